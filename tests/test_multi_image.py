"""Several images per prompt through the processor, the shared prefix and the attention metrics, on Qwen2.5-VL
(the embedded family) and two families with other image layouts (Idefics3, Gemma 3); free-form prompts."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from dapo_ops.attention.image_shares import image_token_ids, mean_image_shares, rollout_image_shares
from dapo_ops.attention.teacher_forced import teacher_forced_pass
from dapo_ops.models.inputs import build_messages, encode_prompts
from dapo_ops.models.loading import Policy
from dapo_ops.models.tiny_families import build_tiny_family
from dapo_ops.models.tokens import FREE_FORM_SYSTEM_PROMPT, SYSTEM_PROMPT
from dapo_ops.rollout.generate import generate_rollouts

CORPUS = ["Which image shows more shapes?", "How many shapes?", "red green blue", "<think>two</think> Answer: 2"]
# Image tokens of one 56x56 image per tiny family (test_families.IMAGE_TOKENS).
TOKENS_PER_IMAGE = {"qwen2_5_vl": 4, "idefics3": 4, "gemma3": 4}


@pytest.fixture(scope="module", params=sorted(TOKENS_PER_IMAGE))
def family(request: pytest.FixtureRequest) -> tuple[str, Policy]:
    return request.param, build_tiny_family(request.param, CORPUS, seed=0)


def _images(*colors: tuple[int, int, int]) -> list[Image.Image]:
    return [Image.new("RGB", (56, 56), c) for c in colors]


def _prompts(policy: Policy):
    return encode_prompts(
        policy,
        ["<image> <image> Which image shows more shapes?", "How many shapes?"],
        [None, ["red", "green"]],
        [_images((255, 0, 0), (0, 0, 255)), _images((0, 255, 0))],
    )


def test_every_images_tokens_are_vision_keys(family: tuple[str, Policy]) -> None:
    name, policy = family
    batch = _prompts(policy)
    assert batch.vision_mask.sum(1).tolist() == [2 * TOKENS_PER_IMAGE[name], TOKENS_PER_IMAGE[name]]
    ids = image_token_ids(batch.vision_mask, [2, 1])
    assert (ids[0] == 1).sum() == (ids[0] == 2).sum() == TOKENS_PER_IMAGE[name]
    assert torch.equal(ids[1] > 0, batch.vision_mask[1])


def test_shared_prefix_gives_the_unshared_masses_with_two_images(family: tuple[str, Policy]) -> None:
    _, policy = family
    rollouts = generate_rollouts(policy, _prompts(policy), num_generations=2, max_completion_length=5, seed=0)
    shared = teacher_forced_pass(policy, rollouts, shared_prefix=True)
    plain = teacher_forced_pass(policy, rollouts, shared_prefix=False)
    torch.testing.assert_close(shared.vision_mass, plain.vision_mass, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared.per_token_logps, plain.per_token_logps, rtol=1e-4, atol=1e-4)


def test_each_images_share_of_the_vision_attention_sums_to_one(family: tuple[str, Policy]) -> None:
    _, policy = family
    rollouts = generate_rollouts(policy, _prompts(policy), num_generations=2, max_completion_length=5, seed=0)
    counts = [2 if int(p) == 0 else 1 for p in rollouts.prompt_index.tolist()]
    shares = rollout_image_shares(policy, rollouts, counts)
    for row, count in zip(shares["all"], counts, strict=True):
        assert len(row) == count and all(0 < s <= 1 for s in row)
        assert math.isclose(sum(row), 1.0, rel_tol=1e-4)
    means = mean_image_shares(shares["all"])
    assert list(means) == [2] and math.isclose(sum(means[2]), 1.0, rel_tol=1e-4)


def test_image_marks_place_the_images_and_free_form_prompts_ask_for_a_final_answer() -> None:
    system, user = build_messages("Compare <image> with <image> please.", None, num_images=2)
    assert system["content"] == FREE_FORM_SYSTEM_PROMPT
    assert [p["type"] for p in user["content"]] == ["text", "image", "text", "image", "text"]
    assert user["content"][0]["text"] == "Compare"
    system, user = build_messages("What color?", ["red", "blue"], num_images=2)
    assert system["content"] == SYSTEM_PROMPT
    assert [p["type"] for p in user["content"]] == ["image", "image", "text"]
    assert build_messages("Q?", None, system_prompt="Own.")[0]["content"] == "Own."


def test_a_question_whose_marks_disagree_with_its_images_is_refused() -> None:
    with pytest.raises(ValueError, match="2 <image> mark"):
        build_messages("<image><image>Q?", None, num_images=1)


def test_a_datasets_own_system_prompt_wins(family: tuple[str, Policy]) -> None:
    _, policy = family
    batch = encode_prompts(policy, ["How many shapes?"] * 2, [None, None], _images((1, 2, 3), (4, 5, 6)),
                           system_prompts=["Reply briefly.", None])
    assert "Reply briefly." in batch.texts[0] and "Answer: followed by the final answer" in batch.texts[1]
