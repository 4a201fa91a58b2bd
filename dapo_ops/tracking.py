"""MLflow tracking that survives MLflow outages: journal every round locally first, then send.

One MLflow run per training run (`run_name`) in one experiment. Every round is appended to a
local journal (JSONL, fsynced) before anything is sent, so a round completes even while the
tracking server or database is unreachable; the next round (or `sync()`, behind
`make sync-mlflow`) sends what is still pending, without logging any metric twice.

Files under `<run_dir>/mlflow/`:
- `journal.jsonl` — one line per `log_round` call (append-only), see `Tracker.log_round`.
- `sent.jsonl` — one line per entry confirmed in MLflow: `{entry_id, key, run_id, sent_at}`.
- `run.json` — the MLflow run id per tracking URI (a cache; the run is always re-checked in MLflow).
- `params.json` — the latest params and tags given to `start`, so a later sync can create the run.
- `lock` — `flock`ed while journaling or sending, so a round and `make sync-mlflow` never interleave.

mlflow is imported lazily: importing this module stays cheap for Dagster's definition loading.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import posixpath
import re
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dapo_ops import faults

DEFAULT_EXPERIMENT = "dapo-vlm"
JOURNAL_VERSION = 1

RUN_NAME_TAG = "dapo.run_name"
KIND_TAG = "dapo.kind"
CHECKPOINT_TAG = "dapo.checkpoint"
LAST_ROUND_TAG = "dapo.last_round"
TRAINING_RUN_NAME_TAG = "dapo.training_run_name"
TRAINING_RUN_ID_TAG = "dapo.training_run_id"
REANALYSIS_OF_TAG = "dapo.reanalysis_of"
PARAM_CHANGED_PREFIX = "param_changed."

# MLflow's limits (mlflow.utils.validation): entities per log_batch call and value lengths.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_NAME_RE = re.compile(r"^[/\w.\- :]+$")
_KEY_RE = re.compile(r"^[\w.\-]+$")

# MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) block a round for
# minutes when the server is down. The journal is our retry mechanism, so fail fast; values the
# user already exported win. mlflow reads these on every request (mlflow.utils.rest_utils).
FAST_FAILURE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


class MlflowUnavailableWarning(UserWarning):
    """MLflow could not be reached; the round is kept in the local journal."""


def default_tracking_uri(data_root: Path) -> str:
    """`sqlite:///<data root>/mlflow.db` (absolute path, so the URI does not depend on the cwd)."""
    return f"sqlite:///{(Path(data_root).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(data_root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the default SQLite store under the data root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(data_root)


def redact_uri(uri: str) -> str:
    """The URI without a password, for messages and local files."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings become dotted keys; lists become JSON; values are strings within MLflow's limit."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{key}."))
            continue
        if isinstance(value, list | tuple):
            text = json.dumps(list(value), default=str)
        elif isinstance(value, Path):
            text = value.as_posix()
        else:
            text = str(value)
        flat[key] = _truncate(text, _MAX_PARAM_VALUE)
    return flat


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _encode_value(value: float) -> float | str:
    """Strict JSON has no NaN/Infinity; keep them as the strings Python's float() reads back."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _check_name(name: str, what: str) -> None:
    if (
        not isinstance(name, str)
        or not _NAME_RE.match(name)
        or posixpath.normpath(name) != name
        or name.startswith(("/", ".."))
    ):
        raise ValueError(
            f"{what} {name!r} is not a valid MLflow name: use letters, digits, _ - . / : and spaces, "
            "without leading '/', '..' or repeated '/'"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one line durably; a torn last line from a crash is closed first so this one parses."""
    line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()
    created = not path.exists()
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if created:
        _fsync_dir(path.parent)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All parseable lines; a line torn by a crash is skipped (its round was never acknowledged)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


Artifacts = Mapping[str, Path | str | Iterable[Path | str]] | Iterable[tuple[Path | str, str | None]]


def normalize_artifacts(artifacts: Artifacts | None) -> list[tuple[Path, str | None]]:
    """`(local path, artifact directory)` pairs from either accepted form.

    - a mapping from artifact directory to one local path or several: `{"reports/ckpt-0003": [a, b]}`;
    - `(local path, artifact directory)` pairs: `[(a, "reports/ckpt-0003")]` (None/"" = the run's root).
    """
    if artifacts is None:
        return []
    pairs: list[tuple[Path, str | None]] = []
    if isinstance(artifacts, Mapping):
        for folder, paths in artifacts.items():
            for path in [paths] if isinstance(paths, str | Path) else paths:
                pairs.append((Path(path), folder or None))
    else:
        pairs = [(Path(path), folder or None) for path, folder in artifacts]
    for _, folder in pairs:
        if folder is not None:
            _check_name(folder, "artifact directory")
    return pairs


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


class Tracker:
    """The MLflow side of one training run, with a local journal that makes MLflow optional.

    After a failure the tracker leaves MLflow alone for `retry_after_s` seconds (the rounds stay
    journaled), so a hung server costs one timeout per round, not one per call.

    Every method that talks to MLflow turns any MLflow failure (connection refused, timeout, a locked
    or unopenable SQLite file, ...) into a `MlflowUnavailableWarning` naming MLflow and the tracking
    URI, plus a return value saying so (`None`/`False`); `last_error` keeps the message. Invalid
    input (bad metric names, non-numeric values) raises `ValueError` before anything is journaled.
    """

    retry_after_s: float = 30.0

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
            from dapo_ops.config import data_root as configured_root

            data_root = configured_root()
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.experiment_name = experiment_name
        self.data_root = Path(data_root).resolve()
        self.tracking_uri = tracking_uri or resolve_tracking_uri(self.data_root)
        self.state_dir = self.run_dir / "mlflow"
        self.journal_path = self.state_dir / "journal.jsonl"
        self.sent_path = self.state_dir / "sent.jsonl"
        self.last_error: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._run_id: str | None = None
        self._failed_at: float | None = None

    # ----------------------------------------------------------------- public API

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once known (this session, or cached for this tracking URI)."""
        return self._run_id or self._cached_run_id()

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: `<data root>/mlartifacts` unless a server decides."""
        if urlsplit(self.tracking_uri).scheme in _REMOTE_SCHEMES:
            return None
        return (self.data_root / "mlartifacts").as_uri()

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str | None:
        """Find or create the run, log params (flattened) and tags, send pending rounds.

        Params are immutable in MLflow: an unchanged value is skipped, a changed value on a continued
        run is recorded as the tag `param_changed.<name>` (the param keeps its first value). Params and
        tags are also saved locally so that a sync after an outage can create the run with them.
        Returns the run id, or None while MLflow is unreachable.
        """
        flat = flatten_params(params)
        for name in flat:
            _check_name(name, "param")
        clean_tags = {str(k): _truncate(str(v), _MAX_TAG_VALUE) for k, v in (tags or {}).items()}
        for name in clean_tags:
            _check_name(name, "tag")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            _write_json_atomic(self.state_dir / "params.json", {"params": flat, "tags": clean_tags})
            try:
                client = self._mlflow()
                run_id = self._resolve_run(create=True)
                self._apply_params(run_id, flat, clean_tags)
                if client.get_run(run_id).info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
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
        """
        if not _KEY_RE.match(key or ""):
            raise ValueError(f"round key {key!r} must be letters, digits, _ - . (e.g. 'ckpt-0003')")
        encoded = {int(step): self._encode_metrics(metrics)}
        for extra_step, values in (per_step or {}).items():
            encoded.setdefault(int(extra_step), {}).update(self._encode_metrics(values))
        if any(s < 0 for s in encoded):
            raise ValueError(f"steps must be >= 0, got {sorted(encoded)}")
        round_tags = {CHECKPOINT_TAG: key, **{str(k): str(v) for k, v in (tags or {}).items()}}
        for name in round_tags:
            _check_name(name, "tag")
        files = [{"path": str(p.resolve()), "artifact_path": a} for p, a in normalize_artifacts(artifacts)]

        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            journal = _read_jsonl(self.journal_path)
            earlier = [e for e in journal if e.get("key") == key]
            # The first journaling of a key fixes its timestamp: MLflow metric rows are identified by
            # (step, timestamp), which is what makes re-sending detectable (see `_send`).
            if earlier:
                timestamp = int(earlier[0]["timestamp_ms"])
            else:
                last = max((int(e["timestamp_ms"]) for e in journal), default=0)
                timestamp = max(_now_ms(), last + 1)
            entry = {
                "v": JOURNAL_VERSION,
                "entry_id": uuid.uuid4().hex,
                "key": key,
                "step": int(step),
                "timestamp_ms": timestamp,
                "metrics": {str(s): values for s, values in sorted(encoded.items())},
                "artifacts": files,
                "tags": {k: _truncate(v, _MAX_TAG_VALUE) for k, v in round_tags.items()},
                "journaled_at": _utc_now(),
            }
            _append_jsonl(self.journal_path, entry)
            sent = self._sync_locked()
        return entry["entry_id"] in sent

    def sync(self) -> int:
        """Send every pending journal entry, oldest first; returns how many are now marked sent.

        Stops at the first MLflow failure (warning, entries stay pending). Never duplicates metrics:
        see `_send`.
        """
        if not self.journal_path.exists():
            return 0
        with self._locked():
            return len(self._sync_locked())

    def pending(self) -> list[dict[str, Any]]:
        """Journal entries not yet confirmed in this tracking URI's run (latest entry per key)."""
        return self._pending_for(self.run_id)

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of one metric in the run, in step order; [] when the run is unknown.

        Unlike the logging methods this raises when MLflow is unreachable (it is for tests and reports).
        """
        run_id = self.run_id
        if run_id is None:
            return []
        history = self._mlflow().get_metric_history(run_id, name)
        return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

    def end(self, status: str = "FINISHED") -> bool:
        """Mark the run terminated (after the last round); `start` sets it RUNNING again."""
        try:
            run_id = self._resolve_run(create=False)
            if run_id is None:
                return False
            self._mlflow().set_terminated(run_id, status=status)
            return True
        except Exception as exc:
            self._warn_unavailable(exc, "the run could not be ended")
            return False

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
            _check_name(name, "param or tag")
        try:
            client = self._mlflow()
            if training_run_name == self.run_name:
                training_run_id = self._resolve_run(create=False, adopt=False)
            else:
                training_run_id = self._find_run(training_run_name)
            run_tags = {
                **{str(k): _truncate(str(v), _MAX_TAG_VALUE) for k, v in (tags or {}).items()},
                KIND_TAG: "reanalysis",
                TRAINING_RUN_NAME_TAG: training_run_name,
                REANALYSIS_OF_TAG: training_run_name,
                CHECKPOINT_TAG: checkpoint,
            }
            # `dapo.run_name` marks training runs: a re-analysis carrying it would be found as one.
            run_tags.pop(RUN_NAME_TAG, None)
            if training_run_id is not None:
                run_tags[TRAINING_RUN_ID_TAG] = training_run_id
                run_tags["mlflow.parentRunId"] = training_run_id
            run = client.create_run(
                self._experiment(), run_name=f"{training_run_name}-reanalysis-{checkpoint}", tags=run_tags
            )
            self._log_params_and_tags(run.info.run_id, flat, {})
            return run.info.run_id
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
        values = self._encode_metrics(metrics)
        pairs = normalize_artifacts(artifacts)
        if run_id is None:
            return False
        try:
            from mlflow.entities import Metric

            client = self._mlflow()
            timestamp = _now_ms()
            batch = [Metric(k, float(v), timestamp, step) for k, v in sorted(values.items())]
            for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=chunk)
            for path, artifact_path in pairs:
                self._log_artifact(run_id, path, artifact_path)
            if finish:
                client.set_terminated(run_id, status="FINISHED")
            return True
        except Exception as exc:
            self._warn_unavailable(exc, "the re-analysis results were not logged")
            return False

    # ----------------------------------------------------------------- MLflow plumbing

    def _mlflow(self) -> Any:
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_after_s:
            raise ConnectionError(f"not retried within {self.retry_after_s:.0f} s of the last failure")
        self._failed_at = None
        if self._client is None:
            for name, value in FAST_FAILURE_ENV.items():
                os.environ.setdefault(name, value)
            from mlflow import MlflowClient

            parts = urlsplit(self.tracking_uri)
            if parts.scheme == "sqlite" and parts.path.startswith("//"):
                # sqlite:////abs/path: SQLite does not create the folder of its database file.
                database = Path(parts.path[1:])
                database.parent.mkdir(parents=True, exist_ok=True)
                # Processes opening a new store at once race through MLflow's schema migrations ("table
                # ... already exists"): each process's first access, which creates the tables, goes in turn.
                fd = os.open(database.with_name(database.name + ".init-lock"), os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    client = MlflowClient(tracking_uri=self.tracking_uri)
                    client.search_experiments(max_results=1)
                    client.search_registered_models(max_results=1)
                finally:
                    os.close(fd)
            else:
                client = MlflowClient(tracking_uri=self.tracking_uri)
            self._client = client
        return self._client

    def _experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        client = self._mlflow()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_location
                )
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

    def _uri_key(self) -> str:
        return redact_uri(self.tracking_uri)

    def _cached_run_id(self) -> str | None:
        return _read_json(self.state_dir / "run.json").get("runs", {}).get(self._uri_key(), {}).get("run_id")

    def _resolve_run(self, *, create: bool, adopt: bool = True) -> str | None:
        """This training run's MLflow run: cached id if MLflow still has it, else the tag search, else new.

        The local cache is per tracking URI and never trusted blindly, so a cache written against
        another store (or a deleted run) cannot misdirect metrics. `adopt`: give a run found or created
        now the params saved by `start` (off for read-only look-ups).
        """
        if self._run_id is not None:
            return self._run_id
        client = self._mlflow()
        experiment_id = self._experiment()
        run_id: str | None = None
        cached = self._cached_run_id()
        if cached is not None:
            try:
                run = client.get_run(cached)
                if run.info.lifecycle_stage == "active" and run.data.tags.get(RUN_NAME_TAG) == self.run_name:
                    run_id = cached
            except Exception as exc:
                if _error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
        if run_id is None:
            run_id = self._find_run(self.run_name)
        created = False
        if run_id is None:
            if not create:
                return None
            run = client.create_run(
                experiment_id,
                run_name=self.run_name,
                tags={
                    RUN_NAME_TAG: self.run_name,
                    KIND_TAG: "training",
                    "dapo.run_dir": str(self.run_dir.resolve()),
                },
            )
            run_id, created = run.info.run_id, True
        self._run_id = run_id
        if run_id != cached:
            cache = _read_json(self.state_dir / "run.json")
            cache.setdefault("runs", {})[self._uri_key()] = {"run_id": run_id, "experiment_id": experiment_id}
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.state_dir / "run.json", cache)
        if adopt and (created or run_id != cached):
            # A run created or found now may lack the params `start` saved during an outage.
            saved = _read_json(self.state_dir / "params.json")
            if saved:
                self._apply_params(run_id, saved.get("params", {}), saved.get("tags", {}))
        return run_id

    def _find_run(self, run_name: str) -> str | None:
        """The oldest active training run of the experiment tagged `dapo.run_name=<run_name>`."""
        if "'" in run_name and '"' in run_name:
            return None
        quote = "'" if "'" not in run_name else '"'
        name_filter = f"tags.`{RUN_NAME_TAG}` = {quote}{run_name}{quote}"
        found = self._mlflow().search_runs(
            [self._experiment()],
            filter_string=f"{name_filter} and tags.`{KIND_TAG}` = 'training'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def _apply_params(self, run_id: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        run = self._mlflow().get_run(run_id)
        existing, run_tags = run.data.params, run.data.tags
        new = {k: v for k, v in params.items() if k not in existing}
        all_tags = dict(tags)
        stale: list[str] = []
        for name, value in params.items():
            changed_tag = f"{PARAM_CHANGED_PREFIX}{name}"
            if name in existing and existing[name] != value:
                all_tags[changed_tag] = _truncate(value, _MAX_TAG_VALUE)
            elif changed_tag in run_tags:  # the value went back to the logged one
                stale.append(changed_tag)
        self._log_params_and_tags(run_id, new, all_tags)
        for tag in stale:
            self._mlflow().delete_tag(run_id, tag)

    def _log_params_and_tags(self, run_id: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        client = self._mlflow()
        for chunk in _chunks([Param(k, v) for k, v in params.items()], _MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], _MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)

    def _log_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._mlflow().log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self._mlflow().log_artifact(run_id, str(path), artifact_path)
        else:
            warnings.warn(f"artifact {path} no longer exists; not logged to MLflow", stacklevel=4)

    # ----------------------------------------------------------------- journal and sending

    def _encode_metrics(self, metrics: Mapping[str, float]) -> dict[str, float | str]:
        encoded: dict[str, float | str] = {}
        for name, value in metrics.items():
            _check_name(name, "metric")
            try:
                encoded[name] = _encode_value(float(value))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metric {name!r} has the non-numeric value {value!r}") from exc
        return encoded

    def _pending_for(self, run_id: str | None) -> list[dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for entry in _read_jsonl(self.journal_path):
            latest.pop(entry["key"], None)  # re-insert: a re-logged key moves to its latest position
            latest[entry["key"]] = entry
        sent = {m["entry_id"] for m in _read_jsonl(self.sent_path) if m.get("run_id") == run_id}
        return [e for e in latest.values() if e["entry_id"] not in sent]

    def _sync_locked(self) -> set[str]:
        """Send pending entries (caller holds the lock); returns the entry ids marked sent now."""
        done: set[str] = set()
        if not self._pending_for(self.run_id):
            return done  # nothing to send: do not touch MLflow at all
        todo: list[dict[str, Any]] = []
        try:
            run_id = self._resolve_run(create=True)
            todo = self._pending_for(run_id)
            for entry in todo:
                faults.point("before_mlflow_send")
                self._send(run_id, entry)
                faults.point("after_mlflow_send")
                _append_jsonl(
                    self.sent_path,
                    {
                        "entry_id": entry["entry_id"],
                        "key": entry["key"],
                        "run_id": run_id,
                        "sent_at": _utc_now(),
                    },
                )
                done.add(entry["entry_id"])
        except Exception as exc:
            left = len(todo) - len(done) if todo else len(self._pending_for(self.run_id))
            self._warn_unavailable(exc, f"{left} round(s) stay pending in {self.journal_path}")
        return done

    def _send(self, run_id: str, entry: Mapping[str, Any]) -> None:
        """Send one entry idempotently: metrics only if MLflow lacks them, then tags and artifacts.

        Metrics go in `log_batch` chunks of at most 1000; each chunk is one transaction in MLflow's SQL
        stores. Before a chunk is sent, the history of its first metric is checked for a value at the
        chunk's (step, journaled timestamp): present means an earlier attempt got through and only its
        "sent" marker was lost, so the chunk is skipped. Tags and artifacts overwrite themselves.
        """
        from mlflow.entities import Metric, RunTag

        client = self._mlflow()
        timestamp = int(entry["timestamp_ms"])
        batch = [
            Metric(name, float(value), timestamp, int(step))
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
            self._log_artifact(run_id, Path(item["path"]), item["artifact_path"])

    def _warn_unavailable(self, exc: BaseException, consequence: str) -> None:
        detail = _truncate(" ".join(str(exc).split()), 300)
        self.last_error = (
            f"MLflow at {redact_uri(self.tracking_uri)} is unavailable ({type(exc).__name__}: {detail}); "
            f"{consequence}. Pending rounds are sent by the next round or `make sync-mlflow`."
        )
        # The client may be half-initialised (e.g. a SQLite store that failed to open): rebuild it next time.
        self._client = None
        self._experiment_id = None
        self._run_id = None
        self._failed_at = time.monotonic()
        warnings.warn(self.last_error, MlflowUnavailableWarning, stacklevel=3)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
