"""Training that learns: a CI-sized run through the library must raise accuracy, and the MDI shapings behave
as documented on recorded rollouts."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.rl import rewards
from dapo_ops.store.layout import RunStore, checkpoint_key

# Round ckpt-0000 of the embedded default (seed 0): 64 prompts x 8 rollouts, per-rollout MDI of each stage.
# The tiny model attends to its 4 image tokens far more per token than to text (MDI ~0.1-0.8).
RECORDED = Path(__file__).parent / "data" / "recorded_mdi.parquet"

# The embedded default itself (the four-task mix, 64 prompts x 8 rollouts, 8 rounds): on this task a smaller
# round (32 prompts, 512 train rows) did not learn within 8 rounds (benchmarks/learning_findings.md), so the
# test runs the default: 68 s on the 2-core machine at load average ~3. The masked pass changes no training
# number (its masks have their own generator), so it is left out here; the blind eval stays.
LEARNING_RUN = {"run_name": "learning-ci", "visual_dependency": False}
LEARNING_ROUNDS = 8


@pytest.mark.slow
def test_a_small_run_learns_to_answer_from_the_image(tmp_path):
    from dapo_ops.run import phases as training
    from dapo_ops.run.round import run_round

    config = DapoConfig(**LEARNING_RUN)
    store = RunStore(tmp_path, config.run_name)
    log = training.RoundLog(tmp_path / "log.txt")
    training.prepare_dataset(config, store)
    policy = training.build_base_checkpoint(config, store, log)["policy"]
    start = training.evaluate(config, store, policy)
    optimizer = training.load_optimizer(store, checkpoint_key(0), policy, config)
    accuracy, evals = [], []
    for k in range(LEARNING_ROUNDS):
        metrics = run_round(config, store, checkpoint_key(k), policy, optimizer, log).metrics
        accuracy.append(metrics["rewards/mc_idx_reward/mean"])
        evals.append(metrics["eval/accuracy"])
    # Seen on this config (seed 0, the same numbers as `make run`): eval 0.328 (ckpt-0000) -> 0.555 (ckpt-0008) with
    # the default attention reward (log_distance + its pathwise term), 0.547 with it off. With learning_rate=0
    # both stay where they start.
    late = sum(accuracy[-3:]) / 3
    assert late >= accuracy[0] + 0.15, f"training accuracy went nowhere: {accuracy}"
    assert evals[-1] >= start["eval/accuracy"], f"eval accuracy fell: {start} -> {evals}"
    assert evals[-1] >= start["eval/accuracy"] + 0.1, f"eval accuracy did not rise: {start} -> {evals}"
    assert metrics["rewards/think_format_reward/mean"] >= 0.8


def _recorded() -> pl.DataFrame:
    return pl.read_parquet(RECORDED)


def _zero_variance_groups(values: list[float], group: int) -> int:
    tensor = torch.tensor(values).view(-1, group)
    return int((tensor.std(dim=1) == 0).sum())


def _saturated_groups(table: pl.DataFrame, group: int) -> pl.DataFrame:
    """Groups whose every MDI is beyond the tolerance R=2 (MDI < 1/2), so that clip gives each rollout -1,
    and whose rollouts differ (identical completions have identical MDI under any shaping)."""
    return table.filter((pl.col("mdi").max().over("prompt_index") < 0.5)
                        & (pl.col("mdi").std().over("prompt_index") > 0))


def test_clip_shaping_gives_no_within_group_variance_on_recorded_large_mdi():
    recorded = _recorded()  # the embedded model's first round: most groups have every MDI below 1/2
    group = int(recorded["num_generations"][0])
    assert _saturated_groups(recorded, group).height >= 0.7 * recorded.height
    table = _saturated_groups(recorded, 8)
    values = rewards.mdi_reward(table["mdi"].to_list(), mdi=table["mdi"].to_list(), mdi_shaping="clip")
    assert set(values) == {-1.0}
    assert _zero_variance_groups(values, 8) == table.height // 8


def test_group_log_distance_shaping_keeps_a_signal_on_the_same_rollouts():
    table = _saturated_groups(_recorded(), 8)
    group = 8
    values = rewards.mdi_reward(table["mdi"].to_list(), mdi=table["mdi"].to_list(),
                                mdi_shaping="group_log_distance", num_generations=group)
    assert _zero_variance_groups(values, group) == 0
    assert all(-1.0 <= v <= 1.0 for v in values)
    # Closer to 1 (in log scale) than its siblings -> positive reward.
    mdi = torch.tensor(table["mdi"].to_list()).view(-1, group)
    shaped = torch.tensor(values).view(-1, group)
    best = mdi.log().abs().argmin(dim=1)
    assert bool((shaped.gather(1, best[:, None]) > 0).all())


def test_group_zscore_hand_values():
    # d = |ln mdi| = (ln 2, 2 ln 2): mean 1.5 ln 2, population std 0.5 ln 2 -> z = (+1, -1).
    values = rewards.mdi_reward(["x"] * 2, mdi=[2.0, 4.0], mdi_shaping="group_zscore", num_generations=2)
    assert values == pytest.approx([1.0, -1.0])


def test_group_zscore_does_not_amplify_near_equal_distances():
    # A 0.01 % MDI difference is below the floor spread (0.05 ln R), so it stays a tiny reward, not +-1.
    values = rewards.mdi_reward(["x"] * 2, mdi=[0.5, 0.50005], mdi_shaping="group_zscore", num_generations=2)
    assert max(abs(v) for v in values) < 0.01


def test_group_zscore_gives_attention_a_spread_comparable_to_accuracy_on_recorded_rollouts():
    """group_log_distance divides by ln R / 2, far wider than a group's spread of |ln MDI|, so its within-group
    std is ~0.1 beside 3 x accuracy's ~1; the z-score makes it several times larger."""
    table = _saturated_groups(_recorded(), 8)
    mdi = table["mdi"].to_list()

    def within_group_std(shaping: str) -> float:
        values = rewards.mdi_reward(mdi, mdi=mdi, mdi_shaping=shaping, num_generations=8)
        return float(torch.tensor(values).view(-1, 8).std(dim=1).mean())

    assert within_group_std("group_log_distance") < 0.15
    assert within_group_std("group_zscore") > 3 * within_group_std("group_log_distance")


def _curves(seed: int, eval_accuracy: list[float], all_mdi: list[float]) -> dict:
    stages = [{"early": 0.1, "middle": 0.2, "late": 0.3, "all": m} for m in all_mdi]
    return {"seed": seed, "eval_accuracy": eval_accuracy, "train_accuracy": eval_accuracy[:-1], "abs_log_mdi": stages}


def test_ablation_summary_is_the_last_round_ratio_and_delta_of_seed_means(tmp_path):
    import json

    from benchmarks import ablation

    off = {"off": [_curves(0, [0.2, 0.8], [0.9, 1.0]), _curves(1, [0.4, 0.9], [0.7, 0.6])]}
    shaped = {"group_zscore": [_curves(0, [0.2, 0.9], [0.9, 0.5]), _curves(1, [0.4, 0.9], [0.7, 0.6])]}
    paths = []
    for i, runs in enumerate((off, shaped)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(ablation.assemble(runs, 1, "group_zscore", 1.0)))
    result = ablation.merge(paths, "group_zscore")
    assert result["summary"]["mdi_log_ratio_vs_off"] == pytest.approx(0.55 / 0.8)
    assert result["summary"]["eval_accuracy_delta_vs_off"] == pytest.approx(0.9 - 0.85)
    assert result["rows"]["off"]["abs_log_mdi/all"][1] == pytest.approx((0.8, torch.tensor([1.0, 0.6]).std().item()))
    ablation.write_outputs(result, tmp_path / "out")
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| group_zscore | 0,1 | 1 | 0.900 ± 0.000 |" in table
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["summary"] == result["summary"]
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 0


def test_ablation_rows_are_off_then_one_per_shaping_and_pathwise_for_the_per_rollout_ones():
    from benchmarks import ablation

    rows = ablation.default_rows()
    assert [r.name for r in rows] == ["off", "clip", "clip+pathwise", "log_distance", "log_distance+pathwise",
                                      "group_log_distance", "group_zscore"]
    assert rows[0].overrides["reward_weights"][-1] == 0.0 and rows[0].overrides["reward_weights"][0] > 0
    assert all(r.overrides["mdi_pathwise_coef"] > 0 for r in rows if r.name.endswith("+pathwise"))
    assert ablation.shaping_row_name(DapoConfig()) in [r.name for r in rows]  # the summary's default row


def test_a_warm_start_target_answering_with_the_choice_text_is_scored_as_that_choice():
    from dapo_ops.train import warmstart

    row = {"choices": ["cat", "dog", "cow"], "correct_choice_idx": 1, "rationales": ["It barks."]}
    assert warmstart.target_completion(row, "choice") == "<think>It barks.</think> Answer: dog"
    wrong = warmstart.format_target(row, 2, "choice")
    assert rewards.mc_idx_reward([warmstart.target_completion(row, "choice"), wrong], correct_choice_idx=[1, 1],
                                 choices=[row["choices"]] * 2) == [1.0, 0.0]


def test_the_warm_start_mode_is_a_validated_config_field():
    assert DapoConfig(warmup_target="format", warmup_answer="choice").warmup_answer == "choice"
    with pytest.raises(ValueError, match="warmup_answer='word' is unknown"):
        DapoConfig(warmup_answer="word")
