"""Each prompt computed once: the shared-prefix forward of the teacher-forced pass and the update.

The G rollouts of a group share one prompt (image, question, template), and in a VLM the prompt is mostly
image tokens. Instead of one forward over prompt + completion per rollout, this path runs

1. a prompt forward over the P unique prompts of the batch (vision tower included, left padded as the
   rollouts are), with a KV cache and only the last position's logits (it predicts the first completion
   token);
2. the cache's keys/values gathered to the N rollouts (`batch_select_indices`: an indexing op, so the
   gradients of all G completions flow back into the one prompt computation);
3. a completion forward over the N completions with that cache, the attention mask
   `[prompt_mask, completion_mask]` and exactly the unshared forward's positions (Qwen-VL's mRoPE text
   positions after the image continue from the prompt's `rope_deltas`; 1D-position families continue
   counting attended tokens, as `inputs.prompt_position_ids` does over the whole sequence).

The prompt inputs are the family's own (`inputs.VisionInputs` of the unique prompts and the processor's
per-token inputs over the prompt), so any family that `attention.completion_forward` runs can share.

Tokens per group fall from G·(P+R) to P + G·R. The numbers equal the unshared `completion_forward` up to
float rounding (tests/test_shared_prefix.py). Models whose cache cannot be gathered along the batch
(sliding-window or linear-attention layers, e.g. Gemma 3; no `batch_select_indices`) fall back to the
unshared forward, with one log line per model class.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from dapo_ops.attention.forward import RolloutLike, model_inputs, unshared_completion_forward, unwrap_model
from dapo_ops.attention.recorder import record_modality_mass, recording_paused
from dapo_ops.models.inputs import uses_rope_index
from dapo_ops.rl.loss import entropy_from_logits, selective_log_softmax

logger = logging.getLogger(__name__)

# Model classes found unable to share (name -> reason), so the fallback is decided and logged once.
_UNSUPPORTED: dict[str, str] = {}
# Model classes already told that gradient checkpointing makes them take the unshared forward.
_CHECKPOINTING_LOGGED: set[str] = set()


class SharingUnsupported(RuntimeError):
    """This model (or its cache) cannot serve one prompt's keys/values to several completions."""


@dataclass(frozen=True)
class PrefixGroups:
    """Which rows share a prompt: `unique` [P] one representative row per prompt, `owner` [N] the prompt
    (0..P-1) of each row."""

    unique: torch.Tensor
    owner: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return int(self.unique.shape[0])


def _image_rows(batch: RolloutLike) -> list[tuple[torch.Tensor, ...]] | None:
    """Each row's image inputs (one view per processor key: Qwen's patches and grid, Idefics3's images and
    pixel mask, ...), or None for a batch without images."""
    vision = getattr(batch, "vision", None)
    if vision is not None:
        keys = sorted(vision.tensors)
        per_key = [torch.split(vision.tensors[k], vision.counts[k].tolist(), 0) for k in keys]
        return [tuple(parts) for parts in zip(*per_key, strict=True)] if keys else None
    pixel_values = getattr(batch, "pixel_values", None)  # a batch with Qwen's two tensors only
    grid = getattr(batch, "image_grid_thw", None)
    if pixel_values is None or grid is None:
        return None
    patches = torch.split(pixel_values, grid.prod(-1).tolist(), 0)
    return [(p, g) for p, g in zip(patches, grid, strict=True)]


def _image_key(images: tuple[torch.Tensor, ...] | None) -> Hashable:
    """What the rows of one prompt always share: the shapes of their image inputs, and the values of the
    small ones (Qwen's grid)."""
    if images is None:
        return None
    return tuple((tuple(t.shape), tuple(t.reshape(-1).tolist()) if t.numel() <= 4 else None) for t in images)


def prefix_groups(batch: RolloutLike) -> PrefixGroups:
    """Rows with the same prompt: same `prompt_index` where the batch has one (the project's contract: one
    prompt of the round's PromptBatch, hence one image), and always the same prompt tokens, mask and image
    input shapes (Qwen: the grid); without `prompt_index`, identical image inputs too."""
    prompt_ids, prompt_mask = batch.prompt_ids.cpu(), batch.prompt_mask.cpu()
    index = getattr(batch, "prompt_index", None)
    images = _image_rows(batch)
    first: dict[Hashable, list[int]] = {}  # key -> representative rows (several only if images differ)
    unique: list[int] = []
    owner: list[int] = []
    for row in range(int(prompt_ids.shape[0])):
        key = (
            None if index is None else int(index[row]),
            tuple(prompt_ids[row].tolist()),
            tuple(prompt_mask[row].tolist()),
            None if images is None else _image_key(images[row]),
        )
        match = None
        for candidate in first.get(key, []):
            if index is not None or images is None or all(
                torch.equal(a, b) for a, b in zip(images[candidate], images[row], strict=True)
            ):
                match = candidate
                break
        if match is None:
            first.setdefault(key, []).append(row)
            unique.append(row)
            match = row
        owner.append(unique.index(match))
    return PrefixGroups(torch.tensor(unique, dtype=torch.long), torch.tensor(owner, dtype=torch.long))


class _PromptView:
    """The prompt half of a rollout batch as a model-input batch (what `_model_inputs` reads)."""

    def __init__(self, rows: RolloutLike) -> None:
        self._rows = rows

    @property
    def input_ids(self) -> torch.Tensor:
        return self._rows.prompt_ids

    @property
    def attention_mask(self) -> torch.Tensor:
        return self._rows.prompt_mask

    @property
    def vision_mask(self) -> torch.Tensor:
        return self._rows.prompt_vision_mask

    @property
    def text_mask(self) -> torch.Tensor:
        return self._rows.prompt_text_mask

    @property
    def mm_token_type_ids(self) -> torch.Tensor | None:
        full = getattr(self._rows, "mm_token_type_ids", None)
        return None if full is None else full[:, : self._rows.prompt_ids.shape[1]]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The family's forward kwargs over the prompt alone: ids, mask, image inputs, per-token inputs."""
        vision = getattr(self._rows, "vision", None)
        if vision is None:  # a batch with Qwen's two image tensors only
            inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
            pixel_values = getattr(self._rows, "pixel_values", None)
            if pixel_values is not None:
                inputs.update(pixel_values=pixel_values, image_grid_thw=self._rows.image_grid_thw)
            mm_types = self.mm_token_type_ids
            if mm_types is not None:
                inputs["mm_token_type_ids"] = mm_types
            return inputs
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            **vision.model_kwargs(),
            **dict(getattr(self._rows, "prompt_token_inputs", None) or {}),
        }

    def __getattr__(self, name: str) -> Any:  # pixel values, image grid, model-family extras
        return getattr(self._rows, name)


def _base_module(model: torch.nn.Module) -> torch.nn.Module:
    """The bare HF model under DDP/FSDP wrappers (they keep it in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _cache_kwarg(model: torch.nn.Module) -> str:
    """`cache` in recent transformers 5.x, `past_key_values` before (the old name is deprecated)."""
    parameters = inspect.signature(_base_module(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _output_cache(outputs: Any) -> Any:
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def _static_check(model: torch.nn.Module) -> None:
    """Refuse before any forward what cannot share: no cache argument, or sliding-window layers (whose cache
    keeps only a window, so completions would lose prompt keys the unshared forward sees)."""
    base = _base_module(model)
    parameters = inspect.signature(base.forward).parameters
    if "cache" not in parameters and "past_key_values" not in parameters:
        raise SharingUnsupported(f"{type(base).__name__}.forward takes no KV cache")
    config = getattr(base.config, "text_config", base.config)
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()) or getattr(
        config, "use_sliding_window", False
    ):
        raise SharingUnsupported("its decoder has sliding-window attention layers")


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward of `model` would run checkpointed layers (which ignore caches)."""
    return bool(model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules()))


def _gather_cache(cache: Any, owner: torch.Tensor) -> None:
    """Row i of the cache becomes prompt `owner[i]`'s keys/values (differentiable indexing, in place)."""
    if cache is None or not hasattr(cache, "batch_select_indices"):
        raise SharingUnsupported(f"its cache ({type(cache).__name__}) cannot be gathered along the batch")
    layers = getattr(cache, "layers", None)
    if layers is not None:
        from transformers.cache_utils import DynamicLayer

        odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if odd:
            raise SharingUnsupported(f"its cache has {', '.join(sorted(odd))} layers, not plain DynamicLayer")
    cache.batch_select_indices(owner)


def _mrope_deltas(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.Tensor | None]:
    """The module holding Qwen-VL's `rope_deltas` (the mRoPE offset of text after the image) and its value."""
    base = _base_module(model)
    for module in (getattr(base, "model", None), base):
        if module is not None and hasattr(module, "rope_deltas"):
            return module, module.rope_deltas
    return None, None


def _completion_positions(
    next_position: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """[3, N, Tc] mRoPE positions of the completion tokens, as `get_rope_index` gives them over the full
    sequence: text positions continue from the prompt's next position over attended tokens; padding 0."""
    mask = completion_mask.long()  # [N, Tc]
    positions = next_position[:, None] + mask.cumsum(-1) - 1  # [N, Tc]
    positions = positions.masked_fill(mask == 0, 0)
    return positions[None].expand(3, -1, -1)


def _completion_positions_1d(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """[N, Tc] positions of the completion tokens as the unshared forward gives them to a 1D-position family
    (`inputs.prompt_position_ids` over `[prompt_mask, completion_mask]`: attended tokens counted, so left
    padding does not shift them)."""
    full = torch.cat([prompt_mask.long(), completion_mask.long()], 1)  # [N, Tp+Tc]
    return (full.cumsum(-1) - 1).clamp(min=0)[:, prompt_mask.shape[1] :]


def _shared_forward(
    model: torch.nn.Module,
    rollouts_slice: RolloutLike,
    groups: PrefixGroups,
    *,
    temperature: float,
    with_attention: bool,
    entropy_grad: bool = False,
    attention_grad: bool = False,
    return_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    device = next(model.parameters()).device
    completion_ids = rollouts_slice.completion_ids.to(device)  # [N, Tc]
    completion_mask = rollouts_slice.completion_mask.to(device)  # [N, Tc]
    num_rows, num_completion = (int(s) for s in completion_ids.shape)
    owner = groups.owner.to(device)  # [N]
    prompts = _PromptView(rollouts_slice.select(groups.unique.tolist()))
    prompt_inputs = model_inputs(model, prompts, device)
    prompt_mask = prompt_inputs["attention_mask"]  # [P, Tp]
    cache_kwarg = _cache_kwarg(model)

    recording: Any
    if with_attention:
        # Queries: the completion tokens; keys: the shared prompt (from the cache) + the completion itself.
        seq_len = int(prompt_mask.shape[1]) + num_completion
        query_mask = torch.zeros(num_rows, seq_len, dtype=torch.bool, device=device)
        query_mask[:, seq_len - num_completion :] = completion_mask.bool()
        recording = record_modality_mass(
            model, query_mask, rollouts_slice.vision_mask.to(device), rollouts_slice.text_mask.to(device),
            differentiable=attention_grad,
        )
    else:
        recording = nullcontext()

    holder, _ = _mrope_deltas(model)
    if holder is not None:
        holder.rope_deltas = None  # set again by this prompt forward iff it builds mRoPE positions
    with recording as recorder:
        with recording_paused():  # the prompt has no query rows
            prompt_out = model(**prompt_inputs, use_cache=True, logits_to_keep=1)
        cache = _output_cache(prompt_out)
        _gather_cache(cache, owner)
        inputs: dict[str, Any] = {
            "input_ids": completion_ids,
            "attention_mask": torch.cat([prompt_mask[owner], completion_mask.to(prompt_mask.dtype)], 1),
            cache_kwarg: cache,
            "use_cache": True,
            # The last completion position predicts nothing: its logits are never computed.
            "logits_to_keep": torch.arange(num_completion - 1, device=device),
        }
        deltas = None if holder is None else holder.rope_deltas
        if deltas is not None:
            next_position = deltas.reshape(-1).to(device) + prompt_mask.sum(-1)  # [P]
            inputs["position_ids"] = _completion_positions(next_position[owner], completion_mask)
        elif uses_rope_index(model):
            raise SharingUnsupported("its prompt forward left no mRoPE offset (rope_deltas) to continue from")
        else:
            inputs["position_ids"] = _completion_positions_1d(prompt_mask[owner], completion_mask)  # [N, Tc]
        completion_out = model(**inputs)
    del cache, inputs
    scale = temperature if temperature > 0 else 1.0
    # The last prompt position predicts completion token 0; completion position j predicts token j+1.
    parts = [(prompt_out.logits[:, -1:, :][owner], completion_ids[:, :1])]  # [N, 1, V], [N, 1]
    if num_completion > 1:
        parts.append((completion_out.logits, completion_ids[:, 1:]))  # [N, Tc-1, V], [N, Tc-1]
    per_token_logps = torch.cat(
        [selective_log_softmax(logits, ids, temperature=scale) for logits, ids in parts], 1
    )  # [N, Tc]
    with nullcontext() if entropy_grad else torch.no_grad():  # a gradient only for an entropy bonus
        entropy = torch.cat([entropy_from_logits(logits, temperature=scale) for logits, _ in parts], 1)
    extra = (torch.cat([logits for logits, _ in parts], 1),) if return_logits else ()  # [N, Tc, V]
    if not with_attention:
        return per_token_logps, entropy, *extra
    return per_token_logps, entropy, recorder.vision_mass, recorder.text_mass, *extra


def shared_completion_forward(
    model: Any, rollouts_slice: RolloutLike, *, temperature: float = 1.0, with_attention: bool = False,
    entropy_grad: bool = False, attention_grad: bool = False, return_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`attention.completion_forward` with each prompt computed once (same outputs, same shapes).

    Falls back to the unshared forward, with one log line per model class, where the model cannot share;
    a batch without repeated prompts or without completion tokens takes the unshared forward as well.
    """
    model = unwrap_model(model)
    name = type(_base_module(model)).__name__

    def unshared() -> tuple[torch.Tensor, ...]:
        return unshared_completion_forward(
            model, rollouts_slice, temperature=temperature, with_attention=with_attention,
            entropy_grad=entropy_grad, attention_grad=attention_grad, return_logits=return_logits,
        )

    if name in _UNSUPPORTED or int(rollouts_slice.completion_ids.shape[1]) == 0:
        return unshared()
    if _checkpointing(model):
        # transformers drops the KV cache inside checkpointed layers, so the prompt's keys cannot serve the
        # completions. This is a property of the current mode, not of the model class: the no-grad
        # teacher-forced pass of the same model still shares.
        if name not in _CHECKPOINTING_LOGGED:
            _CHECKPOINTING_LOGGED.add(name)
            logger.warning("shared_prefix: gradient checkpointing is on for %s (transformers drops the KV "
                           "cache of checkpointed layers); the update uses the unshared forward", name)
        return unshared()
    groups = prefix_groups(rollouts_slice)
    if groups.num_prompts == int(rollouts_slice.completion_ids.shape[0]):
        return unshared()  # nothing shared: one forward per row is the same work, without a cache
    try:
        _static_check(model)
        return _shared_forward(
            model, rollouts_slice, groups, temperature=temperature, with_attention=with_attention,
            entropy_grad=entropy_grad, attention_grad=attention_grad, return_logits=return_logits,
        )
    except SharingUnsupported as reason:
        _UNSUPPORTED[name] = str(reason)
        logger.warning("shared_prefix: %s cannot share prompts (%s); using the unshared forward", name, reason)
        return unshared()
