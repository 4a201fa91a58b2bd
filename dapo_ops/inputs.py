"""Chat-template prompts -> model inputs (ids, pixel values, image grid) and the vision/text key masks.

Works without torchvision. The `<|image_pad|>` expansion is the one `Qwen2_5_VLProcessor` performs: each
placeholder becomes `prod(image_grid_thw) / merge_size**2` copies, one per merged image token.
"""

from __future__ import annotations

import io
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from PIL import Image

from dapo_ops.models import IMAGE_PAD, TEMPLATE_TOKENS, Policy

# Short on purpose: every prompt token is paid for in each rollout, teacher-forced pass and update.
SYSTEM_PROMPT = "Think inside <think></think>, then reply Answer: X with the letter of the correct choice."
LETTERS = string.ascii_uppercase

ImageLike = Image.Image | bytes | bytearray | Mapping[str, Any]


def format_choices(choices: Sequence[str]) -> str:
    """`A. red\\nB. green\\n...`: one lettered choice per line."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))


def build_messages(question: str, choices: Sequence[str], system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """System prompt plus one user turn holding the image, the question and the lettered choices."""
    return [
        {"role": "system", "content": system_prompt},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": f"{question}\n{format_choices(choices)}"},
            ],
        },
    ]


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, encoded bytes, or an HF image struct {"bytes", "path"}."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            return to_pil(image["bytes"])
        if image.get("path"):
            with Image.open(image["path"]) as opened:
                return opened.convert("RGB")
        raise ValueError("image struct has neither bytes nor path")
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def template_token_ids(tokenizer: Any) -> list[int]:
    """Ids that are never text keys: Qwen's template/vision/padding tokens and every special token."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in TEMPLATE_TOKENS if token in vocab}
    ids.update(int(i) for i in tokenizer.all_special_ids)
    if tokenizer.pad_token_id is not None:
        ids.add(int(tokenizer.pad_token_id))
    return sorted(ids)


def key_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(vision_mask, text_mask), bool [B, T], per METRICS.md token sets.

    vision = `<|image_pad|>` positions; text = attended positions that are neither vision nor
    special/template tokens (role names and newlines count as text); padding is in neither.
    """
    attended = attention_mask.bool()
    image_pad_id = tokenizer.get_vocab()[IMAGE_PAD]
    vision = (input_ids == image_pad_id) & attended
    template = torch.tensor(template_token_ids(tokenizer), dtype=input_ids.dtype, device=input_ids.device)
    text = attended & ~vision & ~torch.isin(input_ids, template)
    return vision, text


def patch_counts(image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Rows of `pixel_values` per image: t * h * w of its grid."""
    return image_grid_thw.prod(dim=-1)


def select_pixel_values(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """The pixel rows of images `indices` (in that order) from patches concatenated image after image."""
    counts = patch_counts(image_grid_thw)
    starts = torch.cumsum(counts, 0) - counts
    idx = indices.to(torch.long).cpu()
    counts_sel, starts_sel = counts.cpu()[idx], starts.cpu()[idx]
    if len(idx) == 0:
        return pixel_values[:0]
    # Row r of the result is starts_sel[k] + (r - offset of k), k the image that row belongs to.
    owner = torch.repeat_interleave(torch.arange(len(idx)), counts_sel)
    offsets = torch.cumsum(counts_sel, 0) - counts_sel
    rows = starts_sel[owner] + torch.arange(int(counts_sel.sum())) - offsets[owner]
    return pixel_values[rows.to(pixel_values.device)]


def vl_model_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """The keyword arguments of a Qwen2.5-VL forward from any batch with these attributes. Passing
    `mm_token_type_ids` matters: without it Qwen2.5-VL falls back to 1D positions that ignore the left
    padding and the image grid."""
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "pixel_values": batch.pixel_values,
        "image_grid_thw": batch.image_grid_thw,
        "mm_token_type_ids": batch.mm_token_type_ids,
    }


@dataclass
class PromptBatch:
    """Left-padded prompts with one image each, ready for Qwen2.5-VL (`model(**batch.model_inputs())`)."""

    input_ids: torch.Tensor  # [B, T] long, left padded
    attention_mask: torch.Tensor  # [B, T] long
    pixel_values: torch.Tensor  # [sum_patches, C*temporal*patch*patch]
    image_grid_thw: torch.Tensor  # [B, 3] long
    vision_mask: torch.Tensor  # [B, T] bool
    text_mask: torch.Tensor  # [B, T] bool
    texts: list[str] = field(default_factory=list)  # the templated prompt strings, before expansion

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def mm_token_type_ids(self) -> torch.Tensor:
        """1 at image tokens, else 0: what Qwen2.5-VL needs to build its 3D (mRoPE) position ids."""
        return self.vision_mask.to(torch.int32)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a Qwen2.5-VL forward (mRoPE positions honour the left padding)."""
        return vl_model_inputs(self)

    def select(self, indices: Sequence[int] | torch.Tensor) -> PromptBatch:
        """Rows `indices` (pixel values sliced per image)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return PromptBatch(
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            pixel_values=select_pixel_values(self.pixel_values, self.image_grid_thw, idx),
            image_grid_thw=self.image_grid_thw[idx],
            vision_mask=self.vision_mask[idx],
            text_mask=self.text_mask[idx],
            texts=[self.texts[i] for i in idx.tolist()] if self.texts else [],
        )

    def trim_padding(self) -> PromptBatch:
        """Drop leading columns that are padding in every row (they cost compute and change nothing)."""
        attended = (self.attention_mask.sum(dim=0) > 0).nonzero()
        first = int(attended[0]) if len(attended) else 0
        if first == 0:
            return self
        return PromptBatch(
            input_ids=self.input_ids[:, first:],
            attention_mask=self.attention_mask[:, first:],
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            vision_mask=self.vision_mask[:, first:],
            text_mask=self.text_mask[:, first:],
            texts=list(self.texts),
        )

    def to(self, device: str | torch.device) -> PromptBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return PromptBatch(**moved, texts=list(self.texts))


def expand_image_tokens(texts: Sequence[str], image_grid_thw: torch.Tensor, merge_size: int) -> list[str]:
    """Replace each `<|image_pad|>` (in order over all texts) by one copy per merged image token."""
    expanded: list[str] = []
    image_idx = 0
    placeholder = "\x00IMAGE\x00"
    for text in texts:
        parts = text.split(IMAGE_PAD)
        out = parts[0]
        for part in parts[1:]:
            if image_idx >= len(image_grid_thw):
                raise ValueError(f"more {IMAGE_PAD} placeholders than images ({len(image_grid_thw)})")
            num_tokens = int(image_grid_thw[image_idx].prod()) // merge_size**2
            out += placeholder * num_tokens + part
            image_idx += 1
        expanded.append(out.replace(placeholder, IMAGE_PAD))
    if image_idx != len(image_grid_thw):
        raise ValueError(
            f"{len(image_grid_thw)} images but {image_idx} {IMAGE_PAD} placeholders in the prompts"
        )
    return expanded


def encode_prompts(
    policy: Policy,
    questions: Sequence[str],
    choices_list: Sequence[Sequence[str]],
    images: Sequence[ImageLike],
    *,
    system_prompt: str = SYSTEM_PROMPT,
) -> PromptBatch:
    """Chat-template, image-process and tokenize (left padded) one prompt per (question, choices, image)."""
    if not len(questions) == len(choices_list) == len(images):
        raise ValueError(
            f"questions ({len(questions)}), choices ({len(choices_list)}) and images ({len(images)}) "
            "differ in length"
        )
    if len(questions) == 0:
        raise ValueError("encode_prompts needs at least one prompt")
    tokenizer = policy.tokenizer
    texts = [
        tokenizer.apply_chat_template(
            build_messages(q, c, system_prompt), tokenize=False, add_generation_prompt=True
        )
        for q, c in zip(questions, choices_list, strict=True)
    ]
    vision = policy.image_processor(images=[to_pil(im) for im in images], return_tensors="pt")
    image_grid_thw = vision["image_grid_thw"].to(torch.long)
    expanded = expand_image_tokens(texts, image_grid_thw, int(policy.image_processor.merge_size))
    encoded = tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")
    input_ids = encoded["input_ids"].to(torch.long)
    attention_mask = encoded["attention_mask"].to(torch.long)
    vision_mask, text_mask = key_masks(input_ids, attention_mask, tokenizer)
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=vision["pixel_values"].to(torch.float32),
        image_grid_thw=image_grid_thw,
        vision_mask=vision_mask,
        text_mask=text_mask,
        texts=texts,
    )

