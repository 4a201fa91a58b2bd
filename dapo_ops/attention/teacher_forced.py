"""The teacher-forced pass of a round: old per-token log-probs, entropy and per-layer modality masses of every
rollout from one forward each, shared-prefix aware; and the per-rollout attention metrics from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from dapo_ops.attention.forward import (
    RolloutLike,
    TeacherForcedOutputs,
    model_inputs,
    unshared_completion_forward,
    unwrap_model,
)
from dapo_ops.attention.metrics import StageMetrics, masses_from_attention_weights, metrics_from_masses
from dapo_ops.attention.recorder import decoder_num_layers
from dapo_ops.attention.shared_prefix import shared_completion_forward
from dapo_ops.attention.visual import degraded_batch, token_kl, vision_patch_size
from dapo_ops.common import progress
from dapo_ops.models.inputs import unwrapped


def completion_forward(
    model: Any,
    rollouts_slice: RolloutLike,
    *,
    temperature: float = 1.0,
    with_attention: bool = False,
    entropy_grad: bool = False,
    attention_grad: bool = False,
    shared_prefix: bool = False,
    return_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`unshared_completion_forward`, or with `shared_prefix` the same outputs (up to float rounding) with the
    rows of one prompt sharing one prompt forward (`dapo_ops.attention.shared_prefix`)."""
    forward = shared_completion_forward if shared_prefix else unshared_completion_forward
    return forward(model, rollouts_slice, temperature=temperature, with_attention=with_attention,
                   entropy_grad=entropy_grad, attention_grad=attention_grad, return_logits=return_logits)


@dataclass(frozen=True)
class VisualMasking:
    """The masked pass of `teacher_forced_pass` (`dapo_ops.attention.visual`): how the images are degraded and
    the round's seed (each prompt's masks come from it and the prompt index)."""

    mode: str = "patch"
    ratio: float = 0.6
    seed: int = 0


def _masked_pass_kl(model: torch.nn.Module, batch: RolloutLike, logits: torch.Tensor, masking: VisualMasking, *,
                    temperature: float, shared_prefix: bool) -> torch.Tensor:
    """[B, Tc] KL(π(·|q, I) ‖ π(·|q, I_masked)) of one micro-batch, given its real-image `logits` [B, Tc, V]."""
    masked = degraded_batch(batch, mode=masking.mode, ratio=masking.ratio, seed=masking.seed,
                            patch_size=vision_patch_size(unwrapped(model)))
    masked_logits = completion_forward(model, masked, temperature=temperature, shared_prefix=shared_prefix,
                                       return_logits=True)[-1]
    return token_kl(logits, masked_logits, temperature=temperature if temperature > 0 else 1.0)


def teacher_forced_pass(
    model_or_policy: Any,
    rollouts: RolloutLike,
    *,
    temperature: float = 1.0,
    batch_size: int | None = None,
    with_attention: bool = True,
    shared_prefix: bool = True,
    visual_masking: VisualMasking | None = None,
) -> TeacherForcedOutputs:
    """Old per-token log-probs, entropy and per-layer modality masses of N rollouts from ONE forward each.

    Runs under `torch.no_grad()` in micro-batches of `batch_size` rollouts (all at once when None), through
    the same `completion_forward` that the update step differentiates; with `shared_prefix` (the default,
    `DapoConfig.shared_prefix`) each prompt of a micro-batch is computed once for all its rollouts. The
    model's train/eval mode is left as it is. With `visual_masking`, each micro-batch is scored a second
    time with its images degraded (the masked prompt shared per group as well) and `visual_kl` holds the
    per-token KL between the two (`dapo_ops.attention.visual`); the masks come from their own seeded generators.
    """
    model = unwrap_model(model_or_policy)
    total = int(rollouts.completion_ids.shape[0])
    step = total if not batch_size or batch_size >= total else int(batch_size)
    parts: list[tuple[torch.Tensor, ...]] = []
    progress.begin("teacher-forced", -(-total // max(step, 1)), unit="batch")
    with torch.no_grad():
        for start in range(0, total, max(step, 1)):
            stop = min(start + step, total)
            batch = rollouts if (start, stop) == (0, total) else rollouts.select(list(range(start, stop)))
            result = completion_forward(
                model, batch, temperature=temperature, with_attention=with_attention, shared_prefix=shared_prefix,
                return_logits=visual_masking is not None,
            )
            if visual_masking is not None:
                *result, logits = result
                result = (*result, _masked_pass_kl(model, batch, logits, visual_masking, temperature=temperature,
                                                   shared_prefix=shared_prefix))
                del logits
            parts.append(tuple(t.detach().float().cpu() for t in result))
            progress.advance("teacher-forced")
    if not parts:  # no rollouts
        width = int(rollouts.completion_ids.shape[1])
        empty = torch.zeros(0, width)
        layers = torch.zeros(0, decoder_num_layers(model)) if with_attention else None
        return TeacherForcedOutputs(empty, empty.clone(), layers, None if layers is None else layers.clone(),
                                    empty.clone() if visual_masking is not None else None)
    columns = [torch.cat(column, 0) for column in zip(*parts, strict=True)]
    visual_kl = columns.pop() if visual_masking is not None else None
    if with_attention:
        return TeacherForcedOutputs(*columns, visual_kl=visual_kl)
    return TeacherForcedOutputs(columns[0], columns[1], visual_kl=visual_kl)


def eager_attention_masses(model_or_policy: Any, rollouts: RolloutLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable oracle of the pass's per-layer masses (m_V, m_T), each [B, L] float64: a copy of the model
    with eager attention returns every layer's full weights, averaged over the completion queries. Memory grows
    with T² per layer: for tests and the family probes, not for training."""
    eager = copy.deepcopy(unwrap_model(model_or_policy))
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        outputs = eager(**model_inputs(eager, rollouts, next(eager.parameters()).device), output_attentions=True)
    prompt = torch.zeros_like(rollouts.prompt_mask, dtype=torch.bool)  # [B, P]: prompt tokens ask nothing
    query = torch.cat([prompt, rollouts.completion_mask.bool()], 1)  # [B, P + C]
    return masses_from_attention_weights(outputs.attentions, query, rollouts.vision_mask, rollouts.text_mask)


def rollout_attention_metrics(
    outputs: TeacherForcedOutputs, rollouts: RolloutLike, *, tolerance: float = 2.0
) -> list[StageMetrics]:
    """Per-rollout `{stage: {metric: value}}` from a teacher-forced pass (NaN for rollouts without image)."""
    if outputs.vision_mass is None or outputs.text_mass is None:
        raise ValueError(
            "these outputs carry no attention masses (teacher_forced_pass(with_attention=False))"
        )
    return metrics_from_masses(
        outputs.vision_mass,
        outputs.text_mass,
        rollouts.vision_mask.sum(-1),
        rollouts.text_mask.sum(-1),
        tolerance=tolerance,
    )
