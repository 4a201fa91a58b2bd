"""Training-health findings: collapse of entropy or format, clipped completions, zero-variance groups,
a saturated attention reward, non-finite numbers. Pure functions on a round's metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HealthThresholds:
    min_entropy: float = 0.05
    min_entropy_fraction_of_start: float = 0.1
    min_format_reward: float = 0.5
    max_clipped_ratio: float = 0.5
    max_frac_zero_std: float = 0.8
    min_mdi_reward_std: float = 1e-6


@dataclass(frozen=True)
class Finding:
    name: str
    passed: bool
    severity: str  # "ERROR" blocks the round; "WARN" is reported
    message: str
    remedy: str
    value: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def entropy_collapse(metrics: dict[str, float], *, start_entropy: float | None = None,
                     thresholds: HealthThresholds = HealthThresholds()) -> Finding:
    entropy = metrics.get("entropy", float("nan"))
    floor = thresholds.min_entropy
    if start_entropy is not None and _finite(start_entropy):
        floor = max(floor, thresholds.min_entropy_fraction_of_start * start_entropy)
    passed = _finite(entropy) and entropy >= floor
    return Finding(
        "entropy_collapse", passed, "WARN",
        f"policy entropy {entropy:.4f} per token (floor {floor:.4f}"
        + (f", {start_entropy:.4f} at the start)" if start_entropy is not None else ")"),
        "the policy has become near-deterministic: lower learning_rate, raise temperature, or use "
        "epsilon_high (clip-higher) to keep exploring",
        float(entropy),
    )


def format_collapse(metrics: dict[str, float], thresholds: HealthThresholds = HealthThresholds(), *,
                    format_weight: float = 1.0) -> Finding:
    """Flags a think-format reward below its floor; passes when the format is not rewarded (weight 0 or
    think_format_reward not among the configured rewards)."""
    value = metrics.get("rewards/think_format_reward/mean", float("nan"))
    passed = format_weight == 0 or (_finite(value) and value >= thresholds.min_format_reward)
    return Finding(
        "format_collapse", passed, "WARN",
        f"think format reward {value:.3f} (floor {thresholds.min_format_reward})",
        "completions stopped using <think>...</think>: raise the format weight in reward_weights, lower "
        "learning_rate, or warm-start longer",
        float(value),
    )


def clipped_completions(metrics: dict[str, float], thresholds: HealthThresholds = HealthThresholds()) -> Finding:
    value = metrics.get("completions/clipped_ratio", float("nan"))
    passed = _finite(value) and value <= thresholds.max_clipped_ratio
    return Finding(
        "clipped_completions", passed, "WARN",
        f"{value:.1%} of completions hit max_completion_length without EOS (ceiling {thresholds.max_clipped_ratio:.0%})",
        "raise max_completion_length, enable overlong_buffer (DAPO's soft overlong penalty), or check that the "
        "chat template's EOS is the tokenizer's eos token",
        float(value),
    )


def zero_variance_groups(metrics: dict[str, float], thresholds: HealthThresholds = HealthThresholds()) -> Finding:
    value = metrics.get("frac_reward_zero_std", float("nan"))
    passed = _finite(value) and value <= thresholds.max_frac_zero_std
    return Finding(
        "zero_variance_groups", passed, "WARN",
        f"{value:.1%} of groups have identical rewards and give no gradient (ceiling {thresholds.max_frac_zero_std:.0%})",
        "raise num_generations or temperature, use dynamic_sampling to refill the batch, or pick harder/easier prompts",
        float(value),
    )


def attention_reward_saturated(metrics: dict[str, float], *, mdi_weight: float,
                               thresholds: HealthThresholds = HealthThresholds()) -> Finding:
    std = metrics.get("rewards/mdi_reward/std", float("nan"))
    mean = metrics.get("rewards/mdi_reward/mean", float("nan"))
    passed = mdi_weight == 0 or (_finite(std) and std > thresholds.min_mdi_reward_std)
    return Finding(
        "attention_reward_no_variance", passed, "WARN",
        f"mdi_reward has std {std:.2e} across the batch (mean {mean:.3f}, MDI "
        f"{metrics.get('attention/all/mdi', float('nan')):.2f}): it adds no learning signal",
        "with mdi_shaping='clip' the balance saturates once MDI is far outside the tolerance: use 'log_distance' "
        "(the default, never flat) or a group shaping, raise mdi_tolerance, or set its weight to 0",
        float(std),
    )


def non_finite(metrics: dict[str, float]) -> Finding:
    names = ("loss", "grad_norm", "reward", "rewards/total_reward", "entropy")
    bad = [n for n in names if n in metrics and not _finite(metrics[n])]
    return Finding(
        "non_finite", not bad, "ERROR",
        "non-finite values: " + ", ".join(f"{n}={metrics[n]}" for n in bad) if bad else "loss, gradients and rewards are finite",
        "lower learning_rate or max_grad_norm; check rewards for NaN",
        float(len(bad)),
    )


def reward_findings(metrics: dict[str, float], *, weights: Mapping[str, float],
                    thresholds: HealthThresholds = HealthThresholds()) -> list[Finding]:
    """The rewards phase's checks. `weights` are the configured rewards' weights (`DapoConfig.weights`): a
    reward that is not configured counts as weight 0, so its check passes."""
    return [
        format_collapse(metrics, thresholds, format_weight=weights.get("think_format_reward", 0.0)),
        clipped_completions(metrics, thresholds),
        zero_variance_groups(metrics, thresholds),
        attention_reward_saturated(metrics, mdi_weight=weights.get("mdi_reward", 0.0), thresholds=thresholds),
    ]


def update_findings(metrics: dict[str, float], *, start_entropy: float | None = None,
                    thresholds: HealthThresholds = HealthThresholds()) -> list[Finding]:
    return [entropy_collapse(metrics, start_entropy=start_entropy, thresholds=thresholds), non_finite(metrics)]


def eval_accuracy_drop(previous: float | None, current: float, *, max_drop: float, previous_key: str,
                       current_key: str) -> Finding:
    """ERROR (blocks the next round) when `current_key`'s greedy eval accuracy is more than `max_drop` below
    `previous_key`'s; passes when there is no previous evaluation to compare with."""
    drop = float("nan") if previous is None else previous - current
    passed = previous is None or (_finite(current) and drop <= max_drop + 1e-12)
    message = (f"no evaluation of {previous_key} to compare {current_key} with" if previous is None else
               f"eval accuracy {'fell' if drop > 0 else 'rose'} from {previous:.3f} ({previous_key}) to "
               f"{current:.3f} ({current_key}), a drop of {max(drop, 0.0):.3f} (max_eval_drop {max_drop})")
    return Finding(
        "eval_accuracy_drop", passed, "ERROR", message,
        "the update made the policy worse: lower learning_rate or num_iterations and continue from "
        f"{previous_key}, or raise max_eval_drop to accept {current_key}",
        0.0 if previous is None else float(drop),
    )
