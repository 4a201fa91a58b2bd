"""The preallocated rollout KV cache: written in place, and the same tokens as the growing cache, on the embedded
policy and every tiny family; the batched sampler draws what one `torch.multinomial` per group drew."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dapo_ops.models.inputs import PromptBatch, encode_prompts, prompt_position_ids
from dapo_ops.models.loading import Policy, build_embedded_policy
from dapo_ops.models.tiny_families import BUILDERS, build_tiny_family
from dapo_ops.rollout import kv_cache
from dapo_ops.rollout.generate import _multinomial, generate_rollouts

COLORS = ["red", "green", "blue", "yellow"]
CORPUS = ["What color is the shape?", "red green blue yellow", "The shape is red.", "<think>blue</think> Answer: C"]
QUESTIONS = ["What color is the shape?", "Which shape is it? Look very closely at the picture.", "What color?"]


def _prompts(policy: Policy, count: int = 3) -> PromptBatch:
    images = [Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (120, 60), (0, 255, 0)),
              Image.new("RGB", (56, 56), (0, 0, 255))][:count]
    return encode_prompts(policy, QUESTIONS[:count], [COLORS] * count, images)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return build_embedded_policy(CORPUS, seed=0)


def _both(policy: Policy, prompts: PromptBatch, **kwargs):
    return {cache: generate_rollouts(policy, prompts, rollout_cache=cache, **kwargs) for cache in ("dynamic", "static")}


def _assert_same_rollouts(pair) -> None:
    dynamic, static = pair["dynamic"], pair["static"]
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    assert torch.equal(dynamic.completion_lengths, static.completion_lengths)
    assert torch.equal(dynamic.is_eos, static.is_eos)


def test_static_cache_samples_the_dynamic_caches_tokens_on_the_embedded_policy(policy: Policy) -> None:
    # EOS made likely so that rows finish at different steps (padding after EOS, the early stop).
    offset = torch.zeros(policy.model.config.text_config.vocab_size)
    offset[policy.eos_token_id] = 2.5
    handle = policy.model.lm_head.register_forward_hook(lambda module, args, output: output + offset)
    try:
        pair = _both(policy, _prompts(policy), num_generations=4, max_completion_length=10, seed=3, top_p=0.9)
    finally:
        handle.remove()
    _assert_same_rollouts(pair)
    lengths = pair["static"].completion_lengths
    assert int(lengths.min()) < int(lengths.max())  # the case covers rows that stop early


def test_static_cache_samples_the_dynamic_caches_tokens_greedily(policy: Policy) -> None:
    _assert_same_rollouts(_both(policy, _prompts(policy), num_generations=1, max_completion_length=6, temperature=0))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_static_cache_samples_the_dynamic_caches_tokens_on_every_family(family: str) -> None:
    # Gemma 3's sliding-window layers (window 40 < prompt + completion) keep their dynamic window.
    policy = build_tiny_family(family, CORPUS, seed=0)
    _assert_same_rollouts(_both(policy, _prompts(policy, 2), num_generations=3, max_completion_length=6, seed=1))


def test_unknown_rollout_cache_is_refused(policy: Policy) -> None:
    with pytest.raises(ValueError, match="rollout_cache='paged'"):
        generate_rollouts(policy, _prompts(policy, 1), num_generations=1, max_completion_length=2,
                          rollout_cache="paged")


def _prefilled(policy: Policy, group: int, extra: int):
    inputs = _prompts(policy, 2).model_inputs()
    positions = prompt_position_ids(policy.model, inputs)
    with torch.no_grad():
        out = policy.model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    prompt_keys = [layer.keys.clone() for layer in cache.layers]
    return kv_cache.preallocate(cache, group=group, extra_tokens=extra), prompt_keys


def test_preallocate_broadcasts_each_prompt_to_its_group_and_writes_in_place(policy: Policy) -> None:
    cache, prompt_keys = _prefilled(policy, group=3, extra=4)
    layer = cache.layers[0]
    assert isinstance(layer, kv_cache.PreallocatedLayer)
    tp = prompt_keys[0].shape[-2]
    assert layer.key_buffer.shape[0] == 6 and layer.capacity == tp + 4 and layer.get_seq_length() == tp
    assert torch.equal(layer.keys, prompt_keys[0].repeat_interleave(3, dim=0))
    pointer = layer.key_buffer.data_ptr()
    new = torch.randn(6, layer.key_buffer.shape[1], 1, layer.key_buffer.shape[-1])
    keys, _ = layer.update(new, new.clone())
    assert keys.data_ptr() == pointer and keys.shape[-2] == tp + 1  # a view of the buffer, not a new tensor
    assert torch.equal(keys[:, :, -1:], new) and layer.get_mask_sizes(1) == (tp + 2, 0)


def test_preallocated_cache_refuses_to_overflow(policy: Policy) -> None:
    cache, _ = _prefilled(policy, group=1, extra=1)
    layer = cache.layers[0]
    step = torch.zeros(2, layer.key_buffer.shape[1], 1, layer.key_buffer.shape[-1])
    layer.update(step, step)
    with pytest.raises(RuntimeError, match="overflows"):
        layer.update(step, step)


def test_fixed_mode_writes_at_the_position_tensor_and_masks_the_rest(policy: Policy) -> None:
    cache, _ = _prefilled(policy, group=1, extra=3)
    tp = cache.layers[0].get_seq_length()
    buffers = kv_cache.DecodeBuffers(torch.ones(2, tp, dtype=torch.long), 3, position=torch.full((1,), tp))
    cache, _ = _prefilled(policy, group=1, extra=3)
    layer = kv_cache.PreallocatedLayer(cache.layers[0].key_buffer, cache.layers[0].value_buffer, tp,
                                       position=buffers.position)
    mask = buffers.mask(0)  # 4D, passed through unchanged by transformers' mask creation
    assert mask.shape == (2, 1, 1, tp + 3) and mask.dtype == torch.bool
    assert mask[..., : tp + 1].all() and not mask[..., tp + 1 :].any()
    new = torch.ones(2, layer.key_buffer.shape[1], 1, layer.key_buffer.shape[-1])
    keys, _ = layer.update(new, new)
    assert keys.shape[-2] == tp + 3 and torch.equal(keys[:, :, tp], new[:, :, 0])
    buffers.advance()
    assert int(buffers.position) == tp + 1 and int(layer.get_seq_length()) == tp + 1
    assert layer.get_mask_sizes(1) == (tp + 3, 0)


def test_decoding_masks_are_views_of_one_buffer_the_prompts_padding_then_ones() -> None:
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    flat = kv_cache.DecodeBuffers(prompt_mask, 4)
    assert flat.mask(1).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    four_d = kv_cache.DecodeBuffers(prompt_mask, 4, four_d=True)
    mask = four_d.mask(0)
    assert mask.shape == (2, 1, 1, 4) and mask.dtype == torch.bool and mask.data_ptr() == four_d.buffer.data_ptr()
    assert mask[:, 0, 0].tolist() == [[False, True, True, True], [True, True, True, True]]


def test_sdpa_models_without_sliding_layers_take_a_ready_4d_mask(policy: Policy) -> None:
    cache, _ = _prefilled(policy, group=1, extra=2)
    assert kv_cache.takes_4d_mask(policy.model, cache)
    gemma = build_tiny_family("gemma3", CORPUS, seed=0)  # sliding-window layers keep their own mask
    inputs = _prompts(gemma, 1).model_inputs()
    with torch.no_grad():
        out = gemma.model(**inputs, use_cache=True, logits_to_keep=1)
    cache = kv_cache.preallocate(out.past_key_values, group=1, extra_tokens=2)
    assert not kv_cache.takes_4d_mask(gemma.model, cache)


def test_batched_draws_equal_one_multinomial_per_group() -> None:
    probs = torch.softmax(torch.randn(12, 50) * 3, dim=-1)
    probs[:, :5] = 0  # suppressed tokens
    reference = [torch.Generator().manual_seed(s) for s in range(3)]
    batched = [torch.Generator().manual_seed(s) for s in range(3)]
    noise = torch.empty_like(probs)
    for _ in range(4):  # consecutive steps keep drawing from the same streams
        expected = torch.cat([torch.multinomial(block, 1, generator=g).squeeze(-1)
                              for block, g in zip(probs.split(4), reference, strict=True)])
        assert torch.equal(_multinomial(probs, batched, noise), expected)


def test_config_offers_the_caches_the_rollouts_know() -> None:
    from dapo_ops.config.dapo import ROLLOUT_CACHES, DapoConfig

    assert ROLLOUT_CACHES == kv_cache.ROLLOUT_CACHES and DapoConfig().rollout_cache == "static"
    with pytest.raises(ValueError, match="rollout_cache='paged' is unknown"):
        DapoConfig(rollout_cache="paged")


@pytest.mark.slow
def test_a_compiled_shape_static_decoder_samples_the_same_tokens_from_one_graph(policy: Policy) -> None:
    import torch._dynamo

    prompts = _prompts(policy, 2)
    reference = generate_rollouts(policy, prompts, num_generations=2, max_completion_length=5, seed=0,
                                  rollout_cache="dynamic")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    decoder = kv_cache.compiled_decoder(policy.model, backend="eager")  # dynamo's capture without a compiler
    for _ in range(2):  # a second generation reuses the captured graph
        compiled = generate_rollouts(policy, prompts, num_generations=2, max_completion_length=5, seed=0,
                                     decoder=decoder)
        assert torch.equal(compiled.completion_ids, reference.completion_ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
