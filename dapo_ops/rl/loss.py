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
    "papo_per_token_loss",
    "policy_loss",
    "selective_log_softmax",
    "vppo_advantage_scale",
    "vppo_token_mask",
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


def vppo_token_mask(dependency: Tensor, completion_mask: Tensor, ratio: float) -> Tensor:
    """BoolTensor [B, T]: each sequence's top ⌈ρ·n⌉ completion tokens by visual dependency, n its completion
    tokens (VPPO's token gradient filtering, arXiv 2510.09285; ties broken by position)."""
    keep = completion_mask.bool()
    scores = torch.where(keep, dependency.detach().float(), torch.full_like(dependency, -torch.inf, dtype=torch.float32))
    k = torch.ceil(keep.sum(-1).to(torch.float64) * ratio).long()  # [B]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, T]
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores) < k[:, None]
    return torch.zeros_like(keep).scatter(-1, order, ranks) & keep


def vppo_advantage_scale(scores: Tensor, valid: Tensor, min_scale: float = 0.8) -> Tensor:
    """[n] factors for the advantages of n rollouts from their mean visual dependency `scores` (VPPO's trajectory
    advantage shaping): s̃ = (s − min)/(max − min) over the `valid` rollouts, then
    `min_scale + s̃·(max_scale − min_scale)` with `max_scale = min_scale + (1 − min_scale)/mean(s̃)`, so the
    factors average 1 over the valid rollouts. 1 for invalid rollouts and when the scores do not spread."""
    factors = torch.ones_like(scores, dtype=torch.float64)
    values = scores.double()[valid.bool()]
    if values.numel() < 2 or float(values.max() - values.min()) <= 1e-6:
        return factors
    low, high = values.min(), values.max()
    normalized = ((values - low) / (high - low)).clamp(0.0, 1.0)
    max_scale = min_scale + (1.0 - min_scale) / (normalized.mean() + 1e-8)
    factors[valid.bool()] = min_scale + normalized * (max_scale - min_scale)
    return factors


def papo_per_token_loss(per_token_logps: Tensor, masked_per_token_logps: Tensor, keep: Tensor, *, papo_coef: float,
                        papo_entropy_coef: float = 0.0, entropies: Tensor | None = None,
                        masked_entropies: Tensor | None = None) -> Tensor:
    """PAPO's per-token terms (arXiv 2507.06448): `−γ·KL_prcp + η·(H[π] + H[π_mask])`, with KL_prcp the k3
    estimate of KL(π(·|q, I) ‖ π(·|q, I_mask)) on the sampled token, `r − log r − 1`, r = π_mask/π (maximised,
    hence the minus), and H the full-vocabulary entropies of the real and the masked input (the double-entropy
    regulariser). Zero on padding; the loss type then normalises it as the policy loss."""
    zero = torch.zeros_like(per_token_logps)
    gap = torch.where(keep, masked_per_token_logps - per_token_logps, zero)  # log r
    terms = -papo_coef * (torch.exp(gap) - gap - 1)
    if papo_entropy_coef != 0.0:
        if entropies is None or masked_entropies is None:
            raise ValueError("papo_entropy_coef != 0 needs the entropies of the real and the masked input")
        both = torch.where(keep, entropies + masked_entropies, zero)
        terms = terms + papo_entropy_coef * both
    return terms


def _check_loss_inputs(per_token_logps: Tensor, completion_mask: Tensor, *, loss_type: str,
                       importance_sampling_level: str, beta: float, ref_per_token_logps: Tensor | None,
                       top_entropy_quantile: float, entropy_coef: float, entropies: Tensor | None,
                       vppo_token_ratio: float, visual_dependency: Tensor | None, papo: bool,
                       masked_per_token_logps: Tensor | None) -> None:
    """Refuse inputs `policy_loss` cannot use, saying which."""
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
    if not 0.0 < vppo_token_ratio <= 1.0:
        raise ValueError(f"vppo_token_ratio={vppo_token_ratio} must be in (0, 1]")
    if vppo_token_ratio < 1.0 and (visual_dependency is None or visual_dependency.shape != per_token_logps.shape):
        raise ValueError("vppo_token_ratio < 1 needs visual_dependency [B, T] like per_token_logps")
    if papo and (masked_per_token_logps is None or masked_per_token_logps.shape != per_token_logps.shape):
        raise ValueError("papo_coef / papo_entropy_coef need masked_per_token_logps [B, T] like per_token_logps")


def _weights(per_token_logps: Tensor, old_per_token_logps: Tensor | None, advantages: Tensor, keep: Tensor,
             mask: Tensor, *, importance_sampling_level: str, beta: float, ref_per_token_logps: Tensor | None,
             use_bias_correction_kl: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The advantages as [B, 1] or [B, T] (zero on padding), the importance weight `w` and the k3 KL (β > 0)."""
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
    return advantages, coef_1, per_token_kl


def _objective(per_token_logps: Tensor, coef_1: Tensor, advantages: Tensor, keep: Tensor, *, loss_type: str,
               epsilon_low: float, epsilon_high: float, delta: float | None, sapo_temperature_pos: float,
               sapo_temperature_neg: float) -> tuple[Tensor, Tensor]:
    """The loss type's per-token loss ℓ [B, T] (or [B, 1] per sequence) and the weight the clip metrics read
    (`coef_1`, capped at δ for two-sided clipping)."""
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        zero = torch.zeros_like(per_token_logps)
        return -clamped_ratios * advantages * torch.where(keep, per_token_logps, zero), coef_1
    if loss_type == "sapo":
        # Python floats in torch.where, as TRL: the same (default-dtype) temperatures, bit for bit.
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        return -soft_coef_1 * advantages, coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages), coef_1


def _normalized(masked: Tensor, mask: Tensor, per_token_logps: Tensor, *, loss_type: str,
                max_completion_length: int | None, num_items_in_batch: int | float | Tensor | None,
                num_processes: int, gradient_accumulation_steps: int) -> Tensor:
    """`Σ mℓ` normalised as `loss_type` says, as TRL does:
    - `grpo`, `sapo`: mean over sequences of `Σ_t mℓ / Σ_t m`;
    - `bnpo`: `Σ mℓ / Σ m` over this micro-batch;
    - `dr_grpo`: `Σ mℓ / (B · max_completion_length)` (default: the completion width T — pass the configured
      value so that padding does not change the loss);
    - `luspo`: mean over sequences of `Σ_t mℓ` (each sequence weighted by its length);
    - `dapo`, `cispo`: `Σ mℓ / num_items_in_batch · num_processes`, `num_items_in_batch` being the
      completion-token count of the whole accumulated batch over all processes (default: this micro-batch's
      `Σ m`). Summing the micro-batch losses then equals one big batch's loss.
    The others are divided by `gradient_accumulation_steps` (the micro-batches of this optimizer step)."""
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
    return loss


def _loss_metrics(coef_1: Tensor, advantages: Tensor, mask: Tensor, per_token_kl: Tensor | None, *, loss_type: str,
                  epsilon_low: float, epsilon_high: float) -> dict[str, float]:
    """Clip shares over the masked tokens (over sequences for per-sequence weights), cispo's, and the k3 KL."""
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
    return metrics


def _loss_token_mask(per_token_loss: Tensor, keep: Tensor, *, entropies: Tensor | None, top_entropy_quantile: float,
                     visual_dependency: Tensor | None, vppo_token_ratio: float) -> tuple[Tensor, Tensor | None]:
    """ℓ kept on TRL's high-entropy tokens and/or VPPO's visually dependent ones (both: either, as VPPO
    combines them); also the entropy mask, which the entropy bonus reads."""
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, keep, 1 - top_entropy_quantile)
    if vppo_token_ratio < 1.0:
        vppo_mask = vppo_token_mask(visual_dependency, keep, vppo_token_ratio)
        token_mask = vppo_mask if entropy_mask is None else vppo_mask | entropy_mask
        return per_token_loss * token_mask, entropy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    return per_token_loss, entropy_mask


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
    visual_dependency: Tensor | None = None,
    vppo_token_ratio: float = 1.0,
    masked_per_token_logps: Tensor | None = None,
    masked_entropies: Tensor | None = None,
    papo_coef: float = 0.0,
    papo_entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The micro-batch loss and its metrics, as TRL's `GRPOTrainer._compute_loss` (one process, no vLLM), plus
    the opt-in VPPO token filter and PAPO terms (docs/metrics.md, "Policy loss" and "Visual dependency").

    The importance weight `w` is `exp(logp − old_logp)` per token (`importance_sampling_level="token"`) or
    `exp(mean_t(logp − old_logp))` per sequence (`"sequence"`, GSPO). Per token, with advantage A:
    - `grpo`/`bnpo`/`dr_grpo`/`dapo`/`luspo`: `ℓ = −min(w'·A, clip(w, 1 − ε, 1 + ε_high)·A)`, where `w' = min(w, δ)`
      when `delta` is set (two-sided clipping, INTELLECT-2) and `w' = w` otherwise;
    - `cispo`: `ℓ = −sg(min(w, ε_high))·A·logp` (the IS weight is clipped and carries no gradient; ScaleRL uses
      ε_high = 5);
    - `sapo`: `ℓ = −(4/τ)·sigmoid(τ·(w − 1))·A`, τ = `sapo_temperature_pos` for A > 0, `_neg` otherwise.
    With `top_entropy_quantile` ρ < 1, ℓ is kept only on the top-ρ completion tokens by `entropies`; with
    `vppo_token_ratio` ρ_v < 1 only on each sequence's top ⌈ρ_v·n⌉ tokens by `visual_dependency` (both: on
    either). Then PAPO's `papo_per_token_loss` (with `papo_coef` or `papo_entropy_coef` > 0, from
    `masked_per_token_logps` / `masked_entropies` of the masked input) and `β·k3` are added,
    `k3 = exp(ref − logp) − (ref − logp) − 1` (times `w` with `use_bias_correction_kl`, TRL's default; off here
    by default). With mask m, `loss_type` normalizes `Σ mℓ` as `_normalized` says (TRL's normalizers). An entropy bonus `entropy_coef · mean entropy` over the loss tokens, divided by
    `gradient_accumulation_steps` but never by a loss type's normalizer, is subtracted (TRL's static bonus).
    With the VPPO and PAPO options at their defaults the loss is exactly TRL's, bit for bit.

    Shapes: per_token_logps (with grad), old_per_token_logps (None: on policy), completion_mask (1 on loss
    tokens), ref_per_token_logps (for β > 0), entropies (for the entropy options, with grad for a bonus),
    visual_dependency (the masked pass's KL) and the masked inputs are all [B, T]; advantages [B] or [B, T].
    `epsilon_high` None means `epsilon`. Metrics are shares over this micro-batch's masked tokens (its
    sequences for per-sequence weights): `clip_ratio/low_mean` (w < 1 − ε, A < 0), `/high_mean` (w > 1 + ε_high,
    A > 0), `/region_mean` (either), `cispo_clip_ratio` (w > ε_high, A > 0) for `cispo`, `kl` (mean k3) for β > 0.
    """
    papo = papo_coef != 0.0 or papo_entropy_coef != 0.0
    _check_loss_inputs(per_token_logps, completion_mask, loss_type=loss_type,
                       importance_sampling_level=importance_sampling_level, beta=beta,
                       ref_per_token_logps=ref_per_token_logps, top_entropy_quantile=top_entropy_quantile,
                       entropy_coef=entropy_coef, entropies=entropies, vppo_token_ratio=vppo_token_ratio,
                       visual_dependency=visual_dependency, papo=papo, masked_per_token_logps=masked_per_token_logps)
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high

    keep = completion_mask.bool()
    mask = keep.to(per_token_logps.dtype)
    advantages, coef_1, per_token_kl = _weights(
        per_token_logps, old_per_token_logps, advantages, keep, mask, importance_sampling_level=importance_sampling_level,
        beta=beta, ref_per_token_logps=ref_per_token_logps, use_bias_correction_kl=use_bias_correction_kl)
    per_token_loss, coef_1 = _objective(
        per_token_logps, coef_1, advantages, keep, loss_type=loss_type, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, delta=delta, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg)
    per_token_loss, entropy_mask = _loss_token_mask(
        per_token_loss, keep, entropies=entropies, top_entropy_quantile=top_entropy_quantile,
        visual_dependency=visual_dependency, vppo_token_ratio=vppo_token_ratio)
    if papo:
        per_token_loss = per_token_loss + papo_per_token_loss(
            per_token_logps, masked_per_token_logps, keep, papo_coef=papo_coef, papo_entropy_coef=papo_entropy_coef,
            entropies=entropies, masked_entropies=masked_entropies)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    masked = per_token_loss * mask  # [B, T]: a per-sequence loss [B, 1] broadcasts over the tokens
    loss = _normalized(masked, mask, per_token_logps, loss_type=loss_type, max_completion_length=max_completion_length,
                       num_items_in_batch=num_items_in_batch, num_processes=num_processes,
                       gradient_accumulation_steps=gradient_accumulation_steps)
    if entropy_coef != 0.0:
        effective = mask if entropy_mask is None else mask * entropy_mask
        safe_entropies = torch.where(keep, entropies, torch.zeros_like(entropies))
        entropy_loss = (safe_entropies * effective).sum() / effective.sum().clamp(min=1.0)
        loss = loss - entropy_coef * (entropy_loss / gradient_accumulation_steps)
    return loss, _loss_metrics(coef_1, advantages, mask, per_token_kl, loss_type=loss_type, epsilon_low=epsilon_low,
                               epsilon_high=epsilon_high)


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
