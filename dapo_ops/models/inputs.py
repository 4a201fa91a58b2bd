"""Chat-template prompts -> model inputs (the family's processor outputs) and the vision/text key masks.

The processor of the model's family renders nothing by hand: it expands each image placeholder into the
family's image tokens and returns whatever its forward needs (Qwen: `pixel_values` patch rows,
`image_grid_thw`, `mm_token_type_ids`; Idefics3: `pixel_values` [B, images, C, H, W] and
`pixel_attention_mask`; Gemma 3: `pixel_values` and `token_type_ids`; LLaVA: `pixel_values`). Those outputs
are kept per prompt (`VisionInputs`) so that any subset or repetition of prompts is again a model input.
Which outputs are model inputs (`split_processor_outputs`: never `labels`) and what a per-token input's value is
over generated text (`completion_values`: PaliGemma's causal suffix) are decided in one place each.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from dapo_ops.data.layouts import IMAGE_MARK
from dapo_ops.models.tokens import (
    FREE_FORM_SYSTEM_PROMPT,
    IMAGE_PAD,
    LETTERS,
    SYSTEM_PROMPT,
    template_token_ids,
)

if TYPE_CHECKING:
    from dapo_ops.models.loading import Policy

__all__ = ["LETTERS", "SYSTEM_PROMPT", "PromptBatch", "VisionInputs", "encode_prompts"]

logger = logging.getLogger(__name__)

ImageLike = Image.Image | bytes | bytearray | Mapping[str, Any]


def format_choices(choices: Sequence[str]) -> str:
    """`A. red\\nB. green\\n...`: one lettered choice per line."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))


def default_system_prompt(choices: Sequence[str] | None) -> str:
    """The instruction for the answer kind: a choice letter, or a final answer after `Answer:`."""
    return SYSTEM_PROMPT if choices is not None else FREE_FORM_SYSTEM_PROMPT


def user_content(question: str, choices: Sequence[str] | None, num_images: int = 1) -> list[dict]:
    """The user turn's parts: the images where the question's `<image>` marks put them (no mark: all images
    first), the question's text, and the lettered choices (multiple choice) after it."""
    pieces = question.split(IMAGE_MARK)
    marks = len(pieces) - 1
    if marks not in (0, num_images):
        raise ValueError(f"the question has {marks} {IMAGE_MARK} mark(s) for {num_images} image(s): {question!r}")
    if choices is not None:
        pieces[-1] = f"{pieces[-1]}\n{format_choices(choices)}" if pieces[-1].strip() else format_choices(choices)
    parts: list[dict] = [{"type": "image"} for _ in range(num_images if marks == 0 else 0)]
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image"})
        text = piece.strip() if marks else piece
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def build_messages(question: str, choices: Sequence[str] | None, system_prompt: str | None = None,
                   num_images: int = 1) -> list[dict]:
    """System prompt plus one user turn holding the images, the question and (multiple choice) the lettered
    choices. The system prompt defaults to the answer kind's instruction (`default_system_prompt`)."""
    system = default_system_prompt(choices) if system_prompt is None else system_prompt
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user_content(question, choices, num_images)},
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


def key_masks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Any,
    *,
    image_token_id: int | None = None,
    excluded_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(vision_mask, text_mask), bool [B, T], per the metric's token sets (docs/metrics.md).

    vision = positions of the image token (`image_token_id`; Qwen's `<|image_pad|>` when None); text =
    attended positions that are neither vision nor special/template/boundary tokens (`excluded_ids`, the
    tokenizer's when None; role names and newlines count as text); padding is in neither.
    """
    attended = attention_mask.bool()
    if image_token_id is None:
        image_token_id = tokenizer.get_vocab()[IMAGE_PAD]
    vision = (input_ids == image_token_id) & attended
    excluded = template_token_ids(tokenizer) if excluded_ids is None else list(excluded_ids)
    template = torch.tensor(excluded, dtype=input_ids.dtype, device=input_ids.device)
    text = attended & ~vision & ~torch.isin(input_ids, template)
    return vision, text


def patch_counts(image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Rows of `pixel_values` per image: t * h * w of its grid."""
    return image_grid_thw.prod(dim=-1)


def gather_items(tensor: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The rows of items `indices` (in that order, repeats allowed) of a tensor whose items are stored
    one after another along dim 0, item i owning `counts[i]` rows."""
    counts = counts.to(torch.long).cpu()
    starts = torch.cumsum(counts, 0) - counts
    idx = torch.as_tensor(indices, dtype=torch.long).cpu()
    if len(idx) == 0:
        return tensor[:0]
    counts_sel, starts_sel = counts[idx], starts[idx]
    # Row r of the result is starts_sel[k] + (r - offset of k), k the item that row belongs to.
    owner = torch.repeat_interleave(torch.arange(len(idx)), counts_sel)
    offsets = torch.cumsum(counts_sel, 0) - counts_sel
    rows = starts_sel[owner] + torch.arange(int(counts_sel.sum())) - offsets[owner]
    return tensor[rows.to(tensor.device)]


def select_pixel_values(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """The pixel rows of images `indices` (in that order) from patches concatenated image after image."""
    return gather_items(pixel_values, patch_counts(image_grid_thw), indices)


def _cat_padded(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding trailing dims to the largest (how processors pad a batch:
    Idefics3 pads images per prompt with all-zero images and a False pixel mask)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    shape = [max(int(p.shape[d]) for p in parts) for d in range(1, parts[0].ndim)]
    padded = []
    for part in parts:
        pad: list[int] = []
        for d in reversed(range(1, part.ndim)):
            pad += [0, shape[d - 1] - int(part.shape[d])]
        padded.append(F.pad(part, pad) if any(pad) else part)
    return torch.cat(padded, 0)


@dataclass
class VisionInputs:
    """The processor's image outputs of n items (prompts or rollouts), stored item after item along dim 0.

    Item i owns `counts[key][i]` rows of `tensors[key]`: for Qwen, its t*h*w patch rows of `pixel_values`
    and one row of `image_grid_thw`; for families whose processor returns [B, ...] tensors (Idefics3,
    Gemma 3, LLaVA) one row each. Any key works the same way, so no family is special-cased here.
    """

    tensors: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]  # [n] long per key
    size: int

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    @classmethod
    def from_items(cls, items: Sequence[Mapping[str, torch.Tensor]]) -> VisionInputs:
        """One item per mapping (a prompt's processor outputs), all with the same keys."""
        keys = list(items[0]) if items else []
        for i, item in enumerate(items):
            if list(item) != keys:
                raise ValueError(f"item {i} has image keys {sorted(item)}, item 0 has {sorted(keys)}")
        return cls(
            tensors={k: _cat_padded([item[k] for item in items]) for k in keys},
            counts={k: torch.tensor([int(item[k].shape[0]) for item in items], dtype=torch.long) for k in keys},
            size=len(items),
        )

    @classmethod
    def from_patches(cls, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionInputs:
        """Qwen's layout: one image per item, its t*h*w patch rows and its grid row."""
        n = int(image_grid_thw.shape[0])
        return cls(
            tensors={"pixel_values": pixel_values, "image_grid_thw": image_grid_thw},
            counts={"pixel_values": patch_counts(image_grid_thw).cpu(), "image_grid_thw": torch.ones(n, dtype=torch.long)},
            size=n,
        )

    @staticmethod
    def cat(parts: Sequence[VisionInputs]) -> VisionInputs:
        """The items of `parts`, one after another."""
        keys = list(parts[0].tensors)
        return VisionInputs(
            tensors={k: _cat_padded([p.tensors[k] for p in parts]) for k in keys},
            counts={k: torch.cat([p.counts[k] for p in parts]) for k in keys},
            size=sum(len(p) for p in parts),
        )

    def select(self, indices: Sequence[int] | torch.Tensor) -> VisionInputs:
        """Items `indices`, in that order (repeats allowed: a prompt's images once per rollout)."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        return VisionInputs(
            tensors={k: gather_items(t, self.counts[k], idx) for k, t in self.tensors.items()},
            counts={k: c[idx] for k, c in self.counts.items()},
            size=len(idx),
        )

    def repeat_interleave(self, repeats: int) -> VisionInputs:
        """Each item `repeats` times in a row (a prompt's images for its G rollouts)."""
        return self.select(torch.arange(self.size).repeat_interleave(repeats))

    def to(self, device: str | torch.device) -> VisionInputs:
        return VisionInputs({k: t.to(device) for k, t in self.tensors.items()}, dict(self.counts), self.size)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the family's forward."""
        return dict(self.tensors)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (loadable with `torch.load(..., weights_only=True)`)."""
        return {
            "tensors": {k: t.cpu() for k, t in self.tensors.items()},
            "counts": dict(self.counts),
            "size": self.size,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> VisionInputs:
        return cls(dict(state["tensors"]), dict(state["counts"]), int(state["size"]))


def pad_columns(values: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    """[B, T] -> [B, width]: `value` appended on the right (completion positions of a per-token input)."""
    missing = width - int(values.shape[1])
    if missing <= 0:
        return values
    return torch.cat([values, values.new_full((values.shape[0], missing), value)], dim=1)


def vl_model_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """The keyword arguments of the family's forward from a PromptBatch or RolloutBatch: ids, mask, the
    processor's image outputs, and its per-token inputs, right-padded over a completion with the value that
    marks generated text in this family (`batch.completion_values`, 0 where it names none).

    Passing Qwen's `mm_token_type_ids` matters: without it Qwen2.5-VL falls back to 1D positions that ignore
    the left padding and the image grid; Gemma 3's `token_type_ids` make the image tokens attend to each
    other bidirectionally, as they did when the model was trained; PaliGemma's mark the completion as the
    causal suffix (with 0 there, each completion token would see the ones after it).
    """
    width = int(batch.input_ids.shape[1])
    fill = getattr(batch, "completion_values", None) or {}
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    inputs.update(batch.vision.model_kwargs())
    for name, values in batch.token_inputs.items():
        inputs[name] = pad_columns(values, width, int(fill.get(name, 0)))
    return inputs


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside DDP / FSDP / accelerate wrappers (they keep it in `.module`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def uses_rope_index(model: torch.nn.Module) -> bool:
    """Qwen-VL families build multimodal (3D) positions themselves from `mm_token_type_ids` and the grid."""
    return callable(getattr(getattr(unwrapped(model), "model", None), "get_rope_index", None))


def prompt_position_ids(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Positions of a left-padded batch as the family computes them: Qwen's mRoPE index ([3, B, T]) or
    1D positions counting attended tokens only ([B, T]), so a row's positions ignore its left padding."""
    if uses_rope_index(model) and "mm_token_type_ids" in inputs:
        extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        positions, _ = unwrapped(model).model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], attention_mask=inputs["attention_mask"], **extra
        )
        return positions
    return (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)


def forward_position_ids(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The `position_ids` a full (no cache) forward needs to match generation: None for the Qwen-VL
    families, which compute the same positions from `mm_token_type_ids`; 1D padding-free ones otherwise."""
    if uses_rope_index(model):
        return None
    return prompt_position_ids(model, inputs)


class ImageFields:
    """`pixel_values` / `image_grid_thw` read off a batch's `vision` inputs (one row per prompt or rollout),
    for callers written against the Qwen layout."""

    vision: VisionInputs

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.vision["pixel_values"]

    @property
    def image_grid_thw(self) -> torch.Tensor:
        """Qwen's image grids, one row per batch row (a KeyError for families without one)."""
        return self.vision["image_grid_thw"]


@dataclass
class PromptBatch(ImageFields):
    """Left-padded prompts with one image each, ready for the family's forward (`model(**batch.model_inputs())`)."""

    input_ids: torch.Tensor  # [B, T] long, left padded
    attention_mask: torch.Tensor  # [B, T] long
    vision: VisionInputs  # the processor's image outputs, one item per prompt
    vision_mask: torch.Tensor  # [B, T] bool
    text_mask: torch.Tensor  # [B, T] bool
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, T] each, e.g. mm_token_type_ids
    texts: list[str] = field(default_factory=list)  # the templated prompt strings, before expansion
    # Each per-token input's value over generated text (`completion_values`); 0 for one not named here.
    completion_values: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def mm_token_type_ids(self) -> torch.Tensor:
        """1 at image tokens, else 0: what Qwen2.5-VL needs to build its 3D (mRoPE) positions."""
        return self.token_inputs.get("mm_token_type_ids", self.vision_mask).to(torch.int32)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the family's forward (Qwen's mRoPE positions honour the left padding)."""
        return vl_model_inputs(self)

    def select(self, indices: Sequence[int] | torch.Tensor) -> PromptBatch:
        """Rows `indices` (image inputs sliced per prompt)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return PromptBatch(
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            vision=self.vision.select(idx),
            vision_mask=self.vision_mask[idx],
            text_mask=self.text_mask[idx],
            token_inputs={k: v[idx] for k, v in self.token_inputs.items()},
            texts=[self.texts[i] for i in idx.tolist()] if self.texts else [],
            completion_values=dict(self.completion_values),
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
            vision=self.vision,
            vision_mask=self.vision_mask[:, first:],
            text_mask=self.text_mask[:, first:],
            token_inputs={k: v[:, first:] for k, v in self.token_inputs.items()},
            texts=list(self.texts),
            completion_values=dict(self.completion_values),
        )

    def to(self, device: str | torch.device) -> PromptBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return PromptBatch(
            **moved,
            vision=self.vision.to(device),
            token_inputs={k: v.to(device) for k, v in self.token_inputs.items()},
            texts=list(self.texts),
            completion_values=dict(self.completion_values),
        )


def as_content_parts(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages with string contents turned into `[{"type": "text", "text": ...}]`, the form every
    multimodal template reads (Idefics3's iterates the content; Qwen's renders both forms alike)."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else dict(m)
        for m in messages
    ]


def render_prompt(policy: Policy, messages: list[dict]) -> str:
    """The family's chat template over `messages`, ending with the assistant header."""
    processor = policy.processor
    messages = as_content_parts(messages)
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- what the processor's outputs mean


def is_target(name: str) -> bool:
    """Whether a processor output is a training target (`labels`, `mc_labels`, ...): with it a forward computes
    a loss against it (PaliGemma's processor returns `labels` whenever it gets text). HF's `generate` never
    forwards `labels` either."""
    return "label" in name


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/FSDP wrappers and a PEFT model."""
    model = unwrapped(model)
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def split_processor_outputs(policy: Policy, outputs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model inputs, the rest) of one processor call.

    A model input is a tensor the forward takes (a named parameter, or, for a forward with `**kwargs`, a
    name the processor declares in `model_input_names`) that is not a target (`is_target`). The rest (targets,
    counts such as InternVL's `num_patches`, anything the forward does not take) never reaches a forward.
    """
    declared = set(getattr(policy.processor, "model_input_names", None) or outputs.keys())
    declared.update(("input_ids", "attention_mask"))
    parameters = inspect.signature(_hf_model(policy.model).forward).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    inputs: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    for name, value in outputs.items():
        takes = name in named or (any_keyword and name in declared)
        if isinstance(value, torch.Tensor) and takes and not is_target(name):
            inputs[name] = value
        else:
            rest[name] = value
    return inputs, rest


def _pair_value(tokenizer: Any) -> int | None:
    """The type id the tokenizer gives the second text of a pair (what PaliGemma's processor encodes a
    training suffix as), None when it gives none."""
    try:
        types = tokenizer("a", text_pair="b", return_token_type_ids=True).get("token_type_ids")
    except Exception:  # noqa: BLE001 - a tokenizer without pairs names no suffix value
        return None
    return int(types[-1]) if types else None


def generated_tokens_causal(model: torch.nn.Module, name: str, prompt_value: int, value: int) -> bool | None:
    """Whether generated tokens marked `value` (per-token input `name`) stay causal in the family's mask: in a
    probe of two prompt tokens (`prompt_value`) then two generated ones, the first generated token must not
    see the second. None when the family's mask builder gives no 4D mask to read.

    The mask is the one the family builds for `generate` (`create_masks_for_generate`, which mirrors its
    forward: PaliGemma's prefix-LM block, Gemma 3's image blocks), built eager so it is never left implicit.
    Only the config is read: no weight, no forward (safe on any rank of a sharded model).
    """
    from transformers.masking_utils import create_masks_for_generate

    base = _hf_model(model)
    build = getattr(base, "create_masks_for_generate", create_masks_for_generate)
    config = copy.deepcopy(base.config)
    for sub in {id(c): c for c in (config, config.get_text_config())}.values():
        sub._attn_implementation_internal = "eager"
    marks = torch.tensor([[prompt_value, prompt_value, value, value]])
    mask = build(config=config, inputs_embeds=torch.empty(1, 4, 0), attention_mask=torch.ones(1, 4, dtype=torch.long),
                 cache=None, position_ids=torch.arange(4)[None], is_first_iteration=True, **{name: marks})
    masks = [m for m in (mask.values() if isinstance(mask, dict) else [mask]) if isinstance(m, torch.Tensor)]
    masks = [m for m in masks if m.ndim == 4]
    if not masks:
        return None
    # Eager masks are additive (0 where attended) or boolean (True where attended).
    return not any(bool(m[0, 0, 2, 3] if m.dtype == torch.bool else m[0, 0, 2, 3] == 0) for m in masks)


def completion_values(
    model: torch.nn.Module, token_inputs: Mapping[str, torch.Tensor], tokenizer: Any = None
) -> dict[str, int]:
    """The value each per-token input takes over generated text (the completion), from left-padded prompt
    columns [B, T] (row 0 is read). This is the one place that decides what these inputs mean. The known ones:

    | input               | family                | over the prompt                                   | generated |
    |---------------------|-----------------------|---------------------------------------------------|-----------|
    | `mm_token_type_ids` | Qwen2/2.5/3-VL        | 0 text, 1 image, 2 video: builds the 3D mRoPE positions | 0   |
    | `token_type_ids`    | Gemma 3               | 1 image tokens (an image's tokens see each other both ways), 0 text | 0 |
    | `token_type_ids`    | PaliGemma (prefix-LM) | 0: the prefix (image + prompt), attended both ways | 1: the causal suffix |

    No family is named here: the value is what the processor gives the prompt's last token (text: the
    assistant header), unless the family's own mask (`generated_tokens_causal`) would then let a generated
    token see later ones, as in a prefix-LM's prefix; then it is the value that keeps generated tokens causal,
    tried first as the `tokenizer`'s suffix value (`_pair_value`, when given). `input_ids` / `attention_mask` are not
    per-token inputs here, and targets (`is_target`) never get this far (`split_processor_outputs`).
    """
    values: dict[str, int] = {}
    for name, column in token_inputs.items():
        text_value = int(column[0, -1])
        try:
            causal = {text_value: generated_tokens_causal(model, name, text_value, text_value)}
        except Exception as error:  # noqa: BLE001 - a mask builder that does not take this input
            logger.warning("%s: the family's mask builder does not take %r (%s); generated tokens get the prompt "
                           "text's value %d", type(_hf_model(model)).__name__, name, error, text_value)
            causal = {text_value: None}
        if causal[text_value] is not False:
            values[name] = text_value
            continue
        suffix = None if tokenizer is None else _pair_value(tokenizer)
        for value in dict.fromkeys([suffix, *column.unique().tolist(), 0, 1]):
            if value is not None and int(value) not in causal:
                causal[int(value)] = generated_tokens_causal(model, name, text_value, int(value))
        chosen = [v for v, ok in causal.items() if ok]
        if not chosen:
            raise ValueError(
                f"{type(_hf_model(model)).__name__}: no value of the per-token input {name!r} keeps generated tokens "
                f"causal in the family's attention mask (tried {sorted(causal)}); the completion cannot be scored"
            )
        values[name] = chosen[0]
    return values


def _process_one(policy: Policy, text: str, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """The model inputs among the processor's outputs for one prompt and its images (no padding)."""
    outputs = policy.processor(images=[list(images)], text=[text], return_tensors="pt")
    return split_processor_outputs(policy, outputs)[0]


def _left_pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """[1, T_i] rows -> [B, max T_i], padded on the left with `value`."""
    width = max(int(r.shape[1]) for r in rows)
    out = rows[0].new_full((len(rows), width), value)
    for i, row in enumerate(rows):
        out[i, width - row.shape[1] :] = row[0]
    return out


def _image_list(entry: ImageLike | Sequence[ImageLike]) -> list[Image.Image]:
    if isinstance(entry, Image.Image | bytes | bytearray | Mapping):
        return [to_pil(entry)]
    return [to_pil(image) for image in entry]


def encode_prompts(
    policy: Policy,
    questions: Sequence[str],
    choices_list: Sequence[Sequence[str] | None],
    images: Sequence[ImageLike | Sequence[ImageLike]],
    *,
    system_prompt: str | None = None,
    system_prompts: Sequence[str | None] | None = None,
) -> PromptBatch:
    """Chat-template and process (left padded) one prompt per (question, choices, images).

    A `choices_list` entry of None is a free-form question; an `images` entry is one image or a list of them
    (placed at the question's `<image>` marks, else first). The system prompt is, per row, `system_prompts[i]`
    when given and not None (a dataset's own), else `system_prompt`, else the answer kind's instruction.
    Each prompt goes through the family's processor on its own (its image tokens expanded as the processor
    does) and the rows are then left padded: the same ids, mask and image tensors as one padded processor
    call, with each prompt's image outputs kept apart.
    """
    if not len(questions) == len(choices_list) == len(images):
        raise ValueError(
            f"questions ({len(questions)}), choices ({len(choices_list)}) and images ({len(images)}) "
            "differ in length"
        )
    if len(questions) == 0:
        raise ValueError("encode_prompts needs at least one prompt")
    if system_prompts is not None and len(system_prompts) != len(questions):
        raise ValueError(f"system_prompts ({len(system_prompts)}) and questions ({len(questions)}) differ in length")
    image_lists = [_image_list(entry) for entry in images]
    empty = [i for i, entry in enumerate(image_lists) if not entry]
    if empty:
        raise ValueError(f"prompt(s) {empty} have no image")
    own = list(system_prompts) if system_prompts is not None else [None] * len(questions)
    texts = [
        render_prompt(policy, build_messages(q, c, own[i] if own[i] is not None else system_prompt, len(image_lists[i])))
        for i, (q, c) in enumerate(zip(questions, choices_list, strict=True))
    ]
    outputs = [_process_one(policy, text, entry) for text, entry in zip(texts, image_lists, strict=True)]
    token_names = [k for k in outputs[0] if outputs[0][k].shape == outputs[0]["input_ids"].shape]
    pad = policy.pad_token_id
    columns = {k: _left_pad([o[k] for o in outputs], pad if k == "input_ids" else 0) for k in token_names}
    input_ids = columns.pop("input_ids").to(torch.long)
    attention_mask = columns.pop("attention_mask").to(torch.long)
    fill = completion_values(policy.model, {k: outputs[0][k] for k in columns}, policy.tokenizer)
    vision = VisionInputs.from_items([{k: v for k, v in o.items() if k not in token_names} for o in outputs])
    if "pixel_values" in vision:
        vision.tensors["pixel_values"] = vision.tensors["pixel_values"].to(torch.float32)
    vision_mask, text_mask = key_masks(
        input_ids,
        attention_mask,
        policy.tokenizer,
        image_token_id=policy.image_token_id,
        excluded_ids=policy.text_excluded_ids,
    )
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        vision=vision,
        vision_mask=vision_mask,
        text_mask=text_mask,
        token_inputs=columns,
        texts=texts,
        completion_values=fill,
    )

