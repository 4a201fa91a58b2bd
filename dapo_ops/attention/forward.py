"""One forward over prompt + completion: the family's inputs, the per-token log-probs and entropy, and
(optionally) the modality masses recorded on the way. This is the unshared reference; the shared-prefix path
(`dapo_ops.attention.shared_prefix`) computes the same outputs with each prompt once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dapo_ops.attention.recorder import record_modality_mass
from dapo_ops.models.inputs import (
    completion_values,
    forward_position_ids,
    pad_columns,
    unwrapped,
    uses_rope_index,
)
from dapo_ops.rl.loss import entropy_from_logits, selective_log_softmax


class RolloutLike(Protocol):
    """What the teacher-forced pass reads from a `dapo_ops.rollout.generate.RolloutBatch` (attribute names)."""

    input_ids: torch.Tensor  # [N, Tp+Tc] prompt (left padded) + completion (right padded)
    attention_mask: torch.Tensor  # [N, Tp+Tc]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # [N, 3]
    vision_mask: torch.Tensor  # [N, Tp+Tc] bool, completion positions False
    text_mask: torch.Tensor  # [N, Tp+Tc] bool
    completion_ids: torch.Tensor  # [N, Tc]
    completion_mask: torch.Tensor  # [N, Tc]

    def select(self, indices: Sequence[int]) -> RolloutLike: ...


@dataclass
class TeacherForcedOutputs:
    """One teacher-forced pass over N rollouts (detached float32 tensors on the CPU).

    per_token_logps, entropy: [N, Tc], also at padded completion positions (mask them with
    `completion_mask`). vision_mass, text_mass: [N, L] m_V(l), m_T(l); None without attention.
    visual_kl: [N, Tc] per-token KL against the degraded images; None without the masked pass.
    """

    per_token_logps: torch.Tensor
    entropy: torch.Tensor
    vision_mass: torch.Tensor | None = None
    text_mass: torch.Tensor | None = None
    visual_kl: torch.Tensor | None = None


def unwrap_model(model_or_policy: Any) -> torch.nn.Module:
    """A `models.Policy` holds the model in `.model`; an HF model's own `.model` is its inner trunk."""
    if isinstance(model_or_policy, torch.nn.Module):
        return model_or_policy
    return model_or_policy.model


def _legacymodel_inputs(model: torch.nn.Module, batch: Any) -> dict[str, Any]:
    """Qwen inputs from a batch that only carries ids, masks, `pixel_values` and `image_grid_thw`."""
    input_ids = batch.input_ids
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": batch.attention_mask}
    pixel_values = getattr(batch, "pixel_values", None)
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
        inputs["image_grid_thw"] = batch.image_grid_thw
    return inputs


def model_inputs(model: torch.nn.Module, batch: RolloutLike, device: torch.device) -> dict[str, Any]:
    """The family's forward kwargs over prompt + completion, with the positions generation used."""
    model_inputs = getattr(batch, "model_inputs", None)
    raw = model_inputs() if callable(model_inputs) else _legacymodel_inputs(model, batch)
    prompt_columns = dict(getattr(batch, "token_inputs", None) or {})
    known = getattr(batch, "completion_values", None) or {}
    missing = {k: v for k, v in prompt_columns.items() if k not in known and k in raw}
    if missing:  # a batch built by hand: the completion's values from the family's own mask
        width = int(raw["input_ids"].shape[1])
        for name, value in completion_values(model, missing).items():
            raw[name] = pad_columns(missing[name], width, value)
    inputs: dict[str, Any] = {k: v.to(device) for k, v in raw.items()}
    input_ids = inputs["input_ids"]
    if uses_rope_index(model) and "pixel_values" in inputs:
        # mm_token_type_ids makes Qwen2.5-VL use its 3D (mRoPE) positions, honouring left padding, exactly as
        # generation with the processor's inputs does; without them the forward falls back to 1D positions.
        mm_types = inputs.get("mm_token_type_ids")
        if mm_types is None:
            config = unwrapped(model).config
            mm_types = torch.zeros_like(input_ids, dtype=torch.int32)
            if getattr(config, "image_token_id", None) is not None:
                mm_types[input_ids == config.image_token_id] = 1
            if getattr(config, "video_token_id", None) is not None:
                mm_types[input_ids == config.video_token_id] = 2
        elif mm_types.shape[1] != input_ids.shape[1]:  # given for the prompt only: completions are text
            mm_types = torch.cat(
                [mm_types, mm_types.new_zeros(mm_types.shape[0], input_ids.shape[1] - mm_types.shape[1])], 1
            )
        inputs["mm_token_type_ids"] = mm_types
    positions = forward_position_ids(model, inputs)
    if positions is not None:
        inputs["position_ids"] = positions
    return inputs


def unshared_completion_forward(
    model: Any,
    rollouts_slice: RolloutLike,
    *,
    temperature: float = 1.0,
    with_attention: bool = False,
    entropy_grad: bool = False,
    attention_grad: bool = False,
    return_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One forward over prompt + completion: (per_token_logps, entropy[, vision_mass, text_mass][, logits]).

    per_token_logps is differentiable (run it under `torch.no_grad()` for scoring), entropy only with
    `entropy_grad` (an entropy bonus); both are [B, Tc] on the model's device. Logits are computed only for the last Tc+1 positions
    (`logits_to_keep`) and divided by the sampling temperature, as in TRL (temperature <= 0, i.e. greedy
    sampling, scores the raw logits). With `with_attention`, also the [B, L] masses from the lean path: no
    gradient, on the CPU; with `attention_grad` as well, differentiable and on the model's device (the
    attention reward's pathwise term, `dapo_ops.train.update`). With `return_logits`, last the raw (unscaled)
    logits that score the completion tokens, [B, Tc, V] (the masked pass's KL, `dapo_ops.attention.visual`).
    """
    model = unwrap_model(model)
    device = next(model.parameters()).device
    completion_ids = rollouts_slice.completion_ids.to(device)
    num_completion = int(completion_ids.shape[1])
    inputs = model_inputs(model, rollouts_slice, device)
    seq_len = int(inputs["input_ids"].shape[1])

    recording: Any = nullcontext()
    if with_attention:
        query_mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool, device=device)
        query_mask[:, seq_len - num_completion :] = rollouts_slice.completion_mask.to(device).bool()
        recording = record_modality_mass(
            model, query_mask, rollouts_slice.vision_mask.to(device), rollouts_slice.text_mask.to(device),
            differentiable=attention_grad,
        )
    with recording as recorder:
        outputs = model(**inputs, use_cache=False, logits_to_keep=num_completion + 1)
    # Position p predicts token p+1: the Tc+1 kept rows score the Tc completion tokens, the last row none.
    logits = outputs.logits[:, :-1, :]
    scale = temperature if temperature > 0 else 1.0  # per chunk inside, no scaled copy of all logits
    per_token_logps = selective_log_softmax(logits, completion_ids, temperature=scale)
    # Usually logged only: no graph holding vocabulary-sized temporaries unless a bonus differentiates it.
    with nullcontext() if entropy_grad else torch.no_grad():
        entropy = entropy_from_logits(logits, temperature=scale)
    extra = (logits,) if return_logits else ()
    if not with_attention:
        return per_token_logps, entropy, *extra
    return per_token_logps, entropy, recorder.vision_mass, recorder.text_mass, *extra
