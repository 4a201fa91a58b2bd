"""The round outside Dagster (`dapo_ops.run.round`): health files, the run's config record, the DONE marker,
and `run_round` with a rollout engine of the caller's choosing."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.rollout.engines import HFEngine, RolloutEngine, make_engine
from dapo_ops.run import phases as training
from dapo_ops.run import round as dapo_round
from dapo_ops.store.layout import RunStore, checkpoint_key, write_parquet_atomic
from dapo_ops.train.update import NonFiniteUpdateError

KEY = checkpoint_key(0)
HEALTHY_REWARDS = {"rewards/think_format_reward/mean": 0.95, "completions/clipped_ratio": 0.02,
                   "frac_reward_zero_std": 0.3, "rewards/mdi_reward/std": 0.2, "rewards/mdi_reward/mean": 0.1}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path, "round-test")


def test_reward_health_writes_every_finding_and_warns_only_for_the_failed(store: RunStore):
    log = training.round_log(store, KEY)
    collapsed = {**HEALTHY_REWARDS, "rewards/think_format_reward/mean": 0.0}
    findings = dapo_round.reward_health(DapoConfig(), store, KEY, log, collapsed)
    written = json.loads(store.round(KEY).health_rewards.read_text())
    assert written == [f.to_dict() for f in findings]
    assert [f["name"] for f in written if not f["passed"]] == ["format_collapse"]
    warnings = [line for line in log.lines() if "WARNING health check" in line]
    assert len(warnings) == 1 and "format_collapse" in warnings[0]


def test_a_non_finite_update_is_written_as_a_failed_check(store: RunStore):
    log = training.round_log(store, KEY)
    finding = dapo_round.non_finite_health(store, KEY, log, NonFiniteUpdateError("non-finite gradient norm"))
    assert not finding.passed and finding.severity == "ERROR"
    assert json.loads(store.round(KEY).health_update.read_text()) == [finding.to_dict()]
    assert "ERROR non-finite gradient norm" in log.lines()[-1]


def test_start_entropy_is_the_mean_entropy_of_the_first_round(store: RunStore):
    assert dapo_round.start_entropy(store) is None
    store.round_dir(KEY).mkdir(parents=True)
    pl.DataFrame({"entropy": [0.5, 1.0, 1.5]}).write_parquet(store.round_dir(KEY) / "attention.parquet")
    assert dapo_round.start_entropy(store) == pytest.approx(1.0)


def test_the_config_is_recorded_once_and_a_resumed_change_logs_one_line(store: RunStore):
    log = training.round_log(store, KEY)
    config = DapoConfig(run_name="round-test", learning_rate=5e-4)
    dapo_round.record_config(config, store, log)
    assert json.loads(store.config_path.read_text()) == config.to_dict()
    assert dapo_round.record_config(config, store, log) == []
    assert log.lines() == []  # the full config is not logged per round
    changed = config.replace(learning_rate=1e-3, max_rounds=10)
    assert dapo_round.record_config(changed, store, log) == ["learning_rate 0.0005 -> 0.001", "max_rounds 8 -> 10"]
    assert len(log.lines()) == 1
    assert log.lines()[0].endswith("config changed since config.json: learning_rate 0.0005 -> 0.001; max_rounds 8 -> 10")
    assert json.loads(store.config_path.read_text()) == changed.to_dict()


def test_config_diff_names_added_and_removed_fields():
    assert dapo_round.config_diff({"a": 1, "b": "x"}, {"a": 1, "c": [1]}) == ["b \"x\" -> (unset)", "c (unset) -> [1]"]


def test_the_default_engine_is_the_hf_engine_on_the_policy():
    policy = object()
    engine = make_engine(DapoConfig(), policy)
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine) and engine.policy is policy


class RecordingEngine:
    """The HF engine, recording each call: what a second engine would receive from `training`."""

    def __init__(self, policy) -> None:
        self.inner = HFEngine(None, policy)
        self.calls: list[dict] = []

    def generate(self, prompts, **kwargs):
        self.calls.append({"prompts": len(prompts), **kwargs})
        return self.inner.generate(prompts, **kwargs)


@pytest.mark.slow
def test_run_round_runs_every_phase_with_the_given_engine_and_marks_the_round_done(tmp_path: Path):
    config = DapoConfig(run_name="round-test", prompts_per_round=4, num_generations=2, max_completion_length=8,
                        steps_per_generation=2, num_iterations=1, num_train_examples=16, num_eval_examples=8,
                        eval_subset_size=4, warmup_steps=0)
    store = RunStore(tmp_path, config.run_name)
    log = training.round_log(store, KEY)
    training.prepare_dataset(config, store)
    policy = training.build_base_checkpoint(config, store, log)["policy"]
    optimizer = training.load_optimizer(store, KEY, policy, config)
    engine = RecordingEngine(policy)
    result = dapo_round.run_round(config, store, KEY, policy, optimizer, log, engine=engine)
    assert engine.calls[0] == {"prompts": 4, "num_generations": 2, "max_completion_length": 8, "temperature": 1.0,
                               "top_p": 1.0, "seed": training.derived_seed(config.seed, "rollouts", 0)}
    assert list(result.seconds) == ["rollouts", "attention_metrics", "rewards", "policy_update", "attention_report",
                                    "training_report"]
    assert dapo_round.is_done(store, KEY) and store.is_complete_checkpoint(checkpoint_key(1))
    round_dir, reports = store.round_dir(KEY), store.reports_dir(KEY)
    for name in ("rollouts.parquet", "attention.parquet", "rewards.parquet", "update.json", "metrics.json",
                 "health_rewards.json", "health_update.json"):
        assert (round_dir / name).exists(), name
    for name in ("rollout_results.md", "attention_diagnostics.md", "run_terminal.md"):
        assert (reports / name).stat().st_size > 0, name
    assert json.loads((round_dir / "metrics.json").read_text()) == result.metrics
    assert len(result.findings) == 6
    # visual_dependency is on by default: the masked pass's values beside the 44, and the blind eval.
    assert {"visual/kl_mean", "visual/kl_answer", "visual/dependent_token_ratio"} <= set(result.metrics)
    assert result.metrics["eval/visual_gain"] == pytest.approx(
        result.metrics["eval/accuracy"] - result.metrics["eval/blind_accuracy"])


def sample_round_table(train: pl.DataFrame, totals: list[float]) -> pl.DataFrame:
    """A scored round table over the first len(totals) / 2 train prompts, two rollouts each."""
    from dapo_ops.config.dapo import STAGES

    rows = []
    for i, total in enumerate(totals):
        prompt = train.row(i // 2, named=True)
        rows.append({"rollout_index": i, "prompt_index": i // 2, "generation_index": i % 2,
                     "question_id": prompt["question_id"], "question": prompt["question"],
                     "choices": list(prompt["choices"]), "correct_choice_idx": prompt["correct_choice_idx"],
                     "completion": f"<think>{i}</think> Answer: A", "mc_idx_reward": 1.0, "think_format_reward": 1.0,
                     "mdi_reward": 0.0, "total_reward": total, "advantage": total - 1.0,
                     **{f"attn/{s}/mdi": 1.0 + i for s in STAGES}})
    return pl.DataFrame(rows)


def test_the_rollout_sample_is_an_mlflow_table_with_the_prompt_images(store: RunStore):
    from dapo_ops.data import loading as data

    config = DapoConfig(run_name="round-test", num_train_examples=16, num_eval_examples=8, eval_subset_size=4,
                        report_samples=1)
    training.prepare_dataset(config, store)
    train = training.load_split(store, "train")
    table = sample_round_table(train, [0.0, 1.0, 2.0, 3.0, 1.0, 1.0])  # prompt 1 has the best mean
    sample = dapo_round.write_rollout_sample(config, store, KEY, table)
    assert pl.read_parquet(sample.all_rollouts)["rollout_index"].to_list() == list(range(6))
    payload = json.loads(sample.table_path.read_text())
    rows = [dict(zip(payload["columns"], row, strict=True)) for row in payload["data"]]
    assert [r["rollout_index"] for r in rows] == [2, 3]
    image = rows[0]["image"]
    assert image["type"] == "image" and image["filepath"] == f"reports/{KEY}/rollout_images/prompt-0001.png"
    # Artifact paths mirror the run directory: the file MLflow shows is the one written here.
    with Image.open(store.run_dir / image["filepath"]) as logged:
        assert list(logged.convert("RGB").getdata()) == list(data.decode_image(train["image"][1]).getdata())
    with Image.open(store.run_dir / image["compressed_filepath"]) as thumbnail:
        assert max(thumbnail.size) == 256
    assert "![prompt 1](rollout_images/prompt-0001.png)" in sample.markdown


def test_report_samples_zero_writes_every_rollout_but_no_table(store: RunStore):
    config = DapoConfig(run_name="round-test", num_train_examples=16, num_eval_examples=8, eval_subset_size=4,
                        report_samples=0)
    training.prepare_dataset(config, store)
    sample = dapo_round.write_rollout_sample(config, store, KEY, sample_round_table(
        training.load_split(store, "train"), [0.0, 1.0]))
    assert sample.table_path is None and sample.table.height == 0
    assert pl.read_parquet(sample.all_rollouts).height == 2


# ------------------------------------------------------------------------------ the round's rules, once


def test_the_reference_policy_is_the_base_checkpoint_only_with_beta_and_without_lora(store: RunStore, monkeypatch):
    from dapo_ops.run.round import models

    monkeypatch.setattr(dapo_round, "resolve_model_dir", lambda run_store, key: Path("/models") / key)
    monkeypatch.setattr(models, "load_policy", lambda path, **load: (path, load))
    assert dapo_round.reference_policy(DapoConfig(beta=0.0), store) is None
    assert dapo_round.reference_policy(DapoConfig(beta=0.04, use_peft=True), store) is None  # the adapter disabled
    assert dapo_round.reference_policy(DapoConfig(beta=0.04), store, device="cpu") == (Path("/models/ckpt-0000"),
                                                                                        {"device": "cpu"})


def test_a_phase_on_several_processes_runs_through_the_launcher_without_the_policy_in_memory(store: RunStore):
    from dapo_ops.run.policy_cache import PolicyCache

    config = DapoConfig(run_name="round-test", num_processes=2)
    policies = PolicyCache()
    policies.put(store, KEY, "policy of ckpt-0000", None)
    calls = []

    def launch(phase: str, launched: DapoConfig, **kwargs) -> dict:
        calls.append((phase, launched.num_processes, kwargs))
        write_parquet_atomic(store.round(KEY).attention_parquet, pl.DataFrame({"entropy": [1.0]}))  # rank 0's file
        return {"num_processes": 2}

    store.round_dir(KEY).mkdir(parents=True)
    log = training.round_log(store, KEY)
    result = dapo_round.attention_phase(config, store, KEY, log, policies, launch=launch, reanalysis=True)
    assert calls == [("attention", 2, {"reanalysis": True})]
    assert result.launched == {"num_processes": 2} and result.table["entropy"].to_list() == [1.0]
    assert policies._entry is None  # the ranks load the checkpoint; this process's copy is dropped
    with pytest.raises(ValueError, match="num_processes=2: the attention phase needs a launcher"):
        dapo_round.attention_phase(config, store, KEY, log, policies)


def test_a_reanalysis_runs_the_masked_pass_even_for_a_run_trained_without_it(store: RunStore):
    from dapo_ops.run.policy_cache import PolicyCache

    seen = []

    def launch(phase: str, launched: DapoConfig, **kwargs) -> dict:
        seen.append((kwargs["reanalysis"], launched.visual_dependency))
        write_parquet_atomic(store.round(KEY).attention_parquet, pl.DataFrame({"entropy": [1.0]}))
        return {}

    store.round_dir(KEY).mkdir(parents=True)
    config = DapoConfig(run_name="round-test", num_processes=2, visual_dependency=False)
    log = training.round_log(store, KEY)
    for reanalysis in (False, True):
        dapo_round.attention_phase(config, store, KEY, log, PolicyCache(), launch=launch, reanalysis=reanalysis)
    assert seen == [(False, False), (True, True)]


def _round_files(store: RunStore, evals: dict[str, float]) -> None:
    """ckpt-0000 .. ckpt-0002 complete with their eval accuracy; round 0 DONE; round 1 lost only its reports."""
    for key, accuracy in evals.items():
        path = store.checkpoint_dir(key)
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps({"eval": {"eval/accuracy": accuracy}}))
        (path / "optimizer.pt").write_bytes(b"x")
        (path / "COMPLETE").write_text("")
    for key in ("ckpt-0000", "ckpt-0001"):
        store.round_dir(key).mkdir(parents=True)
    store.round("ckpt-0000").done.write_text("1.0\n")
    store.round("ckpt-0001").update.write_text("{}")


def test_pending_rounds_skip_done_rounds_and_finish_one_that_lost_only_its_reports(store: RunStore):
    from dapo_ops.run.resume import REPORT_PHASES, ROUND_PHASES, PendingRound, pending_rounds

    _round_files(store, {"ckpt-0000": 0.5, "ckpt-0001": 0.5, "ckpt-0002": 0.5})
    assert list(pending_rounds(DapoConfig(max_rounds=3), store)) == [
        PendingRound(1, "ckpt-0001", REPORT_PHASES), PendingRound(2, "ckpt-0002", ROUND_PHASES)]
    assert "resuming ckpt-0001 after an interruption: attention_report, training_report" in \
        store.round("ckpt-0001").log.read_text()


def test_pending_rounds_refuse_to_continue_from_a_checkpoint_that_failed_the_eval_check(store: RunStore):
    from dapo_ops.run.resume import EvalDropError, pending_rounds

    _round_files(store, {"ckpt-0000": 0.5, "ckpt-0001": 0.9, "ckpt-0002": 0.1})
    with pytest.raises(EvalDropError, match="fell from 0.900 \\(ckpt-0001\\) to 0.100 \\(ckpt-0002\\)"):
        list(pending_rounds(DapoConfig(max_rounds=3, max_eval_drop=0.2), store))
    assert list(pending_rounds(DapoConfig(max_rounds=3, max_eval_drop=1.0), store))[0].key == "ckpt-0001"


def test_the_setup_is_to_do_until_ckpt_0000_is_complete_and_the_setup_marked_done(store: RunStore):
    from dapo_ops.run.resume import needs_setup

    assert needs_setup(store)
    _round_files(store, {"ckpt-0000": 0.5})
    assert needs_setup(store)  # complete, but its evaluation may not have reached the journal
    store.setup_marker.write_text("ckpt-0000\n")
    assert not needs_setup(store)


def test_the_blind_eval_decodes_the_same_prompts_with_blank_images_and_grades_them_as_the_eval(embedded_policy):
    from dapo_ops.data import synthetic
    from dapo_ops.rl import rewards

    rows = synthetic.generate_rows(3, seed=5, tasks=("color",))
    prompts = training.encode_rows(embedded_policy, rows)
    engine = RecordingEngine(embedded_policy)
    seen = []
    inner = engine.generate
    engine.generate = lambda batch, **kw: seen.append(batch) or inner(batch, **kw)  # noqa: E731 - a spy
    config = DapoConfig(max_completion_length=6)
    accuracy = training.blind_accuracy(config, embedded_policy, engine, prompts, rows)

    (blind,) = seen
    assert torch.equal(blind.input_ids, prompts.input_ids)  # the same questions ...
    pixels = blind.vision.tensors["pixel_values"]
    assert not torch.equal(pixels, prompts.vision.tensors["pixel_values"])  # ... without their images:
    assert torch.equal(pixels, pixels[:1].expand_as(pixels))  # every patch the same blank (mean) pixel
    greedy = engine.inner.generate(blind, num_generations=1, max_completion_length=6, temperature=0.0, top_p=1.0,
                                   seed=0)
    correct = rewards.answer_correct(greedy.completions, rows)
    assert accuracy == pytest.approx(sum(correct) / len(correct))


def test_a_reanalysis_logs_the_stage_metrics_and_the_finite_visual_values(tmp_path: Path):
    import math

    from dapo_ops.attention.metrics import LOGGED_METRIC_NAMES

    means = {stage: {name: 1.0 for name in LOGGED_METRIC_NAMES} for stage in ("early", "middle", "late", "all")}
    visual = {"visual/kl_mean": 0.2, "visual/kl_answer": math.nan, "eval/blind_accuracy": 0.25,
              "abs_log_mdi_kl_correlation": -0.5}
    report = dapo_round.AttentionReport("", tmp_path / "r.md", tmp_path / "c.png", 2.0, means, visual)
    metrics = report.metrics()
    assert metrics["attention/all/mdi"] == 1.0 and len(metrics) == 4 * len(LOGGED_METRIC_NAMES) + 2
    assert metrics["visual/kl_mean"] == 0.2 and metrics["eval/blind_accuracy"] == 0.25  # NaN and the r left out
