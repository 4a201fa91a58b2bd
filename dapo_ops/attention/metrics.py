"""Modality attention metrics (docs/metrics.md): the stage math over per-layer masses, and the readable
oracle over full attention weights.

`metrics_from_attention_weights` is the oracle (eager attention, `output_attentions=True`, O(L·H·T²) memory,
for tests and small checks); the lean path (`dapo_ops.attention.recorder`) records the same per-layer masses
in O(T). Both reduce with `metrics_from_masses`, so the stage math exists once. A new attention metric is a
line in `_stage_metrics` plus its name in `METRIC_NAMES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from dapo_ops.config.dapo import STAGES

# Per-rollout metrics of each stage: the measurements, then the balance derived from the MDI. Columns
# `attn/{stage}/{name}`, report blocks and `batch_means` use this order.
METRIC_NAMES: tuple[str, ...] = (
    "mdi",
    "aei_text",
    "aei_vision",
    "text_ratio",
    "vision_ratio",
    "mdi_balance",
    "mdi_penalty",
)
# The subset logged per round as `attention/{stage}/{name}` (in the round metrics' order).
LOGGED_METRIC_NAMES: tuple[str, ...] = ("mdi", "mdi_balance", "mdi_penalty", "aei_text", "aei_vision")

StageMetrics = dict[str, dict[str, float]]



# ----------------------------------------------------------------------------------------- stage math


def stage_layers(num_layers: int) -> dict[str, range]:
    """Decoder layers per stage: early [0, ⌊L/3⌋), middle [⌊L/3⌋, ⌊2L/3⌋), late [⌊2L/3⌋, L),
    all [0, L).

    With L < 3 some stages are empty (L=2: early; L=1: early and middle); their metrics are NaN.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    a, b = num_layers // 3, (2 * num_layers) // 3
    return {
        "early": range(0, a),
        "middle": range(a, b),
        "late": range(b, num_layers),
        "all": range(num_layers),
    }


def _nan_metrics() -> dict[str, float]:
    return dict.fromkeys(METRIC_NAMES, math.nan)


def _stage_metrics(m_v: float, m_t: float, n_v: int, n_t: int, tolerance: float) -> dict[str, float]:
    """The docs/metrics.md definitions for one rollout and stage from the stage masses M_V, M_T and the key counts |V|, |T|."""
    if n_v <= 0 or n_t <= 0 or not (m_v + m_t > 0):  # also catches NaN masses
        # |V| = 0 is undefined by definition; |T| = 0 would make t = 0 and mdi 0/0: undefined as well.
        return _nan_metrics()
    text_ratio = m_t / (m_t + m_v)
    vision_ratio = m_v / (m_t + m_v)
    t_share = n_t / (n_t + n_v)
    v_share = n_v / (n_t + n_v)
    aei_text = text_ratio / t_share
    aei_vision = vision_ratio / v_share
    # = (M_T/|T|) / (M_V/|V|); a vision mass that underflowed to 0 gives inf (total text dominance).
    mdi = aei_text / aei_vision if aei_vision > 0 else math.inf
    log_mdi = abs(math.log(mdi)) if mdi > 0 else math.inf
    balance = min(max(1.0 - log_mdi / math.log(tolerance), 0.0), 1.0)
    return {
        "mdi": mdi,
        "aei_text": aei_text,
        "aei_vision": aei_vision,
        "mdi_balance": balance,
        "mdi_penalty": 1.0 - balance,
        "text_ratio": text_ratio,
        "vision_ratio": vision_ratio,
    }


def metrics_from_masses(
    vision_mass: torch.Tensor,
    text_mass: torch.Tensor,
    num_vision: torch.Tensor | Sequence[int],
    num_text: torch.Tensor | Sequence[int],
    *,
    tolerance: float = 2.0,
) -> list[StageMetrics]:
    """Per-rollout `{stage: {metric: value}}` from per-layer masses.

    vision_mass, text_mass: [B, L], m_V(l) and m_T(l) = mean over heads and query rows of the attention
    summed over the vision / text keys. num_vision, num_text: [B] key counts |V|, |T|.
    A rollout with |V| = 0 (or |T| = 0, or no query rows, i.e. NaN masses) gets NaN for every metric.
    """
    if not tolerance > 1.0:
        raise ValueError(f"mdi tolerance R must be > 1 (ln R divides), got {tolerance}")
    vision = torch.as_tensor(vision_mass).detach().to("cpu", torch.float64)
    text = torch.as_tensor(text_mass).detach().to("cpu", torch.float64)
    if vision.ndim != 2 or vision.shape != text.shape:
        raise ValueError(f"masses must both be [B, L], got {tuple(vision.shape)} and {tuple(text.shape)}")
    n_vision = torch.as_tensor(num_vision).reshape(-1).tolist()
    n_text = torch.as_tensor(num_text).reshape(-1).tolist()
    if not len(n_vision) == len(n_text) == vision.shape[0]:
        raise ValueError("num_vision / num_text must have one count per row of the masses")
    stages = stage_layers(vision.shape[1])
    # Stage means for all rollouts at once; an empty stage stays NaN.
    stage_means = {
        stage: (
            (
                vision[:, layers.start : layers.stop].mean(1).tolist(),
                text[:, layers.start : layers.stop].mean(1).tolist(),
            )
            if len(layers)
            else ([math.nan] * vision.shape[0], [math.nan] * vision.shape[0])
        )
        for stage, layers in stages.items()
    }
    results: list[StageMetrics] = []
    for b in range(vision.shape[0]):
        results.append(
            {
                stage: _stage_metrics(m_v[b], m_t[b], int(n_vision[b]), int(n_text[b]), tolerance)
                for stage, (m_v, m_t) in stage_means.items()
            }
        )
    return results


def masses_from_attention_weights(
    attentions: Sequence[torch.Tensor],
    query_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    text_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's per-layer masses (m_V, m_T), each [B, L] float64, from full attention weights.

    m_V(l) = mean over heads h and query rows q of Σ_{k∈V} A[l, h, q, k]; NaN for a row without queries.
    """
    query = query_mask.detach().to("cpu").bool()
    vision = vision_mask.detach().to("cpu", torch.float64)
    text = text_mask.detach().to("cpu", torch.float64)
    num_queries = query.sum(-1)  # [B]; 0 queries -> 0/0 = NaN
    vision_per_layer, text_per_layer = [], []
    for weights in attentions:
        a = weights.detach().to("cpu", torch.float64)  # [B, H, Q, K]
        on_vision = (a * vision[:, None, None, :]).sum(-1).mean(1)  # [B, Q]: Σ_{k∈V} A, mean over heads
        on_text = (a * text[:, None, None, :]).sum(-1).mean(1)
        # `where`, not a product: rows that are not queries (e.g. fully masked padding) may hold NaN.
        vision_per_layer.append(torch.where(query, on_vision, 0.0).sum(-1) / num_queries)
        text_per_layer.append(torch.where(query, on_text, 0.0).sum(-1) / num_queries)
    return torch.stack(vision_per_layer, 1), torch.stack(text_per_layer, 1)


def metrics_from_attention_weights(
    attentions: Sequence[torch.Tensor],
    query_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    tolerance: float = 2.0,
) -> list[StageMetrics]:
    """The oracle: docs/metrics.md straight from attention weights.

    attentions: per decoder layer [B, H, Q, K] (e.g. `output_attentions=True` with eager attention, where
    Q = K = the full sequence); query_mask [B, Q]; vision_mask, text_mask [B, K] (bool).
    Returns per sample `{stage: {mdi, aei_text, aei_vision, mdi_balance, mdi_penalty, text_ratio,
    vision_ratio}}` for early, middle, late, all; all NaN for a sample with no vision key or no query.
    """
    vision_mass, text_mass = masses_from_attention_weights(attentions, query_mask, vision_mask, text_mask)
    return metrics_from_masses(
        vision_mass, text_mass, vision_mask.sum(-1), text_mask.sum(-1), tolerance=tolerance
    )


def batch_means(per_rollout: Sequence[Mapping[str, Mapping[str, float]]]) -> StageMetrics:
    """`attention/{stage}/{name}` batch values: the mean over rollouts, NaN ones left out (NaN if all are)."""
    means: StageMetrics = {}
    for stage in STAGES:
        means[stage] = {}
        for name in METRIC_NAMES:
            values = [float(r[stage][name]) for r in per_rollout if not math.isnan(float(r[stage][name]))]
            means[stage][name] = sum(values) / len(values) if values else math.nan
    return means
