"""The MLflow run's lifecycle: RUNNING while `make run` trains, then FINISHED, FAILED or KILLED; a resumed
run reopens the same run id; `make sync-mlflow` says (by its exit code) when something stayed unsent;
a round without an optimizer step logs no loss/grad_norm instead of a fake 0."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import mlflow
import pytest

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.tracking.facade import MlflowUnavailableWarning, Tracker, default_tracking_uri
from tests.conftest import TINY_RUN

TINY = TINY_RUN


def closed_loopback_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def status_of(uri: str, run_id: str) -> str:
    return mlflow.MlflowClient(uri).get_run(run_id).info.status


# ------------------------------------------------------------------------------------- the facade


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("lifecycle_root")
    return root, default_tracking_uri(root)


def test_end_finishes_the_run_and_start_reopens_the_same_run_id(store: tuple[Path, str], tmp_path: Path) -> None:
    root, uri = store
    tracker = Tracker(tmp_path / "run", "ends", tracking_uri=uri, data_root=root)
    run_id = tracker.start({"seed": 0})
    assert status_of(uri, run_id) == "RUNNING"
    assert tracker.end("FINISHED") is True
    assert status_of(uri, run_id) == "FINISHED"
    again = Tracker(tmp_path / "run", "ends", tracking_uri=uri, data_root=root)
    assert again.start({"seed": 0}) == run_id
    assert status_of(uri, run_id) == "RUNNING"
    assert again.end("FAILED") and status_of(uri, run_id) == "FAILED"


def test_an_end_during_an_outage_is_journaled_and_sent_by_the_next_sync(store: tuple[Path, str],
                                                                       tmp_path: Path) -> None:
    root, uri = store
    run_dir = tmp_path / "run"
    run_id = Tracker(run_dir, "outage-end", tracking_uri=uri, data_root=root).start({"seed": 0})
    down = Tracker(run_dir, "outage-end", tracking_uri=closed_loopback_url(), data_root=root)
    with pytest.warns(MlflowUnavailableWarning):
        assert down.end("KILLED") is False
    assert status_of(uri, run_id) == "RUNNING"
    up = Tracker(run_dir, "outage-end", tracking_uri=uri, data_root=root)
    assert up.pending_status() == "KILLED"
    with warnings.catch_warnings():
        warnings.simplefilter("error", MlflowUnavailableWarning)
        assert up.sync() == 0  # no round was pending, only the run's end
    assert status_of(uri, run_id) == "KILLED"
    assert up.pending_status() is None


def test_a_sigterm_during_make_run_ends_its_run_killed(store: tuple[Path, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from dapo_ops.store.layout import RunStore
    from pipelines.cli import RunInterrupted, _tracked_run

    root, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_store = RunStore(root, "terminated")
    run_id = Tracker(run_store.run_dir, "terminated", tracking_uri=uri, data_root=root).start({"seed": 0})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match="SIGTERM"), _tracked_run(run_store, echo=lambda _: None):
        os.kill(os.getpid(), signal.SIGTERM)
    assert status_of(uri, run_id) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only as long as the run


def test_end_rejects_a_status_mlflow_does_not_have(store: tuple[Path, str], tmp_path: Path) -> None:
    tracker = Tracker(tmp_path / "run", "bad-status", tracking_uri=store[1], data_root=store[0])
    with pytest.raises(ValueError, match="'DONE' is not one of"):
        tracker.end("DONE")
    with pytest.raises(ValueError, match="RUNNING is set by start"):
        tracker.end("RUNNING")


def test_sync_mlflow_exits_non_zero_while_rounds_cannot_be_sent(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipelines.cli import sync_mlflow

    monkeypatch.setenv("DAPO_VLM_HOME", str(tmp_path))
    run_dir = tmp_path / "runs" / "unsent"
    url = closed_loopback_url()
    with pytest.warns(MlflowUnavailableWarning):
        Tracker(run_dir, "unsent", tracking_uri=url, data_root=tmp_path).log_round("ckpt-0000", 1, {"reward": 1.0})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with pytest.warns(MlflowUnavailableWarning):
        assert sync_mlflow("unsent") == 1
    assert "unsent: NOT sent: 1 round(s) stay in" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(tmp_path))
    assert sync_mlflow("unsent") == 0
    assert "unsent: sent 1 journaled round(s)" in capsys.readouterr().out
    assert sync_mlflow("no-such-run") == 2


# ------------------------------------------------------------------------- `make run` (run_training)


def training_run(uri: str, run_name: str):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("dapo-vlm")
    [run] = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dapo.run_name` = '{run_name}'")
    return run


@pytest.fixture(scope="module")
def make_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`make run ROUNDS=1`, then `make run ROUNDS=2` of the same RUN_NAME; and a run whose round 0 fails
    (a NaN advantage), in process through `pipelines.cli.run_training` on a real SQLite MLflow store."""
    from pipelines.cli import run_training

    root = tmp_path_factory.mktemp("make_run")
    uri = default_tracking_uri(root)
    env = {"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"), "MLFLOW_TRACKING_URI": uri}
    previous = {k: os.environ.get(k) for k in (*env, "DAPO_VLM_FAULT")}
    os.environ.update(env)
    seen: dict = {"root": root, "uri": uri}
    try:
        run_training(DapoConfig(run_name="life", **TINY), 1, root=root, echo=lambda _: None)
        seen["first"] = training_run(uri, "life").info
        run_training(DapoConfig(run_name="life", **TINY), 2, root=root, echo=lambda _: None)
        seen["second"] = training_run(uri, "life").info
        os.environ["DAPO_VLM_FAULT"] = "nan:advantages"
        with pytest.raises(RuntimeError, match="non-finite loss"):
            run_training(DapoConfig(run_name="nan", **TINY), 1, root=root, echo=lambda _: None)
        seen["failed"] = training_run(uri, "nan").info
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return seen


@pytest.mark.slow
def test_make_run_leaves_its_mlflow_run_finished(make_runs) -> None:
    assert make_runs["first"].status == "FINISHED"
    assert make_runs["first"].end_time is not None


@pytest.mark.slow
def test_a_resumed_make_run_continues_the_same_run_id_and_finishes_it_again(make_runs) -> None:
    assert make_runs["second"].run_id == make_runs["first"].run_id
    assert make_runs["second"].status == "FINISHED"
    history = mlflow.MlflowClient(make_runs["uri"]).get_metric_history(make_runs["first"].run_id, "reward")
    assert len(history) == 2  # round 0 from the first invocation, round 1 from the second


@pytest.mark.slow
def test_a_failed_round_leaves_the_mlflow_run_failed(make_runs) -> None:
    assert make_runs["failed"].status == "FAILED"


@pytest.mark.slow
def test_a_round_without_an_optimizer_step_logs_no_loss_or_grad_norm(make_runs) -> None:
    """Round 0 of the finished run, read back with an update record that made no optimizer step."""
    from dapo_ops.run import phases as training
    from dapo_ops.run.round_files import UpdateRecord
    from dapo_ops.store import layout as store_io
    from dapo_ops.store.layout import RunStore
    from dapo_ops.train.update import UpdateResult

    run_store = RunStore(make_runs["root"], "life")
    record = store_io.read_json(run_store.round_dir("ckpt-0000") / "update.json")
    measured = training.round_metrics(DapoConfig(**TINY), training.round_table(run_store, "ckpt-0000"),
                                      UpdateRecord.from_dict(record))
    assert {"loss", "grad_norm"} <= measured.keys()  # the default path steps: both are logged

    no_step = {**record, "steps": [], "summary": UpdateResult(global_step=4).summary()}
    metrics = training.round_metrics(DapoConfig(**TINY), training.round_table(run_store, "ckpt-0000"),
                                     UpdateRecord.from_dict(no_step))
    assert "loss" not in metrics and "grad_norm" not in metrics
    assert set(measured) - set(metrics) == {"loss", "grad_norm"}
    assert all(v == v for v in metrics.values()), "no NaN stands in for the missing step"
