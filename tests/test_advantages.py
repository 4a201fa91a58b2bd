"""Group advantages, zero-variance groups, DAPO dynamic sampling and the soft overlong penalty."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_ops.rl.advantages import (
    dynamic_sampling_keep_mask,
    group_advantages,
    group_reward_std,
    normalize_then_sum,
    overlong_penalty,
    truncated_completions_mask,
    zero_std_groups,
)


def test_group_advantages_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 4.0, 2.0, 2.0, 0.0])
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 2, unbiased std sqrt(8/3)
    s1, s2 = math.sqrt(1 / 3) + 1e-4, math.sqrt(8 / 3) + 1e-4
    expected = torch.tensor([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 2 / s2, 0.0, 0.0, -2 / s2])
    torch.testing.assert_close(group_advantages(rewards, 4), expected)


def test_batch_scaling_divides_by_the_batch_std_but_centres_per_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 4.0, 2.0])
    batch_std = rewards.std().item()
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0]) / (batch_std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale_rewards="batch"), expected)


def test_no_scaling_only_centres() -> None:
    rewards = torch.tensor([1.0, 0.0, 4.0, 2.0])
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale_rewards="none"), torch.tensor([0.5, -0.5, 1, -1])
    )


def test_unknown_scaling_and_ragged_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="max")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)


def test_nan_rewards_are_left_out_and_get_zero_advantage() -> None:
    rewards = torch.tensor([1.0, 0.0, float("nan"), 2.0, 2.0, 2.0])
    advantages = group_advantages(rewards, 3)
    expected_first = group_advantages(torch.tensor([1.0, 0.0]), 2)
    torch.testing.assert_close(advantages[:2], expected_first)
    assert advantages[2] == 0.0
    assert torch.equal(advantages[3:], torch.zeros(3))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(min_value=-10, max_value=10), min_size=1, max_size=6),
    st.integers(min_value=1, max_value=6),
    st.sampled_from(["group", "batch", "none"]),
)
def test_a_constant_group_has_zero_advantages(values: list[float], group: int, scale: str) -> None:
    rewards = torch.tensor([v for v in values for _ in range(group)])
    advantages = group_advantages(rewards, group, scale_rewards=scale)
    assert torch.allclose(advantages, torch.zeros_like(advantages), atol=1e-4)
    assert bool(zero_std_groups(rewards, group).all())


def test_zero_std_groups_and_keep_mask() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.1 + 0.2])
    assert zero_std_groups(rewards, 2).tolist() == [True, False, True]
    assert dynamic_sampling_keep_mask(rewards, 2).tolist() == [False, False, True, True, False, False]


def test_group_reward_std_is_the_unbiased_std_per_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(group_reward_std(rewards, 4), torch.tensor([math.sqrt(1 / 3), 0.0]))
    torch.testing.assert_close(group_reward_std(rewards, 1), torch.zeros(8))


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0)],
)
def test_overlong_penalty_hand_values(length: int, expected: float) -> None:
    assert overlong_penalty(torch.tensor([length]), 16, 4).item() == pytest.approx(expected)
    assert overlong_penalty(torch.tensor([length]), 16, 4, penalty_factor=2.0).item() == pytest.approx(
        2 * expected
    )


def test_overlong_penalty_matches_trl() -> None:
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(0, 25))
    for buffer in (1, 4, 8, 20):
        trl = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=buffer)
        expected = trl([[0] * n for n in lengths])
        ours = overlong_penalty(torch.tensor(lengths), 20, buffer).tolist()
        assert ours == pytest.approx(expected)


def test_overlong_penalty_without_buffer_only_punishes_beyond_the_limit() -> None:
    assert overlong_penalty(torch.tensor([5, 16, 17]), 16, 0).tolist() == [0.0, 0.0, -1.0]


# --- normalize_then_sum (GDPO) and mask_truncated_completions --------------------------------------------------


def test_normalize_then_sum_hand_computed() -> None:
    # columns (accuracy, format); group 1 trades accuracy 3 for format 1, group 2 differs only in format
    rewards = torch.tensor([[3.0, 0.0], [0.0, 1.0], [3.0, 1.0], [3.0, 0.0]], dtype=torch.float64)
    acc = 1.5 / (math.sqrt(4.5) + 1e-4)  # group 1 accuracy: mean 1.5, unbiased std sqrt(4.5)
    fmt = 0.5 / (math.sqrt(0.5) + 1e-4)  # format in either group: mean 0.5, unbiased std sqrt(0.5)
    summed = [acc - fmt, -acc + fmt, fmt, -fmt]  # group 2's constant accuracy normalizes to 0
    batch_std = math.sqrt(sum(v * v for v in summed) / 3)  # the sums have batch mean 0
    expected = torch.tensor([v / (batch_std + 1e-4) for v in summed], dtype=torch.float64)
    torch.testing.assert_close(normalize_then_sum(rewards, [1.0, 1.0], 2), expected)


def test_normalize_then_sum_does_not_let_a_reward_on_a_larger_scale_dominate() -> None:
    # the accuracy column on {0, 3} or on {0, 1} gives the same advantages (up to the 1e-4 epsilon)
    accuracy = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    fmt = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    small = normalize_then_sum(torch.stack([accuracy, fmt], 1), [1.0, 1.0], 3)
    large = normalize_then_sum(torch.stack([3 * accuracy, fmt], 1), [1.0, 1.0], 3)
    torch.testing.assert_close(large, small, atol=1e-3, rtol=0)
    # whereas summing first lets the accuracy decide alone in group 1 (3 + 0 vs 0 + 1)
    summed_first = group_advantages(3 * accuracy + fmt, 3)
    assert summed_first[0] > 0 > summed_first[1] and abs(large[0]) < abs(summed_first[0])


def test_normalize_then_sum_weights_the_normalized_columns() -> None:
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # both columns normalize to ±1/(√0.5·√2 + …) ≈ ±0.7071; weights 3 and 1 leave sums +2·0.7071 and −2·0.7071
    advantages = normalize_then_sum(rewards, [3.0, 1.0], 2)
    assert advantages[0].item() == pytest.approx(-advantages[1].item())
    assert advantages[0].item() == pytest.approx(1 / math.sqrt(2), rel=1e-3)  # batch-normalized: std of ±x is x√2


def test_normalize_then_sum_gives_unscorable_rows_zero_and_leaves_them_out() -> None:
    nan = float("nan")
    rewards = torch.tensor([[1.0], [0.0], [nan], [1.0]], dtype=torch.float64)
    advantages = normalize_then_sum(rewards, [1.0], 2)
    assert advantages[2].item() == 0.0
    # group 2 holds one defined reward: its std is undefined, so its scorable row sums to 0
    assert advantages[0].item() == pytest.approx(-advantages[1].item())


def test_normalize_then_sum_refuses_mismatched_weights() -> None:
    with pytest.raises(ValueError, match="2 reward weights for 3 reward columns"):
        normalize_then_sum(torch.zeros(4, 3), [1.0, 1.0], 2)


def test_truncated_completions_leave_the_loss_mask() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    is_eos = torch.tensor([True, False, True])
    assert torch.equal(truncated_completions_mask(mask, is_eos), torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]]))
    with pytest.raises(ValueError, match="one flag per row"):
        truncated_completions_mask(mask, is_eos[:2])
