"""Group-relative advantages and DAPO's batch shaping (docs/metrics.md, "Advantages").

Rows are GROUP-MAJOR: rollout i belongs to prompt i // G, G = `num_generations`. Statistics ignore NaN
rewards (unscorable rollouts, see `rewards.total_rewards`), as TRL's `nanmean`/`nanstd` do; with no NaN they
are the plain mean and the unbiased std.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "STD_EPS",
    "dynamic_sampling_keep_mask",
    "group_advantages",
    "group_reward_std",
    "nanstd",
    "normalize_then_sum",
    "overlong_penalty",
    "truncated_completions_mask",
    "zero_std_groups",
]

STD_EPS = 1e-4  # TRL's constant: keeps near-constant groups from blowing up


def nanstd(values: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased std ignoring NaN (TRL's `nanstd`); NaN where fewer than two values are defined."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1).clamp(min=1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std if keepdim else std.squeeze(dim)


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}"
        )
    # float64: the mean of G equal float32 values is then exact, so a constant group gets exactly zero
    # advantage (in float32, 5.7367 three times leaves ~5e-7, which the 1e-4 epsilon amplifies to ~5e-3).
    return rewards.to(torch.float64).view(-1, num_generations)


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def group_reward_std(rewards: Tensor, num_generations: int) -> Tensor:
    """Per-prompt unbiased std of the rewards, shape [P]; 0 for G = 1 and for groups with < 2 defined rewards."""
    grouped = _grouped(rewards, num_generations)
    if num_generations == 1:
        return torch.zeros(grouped.shape[0], dtype=_out_dtype(rewards), device=grouped.device)
    return torch.nan_to_num(nanstd(grouped, dim=1), nan=0.0).to(_out_dtype(rewards))


def zero_std_groups(rewards: Tensor, num_generations: int) -> Tensor:
    """BoolTensor [P]: True where a group's rewards are all equal (up to float noise) — no learning signal.

    TRL's `frac_reward_zero_std` is the mean of this mask.
    """
    grouped = _grouped(rewards, num_generations)
    if num_generations == 1:
        return torch.ones(grouped.shape[0], dtype=torch.bool, device=grouped.device)
    std = torch.nan_to_num(nanstd(grouped, dim=1), nan=0.0)
    return torch.isclose(std, torch.zeros_like(std))


def dynamic_sampling_keep_mask(rewards: Tensor, num_generations: int) -> Tensor:
    """BoolTensor [N]: DAPO's dynamic sampling keeps the rollouts of groups whose reward std is nonzero."""
    return (~zero_std_groups(rewards, num_generations)).repeat_interleave(num_generations)


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Tensor:
    """`A_i = (r_i − mean_g r) / (std + 1e-4)`, shape [N] (TRL's `sum_then_normalize`).

    `scale_rewards`: "group" divides by the group's unbiased std, "batch" by the whole batch's std (the mean
    stays per group), "none" does not divide (Dr. GRPO). NaN rewards are left out of the statistics and get
    advantage 0.
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards={scale_rewards!r} is unknown; use 'group', 'batch' or 'none'")
    grouped = _grouped(rewards, num_generations)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        std = (
            nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
        )
        advantages = advantages / (std + STD_EPS)
    elif scale_rewards == "batch":
        std = (
            nanstd(grouped)
            if grouped.numel() > 1
            else torch.zeros((), dtype=grouped.dtype, device=grouped.device)
        )
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0).to(_out_dtype(rewards))


def normalize_then_sum(rewards_per_func: Tensor, weights: Tensor | list[float], num_generations: int) -> Tensor:
    """Advantages [N] of TRL's `multi_objective_aggregation="normalize_then_sum"` (GDPO).

    Each reward column of `rewards_per_func` [N, K] is normalized within its group,
    `(r − mean_g) / (std_g + 1e-4)`, the columns are summed with `weights` [K] (NaN columns skipped), and the
    sum is normalized over the whole batch, `(s − mean) / (std + 1e-4)`. So a reward on a large scale (an
    accuracy in {0, 3}) no longer drowns a small one (a format reward in {0, 1}). `scale_rewards` plays no
    part, as in TRL. Rows whose rewards are all NaN (unscorable) get advantage 0.
    """
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [N, K], got shape {tuple(rewards_per_func.shape)}")
    num_rows, num_funcs = rewards_per_func.shape
    weights = torch.as_tensor(weights, dtype=torch.float64, device=rewards_per_func.device)
    if weights.shape != (num_funcs,):
        raise ValueError(f"{weights.numel()} reward weights for {num_funcs} reward columns")
    if num_generations < 1 or num_rows % num_generations:
        raise ValueError(f"{num_rows} rewards do not split into groups of num_generations={num_generations}")
    grouped = rewards_per_func.to(torch.float64).view(-1, num_generations, num_funcs)  # [P, G, K]
    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # [P, 1, K]
    std = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    normalized = ((grouped - mean) / (std + STD_EPS)).view(-1, num_funcs)  # [N, K]
    summed = (normalized * weights).nansum(dim=1)  # [N]
    summed[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
    batch_std = nanstd(summed) if num_rows > 1 else torch.zeros((), dtype=summed.dtype)
    advantages = (summed - torch.nanmean(summed)) / (batch_std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0).to(_out_dtype(rewards_per_func))


def truncated_completions_mask(completion_mask: Tensor, is_eos: Tensor) -> Tensor:
    """`completion_mask` [N, T] with the rows of truncated completions (no EOS, `is_eos` [N] False) zeroed:
    TRL's `mask_truncated_completions`, which DAPO recommends, so a clipped answer is neither rewarded nor
    penalized for its unfinished tail."""
    if is_eos.shape != completion_mask.shape[:1]:
        raise ValueError(f"is_eos {tuple(is_eos.shape)} must have one flag per row of completion_mask "
                         f"{tuple(completion_mask.shape)}")
    return completion_mask * is_eos.to(completion_mask.device).bool().unsqueeze(1).to(completion_mask.dtype)


def overlong_penalty(
    completion_lengths: Tensor,
    max_completion_length: int,
    overlong_buffer: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO's soft overlong punishment (eq. 13), a per-rollout reward ≤ 0; TRL's `get_soft_overlong_punishment`.

    With Lmax = `max_completion_length` and B = `overlong_buffer`: 0 while L ≤ Lmax − B, then
    `(Lmax − B − L) / B · factor` (linear from 0 to −factor at L = Lmax), and −factor beyond Lmax. B = 0 gives
    only the hard −factor beyond Lmax.
    """
    lengths = completion_lengths.float()
    if overlong_buffer < 0 or overlong_buffer > max_completion_length:
        raise ValueError(
            f"overlong_buffer={overlong_buffer} must be in [0, max_completion_length={max_completion_length}]"
        )
    threshold = max_completion_length - overlong_buffer
    penalty = torch.zeros_like(lengths)
    if overlong_buffer > 0:
        in_buffer = (lengths > threshold) & (lengths <= max_completion_length)
        penalty = torch.where(in_buffer, (threshold - lengths) / overlong_buffer * penalty_factor, penalty)
    return torch.where(lengths > max_completion_length, torch.full_like(lengths, -penalty_factor), penalty)
