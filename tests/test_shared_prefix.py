"""The shared-prefix forward (each prompt computed once for its G rollouts) equals the unshared forward.

The batch has what makes sharing hard: prompts of different lengths (left padding), completions of uneven
lengths ending in EOS at different positions and one clipped without EOS, a GQA decoder, mRoPE positions
after an image, and groups split across micro-batches.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_attention import EOS, IMAGE, PAD, TEXT_TOKENS, make_rollouts, tiny_model
from transformers import Qwen2_5_VLForConditionalGeneration

from dapo_ops.attention import shared_prefix
from dapo_ops.attention.teacher_forced import completion_forward, teacher_forced_pass
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models.inputs import VisionInputs
from dapo_ops.rollout.generate import RolloutBatch
from dapo_ops.train.update import make_optimizer, policy_update, rank_micro_batches, step_chunks

G = 4
# (text before image, text after image) per prompt: different lengths, so the shorter ones are left padded.
PROMPTS = [(3, 2), (1, 5), (2, 1)]
# Completion lengths per rollout (group-major); None: clipped at the width without EOS.
LENGTHS = [6, 2, 4, None, 1, 6, 3, 5, 2, 2, 6, 4]
WIDTH = 6


def rollout_batch(seed: int = 0) -> RolloutBatch:
    """A real `RolloutBatch` of len(PROMPTS) groups x G, built from the tiny model's token layout."""
    prompts = make_rollouts([(a, b, 1) for a, b in PROMPTS], seed=seed)
    index = torch.arange(len(PROMPTS)).repeat_interleave(G)  # [N]
    rows = prompts.select(index.tolist())
    g = torch.Generator().manual_seed(seed + 1)
    completion_ids = torch.full((len(LENGTHS), WIDTH), PAD)
    completion_mask = torch.zeros(len(LENGTHS), WIDTH, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        n = WIDTH if length is None else length
        completion_ids[i, :n] = torch.randint(*TEXT_TOKENS, (n,), generator=g)
        completion_mask[i, :n] = 1
        if length is not None:
            completion_ids[i, n - 1] = EOS
    lengths = completion_mask.sum(1)
    return RolloutBatch(
        prompt_ids=rows.prompt_ids,
        prompt_mask=rows.prompt_mask,
        vision=VisionInputs.from_patches(rows.pixel_values, rows.image_grid_thw),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        completion_lengths=lengths,
        is_eos=torch.tensor([n is not None for n in LENGTHS]),
        completions=[""] * len(LENGTHS),
        prompt_index=index,
        num_generations=G,
        prompt_vision_mask=rows.prompt_vision_mask,
        prompt_text_mask=rows.prompt_text_mask,
        prompt_token_inputs={"mm_token_type_ids": rows.prompt_vision_mask.long()},
    )


@pytest.fixture(scope="module")
def model() -> Qwen2_5_VLForConditionalGeneration:
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def batch() -> RolloutBatch:
    return rollout_batch()


def test_the_batch_exercises_left_padding_uneven_lengths_eos_and_gqa(model, batch: RolloutBatch):
    assert len({int(m.sum()) for m in batch.prompt_mask[:: G]}) == len(PROMPTS)  # different prompt lengths
    assert (batch.prompt_mask[:, 0] == 0).any()
    assert len(set(batch.completion_lengths.tolist())) > 3 and not bool(batch.is_eos.all())
    assert (batch.input_ids == IMAGE).any()
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads


def test_rows_of_one_prompt_form_one_group(batch: RolloutBatch):
    groups = shared_prefix.prefix_groups(batch)
    assert groups.unique.tolist() == [0, G, 2 * G]
    assert groups.owner.tolist() == torch.arange(len(PROMPTS)).repeat_interleave(G).tolist()


def test_without_prompt_index_rows_group_by_prompt_tokens_and_image():
    prompts = make_rollouts([(2, 2, 3), (2, 2, 3)], seed=5)
    prompts.prompt_ids[1] = prompts.prompt_ids[0]  # same tokens, different image: not one prompt
    prompts.prompt_mask[1] = prompts.prompt_mask[0]
    rows = prompts.select([0, 1, 0, 1])
    assert shared_prefix.prefix_groups(rows).owner.tolist() == [0, 1, 0, 1]


def test_teacher_forced_pass_shared_equals_unshared(model, batch: RolloutBatch):
    shared = teacher_forced_pass(model, batch, shared_prefix=True)
    unshared = teacher_forced_pass(model, batch, shared_prefix=False)
    mask = batch.completion_mask.bool()
    assert torch.allclose(shared.per_token_logps[mask], unshared.per_token_logps[mask], rtol=0, atol=1e-5)
    assert torch.allclose(shared.entropy[mask], unshared.entropy[mask], rtol=0, atol=1e-5)
    # Padded completion positions get the unshared forward's positions as well (mRoPE: 0).
    assert torch.allclose(shared.per_token_logps, unshared.per_token_logps, rtol=0, atol=1e-5)
    assert shared.vision_mass is not None and unshared.vision_mass is not None
    assert torch.allclose(shared.vision_mass, unshared.vision_mass, rtol=0, atol=1e-6)
    assert torch.allclose(shared.text_mass, unshared.text_mass, rtol=0, atol=1e-6)
    assert shared.vision_mass.isfinite().all()


def test_a_micro_batch_that_splits_groups_still_equals_unshared(model, batch: RolloutBatch):
    shared = teacher_forced_pass(model, batch, shared_prefix=True, batch_size=5)
    unshared = teacher_forced_pass(model, batch, shared_prefix=False)
    assert torch.allclose(shared.per_token_logps, unshared.per_token_logps, rtol=0, atol=1e-5)
    assert torch.allclose(shared.vision_mass, unshared.vision_mass, rtol=0, atol=1e-6)


def test_gradients_of_all_completions_flow_into_the_shared_prompt(model, batch: RolloutBatch):
    grads = []
    for shared in (True, False):
        trained = copy.deepcopy(model).train()
        logps, _ = completion_forward(trained, batch, shared_prefix=shared)
        (logps * batch.completion_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None})
    shared_grads, unshared_grads = grads
    assert shared_grads.keys() == unshared_grads.keys()
    assert any(name.startswith("model.visual") for name in shared_grads)  # through the vision tower too
    for name, grad in unshared_grads.items():
        scale = float(grad.abs().max()) + 1e-12
        assert float((shared_grads[name] - grad).abs().max()) <= 1e-5 * scale + 1e-7, name


def _one_step(model, batch: RolloutBatch, *, shared: bool) -> dict[str, torch.Tensor]:
    config = DapoConfig(prompts_per_round=len(PROMPTS), num_generations=G, steps_per_generation=1,
                        num_iterations=1, gradient_accumulation_steps=2, learning_rate=1e-3, shared_prefix=shared)
    trained = copy.deepcopy(model)
    optimizer = make_optimizer(trained, config)
    with torch.no_grad():
        old = completion_forward(trained, batch, shared_prefix=False)[0] + 0.1
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * len(PROMPTS))
    keep = torch.ones(len(batch), dtype=torch.bool)
    result = policy_update(trained, optimizer, batch, old, advantages, keep, config, global_step=0, seed=0)
    assert result.global_step == 1
    return {n: p.detach().clone() for n, p in trained.named_parameters()}


def test_one_optimizer_step_gives_the_same_weights_shared_or_not(model, batch: RolloutBatch):
    before = {n: p.detach() for n, p in model.named_parameters()}
    shared, unshared = _one_step(model, batch, shared=True), _one_step(model, batch, shared=False)
    assert max(float((unshared[n] - before[n]).abs().max()) for n in before) > 1e-4  # the weights moved
    total = sum(float((shared[n] - unshared[n]).square().sum()) for n in unshared) ** 0.5
    assert total <= 1e-5 * sum(float(w.square().sum()) for w in unshared.values()) ** 0.5
    for name, weights in unshared.items():
        if name.endswith("k_proj.bias"):
            # Its exact gradient is 0 (a key bias shifts every score of a query alike; softmax ignores it), so
            # AdamW's first step is lr x the sign of rounding noise in either path: nothing to compare.
            continue
        assert float((shared[name] - weights).norm()) <= 1e-5 * float(weights.norm()), name


def test_steps_and_micro_batches_take_whole_groups():
    config = DapoConfig(prompts_per_round=6, num_generations=4, steps_per_generation=2)
    group_ids = torch.arange(6).repeat_interleave(4)  # [24]
    kept = torch.tensor([i for i in range(24) if i // 4 != 2])  # group 2 dropped (dynamic sampling)
    chunks = step_chunks(kept, config, generator=torch.Generator().manual_seed(0), group_ids=group_ids)
    assert sorted(torch.cat(chunks).tolist()) == kept.tolist()
    owners = [set(group_ids[c].tolist()) for c in chunks]
    assert sum(len(o) for o in owners) == 5  # no group is in two steps
    for chunk in chunks:
        for rank in range(2):
            for piece in rank_micro_batches(chunk, 1, world_size=2, rank=rank, group_ids=group_ids):
                assert all((group_ids[kept] == g).sum() == (group_ids[piece] == g).sum()
                           for g in group_ids[piece].unique().tolist())


def test_fewer_groups_than_pieces_splits_groups_and_keeps_every_rollout():
    group_ids = torch.zeros(8, dtype=torch.long)
    pieces = rank_micro_batches(torch.arange(8), 4, group_ids=group_ids)
    assert [len(p) for p in pieces] == [2, 2, 2, 2]
    config = DapoConfig(prompts_per_round=1, num_generations=8, steps_per_generation=2)
    chunks = step_chunks(torch.arange(8), config, generator=torch.Generator().manual_seed(0), group_ids=group_ids)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_sliding_window_decoder_falls_back_to_the_unshared_forward(caplog: pytest.LogCaptureFixture):
    config = copy.deepcopy(tiny_model(seed=1).config)
    text = config.text_config
    text.use_sliding_window, text.sliding_window = True, 4
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    sliding = Qwen2_5_VLForConditionalGeneration(config).eval()
    batch = rollout_batch(seed=2)
    with caplog.at_level(logging.WARNING, logger="dapo_ops.attention.shared_prefix"):
        shared = teacher_forced_pass(sliding, batch, shared_prefix=True)
    assert "cannot share prompts" in caplog.text and "sliding-window" in caplog.text
    unshared = teacher_forced_pass(sliding, batch, shared_prefix=False)
    assert torch.equal(shared.per_token_logps, unshared.per_token_logps)


def test_gradient_checkpointing_takes_the_unshared_forward_only_while_it_is_on(model, batch: RolloutBatch,
                                                                               monkeypatch, caplog):
    # transformers drops the KV cache inside checkpointed layers: the checkpointed update must take the
    # unshared forward, and the model class must not be marked unable to share for later no-grad passes.
    monkeypatch.setattr(shared_prefix, "_UNSUPPORTED", {})
    monkeypatch.setattr(shared_prefix, "_CHECKPOINTING_LOGGED", set())
    trained = copy.deepcopy(model).train()
    trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls: list[bool] = []
    real = shared_prefix._shared_forward
    monkeypatch.setattr(shared_prefix, "_shared_forward", lambda *a, **k: calls.append(True) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="dapo_ops.attention.shared_prefix"):
        logps, _ = completion_forward(trained, batch, shared_prefix=True)
    (logps * batch.completion_mask).sum().backward()
    assert calls == [] and "gradient checkpointing is on" in caplog.text
    assert shared_prefix._UNSUPPORTED == {}
    trained.gradient_checkpointing_disable()
    teacher_forced_pass(trained.eval(), batch, shared_prefix=True)
    assert calls == [True]
