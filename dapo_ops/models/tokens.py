"""Token names, the system prompt, and which tokens of a family are never text keys or sampled.

Shared by `models` (which builds tokenizers and policies) and `inputs` (which encodes prompts) so that
neither imports the other.
"""

from __future__ import annotations

import re
import string
from typing import Any

# Short on purpose: every prompt token is paid for in each rollout, teacher-forced pass and update.
SYSTEM_PROMPT = "Think inside <think></think>, then reply Answer: X with the letter of the correct choice."
# Free-form questions (a number, a formula, a word): the same format, the final answer in place of a letter.
FREE_FORM_SYSTEM_PROMPT = "Think inside <think></think>, then reply Answer: followed by the final answer."
LETTERS = string.ascii_uppercase

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
THINK_START = "<think>"
THINK_END = "</think>"

# Order fixes the ids 0..6 of the embedded tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)
# Tokens that are never "text keys" (docs/metrics.md) and never sampled (except EOS).
TEMPLATE_TOKENS: tuple[str, ...] = SPECIAL_TOKENS
VISION_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)

# Tokens that frame or stand for an image in the families transformers ships (Qwen2/2.5/3-VL, Idefics3 and
# SmolVLM, Gemma 3, LLaVA, ...): neither vision keys (they carry no image feature) nor text keys.
IMAGE_BOUNDARY_TOKENS: tuple[str, ...] = (
    VISION_START,
    VISION_END,
    VIDEO_PAD,
    "<fake_token_around_image>",
    "<global-img>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<image>",
    "<|image|>",
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<image_sep>",
    "<|image_start|>",
    "<|image_end|>",
)
# Idefics3 / SmolVLM tile markers (`<row_1_col_2>`) for split images.
TILE_MARKER = re.compile(r"^<row_\d+_col_\d+>$")
# Config fields naming image-related token ids (image, video, boundaries), across families.
IMAGE_TOKEN_FIELDS: tuple[str, ...] = ("image_token_id", "image_token_index")
VISION_ID_FIELDS: tuple[str, ...] = (
    *IMAGE_TOKEN_FIELDS,
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "boi_token_index",
    "eoi_token_index",
    "boi_token_id",
    "eoi_token_id",
)
# Ends of an assistant turn, where the family's template has one (else the tokenizer's eos).
TURN_END_TOKENS: tuple[str, ...] = (IM_END, "<end_of_turn>", "<end_of_utterance>", "<|eot_id|>", "<|im_end|>")


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` when the vocabulary has it (convert_tokens_to_ids maps unknowns to unk or None)."""
    value = tokenizer.get_vocab().get(token)
    return None if value is None else int(value)


def image_token_id(config: Any) -> int | None:
    """The id of the token the processor expands into image features (`image_token_id` or
    `image_token_index`, on the config or its text config); None when the config names none."""
    for holder in (config, getattr(config, "text_config", None)):
        for name in IMAGE_TOKEN_FIELDS:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int):
                return value
    return None


def config_vision_ids(config: Any) -> set[int]:
    """Every image/video/boundary token id the config names."""
    ids: set[int] = set()
    for name in VISION_ID_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def boundary_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the image boundary tokens and tile markers among this tokenizer's added tokens (a BPE merge
    that happens to spell `<image>` is ordinary text)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {
        int(i)
        for i, token in added.items()
        if str(token) in IMAGE_BOUNDARY_TOKENS or TILE_MARKER.match(str(token))
    }


# Attribute names under which a processor or tokenizer declares its image tokens (`image_token`, `boi_token`,
# `start_image_token`, `fake_image_token_id`, `global_image_tag`, `vision_end_token`, `video_token`, ...).
_IMAGE_ATTRIBUTE = re.compile(r"(image|img|video|vision|boi|eoi).*_(token|token_id|token_ids|tag)$")


def declared_image_token_ids(processor: Any, tokenizer: Any) -> set[int]:
    """Ids of the image/video tokens the processor and its tokenizer declare (`_IMAGE_ATTRIBUTE` names:
    the image token, begin/end-of-image tokens, video tokens, ...)."""
    vocab = tokenizer.get_vocab()
    named = {k: v for k, v in vars(processor).items() if _IMAGE_ATTRIBUTE.search(k)}
    named.update({k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
                  if _IMAGE_ATTRIBUTE.search(k)})
    ids: set[int] = set()
    for value in named.values():
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, bool):
                continue
            if isinstance(item, int):
                ids.add(item)
            elif isinstance(item, str) and item in vocab:
                ids.add(int(vocab[item]))
    return ids


def _render(processor: Any, tokenizer: Any, content: list[dict]) -> str:
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def inserted_image_token_ids(processor: Any, tokenizer: Any) -> set[int]:
    """Ids of the special and added tokens the processor puts into a prompt because it holds an image
    (`<|vision_start|>`, `<img>`, `<start_of_image>`, `<fake_token_around_image>`, the image tokens, ...): a
    one-image prompt as the processor encodes it, minus the same prompt without the image as the tokenizer
    encodes it. Ordinary text the processor adds (PaliGemma's "\n", Gemma 3's blank lines) is not among them."""
    from PIL import Image

    text = [{"type": "text", "text": "Zq7"}]
    with_image = _render(processor, tokenizer, [{"type": "image"}, *text])
    encoded = processor(images=[[Image.new("RGB", (64, 64), (128, 64, 32))]], text=[with_image])
    text_only = tokenizer(_render(processor, tokenizer, text))["input_ids"]
    added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    added.update(int(i) for i in tokenizer.all_special_ids)
    return (set(map(int, encoded["input_ids"][0])) - set(map(int, text_only))) & added


def image_token_ids(processor: Any, tokenizer: Any) -> set[int]:
    """Every token a family's processor inserts around or for images: those `inserted_image_token_ids` finds
    in a processed prompt, and those the processor and tokenizer declare (the video tokens a still image
    never shows)."""
    return inserted_image_token_ids(processor, tokenizer) | declared_image_token_ids(processor, tokenizer)


def template_token_ids(tokenizer: Any, config: Any | None = None) -> list[int]:
    """Ids that are never text keys: special tokens (named or added as special), template tokens, image
    boundaries and tile markers, image token ids of `config`, and padding."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in TEMPLATE_TOKENS if token in vocab}
    ids.update(int(i) for i in tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    ids.update(boundary_token_ids(tokenizer))
    if config is not None:
        ids.update(config_vision_ids(config))
    if tokenizer.pad_token_id is not None:
        ids.add(int(tokenizer.pad_token_id))
    return sorted(ids)
