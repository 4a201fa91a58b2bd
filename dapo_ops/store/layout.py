"""The run store: where a training run's files live, atomic writes, checkpoint discovery and the run lock.

Layout under the data root:
``runs/<run_name>/{data, checkpoints/ckpt-NNNN, rounds/ckpt-NNNN, reports/ckpt-NNNN}``; the files of one
round are named once, in `RoundFiles`.

Reading back never runs code: JSON, parquet, safetensors, and tensors through `read_torch`
(`torch.load(weights_only=True)`), which refuses a pickle that would construct arbitrary objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dapo_ops.common import faults

if TYPE_CHECKING:  # polars stays out of the imports of what a GPU image without it runs (scripts/gpu_smoke.py)
    import polars as pl

CHECKPOINT_RE = re.compile(r"^ckpt-(\d{4,})$")
COMPLETE_MARKER = "COMPLETE"
# A checkpoint's own files beside the weights: its record (round, step, parent, model_dir) and AdamW's state.
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
TMP_PREFIX = ".tmp-"
# Leftovers of interrupted writes: ours (`.tmp-*`), those of older versions' `models.save_policy`
# (`.<name>.tmp-*`, `.<name>.old-*`) and the MLflow journal's (`.<name>.<pid>.tmp`). Nothing else in a run
# folder starts with a dot but `.lock`.
TEMPORARY_RE = re.compile(r"^(\.tmp-.*|\..+\.(tmp|old)-.*|\..+\.tmp)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def checkpoint_key(index: int) -> str:
    return f"ckpt-{index:04d}"


def checkpoint_index(key: str) -> int:
    match = CHECKPOINT_RE.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a checkpoint id; expected ckpt-NNNN, e.g. ckpt-0003")
    return int(match.group(1))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write through a temporary sibling + fsync + rename, so readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; these are ordinary shared files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point("mid_file_write")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """The project's JSON layout: sorted keys, two-space indent, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json_text(obj))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_parquet_atomic(path: Path, frame: pl.DataFrame) -> Path:
    import io

    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def write_torch_atomic(path: Path, obj: Any) -> Path:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class UnsafeFileError(ValueError):
    """A file that could only be read by running code from it (a pickle of arbitrary objects)."""


def read_torch(path: Path, *, remedy: str = "load only files this project wrote") -> Any:
    """A `torch.save` file of tensors, numbers, strings, lists, tuples and dicts, loaded on the CPU.

    `weights_only=True` unpickles only those types: a file that asks for anything else (a class whose
    `__reduce__` would run code) is refused with an `UnsafeFileError` naming it, and nothing in it runs.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        where = "/".join(path.parts[-2:])
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise UnsafeFileError(
            f"{where} contains pickled code objects ({found.group(1) if found else 'not tensors or plain values'}), "
            f"which would run when loaded; refusing to load it ({path}): {remedy}"
        ) from None


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(final: Path, *, marker: str | None = COMPLETE_MARKER) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success fsync it (once: the writers inside need not),
    add the completion `marker` (None: none) and rename it into place, replacing an older copy."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        if marker is not None:
            (tmp / marker).write_text("ok\n")
        fsync_tree(tmp)
        # Complete but still under its temporary name: a crash here must leave nothing readable.
        faults.point("mid_checkpoint_write")
        if final.exists():
            # Move the old copy aside first: rename over a non-empty directory is not allowed.
            trash = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RunLockedError(RuntimeError):
    pass


@dataclass(frozen=True)
class RoundFiles:
    """The file contract of one round under ``rounds/ckpt-NNNN/``, in the order the phases write them."""

    dir: Path

    @property
    def rollouts_pt(self) -> Path:
        """The `RolloutBatch` tensors (`round_files.save_rollout_batch`)."""
        return self.dir / "rollouts.pt"

    @property
    def rollouts_parquet(self) -> Path:
        """One row per rollout: prompt, completion, its ids and length."""
        return self.dir / "rollouts.parquet"

    @property
    def rollouts_json(self) -> Path:
        """Generation time and completion tokens."""
        return self.dir / "rollouts.json"

    @property
    def old_logps(self) -> Path:
        """Per-token log-probs and entropy of the sampling policy (teacher-forced)."""
        return self.dir / "old_logps.pt"

    @property
    def attention_parquet(self) -> Path:
        return self.dir / "attention.parquet"

    @property
    def attention_json(self) -> Path:
        """Attention pass time and the MDI tolerance it used."""
        return self.dir / "attention.json"

    @property
    def rewards(self) -> Path:
        """Per-function rewards, total, advantage, keep-mask and the attention values trained on."""
        return self.dir / "rewards.parquet"

    @property
    def update(self) -> Path:
        """The update record (`round_files.UpdateRecord`), written right after ckpt-(k+1)."""
        return self.dir / "update.json"

    @property
    def update_config(self) -> Path:
        """The config a multi-process update's children read."""
        return self.dir / "update_config.json"

    @property
    def update_failure(self) -> Path:
        """A multi-process update's account of a refused (non-finite) update."""
        return self.dir / "update_failure.json"

    @property
    def metrics(self) -> Path:
        """The round's logged metrics."""
        return self.dir / "metrics.json"

    @property
    def health_rewards(self) -> Path:
        return self.dir / "health_rewards.json"

    @property
    def health_update(self) -> Path:
        return self.dir / "health_update.json"

    @property
    def done(self) -> Path:
        """Written last: the round is finished (resumption skips it)."""
        return self.dir / "DONE"

    @property
    def log(self) -> Path:
        """The round's terminal log (rendered into run_terminal.md)."""
        return self.dir / "terminal.log"


@dataclass(frozen=True)
class RunStore:
    """Paths of one training run under the data root."""

    root: Path
    run_name: str

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / "runs" / self.run_name

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint_dir(self, key: str) -> Path:
        checkpoint_index(key)
        return self.checkpoints_dir / key

    @property
    def rounds_dir(self) -> Path:
        return self.run_dir / "rounds"

    def round_dir(self, key: str) -> Path:
        checkpoint_index(key)
        return self.rounds_dir / key

    def round(self, key: str) -> RoundFiles:
        """The files round `key` (trained from checkpoint `key`) reads and writes."""
        return RoundFiles(self.round_dir(key))

    def reports_dir(self, key: str) -> Path:
        checkpoint_index(key)
        return self.run_dir / "reports" / key

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def setup_marker(self) -> Path:
        """Written once the setup (dataset, ckpt-0000, its evaluation journaled for MLflow) has finished."""
        return self.run_dir / "SETUP_DONE"

    def is_complete_checkpoint(self, key: str) -> bool:
        return (self.checkpoint_dir(key) / COMPLETE_MARKER).exists()

    def complete_checkpoints(self) -> list[str]:
        """Checkpoint ids whose directory carries the completion marker, oldest first."""
        if not self.checkpoints_dir.exists():
            return []
        keys = [p.name for p in self.checkpoints_dir.iterdir() if CHECKPOINT_RE.match(p.name)]
        return sorted((k for k in keys if self.is_complete_checkpoint(k)), key=checkpoint_index)

    def latest_checkpoint(self) -> str | None:
        keys = self.complete_checkpoints()
        return keys[-1] if keys else None

    def require_checkpoint(self, key: str) -> Path:
        path = self.checkpoint_dir(key)
        if not self.is_complete_checkpoint(key):
            have = ", ".join(self.complete_checkpoints()) or "none"
            raise FileNotFoundError(
                f"checkpoint {key} of run {self.run_name!r} is missing or incomplete at {path} "
                f"(complete checkpoints: {have})"
            )
        return path

    def remove_temporaries(self) -> list[Path]:
        """Delete leftovers of interrupted atomic writes anywhere in the run folder."""
        removed: list[Path] = []
        if not self.run_dir.exists():
            return removed
        found = [p for p in self.run_dir.rglob(".*") if TEMPORARY_RE.match(p.name)]
        for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
            if not path.exists():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the run; a second process with the same run name is refused."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / ".lock"
        handle = open(path, "a+")  # noqa: SIM115 - held for the lifetime of the context
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunLockedError(
                    f"run {self.run_name!r} is already in use by {holder} (lock {path}); wait for it to "
                    f"finish or choose another RUN_NAME"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.close()


def checkpoint_state(run_store: RunStore, key: str) -> dict[str, Any]:
    """Checkpoint `key`'s `state.json` (it must be complete)."""
    return read_json(run_store.require_checkpoint(key) / STATE_FILE)


def resolve_model_dir(run_store: RunStore, key: str) -> Path:
    """The directory holding checkpoint `key`'s weights (ckpt-0000 of a real model points at its source)."""
    state = checkpoint_state(run_store, key)
    return Path(state["model_dir"]) if state.get("model_dir") else run_store.require_checkpoint(key)
