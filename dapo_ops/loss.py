"""Clipped policy-gradient loss (TRL semantics) and memory-lean per-token log-probs and entropy.

See METRICS.md, "Policy loss (TRL semantics)". Shapes: B sequences × T completion positions × V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dapo_ops.config import LOSS_TYPES

__all__ = ["LOSS_TYPES", "entropy_from_logits", "policy_loss", "selective_log_softmax"]


# Rows per chunk are chosen so that one chunk's float32 temporaries stay near this many elements (16 MiB):
# a real 152k vocabulary gets ~27 rows per chunk. On CPU this size was also the fastest (cache-friendly).
_CHUNK_ELEMENTS = 1 << 22


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
) -> tuple[Tensor, dict[str, float]]:
    """The micro-batch loss and its metrics, as TRL's `GRPOTrainer._compute_loss` (token-level sampling).

    Per token, with `ratio = exp(logp − old_logp)`:
    `ℓ = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε_high)·A) + β·(exp(ref − logp) − (ref − logp) − 1)`.
    With mask m, `loss_type` normalizes `Σ mℓ` as
    - `grpo`: mean over sequences of `Σ_t mℓ / Σ_t m`;
    - `bnpo`: `Σ mℓ / Σ m` over this micro-batch;
    - `dr_grpo`: `Σ mℓ / (B · max_completion_length)` (default: the completion width T — pass the configured
      value so that padding does not change the loss);
    - `dapo`: `Σ mℓ / num_items_in_batch`, the completion-token count of the whole accumulated batch (default:
      this micro-batch's `Σ m`). Summing the micro-batch losses then equals one big batch's loss.
    For grpo/bnpo/dr_grpo the caller divides by the number of accumulated micro-batches, as TRL does.

    Args:
        per_token_logps: [B, T] log-probs of the current policy (with grad).
        old_per_token_logps: [B, T] log-probs of the sampling policy; None means "on policy" (detached current).
        advantages: [B] or [B, T].
        completion_mask: [B, T], 1 on completion tokens up to and including EOS.
        epsilon_high: upper clip; None means `epsilon` (DAPO uses 0.28).
        beta: KL coefficient; > 0 needs `ref_per_token_logps`.

    Returns:
        `(loss, metrics)`; metrics are token shares over the masked tokens of this micro-batch:
        `clip_ratio/low_mean` (ratio < 1 − ε with A < 0), `clip_ratio/high_mean` (ratio > 1 + ε_high with A > 0),
        `clip_ratio/region_mean` (either), and `kl` (mean k3 estimator) when β > 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
    if per_token_logps.dim() != 2 or completion_mask.shape != per_token_logps.shape:
        raise ValueError(
            f"per_token_logps {tuple(per_token_logps.shape)} and completion_mask {tuple(completion_mask.shape)} "
            "must both be [B, T]"
        )
    if beta > 0 and ref_per_token_logps is None:
        raise ValueError("beta > 0 needs ref_per_token_logps")
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
    log_ratio = torch.where(keep, per_token_logps - old_per_token_logps, zero)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)

    per_token_kl = None
    if beta > 0:
        ref_gap = torch.where(keep, ref_per_token_logps - per_token_logps, zero)
        per_token_kl = torch.exp(ref_gap) - ref_gap - 1
        per_token_loss = per_token_loss + beta * per_token_kl

    masked_sum = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked_sum / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        width = per_token_logps.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_sum / (per_token_logps.shape[0] * width)
    else:  # dapo
        items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        items = torch.as_tensor(items, dtype=per_token_logps.dtype, device=per_token_logps.device)
        loss = masked_sum / items.clamp(min=1.0)

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)

        def masked_mean(values: Tensor) -> float:
            return float((values.to(mask.dtype) * mask).sum() / tokens)

        is_low = (ratio < 1 - epsilon_low) & (advantages < 0)
        is_high = (ratio > 1 + epsilon_high) & (advantages > 0)
        metrics = {
            "clip_ratio/low_mean": masked_mean(is_low),
            "clip_ratio/high_mean": masked_mean(is_high),
            "clip_ratio/region_mean": masked_mean(is_low | is_high),
        }
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
