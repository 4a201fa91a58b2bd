"""The masked pass (`dapo_ops.attention.visual`): images degraded in the processed space, seeded per prompt, the per-token
KL to the masked input inside the teacher-forced pass, the answer's tokens and the per-rollout values."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_shared_prefix import G, rollout_batch, tiny_model

from dapo_ops.attention import visual
from dapo_ops.attention.teacher_forced import VisualMasking, teacher_forced_pass
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models.inputs import VisionInputs

PATCH_DIM = 12  # 3 channels x 4 values per patch row, small enough to read


def qwen_layout(patches: list[int], seed: int = 0) -> VisionInputs:
    """One image per item, each `patches[i]` rows of nonzero values, with Qwen's grid (1, rows, 1)."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(sum(patches), PATCH_DIM, generator=g) + 0.5
    grid = torch.tensor([[1, n, 1] for n in patches])
    return VisionInputs.from_patches(pixel_values, grid)


def test_blank_sets_every_pixel_to_the_mean_pixel_and_keeps_the_grid() -> None:
    vision = qwen_layout([4, 6])
    blank = visual.degrade_vision(vision, [1, 2], mode="blank")
    assert torch.equal(blank["pixel_values"], torch.zeros_like(vision["pixel_values"]) + 1e-6)  # see the next test
    assert torch.equal(blank["image_grid_thw"], vision["image_grid_thw"])
    assert torch.equal(vision["pixel_values"], qwen_layout([4, 6])["pixel_values"])  # the input is untouched


def test_an_image_degraded_to_all_zero_keeps_a_tiny_value_so_idefics3_does_not_drop_it_as_padding() -> None:
    planes = torch.ones(1, 2, 3, 4, 4)  # one item: two images [C, H, W], the second batch padding (all zero)
    planes[0, 1] = 0
    vision = VisionInputs({"pixel_values": planes}, {"pixel_values": torch.tensor([1])}, 1)
    blank = visual.degrade_vision(vision, [0], mode="blank")["pixel_values"]
    assert torch.equal(blank[0, 0], torch.full((3, 4, 4), 1e-6))
    assert torch.equal(blank[0, 1], torch.zeros(3, 4, 4))  # padding stays padding


def test_patch_masks_the_ratio_of_each_images_patch_rows_with_the_prompts_seed() -> None:
    vision = qwen_layout([10, 10, 5])
    masked = visual.degrade_vision(vision, [7, 7, 8], mode="patch", ratio=0.6)["pixel_values"]
    rows = torch.split(masked, [10, 10, 5])
    zeroed = [(r == 0).all(-1) for r in rows]
    assert [int(z.sum()) for z in zeroed] == [6, 6, 3]  # round(0.6 n) patches each
    assert torch.equal(zeroed[0], zeroed[1])  # the same seed (one prompt): the same patches
    kept = ~zeroed[0]
    assert torch.equal(rows[0][kept], vision["pixel_values"][:10][kept])  # the rest is the real image
    again = visual.degrade_vision(vision, [7, 7, 8], mode="patch", ratio=0.6)["pixel_values"]
    assert torch.equal(masked, again)  # re-analysis draws the same masks
    other = visual.degrade_vision(vision, [9, 9, 8], mode="patch", ratio=0.6)["pixel_values"]
    assert not torch.equal(masked[:10], other[:10])


def test_patch_masks_squares_of_the_patch_size_on_channel_planes() -> None:
    planes = torch.ones(1, 3, 8, 8)  # LLaVA / Gemma 3 layout: one [C, H, W] image per item
    vision = VisionInputs({"pixel_values": planes}, {"pixel_values": torch.tensor([1])}, 1)
    masked = visual.degrade_vision(vision, [3], mode="patch", ratio=0.5, patch_size=4)["pixel_values"][0]
    cells = masked.reshape(3, 2, 4, 2, 4).permute(1, 3, 0, 2, 4).reshape(4, -1)  # the 2x2 grid of 4x4 squares
    zero = (cells == 0).all(-1)
    assert int(zero.sum()) == 2 and bool(((cells == 1).all(-1) | zero).all())  # whole squares, all channels


def test_noise_replaces_the_image_with_standard_normal_values() -> None:
    vision = qwen_layout([400])
    noise = visual.degrade_vision(vision, [5], mode="noise")["pixel_values"]
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1.0) < 0.05
    assert torch.equal(noise, visual.degrade_vision(vision, [5], mode="noise")["pixel_values"])


def test_degrading_draws_nothing_from_the_global_random_stream() -> None:
    vision = qwen_layout([10, 10])
    state = torch.random.get_rng_state()
    for mode in visual.VISUAL_MASKS:
        visual.degrade_vision(vision, [1, 2], mode=mode)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_an_unknown_mask_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="visual_mask='blur' is unknown"):
        visual.degrade_vision(qwen_layout([2]), [0], mode="blur")
    with pytest.raises(ValueError, match="visual_mask='blur' is unknown; use one of blank, patch, noise"):
        DapoConfig(visual_mask="blur")


def test_token_kl_is_the_kl_of_the_temperature_scaled_distributions() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    masked = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    kl = visual.token_kl(logits, masked, temperature=2.0)
    p, q = torch.softmax(logits[0, 0] / 2, -1), torch.softmax(masked[0, 0] / 2, -1)
    expected = float((p * (p / q).log()).sum())
    assert kl.shape == (1, 2)
    assert float(kl[0, 0]) == pytest.approx(expected, rel=1e-6) and float(kl[0, 1]) == 0.0


class PieceTokenizer:
    """Token id i decodes to PIECES[i]: enough to place the answer after `</think>`."""

    PIECES = ["<think>", "The", " shape", " is", " red", ".", "</", "think>", " Answer", ":", " A", "<|im_end|>"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.PIECES[i] for i in ids)


def test_the_answer_is_the_tokens_after_the_last_think_end_else_the_whole_completion() -> None:
    ids = torch.tensor([list(range(12)), [1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0]])
    mask = visual.answer_token_mask(PieceTokenizer(), ids, [12, 5])
    assert mask[0].tolist() == [False] * 8 + [True] * 4  # " Answer", ":", " A", "<|im_end|>"
    assert mask[1].tolist() == [True] * 5 + [False] * 7  # no `</think>`: the whole completion


def test_per_rollout_values_are_means_over_completion_and_answer_tokens() -> None:
    kl = torch.tensor([[0.0, 0.02, 0.5, 9.0], [0.001, 0.3, 0.0, 0.0]])
    completion = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    answer = torch.tensor([[False, False, True, True], [False, False, False, False]])
    values = visual.rollout_visual_metrics(kl, completion, answer, threshold=0.01)
    assert values["visual/kl_mean"] == pytest.approx([0.52 / 3, 0.301 / 2])
    assert values["visual/kl_answer"][0] == pytest.approx(0.5)  # padding (9.0) left out
    assert math.isnan(values["visual/kl_answer"][1])
    assert values["visual/dependent_token_ratio"] == pytest.approx([2 / 3, 1 / 2])


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def test_the_masked_pass_shares_prompts_and_equals_the_unshared_one(model) -> None:
    batch = rollout_batch()
    masking = VisualMasking("patch", 0.5, seed=11)
    state = torch.random.get_rng_state()
    shared = teacher_forced_pass(model, batch, shared_prefix=True, visual_masking=masking, batch_size=2 * G)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training run's random stream is untouched
    unshared = teacher_forced_pass(model, batch, shared_prefix=False, visual_masking=masking)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(shared.visual_kl[mask], unshared.visual_kl[mask], atol=1e-5, rtol=1e-4)
    assert bool((shared.visual_kl[mask] >= 0).all()) and float(shared.visual_kl[mask].max()) > 0
    plain = teacher_forced_pass(model, batch, shared_prefix=True)
    assert plain.visual_kl is None
    assert torch.equal(plain.per_token_logps, teacher_forced_pass(model, batch, visual_masking=masking).per_token_logps)


def test_an_image_the_mask_leaves_whole_gives_zero_kl(model) -> None:
    batch = rollout_batch()  # 16 patch rows per image: round(0.01 * 16) = 0 masked
    kl = teacher_forced_pass(model, batch, visual_masking=VisualMasking("patch", 0.01, seed=0)).visual_kl
    assert float(kl[batch.completion_mask.bool()].abs().max()) < 1e-6


def test_the_rows_of_one_prompt_get_the_same_masks() -> None:
    batch = rollout_batch()
    masked = visual.degraded_batch(batch, mode="patch", ratio=0.5, seed=4)
    rows = torch.split(masked.vision["pixel_values"], masked.vision.counts["pixel_values"].tolist())
    assert all(torch.equal(rows[i], rows[(i // G) * G]) for i in range(len(rows)))
    assert not torch.equal(rows[0], rows[G])
    assert dataclasses.replace(batch).vision is batch.vision  # degraded_batch copied, never edited in place
