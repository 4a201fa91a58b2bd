"""The tracking journal: what a run has to tell MLflow, kept in local files first. No MLflow here.

Every round is appended to `journal.jsonl` (fsynced) before anything is sent, so a round completes while
MLflow is unreachable; whoever sends it records that in `sent.jsonl`. Files under `<run_dir>/mlflow/`:

- `journal.jsonl` — one line per logged round (append-only): `{v, entry_id, key, step, timestamp_ms,
  metrics: {step: {name: value}}, artifacts: [{path, artifact_path}], tags, journaled_at}`, and optionally
  `models: [{name, path, step, max_completion_length}]` (checkpoints to register as MLflow logged models) and
  `inputs: [{name, path, context}]` (parquet files to log as MLflow dataset inputs) and `tables: [artifact
  path]` (table files among the artifacts that the MLflow UI lists as logged tables).
- `sent.jsonl` — one line per entry confirmed in MLflow: `{entry_id, key, run_id, sent_at}`.
- `run.json` — the MLflow run id per tracking URI (a cache; the sink re-checks it in MLflow).
- `params.json` — the latest params and tags given to `start`, so a later sync can create the run.
- `status.json` — the run status MLflow should show (`RUNNING`, `FINISHED`, `FAILED`, `KILLED`) and the
  run id per tracking URI that already shows it, so an end recorded during an outage is sent by a sync.
- `lock` — `flock`ed while journaling or sending, so a round and `make sync-mlflow` never interleave.

Names and values are checked here, before anything is journaled: an entry in the journal is always sendable.
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
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dapo_ops.store.layout import write_json_atomic

JOURNAL_VERSION = 1
CHECKPOINT_TAG = "dapo.checkpoint"
RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")

# MLflow's value limits (mlflow.utils.validation); longer values are cut with "...".
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
_NAME_RE = re.compile(r"^[/\w.\- :]+$")
_KEY_RE = re.compile(r"^[\w.\-]+$")

Artifacts = Mapping[str, Path | str | Iterable[Path | str]] | Iterable[tuple[Path | str, str | None]]


# ------------------------------------------------------------------------------- names and values


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(name: str, what: str) -> None:
    """Raise ValueError unless `name` is a valid MLflow metric/param/tag name or artifact directory."""
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


def check_round_key(key: str) -> None:
    if not _KEY_RE.match(key or ""):
        raise ValueError(f"round key {key!r} must be letters, digits, _ - . (e.g. 'ckpt-0003')")


def encode_value(value: float) -> float | str:
    """Strict JSON has no NaN/Infinity; keep them as the strings Python's float() reads back."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """Checked names, strict-JSON values; ValueError naming the metric otherwise."""
    encoded: dict[str, float | str] = {}
    for name, value in metrics.items():
        check_name(name, "metric")
        try:
            encoded[name] = encode_value(float(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metric {name!r} has the non-numeric value {value!r}") from exc
    return encoded


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """String tags with checked names, values within MLflow's limit."""
    out = {str(k): truncate(str(v), MAX_TAG_VALUE) for k, v in (tags or {}).items()}
    for name in out:
        check_name(name, "tag")
    return out


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
        flat[key] = truncate(text, MAX_PARAM_VALUE)
    return flat


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
            check_name(folder, "artifact directory")
    return pairs


# ------------------------------------------------------------------------------------- file helpers


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------------ journal


class Journal:
    """The files of one run's tracking state (see the module docstring). Callers hold `locked()`
    around anything that reads and then writes, so two processes never interleave."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.journal_path = self.state_dir / "journal.jsonl"
        self.sent_path = self.state_dir / "sent.jsonl"
        self.run_path = self.state_dir / "run.json"
        self.params_path = self.state_dir / "params.json"
        self.status_path = self.state_dir / "status.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ------------------------------------------------------------------------------ rounds

    def append_round(
        self,
        key: str,
        step: int,
        metrics: Mapping[int, Mapping[str, float | str]],
        artifacts: list[tuple[Path, str | None]],
        tags: Mapping[str, str],
        models: list[Mapping[str, Any]] | None = None,
        inputs: list[Mapping[str, Any]] | None = None,
        tables: list[str] | None = None,
    ) -> dict[str, Any]:
        """Append one round (metrics already encoded, by step) and return its entry."""
        journal = read_jsonl(self.journal_path)
        earlier = [e for e in journal if e.get("key") == key]
        # The first journaling of a key fixes its timestamp: MLflow metric rows are identified by
        # (step, timestamp), which is what makes a re-send detectable (see `mlflow_sink.MlflowSink.send`).
        if earlier:
            timestamp = int(earlier[0]["timestamp_ms"])
        else:
            last = max((int(e["timestamp_ms"]) for e in journal), default=0)
            timestamp = max(int(time.time() * 1000), last + 1)
        entry = {
            "v": JOURNAL_VERSION,
            "entry_id": uuid.uuid4().hex,
            "key": key,
            "step": int(step),
            "timestamp_ms": timestamp,
            "metrics": {str(s): dict(values) for s, values in sorted(metrics.items())},
            "artifacts": [{"path": str(p.resolve()), "artifact_path": a} for p, a in artifacts],
            "tags": {k: truncate(v, MAX_TAG_VALUE) for k, v in tags.items()},
            "journaled_at": utc_now(),
        }
        if models:
            entry["models"] = [{**m, "path": str(Path(m["path"]).resolve())} for m in models]
        if inputs:
            entry["inputs"] = [{**i, "path": str(Path(i["path"]).resolve())} for i in inputs]
        if tables:
            for table in tables:
                check_name(table, "table artifact")
            entry["tables"] = list(tables)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.journal_path, entry)
        return entry

    def pending(self, run_id: str | None) -> list[dict[str, Any]]:
        """The latest entry per key not yet confirmed in `run_id`, in journal order."""
        latest: dict[str, dict[str, Any]] = {}
        for entry in read_jsonl(self.journal_path):
            latest.pop(entry["key"], None)  # re-insert: a re-logged key moves to its latest position
            latest[entry["key"]] = entry
        sent = {m["entry_id"] for m in read_jsonl(self.sent_path) if m.get("run_id") == run_id}
        return [e for e in latest.values() if e["entry_id"] not in sent]

    def mark_sent(self, entry: Mapping[str, Any], run_id: str) -> None:
        append_jsonl(self.sent_path, {"entry_id": entry["entry_id"], "key": entry["key"], "run_id": run_id,
                                      "sent_at": utc_now()})

    # ------------------------------------------------------------------------------ run id and params

    def cached_run_id(self, uri_key: str) -> str | None:
        return read_json_or_empty(self.run_path).get("runs", {}).get(uri_key, {}).get("run_id")

    def cached_experiment_id(self, uri_key: str) -> str | None:
        return read_json_or_empty(self.run_path).get("runs", {}).get(uri_key, {}).get("experiment_id")

    def cache_run_id(self, uri_key: str, run_id: str, experiment_id: str) -> None:
        cache = read_json_or_empty(self.run_path)
        cache.setdefault("runs", {})[uri_key] = {"run_id": run_id, "experiment_id": experiment_id}
        write_json_atomic(self.run_path, cache)

    def save_params(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        write_json_atomic(self.params_path, {"params": dict(params), "tags": dict(tags)})

    def saved_params(self) -> tuple[dict[str, str], dict[str, str]]:
        saved = read_json_or_empty(self.params_path)
        return saved.get("params", {}), saved.get("tags", {})

    # ------------------------------------------------------------------------------ run status

    def set_status(self, status: str) -> None:
        """Record the status MLflow should show; no run shows it yet (a changed status is re-sent)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        current = read_json_or_empty(self.status_path)
        if current.get("status") == status:
            return  # already recorded; whoever holds it in MLflow still does
        write_json_atomic(self.status_path, {"status": status, "recorded_at": utc_now(), "sent": {}})

    def status(self) -> str | None:
        return read_json_or_empty(self.status_path).get("status")

    def pending_status(self, uri_key: str, run_id: str | None) -> str | None:
        """The recorded status when `run_id` (at this tracking URI) does not show it yet, else None."""
        recorded = read_json_or_empty(self.status_path)
        status = recorded.get("status")
        if status is None or (run_id is not None and recorded.get("sent", {}).get(uri_key) == run_id):
            return None
        return status

    def mark_status_sent(self, uri_key: str, run_id: str, status: str) -> None:
        recorded = read_json_or_empty(self.status_path)
        if recorded.get("status") != status:
            return  # a newer status was recorded meanwhile; it stays pending
        recorded.setdefault("sent", {})[uri_key] = run_id
        write_json_atomic(self.status_path, recorded)
