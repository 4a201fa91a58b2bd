"""Build, save and load policies: the embedded tiny Qwen2.5-VL or a real Qwen2.5-VL model directory.

A `Policy` bundles the model with its tokenizer and image processor. Everything here works without
torchvision: images go through transformers' PIL Qwen2-VL image processor.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import logging as hf_logging

from dapo_ops.store import atomic_directory

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
# Tokens that are never "text keys" (METRICS.md) and never sampled (except EOS).
TEMPLATE_TOKENS: tuple[str, ...] = SPECIAL_TOKENS
VISION_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)

# Qwen2's pre-tokenizer split (tokenization_qwen2.py), so the embedded tokenizer behaves like the real one.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template of Qwen2.5-VL-Instruct (chat_template.json of the released checkpoints).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Config fields that name token ids, and the token each one must be.
_TOKEN_ROLES: tuple[tuple[str, str], ...] = (
    ("pad", PAD_TOKEN),
    ("eos", IM_END),
    ("image", IMAGE_PAD),
    ("video", VIDEO_PAD),
    ("vision_start", VISION_START),
    ("vision_end", VISION_END),
)

# 56x56 images -> 4x4 patches of 14 px -> 2x2 = 4 merged image tokens. min = max pins every image to ~56x56.
EMBEDDED_IMAGE_PIXELS = 56 * 56
EMBEDDED_VOCAB_SIZE = 512

# Strings the embedded tokenizer must encode compactly whatever the data corpus holds.
_TEMPLATE_CORPUS: tuple[str, ...] = (
    "system",
    "user",
    "assistant",
    "You are a helpful assistant.",
    "Answer: A",
    "Answer: B",
    "Answer: C",
    "Answer: D",
    "Answer: E",
    "A. B. C. D. E.",
)


@dataclass
class Policy:
    """A vision-language policy: model, tokenizer, image processor, and the directory it came from."""

    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    image_processor: Any
    path: Path | None = None

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        return int(pad)

    @property
    def eos_token_id(self) -> int:
        """`<|im_end|>`, the end of an assistant turn (also where the tokenizer's eos differs)."""
        im_end = _token_id(self.tokenizer, IM_END)
        return im_end if im_end is not None else int(self.tokenizer.eos_token_id)

    @property
    def image_pad_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.text_config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def suppressed_token_ids(self) -> list[int]:
        """Ids never sampled: vision specials, padding, and logit rows with no token behind them."""
        ids = {self.pad_token_id}
        for token in VISION_SPECIAL_TOKENS:
            token_id = _token_id(self.tokenizer, token)
            if token_id is not None:
                ids.add(token_id)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self.model.config, name, None)
            if value is not None:
                ids.add(int(value))
        ids.discard(self.eos_token_id)
        vocab_rows = int(self.model.config.text_config.vocab_size)
        ids.update(range(len(self.tokenizer), vocab_rows))
        return sorted(ids)


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int | None:
    """The id of `token` when the vocabulary has it (convert_tokens_to_ids maps unknowns to unk or None)."""
    token_id = tokenizer.get_vocab().get(token)
    return None if token_id is None else int(token_id)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = EMBEDDED_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` with Qwen's special tokens and chat template.

    Special tokens get ids 0..6 in `SPECIAL_TOKENS` order; `<think>` and `</think>` are added as ordinary
    (non-special) tokens so they survive `skip_special_tokens` decoding, as in Qwen3-style tokenizers.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    from dapo_ops.inputs import SYSTEM_PROMPT  # inputs imports this module

    texts = [*_TEMPLATE_CORPUS, SYSTEM_PROMPT, *corpus]
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        padding_side="left",
    )
    return tokenizer


def build_image_processor(pixels: int = EMBEDDED_IMAGE_PIXELS) -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL image processor with every image resized to about `pixels` pixels."""
    return Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )


def tiny_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 384,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_heads: int = 4,
    vision_intermediate_size: int = 128,
    token_ids: dict[str, int] | None = None,
) -> Qwen2_5_VLConfig:
    """A ~1M-parameter Qwen2.5-VL config (GQA text decoder, 2-block vision tower) for the embedded policy.

    `token_ids` maps `pad`, `eos`, `image`, `video`, `vision_start`, `vision_end` to tokenizer ids; the
    default is the embedded tokenizer's layout (`SPECIAL_TOKENS` order).
    """
    ids = {role: SPECIAL_TOKENS.index(token) for role, token in _TOKEN_ROLES}
    ids.update(token_ids or {})
    # mRoPE splits the head_dim/2 rotary frequencies over (t, h, w) as Qwen's 16/24/24 of 64 does.
    rotary = hidden_size // num_attention_heads // 2
    temporal = rotary // 4
    height = (rotary - temporal) // 2
    mrope_section = [temporal, height, rotary - temporal - height]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        "bos_token_id": ids["pad"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size,
        "num_heads": vision_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden_size,
        # One window covers a 56x56 image; the last block uses full attention as in the real model.
        "window_size": 112,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )


def build_embedded_policy(
    corpus: Iterable[str], seed: int = 0, *, vocab_size: int = EMBEDDED_VOCAB_SIZE, **config_overrides: Any
) -> Policy:
    """The embedded tiny Qwen2.5-VL with a tokenizer trained on `corpus`, randomly initialised from `seed`."""
    tokenizer = build_tokenizer(corpus, vocab_size)
    token_ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in _TOKEN_ROLES}
    config = tiny_config(len(tokenizer), token_ids=token_ids, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = token_ids["eos"]
    model.generation_config.pad_token_id = token_ids["pad"]
    model.generation_config.bos_token_id = None
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, image_processor=build_image_processor(), path=None)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' shard progress bars, which only clutter run logs for a checkpoint of a few MB."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def write_policy(policy: Policy, directory: Path, *, weights: bool = True) -> None:
    """Write model, tokenizer, image processor and chat template into an existing `directory`, plainly
    (inside `store.atomic_directory`, which fsyncs and renames the whole checkpoint once). `weights=False`
    leaves the model out (a LoRA checkpoint writes its adapter instead)."""
    directory = Path(directory)
    if weights:
        with _quiet_progress():
            policy.model.save_pretrained(directory)
    policy.tokenizer.save_pretrained(directory)
    policy.image_processor.save_pretrained(directory)
    if policy.tokenizer.chat_template:
        # Where Qwen2.5-VL checkpoints keep it, for processors that read the processor-level file.
        (directory / "chat_template.json").write_text(
            json.dumps({"chat_template": policy.tokenizer.chat_template}, indent=2) + "\n"
        )


def save_policy(policy: Policy, path: str | os.PathLike[str]) -> Path:
    """Write model, tokenizer, image processor and chat template to `path`, atomically: a reader sees
    either the old directory or the complete new one, never a half-written one."""
    target = Path(path).resolve()
    with atomic_directory(target, marker=None) as tmp:
        write_policy(policy, tmp)
    policy.path = target
    return target


def _read_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = path / "chat_template.json"
    if as_json.is_file():
        template = json.loads(as_json.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _load_processor_parts(path: Path) -> tuple[Any, Any]:
    """(tokenizer, image processor): AutoProcessor when it loads here, else tokenizer + PIL image processor.

    AutoProcessor for Qwen2.5-VL also builds a video processor, which needs torchvision; without it we
    fall back to the PIL image processor, which reads the same preprocessor_config.json.
    """
    try:
        from transformers import AutoProcessor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = AutoProcessor.from_pretrained(path)
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is not None and tokenizer is not None:
            return tokenizer, image_processor
    except Exception:  # noqa: BLE001 - any failure means "use the torchvision-free parts"
        pass
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return tokenizer, image_processor


# The files through which a model directory can ask transformers to import its own Python code.
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                       "video_preprocessor_config.json")


def refuse_remote_code(source: Path) -> None:
    """Model directories load with `trust_remote_code` off: one whose config maps a class to code shipped
    with it (`auto_map`) is refused here, before anything is loaded or written."""
    for name in REMOTE_CODE_CONFIGS:
        path = source / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if isinstance(config, dict) and config.get("auto_map"):
            raise ValueError(
                f"{path} asks for remote code (auto_map: {', '.join(sorted(map(str, config['auto_map'])))}); this project "
                f"loads models with trust_remote_code off and refuses directories that need their own Python code. "
                f"Use a model whose classes ship with transformers (Qwen2.5-VL)."
            )


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | str = torch.float32,
) -> Policy:
    """Load a policy saved by `save_policy` or a real Qwen2.5-VL model directory (nothing is downloaded).

    `device` may be `"auto"`; `torch_dtype` a dtype or its name (`"float32"`, `"bfloat16"`).
    """
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    source = Path(path).resolve()
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model directory (no config.json)")
    refuse_remote_code(source)
    tokenizer, image_processor = _load_processor_parts(source)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _read_chat_template(source) or QWEN2_5_VL_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    with _quiet_progress():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=True
        )
    model.to(resolve_device(device))
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, image_processor=image_processor, path=source)
