"""Each health check flags the collapsed round it exists for, and passes a healthy one."""

import math

from dapo_ops.reporting import health

HEALTHY = {
    "entropy": 0.8,
    "rewards/think_format_reward/mean": 0.95,
    "completions/clipped_ratio": 0.02,
    "frac_reward_zero_std": 0.3,
    "rewards/mdi_reward/std": 0.2,
    "rewards/mdi_reward/mean": 0.1,
    "attention/all/mdi": 1.5,
    "loss": 0.01,
    "grad_norm": 0.5,
    "reward": 2.0,
}
WEIGHTS = {"mc_idx_reward": 3.0, "think_format_reward": 1.0, "mdi_reward": 1.0}


def test_a_healthy_round_passes_every_check():
    findings = health.reward_findings(HEALTHY, weights=WEIGHTS) + health.update_findings(HEALTHY, start_entropy=1.0)
    assert all(f.passed for f in findings), [f.message for f in findings if not f.passed]


def test_entropy_collapse_is_flagged_relative_to_the_start():
    # The replaced system: entropy fell from 1.0 to 0.008.
    finding = health.entropy_collapse({**HEALTHY, "entropy": 0.008}, start_entropy=1.0)
    assert not finding.passed and "0.0080" in finding.message and "learning_rate" in finding.remedy
    assert not health.entropy_collapse({**HEALTHY, "entropy": 0.09}, start_entropy=1.0).passed


def test_format_collapse_is_flagged():
    finding = health.format_collapse({**HEALTHY, "rewards/think_format_reward/mean": 0.0})
    assert not finding.passed and "0.000" in finding.message


def test_clipped_completions_are_flagged():
    finding = health.clipped_completions({**HEALTHY, "completions/clipped_ratio": 0.995})
    assert not finding.passed and "99.5%" in finding.message and "max_completion_length" in finding.remedy


def test_zero_variance_groups_are_flagged():
    assert not health.zero_variance_groups({**HEALTHY, "frac_reward_zero_std": 1.0}).passed


def test_saturated_attention_reward_is_flagged_only_when_it_is_weighted():
    saturated = {**HEALTHY, "rewards/mdi_reward/std": 0.0, "rewards/mdi_reward/mean": -1.0, "attention/all/mdi": 38.0}
    finding = health.attention_reward_saturated(saturated, mdi_weight=1.0)
    assert not finding.passed and "log_distance" in finding.remedy
    assert health.attention_reward_saturated(saturated, mdi_weight=0.0).passed


def test_non_finite_loss_is_an_error():
    finding = health.non_finite({**HEALTHY, "loss": math.nan})
    assert not finding.passed and finding.severity == "ERROR" and "loss=nan" in finding.message


def test_checks_of_rewards_that_are_not_configured_pass():
    collapsed = {**HEALTHY, "rewards/think_format_reward/mean": 0.0, "rewards/mdi_reward/std": 0.0}
    findings = {f.name: f for f in health.reward_findings(collapsed, weights=WEIGHTS)}
    assert not findings["format_collapse"].passed and not findings["attention_reward_no_variance"].passed
    findings = {f.name: f for f in health.reward_findings(collapsed, weights={"mc_idx_reward": 1.0})}
    assert findings["format_collapse"].passed and findings["attention_reward_no_variance"].passed
