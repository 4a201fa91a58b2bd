"""Clipped policy-gradient loss (TRL semantics) and memory-lean per-token log-probs and entropy.

See docs/metrics.md, "Policy loss". Shapes: B sequences × T completion positions × V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dapo_ops.config.dapo import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_TYPES",
    "entropy_from_logits",
    "high_entropy_mask",
    "policy_loss",
    "selective_log_softmax",
]

# Rows per chunk are chosen so that one chunk's float32 temporaries stay near this many elements (16 MiB):
# a real 152k vocabulary gets ~27 rows per chunk. On CPU this size was also the fastest (cache-friendly).
_CHUNK_ELEMENTS = 1 << 22

# Loss types whose normalizer is the token count of the whole accumulated batch (TRL's `num_items_in_batch`);
# the others are normalized per micro-batch and divided by the accumulation steps.
_GLOBAL_TOKEN_NORMALIZED = ("dapo", "cispo")


def high_entropy_mask(entropies: Tensor, completion_mask: Tensor, threshold: float) -> Tensor:
    """BoolTensor [B, T]: completion tokens whose entropy is at least the `threshold` quantile of this batch's
    completion-token entropies (TRL's `get_high_entropy_mask` on one process; `threshold = 1 − ρ`)."""
    keep = completion_mask.bool()
    local = entropies.detach()[keep].float()  # [n] as TRL: the quantile is taken in float32
    if local.numel() == 0:
        return torch.zeros_like(keep)
    entropy_threshold = torch.quantile(local, threshold)
    masked_entropies = torch.where(keep, entropies.detach(), torch.zeros_like(entropies))  # [B, T]
    return (masked_entropies >= entropy_threshold) & keep


def policy_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_per_token_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    entropies: Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy_coef: float = 0.0,
    use_bias_correction_kl: bool = False,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
) -> tuple[Tensor, dict[str, float]]:
    """The micro-batch loss and its metrics, as TRL's `GRPOTrainer._compute_loss` (one process, no vLLM).

    The importance weight `w` is `exp(logp − old_logp)` per token (`importance_sampling_level="token"`) or
    `exp(mean_t(logp − old_logp))` per sequence (`"sequence"`, GSPO). Per token, with advantage A:
    - `grpo`/`bnpo`/`dr_grpo`/`dapo`/`luspo`: `ℓ = −min(w'·A, clip(w, 1 − ε, 1 + ε_high)·A)`, where `w' = min(w, δ)`
      when `delta` is set (two-sided clipping, INTELLECT-2) and `w' = w` otherwise;
    - `cispo`: `ℓ = −sg(min(w, ε_high))·A·logp` (the IS weight is clipped and carries no gradient; ScaleRL uses
      ε_high = 5);
    - `sapo`: `ℓ = −(4/τ)·sigmoid(τ·(w − 1))·A`, τ = `sapo_temperature_pos` for A > 0, `_neg` otherwise.
    With `top_entropy_quantile` ρ < 1, ℓ is kept only on the top-ρ completion tokens by `entropies`. Then
    `β·k3` is added, `k3 = exp(ref − logp) − (ref − logp) − 1` (times `w` with `use_bias_correction_kl`, TRL's
    default; off here by default). With mask m, `loss_type` normalizes `Σ mℓ` as
    - `grpo`, `sapo`: mean over sequences of `Σ_t mℓ / Σ_t m`;
    - `bnpo`: `Σ mℓ / Σ m` over this micro-batch;
    - `dr_grpo`: `Σ mℓ / (B · max_completion_length)` (default: the completion width T — pass the configured
      value so that padding does not change the loss);
    - `luspo`: mean over sequences of `Σ_t mℓ` (each sequence weighted by its length);
    - `dapo`, `cispo`: `Σ mℓ / num_items_in_batch · num_processes`, `num_items_in_batch` being the
      completion-token count of the whole accumulated batch over all processes (default: this micro-batch's
      `Σ m`). Summing the micro-batch losses then equals one big batch's loss.
    The others are divided by `gradient_accumulation_steps` (the micro-batches of this optimizer step).
    An entropy bonus `entropy_coef · mean entropy` over the loss tokens, divided by
    `gradient_accumulation_steps` but never by a loss type's normalizer, is subtracted (TRL's static bonus).

    Args:
        per_token_logps: [B, T] log-probs of the current policy (with grad).
        old_per_token_logps: [B, T] log-probs of the sampling policy; None means "on policy" (detached current).
        advantages: [B] or [B, T].
        completion_mask: [B, T], 1 on the tokens that enter the loss.
        epsilon_high: upper clip; None means `epsilon` (DAPO uses 0.28).
        beta: KL coefficient; > 0 needs `ref_per_token_logps`.
        entropies: [B, T] per-token entropy; needed for `top_entropy_quantile < 1` and `entropy_coef != 0`
            (with grad for the bonus to act). The quantile is over this micro-batch (TRL: over all processes).

    Returns:
        `(loss, metrics)`; metrics are shares over the masked tokens of this micro-batch (over its sequences
        when the weights are per sequence): `clip_ratio/low_mean` (w < 1 − ε with A < 0),
        `clip_ratio/high_mean` (w > 1 + ε_high with A > 0), `clip_ratio/region_mean` (either) for every loss
        type (TRL logs them for the clipped family only), `cispo_clip_ratio` (w > ε_high with A > 0) for
        `cispo`, and `kl` (mean k3 estimator) when β > 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level={importance_sampling_level!r} is unknown; "
            f"use one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
        )
    if per_token_logps.dim() != 2 or completion_mask.shape != per_token_logps.shape:
        raise ValueError(
            f"per_token_logps {tuple(per_token_logps.shape)} and completion_mask {tuple(completion_mask.shape)} "
            "must both be [B, T]"
        )
    if beta > 0 and ref_per_token_logps is None:
        raise ValueError("beta > 0 needs ref_per_token_logps")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={top_entropy_quantile} must be in [0, 1]")
    if (top_entropy_quantile < 1.0 or entropy_coef != 0.0) and entropies is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the per-token entropies")
    if entropies is not None and entropies.shape != per_token_logps.shape:
        raise ValueError(f"entropies {tuple(entropies.shape)} must be [B, T] like per_token_logps")
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high

    keep = completion_mask.bool()
    mask = keep.to(per_token_logps.dtype)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(per_token_logps.dtype)
    if advantages.shape[1] != 1:
        advantages = torch.where(keep, advantages, torch.zeros_like(advantages))

    # Differences are zeroed on padding *before* exp: garbage log-probs there (even ±inf) then give ratio 1
    # and zero gradient, where masking afterwards would give inf · 0 = NaN.
    zero = torch.zeros_like(per_token_logps)
    log_ratio = torch.where(keep, per_token_logps - old_per_token_logps, zero)  # [B, T]
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio  # [B, T]
    else:  # one weight per sequence: the geometric mean of its token ratios (GSPO)
        log_importance_weights = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    coef_1 = torch.exp(log_importance_weights)  # [B, T] or [B, 1]

    per_token_kl = None
    if beta > 0:
        ref_gap = torch.where(keep, ref_per_token_logps - per_token_logps, zero)
        per_token_kl = torch.exp(ref_gap) - ref_gap - 1  # [B, T]
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * torch.where(keep, per_token_logps, zero)
    elif loss_type == "sapo":
        # Python floats in torch.where, as TRL: the same (default-dtype) temperatures, bit for bit.
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)

    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, keep, 1 - top_entropy_quantile)
        per_token_loss = per_token_loss * entropy_mask
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    masked = per_token_loss * mask  # [B, T]: a per-sequence loss [B, 1] broadcasts over the tokens
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        width = per_token_logps.shape[1] if max_completion_length is None else max_completion_length
        loss = masked.sum() / (per_token_logps.shape[0] * width)
    elif loss_type == "luspo":
        loss = masked.sum(-1).mean()
    else:  # dapo, cispo
        items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        items = torch.as_tensor(items, dtype=per_token_logps.dtype, device=per_token_logps.device)
        loss = masked.sum() / items.clamp(min=1.0)
        if num_processes != 1:
            loss = loss * num_processes
    if loss_type not in _GLOBAL_TOKEN_NORMALIZED and gradient_accumulation_steps != 1:
        loss = loss / gradient_accumulation_steps

    if entropy_coef != 0.0:
        effective = mask if entropy_mask is None else mask * entropy_mask
        safe_entropies = torch.where(keep, entropies, torch.zeros_like(entropies))
        entropy_loss = (safe_entropies * effective).sum() / effective.sum().clamp(min=1.0)
        loss = loss - entropy_coef * (entropy_loss / gradient_accumulation_steps)

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)

        def masked_mean(values: Tensor) -> float:
            if values.shape[1] == 1:  # one value per sequence: the share of sequences, as TRL
                return float(values.to(mask.dtype).sum() / max(values.shape[0], 1))
            return float((values.to(mask.dtype) * mask).sum() / tokens)

        is_low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        is_high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        metrics = {
            "clip_ratio/low_mean": masked_mean(is_low),
            "clip_ratio/high_mean": masked_mean(is_high),
            "clip_ratio/region_mean": masked_mean(is_low | is_high),
        }
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_mean((coef_1 > epsilon_high) & (advantages > 0))
        if per_token_kl is not None:
            metrics["kl"] = masked_mean(per_token_kl)
    return loss, metrics


def _row_chunks(flat: Tensor, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be positive")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(1, flat.shape[-1]))


def selective_log_softmax(
    logits: Tensor,
    index: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """`log_softmax(logits / temperature).gather(-1, index)` without a full-size log-softmax copy.

    `logits` [..., V] (e.g. [B, T, V]), `index` [...] → log-probs [...], computed over chunks of rows so that
    the only full-vocabulary temporaries are one chunk's. With autograd recording, each chunk uses TRL's
    `x_i − logsumexp(x)`, whose backward keeps nothing vocabulary-sized beyond the logits themselves (a
    log-softmax would keep its whole output; a temperature ≠ 1 or an upcast does keep the scaled chunks);
    without, a chunk's `log_softmax` + gather (faster on CPU).
    Half-precision logits are upcast per chunk (importance ratios need more than bf16's 8 bits), and the
    result is float32 for them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if index.shape != logits.shape[:-1]:
        raise ValueError(
            f"index {tuple(index.shape)} must match logits {tuple(logits.shape)} without the last dim"
        )
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_index = index.reshape(-1, 1).long()
    rows = _row_chunks(flat_logits, chunk_size)
    recording = torch.is_grad_enabled() and logits.requires_grad
    out = []
    for chunk, chunk_index in zip(flat_logits.split(rows), flat_index.split(rows), strict=True):
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        if recording:
            out.append(chunk.gather(-1, chunk_index).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
        else:
            out.append(F.log_softmax(chunk, dim=-1).gather(-1, chunk_index).squeeze(-1))
    result = torch.cat(out) if out else flat_logits.new_zeros(0, dtype=torch.float32)
    return result.reshape(index.shape)


def entropy_from_logits(
    logits: Tensor,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Shannon entropy (nats) of `softmax(logits / temperature)` along the last dim, computed over chunks of rows.

    `logits` [..., V] → [...]; `chunk_size` rows per chunk (None: sized to ~16 MiB of float32 temporaries).
    It is usually only logged: call it under `torch.no_grad()` unless an entropy bonus needs its gradient.
    Half-precision logits are upcast per chunk and the result is float32 for them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    rows = _row_chunks(flat_logits, chunk_size)
    out = []
    for chunk in flat_logits.split(rows):
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        logps = F.log_softmax(chunk, dim=-1)
        # p·log p is 0 for p = 0; the clamp keeps -inf logits (masked vocabulary) from giving 0·(-inf) = NaN.
        out.append(-(logps.exp() * logps.clamp(min=torch.finfo(logps.dtype).min)).sum(-1))
    result = torch.cat(out) if out else flat_logits.new_zeros(0, dtype=torch.float32)
    return result.reshape(logits.shape[:-1])
