"""The MLflow side of tracking: client, fail-fast backoff, run lookup/creation, params, batches, artifacts.

Every method may raise whatever MLflow raises (connection refused, a locked SQLite file, ...); the
facade (`dapo_ops.tracking.facade.Tracker`) turns that into a warning and keeps the journal for later.
mlflow is imported lazily: importing this module stays cheap for Dagster's definition loading.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dapo_ops.common import faults
from dapo_ops.store.layout import TMP_PREFIX
from dapo_ops.tracking.journal import CHECKPOINT_TAG, MAX_TAG_VALUE, Journal, truncate

DEFAULT_EXPERIMENT = "dapo-vlm"

RUN_NAME_TAG = "dapo.run_name"
KIND_TAG = "dapo.kind"
LAST_ROUND_TAG = "dapo.last_round"
TRAINING_RUN_NAME_TAG = "dapo.training_run_name"
TRAINING_RUN_ID_TAG = "dapo.training_run_id"
REANALYSIS_OF_TAG = "dapo.reanalysis_of"
PARAM_CHANGED_PREFIX = "param_changed."
CHECKPOINT_DIR_TAG = "dapo.checkpoint_dir"
MODEL_TYPE = "dapo-vlm-checkpoint"
EVAL_PREFIX = "eval/"

# MLflow's limits (mlflow.utils.validation): entities per log_batch call.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100

# MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) block a round for
# minutes when the server is down. The journal is our retry mechanism, so fail fast; values the
# user already exported win. mlflow reads these on every request (mlflow.utils.rest_utils).
FAST_FAILURE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# The folder of the MLflow store template (`store_template`).
CACHE_ENV = "DAPO_VLM_CACHE"

REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _now_ms() -> int:
    return int(time.time() * 1000)


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:////abs/path` tracking URI; None for any other store."""
    parts = urlsplit(tracking_uri)
    return Path(parts.path[1:]) if parts.scheme == "sqlite" and parts.path.startswith("//") else None


@contextlib.contextmanager
def _store_lock(database: Path) -> Iterator[None]:
    """Processes creating a new store at once would race through MLflow's schema migrations ("table ...
    already exists"): the creation goes in turn."""
    database.parent.mkdir(parents=True, exist_ok=True)  # SQLite does not create the folder of its file
    fd = os.open(database.with_name(database.name + ".init-lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_store(tracking_uri: str) -> None:
    """Create the SQLite store of `tracking_uri` (folder, tables) if it does not exist yet, as `open_client`
    would; for a process that opens it some other way (`mlflow ui`). Other stores are left alone."""
    database = sqlite_database(tracking_uri)
    if database is None or database.exists():
        return
    with _store_lock(database):
        if not database.exists():
            _create_store(database)


def open_client(tracking_uri: str) -> Any:
    """An `MlflowClient` whose store exists: a new SQLite file gets its folder and its tables, in turn."""
    for name, value in FAST_FAILURE_ENV.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    ensure_store(tracking_uri)  # before the client: MLflow may build a missing store in place as it opens it
    client = MlflowClient(tracking_uri=tracking_uri)
    if sqlite_database(tracking_uri) is not None:
        _open_stores(client)
    return client


def _open_stores(client: Any) -> None:
    """Open the client's tracking and model-registry stores now (MLflow opens each on first use), so that a
    database that cannot be opened fails here."""
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)


def _create_store(database: Path) -> None:
    """A new SQLite store, built under a temporary name and linked into place (under `_store_lock`).

    MLflow's migrations commit table by table: a process killed while it builds the store in place leaves
    tables ahead of the recorded schema version, and every later open fails ("table ... already exists").
    Built aside, a killed build leaves only a temporary file (the store's `.tmp-` convention), removed by the
    next build. The tables come from a copy of `store_template()` when there is one (milliseconds instead of
    MLflow's seconds of migrations); MLflow adds its Default experiment as it opens the copy, as it does in a
    store it built."""
    template = store_template()
    try:
        _build_aside(database, before_open=partial(shutil.copyfile, template) if template else None)
    except Exception:
        if template is None:
            raise
        with contextlib.suppress(OSError):  # unreadable by this MLflow: built anew by the next store creation
            template.unlink()
        _build_aside(database)


def _build_aside(database: Path, *, before_open: Callable[[Path], Any] | None = None,
                 after_open: Callable[[Path], Any] | None = None) -> None:
    """Open an MLflow store at a staging name next to `database` (`before_open(staging)` first, `after_open`
    after), then link it to `database`; leftovers of killed builds of `database` are removed first."""
    from mlflow import MlflowClient

    prefix = f"{TMP_PREFIX}{database.name}-"
    leftover = re.compile(rf"{re.escape(prefix)}\d+-\d+(-journal|-wal|-shm)?")
    for stale in database.parent.glob(f"{glob.escape(prefix)}*"):
        if leftover.fullmatch(stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)
    # A name never used before: MLflow caches a store's engine per URI for the life of the process.
    staging = database.with_name(f"{prefix}{os.getpid()}-{time.time_ns()}")
    try:
        if before_open:
            before_open(staging)
        _open_stores(MlflowClient(tracking_uri=f"sqlite:///{staging.as_posix()}"))  # creates what is missing
        if after_open:
            after_open(staging)
        # FileExistsError: made meanwhile by a process that does not take the lock (an `mlflow ui` started by
        # hand), and kept.
        with contextlib.suppress(FileExistsError):
            os.link(staging, database)
    finally:
        staging.unlink(missing_ok=True)


def store_cache_dir() -> Path:
    """Where the store template lives: `DAPO_VLM_CACHE`, else `$XDG_CACHE_HOME/dapo-vlm` (`~/.cache/dapo-vlm`),
    beside Hugging Face's and pip's caches."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dapo-vlm"


def store_template() -> Path | None:
    """An empty SQLite store at this MLflow's schema, without its Default experiment (whose artifact location
    MLflow derives from where a store is opened), built once per MLflow install (its version and migration
    files name it) in `store_cache_dir()`; None when that folder cannot be written, and stores are then built
    by MLflow's migrations each time."""
    import hashlib

    import mlflow

    migrations = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
    names = "\n".join(sorted(p.name for p in migrations.glob("*.py"))) if migrations.is_dir() else ""
    digest = hashlib.sha256(names.encode()).hexdigest()[:12]
    template = store_cache_dir() / f"mlflow-{mlflow.__version__}-{digest}.db"
    if template.exists():
        return template
    try:
        with _store_lock(template):
            if not template.exists():
                _build_aside(template, after_open=_drop_default_experiment)  # MLflow's migrations, once
    except OSError as error:
        warnings.warn(f"MLflow store template not written to {template.parent} ({error}); each new store runs "
                      f"MLflow's migrations (set {CACHE_ENV} to a writable folder)", stacklevel=2)
        return None
    return template


def _drop_default_experiment(template: Path) -> None:
    import sqlite3

    with contextlib.closing(sqlite3.connect(template)) as connection, connection:
        connection.execute("DELETE FROM experiments WHERE experiment_id = 0")


class MlflowSink:
    """One training run's MLflow run (found by its `dapo.run_name` tag) and the re-analysis runs beside it.

    After a failure (`failed()`), `client()` refuses to touch MLflow for `retry_after_s` seconds, so a
    hung server costs one timeout per round, not one per call.
    """

    retry_after_s: float = 30.0

    def __init__(self, journal: Journal, run_dir: Path, run_name: str, *, tracking_uri: str, uri_key: str,
                 experiment_name: str, artifact_location: str | None) -> None:
        self.journal = journal
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.uri_key = uri_key
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self.run_id: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._failed_at: float | None = None

    # ------------------------------------------------------------------------------ connection

    def client(self) -> Any:
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_after_s:
            raise ConnectionError(f"not retried within {self.retry_after_s:.0f} s of the last failure")
        self._failed_at = None
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    def failed(self) -> None:
        """Forget the (maybe half-initialised) client and back off."""
        self._client = None
        self._experiment_id = None
        self.run_id = None
        self._failed_at = time.monotonic()

    def experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        client = self.client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment_name,
                                                         artifact_location=self.artifact_location)
            except Exception as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # another process created it first
                    raise
                experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment_id)
        self._experiment_id = experiment_id
        return experiment_id

    # ------------------------------------------------------------------------------ the training run

    def resolve_run(self, *, create: bool, adopt: bool = True) -> str | None:
        """This training run's MLflow run: cached id if MLflow still has it, else the tag search, else new.

        The local cache is per tracking URI and never trusted blindly, so a cache written against
        another store (or a deleted run) cannot misdirect metrics. `adopt`: give a run found or created
        now the params saved by `start` (off for read-only look-ups).
        """
        if self.run_id is not None:
            return self.run_id
        client = self.client()
        experiment_id = self.experiment()
        run_id: str | None = None
        cached = self.journal.cached_run_id(self.uri_key)
        if cached is not None:
            try:
                run = client.get_run(cached)
                if run.info.lifecycle_stage == "active" and run.data.tags.get(RUN_NAME_TAG) == self.run_name:
                    run_id = cached
            except Exception as exc:
                if _error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
        if run_id is None:
            run_id = self.find_run(self.run_name)
        created = False
        if run_id is None:
            if not create:
                return None
            run = client.create_run(experiment_id, run_name=self.run_name, tags={
                RUN_NAME_TAG: self.run_name, KIND_TAG: "training", "dapo.run_dir": str(self.run_dir.resolve())})
            run_id, created = run.info.run_id, True
        self.run_id = run_id
        if run_id != cached:
            self.journal.cache_run_id(self.uri_key, run_id, experiment_id)
        if adopt and (created or run_id != cached):
            # A run created or found now may lack the params `start` saved during an outage.
            params, tags = self.journal.saved_params()
            if params or tags:
                self.apply_params(run_id, params, tags)
        return run_id

    def find_run(self, run_name: str) -> str | None:
        """The oldest active training run of the experiment tagged `dapo.run_name=<run_name>`."""
        if "'" in run_name and '"' in run_name:
            return None
        quote = "'" if "'" not in run_name else '"'
        name_filter = f"tags.`{RUN_NAME_TAG}` = {quote}{run_name}{quote}"
        found = self.client().search_runs(
            [self.experiment()],
            filter_string=f"{name_filter} and tags.`{KIND_TAG}` = 'training'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def apply_params(self, run_id: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        """Params are immutable in MLflow: log new ones; a changed value becomes `param_changed.<name>`."""
        run = self.client().get_run(run_id)
        existing, run_tags = run.data.params, run.data.tags
        new = {k: v for k, v in params.items() if k not in existing}
        all_tags = dict(tags)
        stale: list[str] = []
        for name, value in params.items():
            changed_tag = f"{PARAM_CHANGED_PREFIX}{name}"
            if name in existing and existing[name] != value:
                all_tags[changed_tag] = truncate(value, MAX_TAG_VALUE)
            elif changed_tag in run_tags:  # the value went back to the logged one
                stale.append(changed_tag)
        self.log_params_and_tags(run_id, new, all_tags)
        for tag in stale:
            self.client().delete_tag(run_id, tag)

    def log_params_and_tags(self, run_id: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        client = self.client()
        for chunk in _chunks([Param(k, v) for k, v in params.items()], _MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], _MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)

    def set_status(self, run_id: str, status: str) -> None:
        """RUNNING reopens a terminated run (same id); any other status terminates it (sets its end time)."""
        client = self.client()
        if status == "RUNNING":
            if client.get_run(run_id).info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status)

    # ------------------------------------------------------------------------------ sending

    def sync(self, done: set[str], *, create: bool) -> None:
        """Send every pending journal entry, oldest first, then the recorded run status; add the entry ids
        marked sent to `done`. `create`: create the run if MLflow has none (a status alone never does).

        The caller holds the journal's lock; any MLflow failure propagates (entries sent before it stay
        marked sent, and in `done`)."""
        run_id = self.resolve_run(create=create)
        if run_id is None:
            return  # no run to send a status to yet: the round or `start` that creates it sends it
        for entry in self.journal.pending(run_id):
            faults.point("before_mlflow_send")
            self.send(run_id, entry)
            faults.point("after_mlflow_send")
            self.journal.mark_sent(entry, run_id)
            done.add(entry["entry_id"])
        status = self.journal.pending_status(self.uri_key, run_id)
        if status is not None:
            self.set_status(run_id, status)
            self.journal.mark_status_sent(self.uri_key, run_id, status)

    def send(self, run_id: str, entry: Mapping[str, Any]) -> None:
        """Send one entry idempotently: metrics only if MLflow lacks them, then tags and artifacts.

        Metrics go in `log_batch` chunks of at most 1000; each chunk is one transaction in MLflow's SQL
        stores. Before a chunk is sent, the history of its first metric is checked for a value at the
        chunk's (step, journaled timestamp): present means an earlier attempt got through and only its
        "sent" marker was lost, so the chunk is skipped. Tags and artifacts overwrite themselves.
        """
        from mlflow.entities import Metric, RunTag

        client = self.client()
        timestamp = int(entry["timestamp_ms"])
        # The round's checkpoint first: its eval metrics are logged linked to it (the UI's model list sorts by them).
        model_ids = [self.ensure_model(run_id, model) for model in entry.get("models", [])]
        for dataset in entry.get("inputs", []):
            self.log_dataset(run_id, dataset)
        model_id = model_ids[0] if model_ids else None
        batch = [
            Metric(name, float(value), timestamp, int(step),
                   model_id=model_id if name.startswith(EVAL_PREFIX) and int(step) == entry["step"] else None)
            for step, values in entry["metrics"].items()
            for name, value in sorted(values.items())
        ]
        for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
            sentinel = chunk[0]
            history = client.get_metric_history(run_id, sentinel.key)
            if any(m.step == sentinel.step and m.timestamp == timestamp for m in history):
                continue
            client.log_batch(run_id, metrics=chunk)
        tags = [RunTag(k, v) for k, v in {**entry["tags"], LAST_ROUND_TAG: entry["key"]}.items()]
        for chunk in _chunks(tags, _MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)
        for item in entry["artifacts"]:
            self.log_artifact(run_id, Path(item["path"]), item["artifact_path"])
        if entry.get("tables"):
            self.register_tables(run_id, entry["tables"])

    def register_tables(self, run_id: str, tables: list[str]) -> None:
        """List table files (already logged as artifacts) in the run's `mlflow.loggedArtifacts` tag, as
        `log_table` does, so the UI shows them as tables. Idempotent, unlike `log_table`, which appends the
        rows again to a table file that exists."""
        import json

        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        client = self.client()
        current = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        added = [{"path": path, "type": "table"} for path in tables if {"path": path, "type": "table"} not in current]
        if not added:
            return
        listed = current + added
        # A tag holds at most MAX_TAG_VALUE characters: past ~140 rounds the oldest tables leave the list
        # (their files stay among the artifacts), or every later send would fail.
        while len(json.dumps(listed)) > MAX_TAG_VALUE and len(listed) > len(added):
            listed.pop(0)
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(listed))

    def ensure_model(self, run_id: str, model: Mapping[str, Any]) -> str:
        """The READY logged model of checkpoint `model["name"]` in `run_id`, created once (idempotent: a
        model a crash left PENDING is completed, a READY one is reused). Its artifacts are the MLmodel and a
        pyfunc wrapper loading the checkpoint directory in place (`dapo_ops.tracking.logged_model`)."""
        import tempfile

        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        from dapo_ops.tracking.logged_model import save_checkpoint_model

        client = self.client()
        name = str(model["name"])
        found = client.search_logged_models(
            experiment_ids=[self.experiment()],
            filter_string=f"name = '{name}' AND source_run_id = '{run_id}'", max_results=10)
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        if ready:
            return ready[0].model_id
        logged = found[0] if found else client.create_logged_model(
            self.experiment(), name=name, source_run_id=run_id, model_type=MODEL_TYPE,
            tags={CHECKPOINT_TAG: name, CHECKPOINT_DIR_TAG: str(model["path"]), RUN_NAME_TAG: self.run_name})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            save_checkpoint_model(folder, Path(model["path"]), int(model.get("max_completion_length", 24)))
            client.log_model_artifacts(logged.model_id, str(folder))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, int(model["step"]))])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return logged.model_id

    def log_dataset(self, run_id: str, dataset: Mapping[str, Any]) -> None:
        """A parquet split as the run's MLflow dataset input (name, digest, source path, schema, row count);
        MLflow keeps one input per (dataset, run), so a re-send adds nothing."""
        import mlflow.data
        import polars as pl
        from mlflow.entities import DatasetInput, InputTag

        path = Path(dataset["path"])
        if not path.is_file():
            warnings.warn(f"dataset {path} no longer exists; not logged to MLflow", stacklevel=4)
            return
        table = pl.read_parquet(path)
        with warnings.catch_warnings():
            # MLflow registers its local-file dataset source twice and warns that a path "can be interpreted in
            # multiple ways" (both ways are that one class).
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            entity = mlflow.data.from_polars(table, source=str(path), name=str(dataset["name"]))._to_mlflow_entity()
        context = InputTag("mlflow.data.context", str(dataset.get("context", dataset["name"])))
        self.client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[context])])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client().log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client().log_artifact(run_id, str(path), artifact_path)
        else:
            warnings.warn(f"artifact {path} no longer exists; not logged to MLflow", stacklevel=4)

    def metric_history(self, run_id: str, name: str) -> list[tuple[int, float]]:
        history = self.client().get_metric_history(run_id, name)
        return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

    # ------------------------------------------------------------------------------ re-analysis runs

    def create_reanalysis_run(self, training_run_name: str, checkpoint: str, params: Mapping[str, str],
                              tags: Mapping[str, str]) -> str:
        """A new run nested under the training run (looked up, never created or modified)."""
        if training_run_name == self.run_name:
            training_run_id = self.resolve_run(create=False, adopt=False)
        else:
            training_run_id = self.find_run(training_run_name)
        run_tags = {**tags, KIND_TAG: "reanalysis", TRAINING_RUN_NAME_TAG: training_run_name,
                    REANALYSIS_OF_TAG: training_run_name, CHECKPOINT_TAG: checkpoint}
        # `dapo.run_name` marks training runs: a re-analysis carrying it would be found as one.
        run_tags.pop(RUN_NAME_TAG, None)
        if training_run_id is not None:
            run_tags[TRAINING_RUN_ID_TAG] = training_run_id
            run_tags["mlflow.parentRunId"] = training_run_id
        run = self.client().create_run(self.experiment(), run_name=f"{training_run_name}-reanalysis-{checkpoint}",
                                       tags=run_tags)
        self.log_params_and_tags(run.info.run_id, params, {})
        return run.info.run_id

    def log_metrics_now(self, run_id: str, metrics: Mapping[str, float | str], step: int) -> None:
        """Metrics at `step`, stamped now (not journaled: for runs that are repeatable from disk)."""
        from mlflow.entities import Metric

        timestamp = _now_ms()
        batch = [Metric(k, float(v), timestamp, step) for k, v in sorted(metrics.items())]
        for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
            self.client().log_batch(run_id, metrics=chunk)
