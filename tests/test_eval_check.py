"""The blocking eval check on policy_update: a checkpoint whose eval accuracy fell by more than
`max_eval_drop` fails it, and neither `make run` nor the next-round sensor continues from it."""

from __future__ import annotations

import contextlib
import io

import dagster as dg
import pytest

from dapo_ops.reporting.health import eval_accuracy_drop

TINY_RUN = {
    "run_name": "eval-drop",
    "prompts_per_round": 2,
    "num_generations": 2,
    "max_completion_length": 8,
    "steps_per_generation": 1,
    "num_iterations": 1,
    "num_train_examples": 16,
    "num_eval_examples": 8,
    "eval_subset_size": 4,
    "warmup_steps": 2,
}


def test_a_drop_within_max_eval_drop_passes_and_a_larger_one_fails():
    kept = eval_accuracy_drop(0.5, 0.35, max_drop=0.2, previous_key="ckpt-0000", current_key="ckpt-0001")
    fell = eval_accuracy_drop(0.5, 0.25, max_drop=0.2, previous_key="ckpt-0000", current_key="ckpt-0001")
    assert kept.passed and not fell.passed
    assert fell.severity == "ERROR"
    assert fell.value == pytest.approx(0.25)
    assert "fell from 0.500 (ckpt-0000) to 0.250 (ckpt-0001)" in fell.message


def test_a_rise_passes_and_an_unevaluated_checkpoint_fails():
    assert eval_accuracy_drop(0.2, 0.9, max_drop=0.0, previous_key="ckpt-0001", current_key="ckpt-0002").passed
    assert not eval_accuracy_drop(0.2, float("nan"), max_drop=0.2, previous_key="a", current_key="b").passed


@pytest.fixture(scope="module")
def eval_drop_run(tmp_path_factory: pytest.TempPathFactory):
    """Setup + round 0 of a tiny run whose evaluation is forced to fall from 0.75 (ckpt-0000) to 0.25."""
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.run import phases as training
    from dapo_ops.tracking.facade import default_tracking_uri
    from pipelines.checks import EvalDropError
    from pipelines.cli import run_training

    root = tmp_path_factory.mktemp("eval_drop")
    accuracies = iter([0.75, 0.25])

    def forced_evaluate(config, run_store, policy, **_):
        return {"eval/accuracy": next(accuracies), "eval/format": 1.0}

    env = {"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
           "MLFLOW_TRACKING_URI": default_tracking_uri(root)}
    config = DapoConfig(**TINY_RUN)
    console = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.setattr(training, "evaluate", forced_evaluate)
        with contextlib.redirect_stderr(console), pytest.raises(EvalDropError) as first:
            run_training(config, rounds=2, root=root, echo=lambda _: None)
        with pytest.raises(EvalDropError) as again:
            run_training(config, rounds=2, root=root, echo=lambda _: None)
    return {"root": root, "config": config, "error": str(first.value), "again": str(again.value),
            "console": console.getvalue()}



@pytest.mark.slow
def test_a_forced_eval_drop_stops_make_run_with_the_check_s_message(eval_drop_run):
    assert "policy_update: blocking check eval_accuracy_drop failed" in eval_drop_run["error"]
    assert "fell from 0.750 (ckpt-0000) to 0.250 (ckpt-0001)" in eval_drop_run["error"]
    assert "Traceback" not in eval_drop_run["console"]


@pytest.mark.slow
def test_the_failed_blocking_check_skips_the_round_s_reports_and_the_next_round(eval_drop_run):
    from dapo_ops.store.layout import RunStore

    instance = dg.DagsterInstance.from_config(str(eval_drop_run["root"] / "dagster"))
    key = dg.AssetCheckKey(dg.AssetKey("policy_update"), "eval_accuracy_drop")
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])
    assert latest[key].status.value == "FAILED"
    assert instance.get_materialized_partitions(dg.AssetKey("policy_update")) == {"ckpt-0000"}
    assert instance.get_materialized_partitions(dg.AssetKey("training_report")) == set()
    store = RunStore(eval_drop_run["root"], eval_drop_run["config"].run_name)
    assert store.complete_checkpoints() == ["ckpt-0000", "ckpt-0001"]  # kept for inspection, never trained on
    assert not (store.round_dir("ckpt-0001")).exists()


@pytest.mark.slow
def test_a_second_make_run_stops_again_before_any_work(eval_drop_run):
    assert "blocking check eval_accuracy_drop failed" in eval_drop_run["again"]


@pytest.mark.slow
def test_the_sensor_does_not_launch_a_round_from_the_failed_checkpoint_and_says_why(eval_drop_run):
    from pipelines.resources import RunStoreResource
    from pipelines.sensors import next_round_request

    store = RunStoreResource(data_root=str(eval_drop_run["root"]))
    result = next_round_request(eval_drop_run["config"].run_name, "ckpt-0001", store)
    assert isinstance(result, dg.SkipReason)
    assert "stops at ckpt-0001: blocking check eval_accuracy_drop failed" in result.skip_message
