"""Adding a reward is one function plus a config entry: a reward given by import path is scored, weighted,
logged as `rewards/<name>/mean|std` and shown in the reports of a real round on the embedded model."""

from __future__ import annotations

import json
import math
import re

import pytest

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.reporting import reports
from dapo_ops.run import phases as training
from dapo_ops.store.layout import RunStore, checkpoint_key

CUSTOM = "tests.custom_rewards:length_penalty"
TINY_RUN = {
    "run_name": "custom-reward",
    "prompts_per_round": 2,
    "num_generations": 2,
    "max_completion_length": 8,
    "steps_per_generation": 1,
    "num_iterations": 1,
    "num_train_examples": 8,
    "num_eval_examples": 2,
    "eval_subset_size": 2,
    "warmup_steps": 2,
    "reward_funcs": ["mc_idx_reward", "think_format_reward", "mdi_reward", CUSTOM],
    "reward_weights": [3.0, 1.0, 1.0, 0.5],
}


@pytest.fixture(scope="module")
def custom_round(tmp_path_factory):
    """One round through the phase functions, scored with the three built-in rewards and `length_penalty`."""
    config = DapoConfig(**TINY_RUN)
    root = tmp_path_factory.mktemp("custom_reward")
    store = RunStore(root, config.run_name)
    log = training.RoundLog(root / "log.txt")
    training.prepare_dataset(config, store)
    policy = training.build_base_checkpoint(config, store, log)["policy"]
    optimizer = training.load_optimizer(store, checkpoint_key(0), policy, config)
    key = checkpoint_key(0)
    training.generate_round_rollouts(config, store, key, policy, log)
    training.compute_attention(config, store, key, policy, log)
    training.compute_rewards(config, store, key, log)
    record = training.run_update(config, store, key, policy, optimizer, log)
    table = training.round_table(store, key)
    return config, table, training.round_metrics(config, table, record), log


def test_the_custom_reward_is_scored_from_the_round_columns_and_weighted_into_the_total(custom_round):
    config, table, _, _ = custom_round
    expected = [-n / config.max_completion_length for n in table["completion_length"].to_list()]
    assert table["length_penalty"].to_list() == pytest.approx(expected)
    for row in table.iter_rows(named=True):
        terms = [w * row[name] for name, w in config.weights.items() if not math.isnan(row[name])]
        assert row["total_reward"] == pytest.approx(sum(terms))
    assert any(v != 0 for v in expected)  # the weighted term really moves the total


def test_the_custom_reward_is_logged_beside_the_44(custom_round):
    config, table, metrics, log = custom_round
    assert metrics["rewards/length_penalty/mean"] == pytest.approx(sum(table["length_penalty"]) / table.height)
    assert "rewards/length_penalty/std" in metrics
    assert set(reports.round_metric_names(config.reward_names)) <= set(metrics)
    assert set(reports.ROUND_METRIC_NAMES) | {"rewards/length_penalty/mean", "rewards/length_penalty/std"} == set(
        reports.round_metric_names(config.reward_names))
    block = reports.format_metrics_block(metrics, reward_names=config.reward_names)
    assert block.splitlines()[0] == "📊 Logging 46 metrics for train mode"
    assert any(re.search(r"length_penalty \S+, total", line) for line in log.lines())


def test_the_custom_reward_appears_in_rollout_results(custom_round):
    config, table, _, _ = custom_round
    md = reports.render_rollout_results(table, run_name=config.run_name, checkpoint="ckpt-0000",
                                        reward_names=config.reward_names)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "length_penalty Mean" in rows
    assert rows["MDI Reward Mean"] and rows["Accuracy Mean"] and rows["Success Rate"]
    first = json.loads(md.split("```json\n")[1].split("\n```")[0])
    assert list(first["rewards"]) == ["accuracy", "format", "mdi", "mdi_reward", "length_penalty", "total"]
    assert first["rewards"]["length_penalty"] == pytest.approx(table.sort("rollout_index")["length_penalty"][0])
