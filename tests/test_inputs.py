"""Prompt encoding: chat template, `<|image_pad|>` expansion as Qwen2_5_VLProcessor does it, key masks."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLProcessor

from dapo_ops.models.inputs import (
    PromptBatch,
    build_messages,
    encode_prompts,
    format_choices,
    key_masks,
    select_pixel_values,
    to_pil,
)
from dapo_ops.models.loading import IMAGE_PAD, TEMPLATE_TOKENS, Policy

COLORS = ["red", "green", "blue", "yellow"]
QUESTIONS = [
    "What color is the shape?",
    "Which shape is it? Look very closely at the picture.",
    "What color?",
]


@pytest.fixture(scope="module")
def policy(embedded_policy) -> Policy:
    return embedded_policy


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # 56x56 -> grid (1, 4, 4) -> 4 tokens; a wide image -> 28x56 after resizing -> grid (1, 2, 4) -> 2 tokens.
    return [
        Image.new("RGB", (56, 56), (255, 0, 0)),
        Image.new("RGB", (120, 60), (0, 255, 0)),
        Image.new("RGB", (56, 56), (0, 0, 255)),
    ]


@pytest.fixture(scope="module")
def batch(policy: Policy, images: list[Image.Image]) -> PromptBatch:
    return encode_prompts(policy, QUESTIONS, [COLORS, COLORS[:2], COLORS], images)


class _ProcessorWithoutVideo(Qwen2_5_VLProcessor):
    """The real Qwen2.5-VL processor; only its class check of the (torchvision-only) video processor is
    skipped, so its own text expansion and tokenization run unchanged."""

    def check_argument_for_proper_class(self, argument_name, argument):  # noqa: ANN001, ANN201
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def test_format_choices_letters_one_choice_per_line() -> None:
    assert format_choices(["red", "green", "blue"]) == "A. red\nB. green\nC. blue"


def test_messages_hold_a_system_prompt_asking_for_think_then_answer_and_an_image_turn() -> None:
    system, user = build_messages("What color?", ["red", "blue"])
    assert system["role"] == "system"
    assert "<think>" in system["content"] and "Answer: X" in system["content"]
    assert user["content"][0] == {"type": "image"}
    assert user["content"][1] == {"type": "text", "text": "What color?\nA. red\nB. blue"}


def test_a_56_pixel_image_is_a_4x4_patch_grid_and_4_image_tokens(policy: Policy) -> None:
    out = policy.image_processor(images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert tuple(out["pixel_values"].shape) == (16, 3 * 2 * 14 * 14)


def test_each_image_pad_expands_to_grid_over_merge_squared_tokens(batch: PromptBatch) -> None:
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 4], [1, 4, 4]]
    assert batch.vision_mask.sum(dim=1).tolist() == [4, 2, 4]
    assert batch.pixel_values.shape[0] == 16 + 8 + 16
    for text in batch.texts:
        assert text.count(IMAGE_PAD) == 1  # texts are stored before expansion


def test_encoding_is_identical_to_the_qwen2_5_vl_processor(
    policy: Policy, images: list[Image.Image], batch: PromptBatch
) -> None:
    processor = _ProcessorWithoutVideo(
        image_processor=policy.image_processor, tokenizer=policy.tokenizer, video_processor=None
    )
    expected = processor(
        images=images, text=batch.texts, padding=True, padding_side="left", return_tensors="pt"
    )
    assert torch.equal(batch.input_ids, expected["input_ids"])
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    assert torch.equal(batch.pixel_values, expected["pixel_values"])
    assert torch.equal(batch.image_grid_thw, expected["image_grid_thw"])
    assert torch.equal(batch.mm_token_type_ids, expected["mm_token_type_ids"].to(torch.int32))


def test_prompts_are_left_padded_and_end_with_the_assistant_header(
    policy: Policy, batch: PromptBatch
) -> None:
    lengths = batch.attention_mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1
    assert bool((batch.attention_mask[:, -1] == 1).all())
    for row, n in zip(batch.input_ids, lengths.tolist(), strict=True):
        assert bool((row[: len(row) - n] == policy.pad_token_id).all())
        tail = policy.tokenizer.decode(row[-3:])
        assert tail == "<|im_start|>assistant\n"


def test_vision_mask_is_exactly_the_image_pad_positions(policy: Policy, batch: PromptBatch) -> None:
    assert torch.equal(batch.vision_mask, batch.input_ids == policy.image_pad_id)


def test_text_mask_excludes_special_template_tokens_and_padding(policy: Policy, batch: PromptBatch) -> None:
    special = torch.tensor(policy.tokenizer.convert_tokens_to_ids(list(TEMPLATE_TOKENS)))
    assert not bool((batch.text_mask & torch.isin(batch.input_ids, special)).any())
    assert not bool((batch.text_mask & (batch.attention_mask == 0)).any())
    assert not bool((batch.text_mask & batch.vision_mask).any())
    # Everything attended that is neither special nor vision is text: the sets partition the prompt.
    rest = (batch.attention_mask == 1) & ~batch.vision_mask & ~torch.isin(batch.input_ids, special)
    assert torch.equal(batch.text_mask, rest)


def test_role_names_and_the_question_count_as_text(policy: Policy, batch: PromptBatch) -> None:
    text_tokens = policy.tokenizer.convert_ids_to_tokens(batch.input_ids[0][batch.text_mask[0]].tolist())
    text = policy.tokenizer.convert_tokens_to_string(text_tokens)
    assert text.count("system") == 1 and "user" in text and "assistant" in text
    assert "What color is the shape?" in text
    assert "<|" not in text


def test_key_masks_recomputes_the_batch_masks(policy: Policy, batch: PromptBatch) -> None:
    vision, text = key_masks(batch.input_ids, batch.attention_mask, policy.tokenizer)
    assert torch.equal(vision, batch.vision_mask) and torch.equal(text, batch.text_mask)


def test_select_slices_pixel_values_per_image(batch: PromptBatch) -> None:
    picked = batch.select([2, 1])
    assert torch.equal(picked.pixel_values, torch.cat([batch.pixel_values[24:40], batch.pixel_values[16:24]]))
    assert picked.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 4]]
    assert torch.equal(picked.input_ids, batch.input_ids[[2, 1]])
    assert torch.equal(
        select_pixel_values(batch.pixel_values, batch.image_grid_thw, torch.tensor([0, 0])),
        torch.cat([batch.pixel_values[:16], batch.pixel_values[:16]]),
    )


def test_trim_padding_drops_only_columns_padded_in_every_row(batch: PromptBatch) -> None:
    short = batch.select([0, 2]).trim_padding()
    assert short.input_ids.shape[1] == int(batch.attention_mask[[0, 2]].sum(dim=1).max())
    assert torch.equal(short.input_ids[:, -5:], batch.input_ids[[0, 2], -5:])


def test_images_may_be_png_bytes_or_hf_structs(policy: Policy) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (0, 0, 255)).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert to_pil(png).getpixel((0, 0)) == (0, 0, 255)
    encoded = encode_prompts(policy, ["What color?"] * 2, [COLORS] * 2, [png, {"bytes": png, "path": None}])
    assert torch.equal(encoded.pixel_values[:16], encoded.pixel_values[16:])


def test_mismatched_lengths_are_refused(policy: Policy, images: list[Image.Image]) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        encode_prompts(policy, QUESTIONS[:2], [COLORS] * 3, images)
