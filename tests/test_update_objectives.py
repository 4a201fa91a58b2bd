"""The update runs every objective variant on the embedded model, and masks truncated completions."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.data import synthetic
from dapo_ops.data.loading import decode_image
from dapo_ops.models.inputs import encode_prompts
from dapo_ops.rollout.generate import generate_rollouts
from dapo_ops.train.update import make_optimizer, policy_update

ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])


@pytest.fixture(scope="module")
def policy_and_rollouts(embedded_policy_for):
    torch.manual_seed(0)
    policy = embedded_policy_for(list(synthetic.corpus())[:200], seed=0)
    rows = synthetic.generate_rows(2, seed=0)
    prompts = encode_prompts(policy, rows["question"].to_list(), rows["choices"].to_list(),
                             [decode_image(b) for b in rows["image"].to_list()])
    batch = generate_rollouts(policy, prompts, num_generations=2, max_completion_length=4, seed=0)
    return policy, batch


def run_update(policy_and_rollouts, rollouts=None, **changes):
    policy, batch = policy_and_rollouts
    model = copy.deepcopy(policy.model)
    config = DapoConfig(prompts_per_round=2, num_generations=2, steps_per_generation=1, num_iterations=1,
                        **changes)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old = torch.zeros(batch.completion_ids.shape)  # off policy: ratios far from 1, some tokens clip
    result = policy_update(model, make_optimizer(model, config), batch if rollouts is None else rollouts, old,
                           ADVANTAGES, torch.ones(4, dtype=torch.bool), config, global_step=0, seed=0)
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    return result.summary(), changed


@pytest.mark.parametrize(
    "changes",
    [
        {"loss_type": "cispo", "epsilon_high": 5.0},
        {"loss_type": "sapo"},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "delta": 1.5},
        {"loss_type": "dapo", "top_entropy_quantile": 0.2, "entropy_coef": 0.01},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_each_objective_takes_a_finite_step(policy_and_rollouts, changes):
    summary, changed = run_update(policy_and_rollouts, **changes)
    assert changed
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert ("cispo_clip_ratio" in summary) == (changes["loss_type"] == "cispo")
    assert 0.0 <= summary["clip_ratio/region_mean"] <= 1.0


def test_the_entropy_bonus_changes_the_step(policy_and_rollouts):
    plain, _ = run_update(policy_and_rollouts)
    bonus, _ = run_update(policy_and_rollouts, entropy_coef=0.5)
    assert bonus["loss"] < plain["loss"]  # minus 0.5 x a positive mean entropy
    assert bonus["entropy"] == pytest.approx(plain["entropy"])  # the same forward before the step


def test_truncated_completions_leave_the_loss(policy_and_rollouts):
    _, batch = policy_and_rollouts
    truncated = dataclasses.replace(batch, is_eos=torch.zeros(len(batch), dtype=torch.bool))
    summary, changed = run_update(policy_and_rollouts, truncated, mask_truncated_completions=True)
    assert not changed and summary["loss"] == 0.0  # no token entered the loss: zero gradient, no move
    _, changed = run_update(policy_and_rollouts, truncated)
    assert changed  # without the option the same rollouts train
