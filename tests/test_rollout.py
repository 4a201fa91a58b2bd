"""Batched KV-cache rollouts: group-major layout, EOS handling, determinism, suppression, greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from dapo_ops.models.inputs import PromptBatch, encode_prompts, select_pixel_values
from dapo_ops.models.loading import Policy
from dapo_ops.rollout.generate import (
    RolloutBatch,
    from_per_prompt_state,
    generate_rollouts,
    per_prompt_state,
    sample_tokens,
)
from dapo_ops.run.round_files import load_rollout_batch, save_rollout_batch
from dapo_ops.store.layout import RunStore

COLORS = ["red", "green", "blue", "yellow"]
P, G, MAX_LEN = 3, 4, 8


@pytest.fixture(scope="module")
def policy(embedded_policy) -> Policy:
    return embedded_policy


@pytest.fixture(scope="module")
def prompts(policy: Policy) -> PromptBatch:
    # Different question lengths (left padding) and image sizes (grids of 16 and 8 patches).
    images = [
        Image.new("RGB", (56, 56), (255, 0, 0)),
        Image.new("RGB", (120, 60), (0, 255, 0)),
        Image.new("RGB", (56, 56), (0, 0, 255)),
    ]
    questions = ["What color is the shape?", "Which shape is it? Look very closely at it.", "What color?"]
    return encode_prompts(policy, questions, [COLORS] * P, images)


@contextmanager
def logit_bias(policy: Policy, bias: dict[int, float]) -> Iterator[None]:
    """Add fixed amounts to some logits (e.g. make EOS likely) while the context is open."""
    offset = torch.zeros(policy.model.config.text_config.vocab_size)
    for token_id, value in bias.items():
        offset[token_id] = value
    handle = policy.model.lm_head.register_forward_hook(lambda module, args, output: output + offset)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def rollouts(policy: Policy, prompts: PromptBatch) -> RolloutBatch:
    with logit_bias(policy, {policy.eos_token_id: 3.0}):
        return generate_rollouts(policy, prompts, num_generations=G, max_completion_length=MAX_LEN, seed=0)


def test_rollouts_are_group_major_with_p_times_g_rows(prompts: PromptBatch, rollouts: RolloutBatch) -> None:
    n = P * G
    assert len(rollouts) == n and len(rollouts.completions) == n
    assert rollouts.num_generations == G
    assert rollouts.prompt_index.tolist() == [i // G for i in range(n)]
    for i in range(n):
        assert torch.equal(rollouts.prompt_ids[i], prompts.input_ids[i // G])
        assert torch.equal(rollouts.image_grid_thw[i], prompts.image_grid_thw[i // G])
    assert rollouts.pixel_values.shape[0] == G * (16 + 8 + 16)
    assert (
        rollouts.completion_ids.shape
        == rollouts.completion_mask.shape
        == (n, rollouts.completion_ids.shape[1])
    )


def test_completions_stop_at_eos_and_the_mask_covers_it(policy: Policy, rollouts: RolloutBatch) -> None:
    eos, pad = policy.eos_token_id, policy.pad_token_id
    assert 0 < int(rollouts.is_eos.sum()) < len(rollouts)  # the bias makes both outcomes occur
    assert rollouts.completion_ids.shape[1] == int(rollouts.completion_lengths.max())
    for ids, mask, length, ended in zip(
        rollouts.completion_ids,
        rollouts.completion_mask,
        rollouts.completion_lengths.tolist(),
        rollouts.is_eos.tolist(),
        strict=True,
    ):
        assert mask.tolist() == [1] * length + [0] * (len(mask) - length)
        assert bool((ids[length:] == pad).all())
        assert int((ids[:length] == eos).sum()) == int(ended)
        if ended:
            assert int(ids[length - 1]) == eos
        else:
            assert length == MAX_LEN


def test_completions_are_decoded_without_special_tokens(policy: Policy, rollouts: RolloutBatch) -> None:
    for ids, length, text in zip(
        rollouts.completion_ids, rollouts.completion_lengths.tolist(), rollouts.completions, strict=True
    ):
        # Whole characters only (issue: a token cut mid-character must not leave a "\ufffd"), else the plain decode.
        plain = policy.tokenizer.decode(ids[:length], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert text == plain or (plain.startswith(text) and plain.endswith("\ufffd"))
        assert "<|im_end|>" not in text


def test_sampling_is_deterministic_per_seed(policy: Policy, prompts: PromptBatch) -> None:
    def run(seed: int) -> torch.Tensor:
        return generate_rollouts(
            policy, prompts, num_generations=G, max_completion_length=MAX_LEN, seed=seed
        ).completion_ids

    first = run(5)
    assert torch.equal(first, run(5))
    assert not torch.equal(first, run(6))


def test_suppressed_tokens_are_never_sampled_even_when_the_model_prefers_them(
    policy: Policy, prompts: PromptBatch
) -> None:
    suppressed = policy.suppressed_token_ids
    with logit_bias(policy, {token_id: 50.0 for token_id in suppressed}):
        batch = generate_rollouts(policy, prompts, num_generations=G, max_completion_length=MAX_LEN, seed=0)
    generated = batch.completion_ids[batch.completion_mask.bool()]
    assert not bool(torch.isin(generated, torch.tensor(suppressed)).any())


def test_greedy_rollouts_are_the_argmax_of_a_full_teacher_forced_forward(
    policy: Policy, prompts: PromptBatch
) -> None:
    """Decoding with the KV cache and its mRoPE positions matches one uncached forward over the
    concatenated prompt + completion (`model_inputs()`), token by token."""
    batch = generate_rollouts(
        policy, prompts, num_generations=2, max_completion_length=MAX_LEN, temperature=0.0
    )
    assert torch.equal(
        batch.completion_ids[0::2], batch.completion_ids[1::2]
    )  # greedy: identical within a group
    width = batch.completion_ids.shape[1]
    with torch.no_grad():
        logits = policy.model(**batch.model_inputs(), logits_to_keep=width + 1).logits[:, :-1]
    expected = sample_tokens(
        logits.reshape(-1, logits.shape[-1]),
        temperature=0.0,
        top_p=1.0,
        generator=None,
        suppressed=torch.tensor(policy.suppressed_token_ids),
    ).view(len(batch), width)
    mask = batch.completion_mask.bool()
    assert torch.equal(batch.completion_ids[mask], expected[mask])


def test_left_padding_does_not_change_a_greedy_completion(policy: Policy, prompts: PromptBatch) -> None:
    together = generate_rollouts(
        policy, prompts, num_generations=1, max_completion_length=MAX_LEN, temperature=0.0
    )
    for i in range(P):
        alone = generate_rollouts(
            policy,
            prompts.select([i]).trim_padding(),
            num_generations=1,
            max_completion_length=MAX_LEN,
            temperature=0.0,
        )
        n = int(together.completion_lengths[i])
        assert torch.equal(
            alone.completion_ids[0, : alone.completion_lengths[0]], together.completion_ids[i, :n]
        )


def test_batch_size_chunks_prompt_groups_without_changing_greedy_results(
    policy: Policy, prompts: PromptBatch
) -> None:
    whole = generate_rollouts(
        policy, prompts, num_generations=G, max_completion_length=MAX_LEN, temperature=0.0
    )
    chunked = generate_rollouts(
        policy, prompts, num_generations=G, max_completion_length=MAX_LEN, temperature=0.0, batch_size=G
    )
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    assert torch.equal(whole.pixel_values, chunked.pixel_values)


def test_concatenated_sequence_and_key_masks(prompts: PromptBatch, rollouts: RolloutBatch) -> None:
    tp, tc = rollouts.prompt_length, rollouts.completion_ids.shape[1]
    assert torch.equal(rollouts.input_ids, torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1))
    assert torch.equal(rollouts.attention_mask[:, tp:], rollouts.completion_mask)
    for mask in (rollouts.vision_mask, rollouts.text_mask, rollouts.mm_token_type_ids.bool()):
        assert mask.shape == (len(rollouts), tp + tc)
        assert not bool(mask[:, tp:].any())
    assert torch.equal(rollouts.vision_mask[:, :tp], prompts.vision_mask.repeat_interleave(G, dim=0))
    assert torch.equal(rollouts.text_mask[:, :tp], prompts.text_mask.repeat_interleave(G, dim=0))


def test_select_keeps_rows_and_their_own_pixel_values(policy: Policy, rollouts: RolloutBatch) -> None:
    picked = rollouts.select([G * 1 + 2, 0])  # a row of prompt 1 (8 patches), then of prompt 0 (16 patches)
    per_row = rollouts.pixel_values.split(rollouts.image_grid_thw.prod(dim=-1).tolist())
    assert torch.equal(picked.pixel_values, torch.cat([per_row[G + 2], per_row[0]]))
    assert picked.prompt_index.tolist() == [1, 0]
    assert picked.completions == [rollouts.completions[G + 2], rollouts.completions[0]]
    # The slice is a consistent model input: the forward accepts it (image tokens match features).
    with torch.no_grad():
        policy.model(**picked.model_inputs())


def test_rollout_batch_round_trips_through_a_file(rollouts: RolloutBatch, tmp_path: Path) -> None:
    store = RunStore(tmp_path, "run")
    save_rollout_batch(store.round("ckpt-0000").rollouts_pt, rollouts)
    loaded = load_rollout_batch(store, "ckpt-0000")
    assert loaded.completions == rollouts.completions and loaded.num_generations == G
    assert torch.equal(loaded.input_ids, rollouts.input_ids)
    assert torch.equal(loaded.pixel_values, rollouts.pixel_values)


def test_per_prompt_state_stores_each_prompts_images_once_and_restores_them_per_rollout(
    rollouts: RolloutBatch,
) -> None:
    state = per_prompt_state(rollouts)
    assert state["vision"]["size"] == len(rollouts) // G
    restored = from_per_prompt_state(state)
    for key, value in rollouts.vision.tensors.items():
        assert torch.equal(restored.vision[key], value), key
    assert torch.equal(restored.prompt_token_inputs["mm_token_type_ids"], rollouts.prompt_token_inputs["mm_token_type_ids"])


def test_a_rollouts_file_of_the_qwen_only_layout_still_loads(rollouts: RolloutBatch) -> None:
    """rollouts.pt written before image inputs were generic: per-prompt patches plus their grids."""
    state = {k: v for k, v in rollouts.state_dict().items() if k not in ("vision", "prompt_token_inputs")}
    first = torch.arange(0, len(rollouts), G)
    state["pixel_values"] = select_pixel_values(rollouts.pixel_values, rollouts.image_grid_thw, first)
    state["image_grid_thw"] = rollouts.image_grid_thw
    state["prompt_image_grid_thw"] = rollouts.image_grid_thw[first]
    state["prompt_rows"] = torch.arange(len(rollouts) // G)
    loaded = from_per_prompt_state(state)
    assert torch.equal(loaded.pixel_values, rollouts.pixel_values)
    assert torch.equal(loaded.image_grid_thw, rollouts.image_grid_thw)
    for key, value in rollouts.model_inputs().items():
        assert torch.equal(loaded.model_inputs()[key], value), key


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(200, 1)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_tokens(logits, temperature=1.0, top_p=0.5, generator=generator)
    assert set(tokens.tolist()) == {0}
    tokens = sample_tokens(logits, temperature=1.0, top_p=0.8, generator=generator)
    assert set(tokens.tolist()) == {0, 1}
