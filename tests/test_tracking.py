"""MLflow tracking: one run per run name, a local journal, and no lost or duplicated rounds in outages."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
import warnings
from pathlib import Path

import mlflow
import pytest

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.tracking.facade import (
    MlflowUnavailableWarning,
    Tracker,
    default_tracking_uri,
    flatten_params,
    normalize_artifacts,
    redact_uri,
    resolve_tracking_uri,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One SQLite MLflow store for the module (creating its tables costs seconds)."""
    root = tmp_path_factory.mktemp("data_root")
    return root, default_tracking_uri(root)


@pytest.fixture()
def client(store: tuple[Path, str]) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=store[1])


def make_tracker(store: tuple[Path, str], run_dir: Path, run_name: str, uri: str | None = None) -> Tracker:
    root, default_uri = store
    return Tracker(run_dir, run_name, tracking_uri=uri or default_uri, data_root=root)


def closed_loopback_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_reports(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("rollout_results.md", "attention_diagnostics.md", "run_terminal.md"):
        path = folder / name
        path.write_text(f"# {name}\n")
        paths.append(path)
    png = folder / "rewards.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    return [*paths, png]


def test_default_tracking_uri_is_sqlite_under_the_data_root_and_env_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert Tracker(tmp_path / "run", "a", data_root=tmp_path).tracking_uri == "http://127.0.0.1:5000"


def test_params_are_flattened_strings_and_uri_passwords_are_redacted() -> None:
    flat = flatten_params({"lr": 5e-4, "weights": [3.0, 1.0], "model": {"layers": 4}, "on": True})
    assert flat == {"lr": "0.0005", "weights": "[3.0, 1.0]", "model.layers": "4", "on": "True"}
    assert redact_uri("postgresql://me:secret@127.0.0.1:5432/db") == "postgresql://me:***@127.0.0.1:5432/db"


def test_artifacts_are_given_by_folder_or_as_path_folder_pairs(tmp_path: Path) -> None:
    a, b = tmp_path / "a.md", tmp_path / "b.png"
    expected = [(a, "reports/ckpt-0003"), (b, "reports/ckpt-0003")]
    assert normalize_artifacts({"reports/ckpt-0003": [a, b]}) == expected
    assert normalize_artifacts([(a, "reports/ckpt-0003"), (b, "reports/ckpt-0003")]) == expected
    assert normalize_artifacts({"": a}) == [(a, None)]
    with pytest.raises(ValueError, match="artifact directory"):
        normalize_artifacts({"../outside": a})


def test_rounds_log_metrics_at_their_steps_with_params_tags_and_artifacts(
    store: tuple[Path, str], client: mlflow.MlflowClient, tmp_path: Path
) -> None:
    run_dir = tmp_path / "runs" / "round-demo"
    tracker = make_tracker(store, run_dir, "round-demo")
    config = DapoConfig(run_name="round-demo")
    run_id = tracker.start(config.to_dict(), tags={"dagster.run_id": "d-1"})
    assert run_id is not None

    for k, step in ((0, 8), (1, 16)):
        key = f"ckpt-{k:04d}"
        files = write_reports(run_dir / "reports" / key)
        sent = tracker.log_round(
            key,
            step,
            {"reward": 0.5 + k, "attention/all/mdi": 4.0 - k},
            artifacts={f"reports/{key}": files},
            tags={"dagster.run_id": f"d-{k + 2}"},
            per_step={step - 1: {"loss": 1.0 - k}},
        )
        assert sent is True

    assert tracker.metric_history("reward") == [(8, 0.5), (16, 1.5)]
    assert tracker.metric_history("loss") == [(7, 1.0), (15, 0.0)]
    run = client.get_run(run_id)
    assert run.info.run_name == "round-demo"
    assert run.data.params["learning_rate"] == str(config.learning_rate)
    assert run.data.params["reward_weights"] == "[3.0, 1.0, 1.0]"
    assert run.data.tags["dapo.run_name"] == "round-demo"
    assert run.data.tags["dapo.checkpoint"] == "ckpt-0001"
    assert run.data.tags["dagster.run_id"] == "d-3"
    listed = {f.path for f in client.list_artifacts(run_id, "reports/ckpt-0001")}
    assert listed == {
        f"reports/ckpt-0001/{n}"
        for n in ("rollout_results.md", "attention_diagnostics.md", "run_terminal.md", "rewards.png")
    }
    # The SQLite store keeps artifacts under the data root, not in the working directory.
    assert list((store[0] / "mlartifacts").glob(f"{run_id}/artifacts/reports/ckpt-0000/run_terminal.md"))
    assert tracker.pending() == []


def test_the_same_run_name_continues_the_same_mlflow_run(store: tuple[Path, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "continued"
    first = make_tracker(store, run_dir, "continued")
    run_id = first.start({"seed": 0})
    first.log_round("ckpt-0000", 4, {"reward": 1.0})

    # A later process, even without the local cache, finds the run by its `dapo.run_name` tag.
    (run_dir / "mlflow" / "run.json").unlink()
    second = make_tracker(store, run_dir, "continued")
    assert second.start({"seed": 0}) == run_id
    assert second.log_round("ckpt-0001", 8, {"reward": 2.0})
    assert second.metric_history("reward") == [(4, 1.0), (8, 2.0)]


def test_two_run_names_get_two_runs(store: tuple[Path, str], tmp_path: Path) -> None:
    a = make_tracker(store, tmp_path / "a", "name-a")
    b = make_tracker(store, tmp_path / "b", "name-b")
    assert a.start({"seed": 1}) != b.start({"seed": 2})
    a.log_round("ckpt-0000", 1, {"reward": 0.1})
    b.log_round("ckpt-0000", 1, {"reward": 0.9})
    assert a.metric_history("reward") == [(1, 0.1)]
    assert b.metric_history("reward") == [(1, 0.9)]


def test_a_changed_param_on_continuation_becomes_a_tag(
    store: tuple[Path, str], client: mlflow.MlflowClient, tmp_path: Path
) -> None:
    run_dir = tmp_path / "changed"
    run_id = make_tracker(store, run_dir, "changed").start({"learning_rate": 1e-3, "seed": 0})
    again = make_tracker(store, run_dir, "changed")
    assert again.start({"learning_rate": 5e-4, "seed": 0, "beta": 0.0}) == run_id
    run = client.get_run(run_id)
    assert run.data.params == {"learning_rate": "0.001", "seed": "0", "beta": "0.0"}
    assert run.data.tags["param_changed.learning_rate"] == "0.0005"


def test_an_unreachable_server_fails_fast_and_keeps_the_round_in_the_journal(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    url = closed_loopback_url()
    run_dir = tmp_path / "outage"
    tracker = make_tracker(store, run_dir, "outage", uri=url)
    with pytest.warns(MlflowUnavailableWarning) as caught:
        began = time.monotonic()
        assert tracker.start({"seed": 0}) is None
        assert tracker.log_round("ckpt-0000", 8, {"reward": 0.5}) is False
        elapsed = time.monotonic() - began
    assert elapsed < 10, f"an unreachable MLflow blocked the round for {elapsed:.1f} s"
    message = str(caught[-1].message)
    assert "MLflow" in message and url in message
    assert tracker.last_error == message

    [entry] = tracker.pending()
    assert entry["key"] == "ckpt-0000" and entry["step"] == 8 and entry["metrics"] == {"8": {"reward": 0.5}}
    journal = (run_dir / "mlflow" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in journal] == ["ckpt-0000"]


def test_sync_after_an_outage_sends_each_round_once(
    store: tuple[Path, str], client: mlflow.MlflowClient, tmp_path: Path
) -> None:
    run_dir = tmp_path / "recovering"
    down = make_tracker(store, run_dir, "recovering", uri=closed_loopback_url())
    with pytest.warns(MlflowUnavailableWarning):
        down.start({"seed": 7})
        down.log_round("ckpt-0000", 8, {"reward": 0.5})
        down.log_round("ckpt-0001", 16, {"reward": 0.7})
    assert len(down.pending()) == 2

    # MLflow is back: the run is created at the working store, with the params saved during the outage.
    up = make_tracker(store, run_dir, "recovering")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MlflowUnavailableWarning)
        assert up.sync() == 2
    assert up.pending() == []
    assert up.sync() == 0
    assert up.metric_history("reward") == [(8, 0.5), (16, 0.7)]
    assert client.get_run(up.run_id).data.params == {"seed": "7"}


def test_a_crash_between_sending_and_marking_does_not_duplicate_metrics(
    store: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "crash"
    tracker = make_tracker(store, run_dir, "crash")
    assert tracker.log_round("ckpt-0000", 8, {"reward": 0.5, "loss": 1.0})
    (run_dir / "mlflow" / "sent.jsonl").write_text("")  # the "sent" marker never reached the disk

    restarted = make_tracker(store, run_dir, "crash")
    metric_batches = []
    real_log_batch = restarted._mlflow().log_batch

    def spy(run_id, metrics=(), **kw):
        if metrics:
            metric_batches.append(metrics)
        return real_log_batch(run_id, metrics=metrics, **kw)

    monkeypatch.setattr(restarted._mlflow(), "log_batch", spy)
    assert len(restarted.pending()) == 1
    assert restarted.sync() == 1
    assert metric_batches == []
    assert restarted.metric_history("reward") == [(8, 0.5)]
    assert restarted.pending() == []


def test_logging_a_round_key_again_never_adds_a_second_value(store: tuple[Path, str], tmp_path: Path) -> None:
    tracker = make_tracker(store, tmp_path / "relog", "relog")
    assert tracker.log_round("ckpt-0000", 8, {"reward": 0.5})
    assert tracker.log_round("ckpt-0000", 8, {"reward": 0.9})  # e.g. a re-materialized report
    assert tracker.metric_history("reward") == [(8, 0.5)]


def test_rounds_sharing_a_step_are_both_logged(store: tuple[Path, str], tmp_path: Path) -> None:
    """A round whose update kept no groups does not advance the global step; it is still a round."""
    tracker = make_tracker(store, tmp_path / "same-step", "same-step")
    assert tracker.log_round("ckpt-0000", 8, {"reward": 0.5})
    assert tracker.log_round("ckpt-0001", 8, {"reward": 0.6})
    assert tracker.metric_history("reward") == [(8, 0.5), (8, 0.6)]


def test_a_stale_cached_run_id_is_not_trusted(store: tuple[Path, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "stale"
    tracker = make_tracker(store, run_dir, "stale")
    run_id = tracker.start({"seed": 0})
    cache = run_dir / "mlflow" / "run.json"
    data = json.loads(cache.read_text())
    data["runs"][tracker.tracking_uri]["run_id"] = "0" * 32
    cache.write_text(json.dumps(data))

    again = make_tracker(store, run_dir, "stale")
    assert again.log_round("ckpt-0000", 1, {"reward": 1.0})
    assert again.run_id == run_id
    assert again.metric_history("reward") == [(1, 1.0)]


def test_a_store_that_cannot_be_opened_is_an_outage(store: tuple[Path, str], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    uri = f"sqlite:///{blocker}/mlflow.db"
    tracker = make_tracker(store, tmp_path / "broken", "broken", uri=uri)
    with pytest.warns(MlflowUnavailableWarning, match="MLflow"):
        assert tracker.log_round("ckpt-0000", 1, {"reward": 1.0}) is False
    assert len(tracker.pending()) == 1


def test_non_finite_metrics_are_journaled_as_strict_json_and_logged_as_nan(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "nan"
    tracker = make_tracker(store, run_dir, "nan")
    assert tracker.log_round("ckpt-0000", 2, {"attention/all/mdi": float("nan"), "x": float("inf")})
    line = (run_dir / "mlflow" / "journal.jsonl").read_text()
    assert json.loads(line)["metrics"]["2"] == {"attention/all/mdi": "NaN", "x": "Infinity"}
    [(step, value)] = tracker.metric_history("attention/all/mdi")
    assert step == 2 and math.isnan(value)


def test_invalid_metrics_are_rejected_before_anything_is_journaled(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    tracker = make_tracker(store, tmp_path / "invalid", "invalid")
    with pytest.raises(ValueError, match="metric"):
        tracker.log_round("ckpt-0000", 1, {"bad|name": 1.0})
    with pytest.raises(ValueError, match="non-numeric"):
        tracker.log_round("ckpt-0000", 1, {"reward": "high"})
    assert tracker.pending() == []


def test_more_than_a_thousand_metrics_are_sent_in_batches(
    store: tuple[Path, str], client: mlflow.MlflowClient, tmp_path: Path
) -> None:
    tracker = make_tracker(store, tmp_path / "wide", "wide")
    metrics = {f"m/{i:04d}": float(i) for i in range(1500)}
    assert tracker.log_round("ckpt-0000", 3, metrics)
    assert len(client.get_run(tracker.run_id).data.metrics) == 1500


def test_a_torn_journal_line_from_a_crash_is_skipped(store: tuple[Path, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "torn"
    tracker = make_tracker(store, run_dir, "torn")
    assert tracker.log_round("ckpt-0000", 1, {"reward": 1.0})
    with open(run_dir / "mlflow" / "journal.jsonl", "a") as f:
        f.write('{"key": "ckpt-0001", "st')  # the process died mid-write
    assert tracker.log_round("ckpt-0001", 2, {"reward": 2.0})
    assert tracker.metric_history("reward") == [(1, 1.0), (2, 2.0)]


def test_a_reanalysis_is_a_separate_tagged_run_that_leaves_training_alone(
    store: tuple[Path, str], client: mlflow.MlflowClient, tmp_path: Path
) -> None:
    run_dir = tmp_path / "trained"
    tracker = make_tracker(store, run_dir, "trained")
    training_id = tracker.start({"mdi_tolerance": 2.0})
    tracker.log_round("ckpt-0001", 8, {"attention/all/mdi": 5.0})
    report = write_reports(run_dir / "reanalysis")[0]

    reanalysis_id = tracker.start_reanalysis_run(
        "trained",
        "ckpt-0001",
        {"mdi_tolerance": 3.0},
        tags={"dapo.run_name": "trained", "dagster.run_id": "d"},
    )
    assert reanalysis_id is not None and reanalysis_id != training_id
    assert tracker.log_reanalysis(
        reanalysis_id, {"attention/all/mdi_balance": 0.2}, {"reports/ckpt-0001": report}, step=8
    )

    reanalysis = client.get_run(reanalysis_id)
    assert reanalysis.data.tags["dapo.kind"] == "reanalysis"
    assert reanalysis.data.tags["dapo.training_run_name"] == "trained"
    assert reanalysis.data.tags["dapo.training_run_id"] == training_id
    assert reanalysis.data.tags["dapo.reanalysis_of"] == "trained"
    assert reanalysis.data.tags["mlflow.parentRunId"] == training_id
    assert "dapo.run_name" not in reanalysis.data.tags  # so it is never mistaken for the training run
    assert reanalysis.data.tags["dapo.checkpoint"] == "ckpt-0001"
    assert reanalysis.data.params == {"mdi_tolerance": "3.0"}
    assert reanalysis.data.metrics == {"attention/all/mdi_balance": 0.2}
    assert [f.path for f in client.list_artifacts(reanalysis_id, "reports/ckpt-0001")] == [
        "reports/ckpt-0001/rollout_results.md"
    ]

    training = client.get_run(training_id)
    assert training.data.params == {"mdi_tolerance": "2.0"}
    assert training.data.metrics == {"attention/all/mdi": 5.0}
    assert client.list_artifacts(training_id) == []
    # A re-analysis started during an outage has no run id; logging to it is a no-op.
    assert tracker.log_reanalysis(None, {"x": 1.0}) is False
    # Later rounds still go to the training run, not to the re-analysis.
    assert make_tracker(store, run_dir, "trained").start({"mdi_tolerance": 2.0}) == training_id


def test_a_round_table_is_listed_once_in_the_ui_and_loads_back(store: tuple[Path, str], client, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    from PIL import Image

    from dapo_ops.reporting.reports import mlflow_table_json
    from tests.conftest import use_global_mlflow_uri

    run_dir = tmp_path / "runs" / "tabled"
    folder = run_dir / "reports" / "ckpt-0000"
    (folder / "rollout_images").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(folder / "rollout_images" / "prompt-0000.png")
    cell = {"type": "image", "filepath": "reports/ckpt-0000/rollout_images/prompt-0000.png",
            "compressed_filepath": "reports/ckpt-0000/rollout_images/prompt-0000.png"}
    table = folder / "rollout_table.json"
    table.write_text(mlflow_table_json({"image": [cell, cell], "completion": ["a", "b"], "total": [1.0, 2.0]}))
    tracker = make_tracker(store, run_dir, "tabled")
    run_id = tracker.start({"seed": 0})
    artifacts = {"reports/ckpt-0000": [table], "reports/ckpt-0000/rollout_images": [folder / "rollout_images"]}
    for _ in range(2):  # a re-materialized report sends the round again
        assert tracker.log_round("ckpt-0000", 1, {"reward": 1.0}, artifacts=artifacts,
                                 tables=["reports/ckpt-0000/rollout_table.json"])
    listed = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert listed == [{"path": "reports/ckpt-0000/rollout_table.json", "type": "table"}]
    experiment_id = client.get_run(run_id).info.experiment_id
    use_global_mlflow_uri(monkeypatch, store[1])  # load_table searches the runs through the global tracking URI
    loaded = client.load_table(experiment_id, "reports/ckpt-0000/rollout_table.json", run_ids=[run_id])
    assert loaded["completion"].tolist() == ["a", "b"]  # not appended twice, as log_table would
    assert {a.path for a in client.list_artifacts(run_id, "reports/ckpt-0000/rollout_images")} == {
        cell["filepath"]}


def test_a_table_path_is_checked_before_it_is_journaled(store: tuple[Path, str], tmp_path: Path):
    tracker = make_tracker(store, tmp_path / "runs" / "badtable", "badtable")
    with pytest.raises(ValueError, match="table artifact"):
        tracker.log_round("ckpt-0000", 1, {"reward": 1.0}, tables=["../outside.json"])
    assert not tracker.journal_path.exists()


class CutShort(Exception):
    """Stands for a kill: raised inside MLflow's migration of a new store."""


def test_a_store_whose_creation_was_cut_short_opens_on_the_next_run(tmp_path: Path, monkeypatch) -> None:
    """A process killed while MLflow migrates a new SQLite store (here: right after a migration created a table,
    before it recorded its version; the migration of the store template, the one place they run) leaves nothing
    the next open trips over, and no staging file behind."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from dapo_ops.tracking.mlflow_sink import CACHE_ENV, open_client

    cache, root = tmp_path / "cache", tmp_path / "root"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    uri = default_tracking_uri(root)
    state = {"migrating": False, "created_table": False}

    def cut(conn, cursor, statement: str, parameters, context, executemany) -> None:  # noqa: ANN001
        if str(tmp_path) not in str(conn.engine.url.database):
            return  # another test's store (a thread left running)
        words = statement.split()
        if state["created_table"]:
            raise CutShort(" ".join(words[:3]))
        if "alembic_version" in words and words[0] == "UPDATE":
            state["migrating"] = True
        state["created_table"] = state["migrating"] and words[:2] == ["CREATE", "TABLE"]

    event.listen(Engine, "before_cursor_execute", cut)
    try:
        with pytest.raises(CutShort):
            open_client(uri)
    finally:
        event.remove(Engine, "before_cursor_execute", cut)

    client = open_client(uri)
    experiment = client.create_experiment("after-the-cut")
    assert client.get_experiment(experiment).name == "after-the-cut"
    assert sorted(p.name for p in root.iterdir()) == ["mlflow.db", "mlflow.db.init-lock"]
    template, lock = sorted(p.name for p in cache.iterdir())  # the template and its lock, no staging file
    assert template.endswith(".db") and lock == f"{template}.init-lock"


def _migrations_run(build) -> int:  # noqa: ANN001
    """How many MLflow schema migrations `build()` runs (each records its version in alembic_version)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counted = []

    def count(conn, cursor, statement: str, *args) -> None:  # noqa: ANN001
        if statement.lstrip().startswith("UPDATE alembic_version"):
            counted.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        build()
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    return len(counted)


def _dump(database: Path) -> tuple[list, dict]:
    """The schema and every row of a SQLite store, but the Default experiment's times. (MLflow's migrations
    write a table's constraints in no fixed order: each statement is compared as its sorted lines.)"""
    import sqlite3

    with contextlib.closing(sqlite3.connect(database)) as connection:
        schema = [(kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                  for kind, name, sql in connection.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name")]
        rows = {}
        for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            columns = [c[1] for c in connection.execute(f'PRAGMA table_info("{table}")')]
            kept = [c for c in columns if c not in ("creation_time", "last_update_time")]
            rows[table] = sorted(connection.execute(f'SELECT {", ".join(kept)} FROM "{table}"').fetchall(), key=repr)
    return schema, rows


def test_new_stores_are_copies_of_a_template_built_once_and_equal_what_mlflow_builds(tmp_path, monkeypatch):
    from dapo_ops.tracking.mlflow_sink import CACHE_ENV, ensure_store

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    # MLflow puts its Default experiment's artifacts under the working directory of the process that builds a
    # store: the template, built elsewhere, must not carry its own.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _migrations_run(lambda: ensure_store(default_tracking_uri(tmp_path / "first"))) > 10
    monkeypatch.chdir(tmp_path)
    assert _migrations_run(lambda: ensure_store(default_tracking_uri(tmp_path / "second"))) == 0
    assert [p.suffix for p in (tmp_path / "cache").glob("*.db")] == [".db"]
    # MLflow's own build, for comparison.
    mlflow.MlflowClient(default_tracking_uri(tmp_path / "mlflow")).search_experiments()
    reference = _dump(tmp_path / "mlflow" / "mlflow.db")
    assert _dump(tmp_path / "second" / "mlflow.db") == reference
    client = mlflow.MlflowClient(default_tracking_uri(tmp_path / "second"))
    assert client.get_experiment("0").artifact_location == mlflow.MlflowClient(
        default_tracking_uri(tmp_path / "mlflow")).get_experiment("0").artifact_location
    assert client.create_experiment("next") == "1"


def test_an_unreadable_template_is_rebuilt_and_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    from dapo_ops.tracking.mlflow_sink import CACHE_ENV, ensure_store, store_template

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    template = store_template()
    template.write_bytes(b"not a database")
    ensure_store(default_tracking_uri(tmp_path / "a"))
    assert mlflow.MlflowClient(default_tracking_uri(tmp_path / "a")).get_experiment("0").name == "Default"
    assert store_template() == template and template.read_bytes().startswith(b"SQLite format 3")

    (tmp_path / "file").write_text("a file where the cache folder would go")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))
    with pytest.warns(UserWarning, match="MLflow store template not written"):
        ensure_store(default_tracking_uri(tmp_path / "b"))
    assert mlflow.MlflowClient(default_tracking_uri(tmp_path / "b")).get_experiment("0").name == "Default"


def test_ensure_store_builds_a_missing_store_once_and_removes_only_its_own_leftovers(tmp_path: Path) -> None:
    """What `make mlflow-ui` calls before the server opens the store: a missing SQLite store is built (aside,
    then linked into place); an existing one is left as it is."""
    from dapo_ops.tracking.mlflow_sink import ensure_store

    leftover, unrelated = tmp_path / ".tmp-mlflow.db-123-456-journal", tmp_path / ".tmp-mlflow.db-notes"
    leftover.write_bytes(b"half")
    unrelated.write_text("not a store build's")
    ensure_store(default_tracking_uri(tmp_path))
    store = tmp_path / "mlflow.db"
    assert mlflow.MlflowClient(default_tracking_uri(tmp_path)).get_experiment("0").name == "Default"
    assert not leftover.exists() and unrelated.exists()
    built = store.stat().st_mtime_ns
    ensure_store(default_tracking_uri(tmp_path))
    assert store.stat().st_mtime_ns == built
