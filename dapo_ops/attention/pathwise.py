"""The attention reward's pathwise gradient: the part of ∇E[reward] that the policy-gradient loss leaves out.

A task reward depends on the sampled tokens y only, so its gradient is the score-function (REINFORCE) term
E[r·∇log π(y)] that GRPO's clipped loss estimates. `mdi_reward` also depends on the weights directly: it
reads the policy's own attention while it scores y, r = r(θ, y). Its exact gradient has a second term,

    ∇θ E_y[r(θ, y)] = E_y[r(θ, y)·∇θ log π(y)] + E_y[∇θ r(θ, y)],

the pathwise term. The first only re-weights completions whose attention happened to differ (siblings share
one image and differ little), the second moves the attention itself. With `mdi_pathwise_coef` c > 0 the update
adds `−c · w · mean_i r(θ, y_i)` over the step's rollouts to the loss, with r computed by the same shaping from
differentiable modality masses of the update's own forward (docs/metrics.md, "The attention reward's
gradient"). c = 1 weights the two terms as the gradient of the expected reward does (estimated, like the
policy-gradient term, on the step's rollouts, without importance weights); it is a knob because the
policy-gradient term is a normalized estimate (advantages divided by the group's reward std, clipped ratios),
so the two terms' exact proportion is not the one that learns the task best.

Only per-rollout shapings have this term. A group-relative reward (`group_log_distance`, `group_zscore`)
sums to zero over every group by construction (exactly inside its ±1 clip), so its pathwise term is zero.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from dapo_ops.attention.metrics import stage_layers

if TYPE_CHECKING:
    from dapo_ops.config.dapo import DapoConfig

# Shapings whose reward is a function of one rollout's MDI (see `rewards.mdi_reward`).
PER_ROLLOUT_SHAPINGS: frozenset[str] = frozenset({"clip", "log_distance"})


def pathwise_weight(config: DapoConfig) -> float:
    """`mdi_pathwise_coef` times the weight of `mdi_reward` (0: no term, no differentiable attention)."""
    if not config.mdi_pathwise_coef or "mdi_reward" not in config.reward_funcs:
        return 0.0
    return config.mdi_pathwise_coef * float(config.reward_weights[config.reward_funcs.index("mdi_reward")])


def stage_log_mdi(
    vision_mass: torch.Tensor, text_mass: torch.Tensor, num_vision: torch.Tensor, num_text: torch.Tensor,
    stage: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln MDI [B], defined [B] bool) of one stage from per-layer masses [B, L] and key counts [B].

    ln MDI = ln(M_T/|T|) − ln(M_V/|V|) with M the stage's mean over layers, as `attention.metrics_from_masses`;
    rows without image or text keys, query rows or a positive mass are undefined (their ln MDI is 0 and has
    no gradient, so a NaN never reaches the backward), and so is every row of an empty stage (L < 3).
    """
    layers = stage_layers(int(vision_mass.shape[1]))[stage]
    if not len(layers):  # as `metrics_from_masses`: NaN metrics, here no term
        zeros = vision_mass.new_zeros(vision_mass.shape[0]).float()
        return zeros, torch.zeros_like(zeros, dtype=torch.bool)
    m_v = vision_mass[:, layers.start : layers.stop].float().mean(1)  # [B]
    m_t = text_mass[:, layers.start : layers.stop].float().mean(1)  # [B]
    n_v = num_vision.to(m_v.device, torch.float32)  # [B]
    n_t = num_text.to(m_v.device, torch.float32)  # [B]
    defined = (n_v > 0) & (n_t > 0) & torch.isfinite(m_v) & torch.isfinite(m_t) & (m_v > 0) & (m_t > 0)
    one = torch.ones_like(m_v)
    # Undefined rows read 1s, so log and its gradient stay finite there; `where` then drops them.
    log_mdi = (torch.log(torch.where(defined, m_t, one)) - torch.log(torch.where(defined, n_t, one))
               - torch.log(torch.where(defined, m_v, one)) + torch.log(torch.where(defined, n_v, one)))
    return torch.where(defined, log_mdi, torch.zeros_like(log_mdi)), defined


def shaped_reward(log_mdi: torch.Tensor, shaping: str, tolerance: float) -> torch.Tensor:
    """`rewards.mdi_reward` of a per-rollout shaping as a differentiable function of ln MDI [B] -> [B]."""
    if shaping not in PER_ROLLOUT_SHAPINGS:
        raise ValueError(f"mdi_shaping={shaping!r} has no pathwise term (use one of {sorted(PER_ROLLOUT_SHAPINGS)})")
    distance = log_mdi.abs() / math.log(tolerance)  # [B] d / ln R
    if shaping == "clip":
        return 2.0 * (1.0 - distance).clamp(0.0, 1.0) - 1.0
    return 1.0 - 2.0 * distance


def pathwise_loss(
    vision_mass: torch.Tensor,
    text_mass: torch.Tensor,
    num_vision: torch.Tensor,
    num_text: torch.Tensor,
    *,
    weight: float,
    shaping: str,
    tolerance: float,
    stage: str,
    denominator: int,
    include: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rewards, entered): `−weight · Σ_i r(θ, y_i) / denominator` over a micro-batch's defined rows, r [B]
    (0 for rows left out) and which rows entered [B] bool.

    `denominator` is the number of rollouts in the whole optimizer step (all micro-batches and ranks), so that
    the micro-batch losses add up to the step mean, like the token-normalized policy loss. `include` [B] bool:
    the rows that enter (default: all).
    """
    log_mdi, defined = stage_log_mdi(vision_mass, text_mass, num_vision, num_text, stage)  # [B], [B]
    if include is not None:
        defined = defined & include.to(defined.device)
    reward = shaped_reward(log_mdi, shaping, tolerance)  # [B]
    reward = torch.where(defined, reward, torch.zeros_like(reward))
    return -weight * reward.sum() / max(int(denominator), 1), reward.detach(), defined
