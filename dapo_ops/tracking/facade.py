"""MLflow tracking that survives MLflow outages: journal every round locally first, then send.

One MLflow run per training run (`run_name`) in one experiment. Every round is appended to a local
journal (`dapo_ops.tracking.journal`, files only) before anything is sent; the MLflow side is
`dapo_ops.tracking.mlflow_sink`. This facade joins the two: a round completes even while the tracking server or
database is unreachable, and the next round (or `sync()`, behind `make sync-mlflow`) sends what is still
pending, without logging any metric twice. The run's status (RUNNING while training, then FINISHED,
FAILED or KILLED) goes through the journal too, so an end recorded during an outage is sent later.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dapo_ops.tracking.journal import (
    CHECKPOINT_TAG,
    RUN_STATUSES,
    Artifacts,
    Journal,
    check_name,
    check_round_key,
    clean_tags,
    encode_metrics,
    flatten_params,
    normalize_artifacts,
    truncate,
)
from dapo_ops.tracking.mlflow_sink import (
    DEFAULT_EXPERIMENT,
    KIND_TAG,
    LAST_ROUND_TAG,
    PARAM_CHANGED_PREFIX,
    REANALYSIS_OF_TAG,
    REMOTE_SCHEMES,
    RUN_NAME_TAG,
    TRAINING_RUN_ID_TAG,
    TRAINING_RUN_NAME_TAG,
    MlflowSink,
)

__all__ = [
    "CHECKPOINT_TAG", "DEFAULT_EXPERIMENT", "KIND_TAG", "LAST_ROUND_TAG", "PARAM_CHANGED_PREFIX",
    "REANALYSIS_OF_TAG", "RUN_NAME_TAG", "TRAINING_RUN_ID_TAG", "TRAINING_RUN_NAME_TAG", "Artifacts",
    "MlflowUnavailableWarning", "Tracker", "default_tracking_uri", "flatten_params", "normalize_artifacts",
    "redact_uri", "resolve_tracking_uri",
]


# Where `make mlflow-ui` serves the UI of a local (SQLite) store.
DEFAULT_UI_URL = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")


class MlflowUnavailableWarning(UserWarning):
    """MLflow could not be reached; the round is kept in the local journal."""


def default_tracking_uri(data_root: Path) -> str:
    """`sqlite:///<data root>/mlflow.db` (absolute path, so the URI does not depend on the cwd)."""
    return f"sqlite:///{(Path(data_root).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(data_root: Path, configured: str | None = None) -> str:
    """The tracking URI every caller uses: `configured` (e.g. a Dagster resource's setting) when given,
    else `MLFLOW_TRACKING_URI` when set, else the default SQLite store under the data root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(data_root)


def redact_uri(uri: str) -> str:
    """The URI without a password, for messages and local files."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class Tracker:
    """The MLflow side of one training run, with a local journal that makes MLflow optional.

    After a failure the tracker leaves MLflow alone for `retry_after_s` seconds (the rounds stay
    journaled), so a hung server costs one timeout per round, not one per call.

    Every method that talks to MLflow turns any MLflow failure (connection refused, timeout, a locked
    or unopenable SQLite file, ...) into a `MlflowUnavailableWarning` naming MLflow and the tracking
    URI, plus a return value saying so (`None`/`False`); `last_error` keeps the message. Invalid
    input (bad metric names, non-numeric values) raises `ValueError` before anything is journaled.
    """

    def __init__(
        self,
        run_dir: Path,
        run_name: str,
        *,
        tracking_uri: str | None = None,
        experiment_name: str = DEFAULT_EXPERIMENT,
        data_root: Path | None = None,
    ) -> None:
        if not run_name or ("'" in run_name and '"' in run_name):
            raise ValueError(f"run_name={run_name!r} cannot be searched for in MLflow")
        if data_root is None:
            from dapo_ops.config.dapo import data_root as configured_root

            data_root = configured_root()
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.experiment_name = experiment_name
        self.data_root = Path(data_root).resolve()
        self.tracking_uri = resolve_tracking_uri(self.data_root, tracking_uri)
        self.state_dir = self.run_dir / "mlflow"
        self.journal = Journal(self.state_dir)
        self.journal_path = self.journal.journal_path
        self.sent_path = self.journal.sent_path
        self.last_error: str | None = None
        self._uri_key = redact_uri(self.tracking_uri)
        self._sink = MlflowSink(self.journal, self.run_dir, run_name, tracking_uri=self.tracking_uri,
                                uri_key=self._uri_key, experiment_name=experiment_name,
                                artifact_location=self.artifact_location)

    @property
    def retry_after_s(self) -> float:
        return self._sink.retry_after_s

    @retry_after_s.setter
    def retry_after_s(self, seconds: float) -> None:
        self._sink.retry_after_s = seconds

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once known (this session, or cached for this tracking URI)."""
        return self._sink.run_id or self.journal.cached_run_id(self._uri_key)

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: `<data root>/mlartifacts` unless a server decides."""
        if urlsplit(self.tracking_uri).scheme in REMOTE_SCHEMES:
            return None
        return (self.data_root / "mlartifacts").as_uri()

    # ----------------------------------------------------------------- the training run

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str | None:
        """Find or create the run, log params (flattened) and tags, mark it RUNNING, send pending rounds.

        Params are immutable in MLflow: an unchanged value is skipped, a changed value on a continued
        run is recorded as the tag `param_changed.<name>` (the param keeps its first value). Params and
        tags are also saved locally so that a sync after an outage can create the run with them.
        Returns the run id, or None while MLflow is unreachable.
        """
        flat = flatten_params(params)
        for name in flat:
            check_name(name, "param")
        run_tags = clean_tags(tags)
        with self.journal.locked():
            self.journal.save_params(flat, run_tags)
            self.journal.set_status("RUNNING")
            try:
                run_id = self._sink.resolve_run(create=True)
                assert run_id is not None
                self._sink.apply_params(run_id, flat, run_tags)
            except Exception as exc:  # any MLflow failure: the run is created by a later sync
                self._warn_unavailable(exc, "the run could not be started")
                return None
            self._sync_locked()
            return run_id

    def log_round(
        self,
        key: str,
        step: int,
        metrics: Mapping[str, float],
        artifacts: Artifacts | None = None,
        tags: Mapping[str, str] | None = None,
        *,
        per_step: Mapping[int, Mapping[str, float]] | None = None,
        model: Mapping[str, Any] | None = None,
        inputs: list[Mapping[str, Any]] | None = None,
        tables: list[str] | None = None,
    ) -> bool:
        """Journal one round, then send everything pending (older rounds first). True if it is in MLflow.

        key: the round's unique id (its checkpoint, e.g. `ckpt-0003`); also the default `dapo.checkpoint`
            tag. Logging the same key again re-sends artifacts and tags but never adds metric values
            that MLflow already holds for it.
        step: the global optimizer step of `metrics`.
        artifacts: `{artifact directory: local path(s)}`, e.g. `{"reports/ckpt-0003": [md, png]}`, or
            `(local path, artifact directory)` pairs (see `normalize_artifacts`); a local directory is
            logged with its contents. Paths are journaled absolute and read at send time (a file
            missing by then is skipped with a warning).
        tags: run tags to set with this round (e.g. `dagster.run_id`), overwriting older values.
        per_step: metrics at other steps within the round (e.g. loss per optimizer step).
        model: the checkpoint this round produced, `{name, path, max_completion_length}`: sent as an MLflow
            logged model of the run at `step`, with the round's `eval/*` metrics (see `MlflowSink.ensure_model`).
        inputs: `[{name, path, context}]` parquet files logged as the run's MLflow dataset inputs.
        tables: artifact paths of table files among `artifacts` (in `MlflowClient.log_table`'s JSON format) that
            the MLflow UI lists as the run's logged tables (the `mlflow.loggedArtifacts` tag).
        """
        check_round_key(key)
        encoded = {int(step): encode_metrics(metrics)}
        for extra_step, values in (per_step or {}).items():
            encoded.setdefault(int(extra_step), {}).update(encode_metrics(values))
        if any(s < 0 for s in encoded):
            raise ValueError(f"steps must be >= 0, got {sorted(encoded)}")
        round_tags = {CHECKPOINT_TAG: key, **{str(k): str(v) for k, v in (tags or {}).items()}}
        for name in round_tags:
            check_name(name, "tag")
        files = normalize_artifacts(artifacts)
        with self.journal.locked():
            models = [{**model, "step": int(step)}] if model else None
            entry = self.journal.append_round(key, step, encoded, files, round_tags, models=models, inputs=inputs,
                                              tables=tables)
            sent = self._sync_locked()
        return entry["entry_id"] in sent

    def sync(self) -> int:
        """Send every pending journal entry (oldest first) and the recorded run status; returns how many
        entries are now marked sent.

        Stops at the first MLflow failure (warning and `last_error`; entries stay pending). Never
        duplicates metrics: see `MlflowSink.send`.
        """
        if not self.journal.journal_path.exists() and not self.journal.status_path.exists():
            return 0
        with self.journal.locked():
            return len(self._sync_locked())

    def pending(self) -> list[dict[str, Any]]:
        """Journal entries not yet confirmed in this tracking URI's run (latest entry per key)."""
        return self.journal.pending(self.run_id)

    def pending_status(self) -> str | None:
        """The recorded run status when MLflow does not show it yet (unsent, or no run exists yet)."""
        return self.journal.pending_status(self._uri_key, self.run_id)

    def set_status(self, status: str) -> bool:
        """Record the run's status in the journal, then send it with anything pending. True when the MLflow
        run shows it now; False while MLflow is unreachable or before the run exists (a later sync, round
        or `start` sends it). RUNNING reopens a terminated run under the same id."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        with self.journal.locked():
            self.journal.set_status(status)
            self._sync_locked()
        return self.pending_status() is None

    def end(self, status: str = "FINISHED") -> bool:
        """Mark the run terminated: FINISHED, FAILED or KILLED (see `set_status`); `start` reopens it."""
        if status == "RUNNING":
            raise ValueError("end(status) takes FINISHED, FAILED or KILLED; RUNNING is set by start/set_status")
        return self.set_status(status)

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of one metric in the run, in step order; [] when the run is unknown.

        Unlike the logging methods this raises when MLflow is unreachable (it is for tests and reports).
        """
        run_id = self.run_id
        return [] if run_id is None else self._sink.metric_history(run_id, name)

    @contextlib.contextmanager
    def system_metrics(self, sampling_interval_s: float = 10.0) -> Iterator[bool]:
        """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, GPU when present) logged to
        the run while the block runs; yields whether they are. Best effort and not journaled: a sample
        that MLflow misses is a missed sample, not a lost result (none while MLflow is unreachable)."""
        run_id = self.run_id
        monitor = None
        if run_id is not None:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._sink.client()  # not while backing off after a failure
                monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, resume_logging=True,
                                               tracking_uri=self.tracking_uri)
                monitor.start()
            except Exception as exc:  # noqa: BLE001 - no system metrics, the training goes on
                self._warn_unavailable(exc, "system metrics are not logged")
                monitor = None
        try:
            yield monitor is not None
        finally:
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()

    def run_url(self, ui_url: str | None = None) -> str | None:
        """The run's page in the MLflow UI (`ui_url`, default the tracking server itself, else
        `make mlflow-ui`'s address); None before the run is known."""
        run_id = self.run_id
        experiment_id = self.journal.cached_experiment_id(self._uri_key)
        if run_id is None or experiment_id is None:
            return None
        remote = urlsplit(self.tracking_uri).scheme in ("http", "https")
        base = (ui_url or (redact_uri(self.tracking_uri) if remote else DEFAULT_UI_URL)).rstrip("/")
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"

    # ----------------------------------------------------------------- re-analysis runs

    def start_reanalysis_run(
        self,
        training_run_name: str,
        checkpoint: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
    ) -> str | None:
        """A new MLflow run for a re-analysis of `checkpoint`, nested under the training run in the UI.

        Tagged `dapo.kind=reanalysis`, `dapo.training_run_name` and `dapo.reanalysis_of` (both the
        training run's name), `dapo.training_run_id` (when the training run exists; it is looked up,
        never created or modified) and `dapo.checkpoint`; never `dapo.run_name`.
        `training_run_name` is normally this tracker's `run_name`. Returns the new run's id, or None
        while MLflow is unreachable (the re-analysis output stays on disk).
        """
        flat = flatten_params(params)
        for name in [*flat, *(tags or {})]:
            check_name(name, "param or tag")
        run_tags = clean_tags(tags)
        try:
            return self._sink.create_reanalysis_run(training_run_name, checkpoint, flat, run_tags)
        except Exception as exc:
            self._warn_unavailable(exc, f"the re-analysis of {checkpoint} is not tracked")
            return None

    def log_reanalysis(
        self,
        run_id: str | None,
        metrics: Mapping[str, float],
        artifacts: Artifacts | None = None,
        *,
        step: int = 0,
        finish: bool = True,
    ) -> bool:
        """Log metrics and artifacts to a re-analysis run and end it; False (no-op) when `run_id` is None.

        Not journaled: a re-analysis is repeatable from its files on disk.
        """
        values = encode_metrics(metrics)
        pairs = normalize_artifacts(artifacts)
        if run_id is None:
            return False
        try:
            self._sink.log_metrics_now(run_id, values, step)
            for path, artifact_path in pairs:
                self._sink.log_artifact(run_id, path, artifact_path)
            if finish:
                self._sink.set_status(run_id, "FINISHED")
            return True
        except Exception as exc:
            self._warn_unavailable(exc, "the re-analysis results were not logged")
            return False

    # ----------------------------------------------------------------- plumbing

    def _mlflow(self) -> Any:
        """The sink's `MlflowClient` (raises while backing off after a failure)."""
        return self._sink.client()

    def _sync_locked(self) -> set[str]:
        """Send what is pending (caller holds the lock); returns the entry ids marked sent now."""
        done: set[str] = set()
        entries = self.journal.pending(self.run_id)
        if not entries and self.pending_status() is None:
            return done  # nothing to send: do not touch MLflow at all
        try:
            self._sink.sync(done, create=bool(entries))
        except Exception as exc:
            left = len(self.journal.pending(self.run_id))
            self._warn_unavailable(exc, f"{left} round(s) stay pending in {self.journal_path}")
        return done

    def _warn_unavailable(self, exc: BaseException, consequence: str) -> None:
        detail = truncate(" ".join(str(exc).split()), 300)
        self.last_error = (
            f"MLflow at {redact_uri(self.tracking_uri)} is unavailable ({type(exc).__name__}: {detail}); "
            f"{consequence}. Pending rounds are sent by the next round or `make sync-mlflow`."
        )
        self._sink.failed()  # a half-initialised client (e.g. an unopenable SQLite file) is rebuilt next time
        warnings.warn(self.last_error, MlflowUnavailableWarning, stacklevel=3)
