"""`make run DATASET=...` on datasets in the TRL, verl and EasyR1 layouts (made as their users make them), on
the embedded model: the free-form accuracy reward is logged, the 44-metric block is finite and names it, bad
rows are quarantined with their reasons; and the opt-in synthetic tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.reporting.reports import round_metric_names
from dapo_ops.rl.rewards import accuracy_reward_name
from tests import layout_datasets as L
from tests.conftest import TINY_RUN, _restore_env, _set_env

pytestmark = pytest.mark.slow
FREE_FORM_REWARDS = ["accuracy_reward", "think_format_reward", "mdi_reward"]


def _run(tmp_path: Path, rounds: int, **config) -> Path:
    from pipelines.cli import run_training

    root = tmp_path / "home"
    previous = _set_env({"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster")})
    try:
        cfg = DapoConfig(**{**TINY_RUN, "run_name": "byod", **config})
        run_training(cfg, rounds=rounds, root=root, echo=lambda _: None)
    finally:
        _restore_env(previous)
    return root / "runs" / "byod"


def _check_round(run: Path, key: str, reward_names: list[str]) -> dict[str, float]:
    """Every round metric finite; the block counts them (44 for one accuracy reward) and names the reward."""
    metrics = json.loads((run / "rounds" / key / "metrics.json").read_text())
    for name in round_metric_names(reward_names):
        assert math.isfinite(metrics[name]), name
    terminal = (run / "reports" / key / "run_terminal.md").read_text()
    assert f"📊 Logging {len(round_metric_names(reward_names))} metrics for train mode" in terminal
    assert f"🎯 Accuracy reward: {accuracy_reward_name(reward_names)}" in terminal
    return metrics


@pytest.mark.parametrize("layout", ["trl", "verl", "easyr1"])
def test_a_dataset_in_each_trainer_layout_trains_with_the_free_form_accuracy_reward(tmp_path: Path,
                                                                                    layout: str) -> None:
    source = L.write(layout, tmp_path / (f"{layout}.parquet" if layout != "trl" else "trl_disk"), n=16)
    rounds = 2 if layout == "verl" else 1
    run = _run(tmp_path, rounds, dataset=str(source))
    config = json.loads((run / "rounds" / "ckpt-0000" / "metrics.json").read_text())
    assert "rewards/mc_idx_reward/mean" not in config
    for k in range(rounds):
        _check_round(run, f"ckpt-{k:04d}", FREE_FORM_REWARDS)
    quarantine = pl.read_parquet(run / "data" / "quarantine.parquet")
    assert quarantine.height >= 1 and all(r.startswith("row ") for r in quarantine["reason"].to_list())
    if layout == "easyr1":  # prompts with two images: every image in the MLflow table, each image's share
        rollouts = pl.read_parquet(run / "rounds" / "ckpt-0000" / "rollouts.parquet")
        if int(rollouts["num_images"].max()) == 2:
            attention = pl.read_parquet(run / "rounds" / "ckpt-0000" / "attention.parquet")
            assert "image_share/all" in attention.columns


def test_opt_in_synthetic_tasks_mix_choice_and_free_form_answers(tmp_path: Path) -> None:
    run = _run(tmp_path, 1, synthetic_tasks=["two_image_color", "shape_count"], prompts_per_round=8)
    metrics = _check_round(run, "ckpt-0000", ["mc_idx_reward", "accuracy_reward", "think_format_reward",
                                              "mdi_reward"])
    assert math.isfinite(metrics["rewards/accuracy_reward/mean"])
    diagnostics = (run / "reports" / "ckpt-0000" / "attention_diagnostics.md").read_text()
    assert "| 2 images: image 1 |" in diagnostics
    table = json.loads((run / "reports" / "ckpt-0000" / "rollout_table.json").read_text())
    assert table["columns"][:2] == ["image", "image_2"]
