"""Build, save and load policies: the embedded tiny Qwen2.5-VL or any image-text-to-text model directory.

A `Policy` bundles the model with its processor (tokenizer, image processor, chat template). Any family
that transformers loads with `AutoModelForImageTextToText` and `AutoProcessor` works (trust_remote_code
stays off); images always go through the PIL backend of the family's image processor, so pixel values do
not depend on whether torchvision is installed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import logging as hf_logging

from dapo_ops.models.tokens import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_TOKEN_FIELDS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    TEMPLATE_TOKENS,
    THINK_END,
    THINK_START,
    TURN_END_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_SPECIAL_TOKENS,
    VISION_START,
    config_vision_ids,
    image_token_id,
    image_token_ids,
    template_token_ids,
    token_id,
)
from dapo_ops.store.layout import atomic_directory

__all__ = [  # the token names are re-exported: `from dapo_ops.models.loading import IM_END` keeps working
    "IM_END",
    "IM_START",
    "IMAGE_PAD",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TEMPLATE_TOKENS",
    "THINK_END",
    "THINK_START",
    "VIDEO_PAD",
    "VISION_END",
    "VISION_SPECIAL_TOKENS",
    "VISION_START",
    "Policy",
    "build_embedded_policy",
    "build_tokenizer",
    "load_policy",
    "save_policy",
    "tiny_config",
]

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
    """A vision-language policy: model, its processor (tokenizer, image processor, chat template), and the
    directory it came from."""

    model: PreTrainedModel
    processor: Any
    path: Path | None = None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        return int(pad)

    @functools.cached_property
    def eos_token_id(self) -> int:
        """The token that ends an assistant turn (`<|im_end|>`, `<end_of_turn>`, ...), else the tokenizer's
        eos: generation stops there and the warm start appends it."""
        return turn_end_token_id(self.tokenizer)

    @property
    def image_token_id(self) -> int:
        """The id the processor expands into one token per image feature (vision keys)."""
        value = image_token_id(self.model.config)
        if value is None:
            raise ValueError(f"{self.path or type(self.model).__name__}: no image token id in config.json")
        return value

    @property
    def image_pad_id(self) -> int:
        return self.image_token_id

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def image_token_ids(self) -> frozenset[int]:
        """Every token the processor inserts around or for images (`tokens.image_token_ids`: found in a
        processed prompt and declared by the processor, not a list of names), with the config's image ids."""
        ids = image_token_ids(self.processor, self.tokenizer) | config_vision_ids(self.model.config)
        ids.add(self.image_token_id)
        return frozenset(ids)

    @property
    def text_excluded_ids(self) -> list[int]:
        """Ids that are never text keys: special, template, image-boundary and padding tokens."""
        ids = set(template_token_ids(self.tokenizer, self.model.config))
        ids.update(self.image_token_ids)
        ids.add(self.pad_token_id)
        return sorted(ids)

    @property
    def suppressed_token_ids(self) -> list[int]:
        """Ids never sampled: the tokens the processor inserts for images (`image_token_ids`), padding, and
        logit rows with no token behind them; never the end of turn."""
        ids = {self.pad_token_id, *self.image_token_ids}
        ids.discard(self.eos_token_id)
        vocab_rows = int(self.model.config.get_text_config().vocab_size)
        ids.update(range(len(self.tokenizer), vocab_rows))
        return sorted(ids)


def turn_end_token_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in the chat template (`<|im_end|>`, `<end_of_turn>`,
    `<end_of_utterance>`, ...): the first special token after an assistant message; the tokenizer's eos when
    the template shows none."""
    marker = "Zq7"
    special = set(int(i) for i in tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": marker}]},
    ]
    with contextlib.suppress(Exception):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        tail = text[text.rindex(marker) + len(marker) :]
        for value in tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if int(value) in special:
                return int(value)
    for token in TURN_END_TOKENS:
        value = token_id(tokenizer, token)
        if value is not None:
            return value
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a turn-end token nor an eos token")
    return int(tokenizer.eos_token_id)


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = EMBEDDED_VOCAB_SIZE,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    eos_token: str = IM_END,
    pad_token: str = PAD_TOKEN,
    bos_token: str | None = None,
    chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE,
    template_corpus: Sequence[str] = (),
    extra_special_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` with a family's special tokens and chat template.

    Defaults are Qwen's: special tokens get ids 0..6 in `SPECIAL_TOKENS` order. `<think>` and `</think>`
    are added as ordinary (non-special) tokens so they survive `skip_special_tokens` decoding, as in
    Qwen3-style tokenizers. `template_corpus` adds a family's template words (role names, headers);
    `extra_special_tokens` names special tokens as tokenizer attributes (Gemma 3's `boi_token`, ...).
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
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [*_TEMPLATE_CORPUS, *template_corpus, SYSTEM_PROMPT, *corpus]
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token=pad_token,
        bos_token=bos_token,
        additional_special_tokens=[t for t in special_tokens if t not in (pad_token, bos_token)],
        chat_template=chat_template,
        padding_side="left",
        **({"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}),
    )


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


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor, where torchvision (which its class needs) is missing, as
    on the GPU image of scripts/gpu_smoke.py: images only, all the pipeline uses."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def build_embedded_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLProcessor:
    """The real `Qwen2_5_VLProcessor` around `tokenizer`, the PIL image processor and Qwen's chat template
    (`ImageOnlyQwen2_5_VLProcessor` where torchvision is not installed)."""
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except ImportError:  # no torchvision
        return ImageOnlyQwen2_5_VLProcessor(image_processor=build_image_processor(), tokenizer=tokenizer,
                                            video_processor=None, chat_template=tokenizer.chat_template)
    return Qwen2_5_VLProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
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
    return Policy(model=model, processor=build_embedded_processor(tokenizer), path=None)


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
    """Write model and processor (tokenizer, image processor, chat template) into an existing `directory`, plainly
    (inside `store.atomic_directory`, which fsyncs and renames the whole checkpoint once). `weights=False`
    leaves the model out (a LoRA checkpoint writes its adapter instead)."""
    directory = Path(directory)
    if weights:
        with _quiet_progress():
            policy.model.save_pretrained(directory)
    policy.processor.save_pretrained(directory)
    # preprocessor_config.json as well, where released checkpoints keep it (and older readers look).
    policy.image_processor.save_pretrained(directory)
    if policy.tokenizer.chat_template:
        # Where Qwen2.5-VL checkpoints keep it, for processors that read the processor-level file.
        (directory / "chat_template.json").write_text(
            json.dumps({"chat_template": policy.tokenizer.chat_template}, indent=2) + "\n"
        )


def save_policy(policy: Policy, path: str | os.PathLike[str]) -> Path:
    """Write model and processor (tokenizer, image processor, chat template) to `path`, atomically: a reader
    sees either the old directory or the complete new one, never a half-written one."""
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


def _load_processor(path: Path) -> Any:
    """The family's processor with its image processor on the PIL backend.

    The PIL backend gives the same pixel values with or without torchvision (the torchvision backend
    resizes slightly differently), so a checkpoint scores the same everywhere.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise ValueError(
            f"{path}: no processor could be loaded (processor_config.json / preprocessor_config.json and a "
            f"tokenizer): {type(error).__name__}: {error}"
        ) from error
    for part in ("tokenizer", "image_processor"):
        if getattr(processor, part, None) is None:
            raise ValueError(f"{path}: the processor ({type(processor).__name__}) has no {part}")
    if "Pil" not in type(processor.image_processor).__name__:
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor.image_processor = AutoImageProcessor.from_pretrained(
                path, backend="pil", local_files_only=True
            )
    return processor


def _model_class_check(source: Path) -> Any:
    """The config, after checking what the pipeline needs before any weight is read or checkpoint written."""
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{source}/config.json: model_type {model_type!r} is not an image-text-to-text model that "
            "transformers can load (AutoModelForImageTextToText has no class for it; trust_remote_code stays off)"
        )
    # The raw file, not the config object: config classes fill a default id (LLaVA's 32000) that may name
    # any token of this tokenizer.
    raw = json.loads((source / "config.json").read_text())
    holders = [raw, raw.get("text_config") or {}]
    if not any(isinstance(h.get(name), int) for h in holders for name in IMAGE_TOKEN_FIELDS):
        raise ValueError(
            f"{source}: no image token id in config.json (image_token_id or image_token_index): the vision "
            "keys of the attention metrics are the positions of that token"
        )
    return config


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
                f"Use a model whose classes ship with transformers (AutoModelForImageTextToText loads them)."
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
    """Load a policy saved by `save_policy` or any image-text-to-text model directory (nothing is downloaded).

    The model comes from `AutoModelForImageTextToText`, the processor from `AutoProcessor`.
    `device` may be `"auto"`; `torch_dtype` a dtype or its name (`"float32"`, `"bfloat16"`). A directory
    the pipeline cannot train (no image token id, no processor, no chat template) is refused with a
    `ValueError` naming what is missing.
    """
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    source = Path(path).resolve()
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model directory (no config.json)")
    refuse_remote_code(source)
    _model_class_check(source)
    processor = _load_processor(source)
    tokenizer = processor.tokenizer
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template or _read_chat_template(source)
    if not template:
        raise ValueError(f"{source}: no chat template (chat_template.jinja / chat_template.json / tokenizer_config)")
    processor.chat_template = template
    if not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN if PAD_TOKEN in tokenizer.get_vocab() else tokenizer.eos_token
    with _quiet_progress():
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=True
        )
    model.to(resolve_device(device))
    model.eval()
    return Policy(model=model, processor=processor, path=source)
