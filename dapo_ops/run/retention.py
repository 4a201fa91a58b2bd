"""Checkpoint retention, the HF Trainer's `save_total_limit` / `save_only_model` for checkpoint partitions,
and the disk-space check before a round.

- Optimizer state lives only in the newest checkpoint (resuming needs that one alone): once a round's
  checkpoint and update record are written, `optimizer.pt` of every older checkpoint is deleted. With
  `save_only_model` none is stored at all (a resumed run restarts AdamW).
- Weights of every checkpoint are kept (re-analysis needs them) unless `save_total_limit: N`: then only the
  newest N trained checkpoints keep them. ckpt-0000 is never pruned and does not count: it is the run's base
  (the reference policy of `beta > 0`, the base of LoRA adapters, the start of every comparison); neither
  is a checkpoint that a kept LoRA checkpoint names as its base model. A pruned checkpoint keeps state.json
  and COMPLETE plus a PRUNED marker (its partition stays known: rollouts, rewards and reports remain), and
  re-analysing it fails with `PrunedCheckpointError` saying so.
- Pruning writes the PRUNED marker first, then deletes: a kill in between leaves a checkpoint that reads
  as pruned, and the next round finishes the deletion.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.store import layout as store
from dapo_ops.store.layout import RunStore, checkpoint_index, checkpoint_key

PRUNED_MARKER = "PRUNED"
OBSERVED_MARKER = "PRUNED.observed"  # the Dagster observation of the pruning was logged
OPTIMIZER_DCP_DIR = "optimizer_dcp"
# What a checkpoint keeps when pruned; everything else (weights, adapter, tokenizer...) is deleted.
KEPT_WHEN_PRUNED = frozenset({store.STATE_FILE, store.COMPLETE_MARKER, PRUNED_MARKER, OBSERVED_MARKER})
# Room for the round's own files (rollouts, attention, reports) beside the next checkpoint.
ROUND_FILES_MARGIN = 64 * 2**20


class PrunedCheckpointError(FileNotFoundError):
    """The checkpoint's weights were deleted by `save_total_limit`."""


class DiskSpaceError(RuntimeError):
    """Not enough free disk space for the next round's checkpoint; nothing was started."""


def is_pruned(run_store: RunStore, key: str) -> bool:
    return (run_store.checkpoint_dir(key) / PRUNED_MARKER).exists()


def pruned_checkpoints(run_store: RunStore) -> list[str]:
    return [k for k in run_store.complete_checkpoints() if is_pruned(run_store, k)]


def checkpoints_with_weights(run_store: RunStore) -> list[str]:
    return [k for k in run_store.complete_checkpoints() if not is_pruned(run_store, k)]


def require_weights(run_store: RunStore, key: str) -> None:
    """Raise `PrunedCheckpointError` for a pruned checkpoint, naming what is left and what can be analysed."""
    if not is_pruned(run_store, key):
        return
    reason = (run_store.checkpoint_dir(key) / PRUNED_MARKER).read_text(encoding="utf-8").strip()
    kept = ", ".join(checkpoints_with_weights(run_store)) or "none"
    raise PrunedCheckpointError(
        f"checkpoint {key} of run {run_store.run_name!r} cannot be re-analysed or loaded: its weights were "
        f"deleted ({reason}). Its rollouts, rewards and reports are kept under {run_store.round_dir(key)} and "
        f"{run_store.reports_dir(key)}. Checkpoints with weights: {kept}. Raise save_total_limit (or leave it "
        f"null) to keep more.")


def _bases(run_store: RunStore, keys: list[str]) -> set[str]:
    """Checkpoints that the LoRA checkpoints among `keys` name as their base model directory."""
    names: set[str] = set()
    for key in keys:
        state = store.read_json(run_store.checkpoint_dir(key) / store.STATE_FILE)
        model_dir = state.get("model_dir")
        if model_dir and Path(model_dir).parent == run_store.checkpoints_dir:
            names.add(Path(model_dir).name)
    return names


def apply(run_store: RunStore, config: DapoConfig, newest: str) -> dict[str, list[str]]:
    """After checkpoint `newest` and its round's update record are written: drop older optimizer state and,
    with `save_total_limit`, older weights. Returns {"optimizer_removed": [...], "pruned": [...]}."""
    complete = run_store.complete_checkpoints()
    older = [k for k in complete if checkpoint_index(k) < checkpoint_index(newest)]
    removed = []
    for key in [*older, *([newest] if config.save_only_model else [])]:
        path = run_store.checkpoint_dir(key) / store.OPTIMIZER_FILE
        sharded = run_store.checkpoint_dir(key) / OPTIMIZER_DCP_DIR  # FSDP2's form of the same state
        if path.exists() or sharded.is_dir():
            path.unlink(missing_ok=True)
            shutil.rmtree(sharded, ignore_errors=True)
            removed.append(key)
    pruned: list[str] = []
    if config.save_total_limit is not None:
        trained = [k for k in complete if checkpoint_index(k) > 0 and checkpoint_index(k) <= checkpoint_index(newest)]
        keep = set(trained[-config.save_total_limit:]) | {checkpoint_key(0)}
        keep |= _bases(run_store, sorted(keep))
        for key in trained:
            if key not in keep and _prune(run_store, key, config.save_total_limit):
                pruned.append(key)
    return {"optimizer_removed": removed, "pruned": pruned}


def catch_up(run_store: RunStore, config: DapoConfig) -> dict[str, list[str]]:
    """`apply` for the newest checkpoint whose round finished writing (idempotent: after a kill between a
    round's update record and its retention, or after `save_total_limit` was lowered)."""
    newest = run_store.latest_checkpoint()
    if newest is None or checkpoint_index(newest) == 0:
        return {"optimizer_removed": [], "pruned": []}
    if not run_store.round(checkpoint_key(checkpoint_index(newest) - 1)).update.exists():
        return {"optimizer_removed": [], "pruned": []}
    return apply(run_store, config, newest)


def _prune(run_store: RunStore, key: str, limit: int) -> bool:
    """Delete checkpoint `key`'s weights, keeping state.json + COMPLETE + PRUNED; False if nothing was left."""
    path = run_store.checkpoint_dir(key)
    leftovers = [p for p in path.iterdir() if p.name not in KEPT_WHEN_PRUNED]
    marker = path / PRUNED_MARKER
    if marker.exists() and not leftovers:
        return False
    if not marker.exists():
        store.write_text_atomic(marker, f"pruned by save_total_limit={limit}\n")
    for item in leftovers:
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
    return True


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def next_checkpoint_bytes(run_store: RunStore, key: str, config: DapoConfig) -> int:
    """The expected size of the checkpoint round `key` writes: the size of `key` itself when it holds its
    own weights and optimizer state (the newest checkpoint does), else an estimate from the model
    directory it refers to (weights, plus AdamW's two fp32 moments of the trained parameters)."""
    from dapo_ops.train import memory_plan

    path = run_store.checkpoint_dir(key)
    has_optimizer = (path / store.OPTIMIZER_FILE).exists() or config.save_only_model
    if checkpoint_index(key) > 0 and has_optimizer and not is_pruned(run_store, key):
        return directory_bytes(path)
    plan = memory_plan.parameter_counts(store.resolve_model_dir(run_store, key), config)
    weights = plan.trainable * 4 if config.use_peft else plan.weight_bytes
    optimizer = 0 if config.save_only_model else plan.trainable * 8
    return int(weights + optimizer)


def check_disk_space(run_store: RunStore, key: str, config: DapoConfig) -> tuple[int, int]:
    """Before round `key`: (needed, free) bytes; raises `DiskSpaceError` saying both when it will not fit."""
    needed = next_checkpoint_bytes(run_store, key, config) + ROUND_FILES_MARGIN
    run_store.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_store.checkpoints_dir).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk space for round {key} of run {run_store.run_name!r}: its checkpoint "
            f"{checkpoint_key(checkpoint_index(key) + 1)} needs about {_size(needed)} (weights, optimizer state and "
            f"the round's files) and {run_store.checkpoints_dir} has {_size(free)} free. Nothing was started; free "
            f"space, set save_total_limit (keeps the weights of the newest N checkpoints) or use_peft: true, then "
            f"`make run` again: it resumes here.")
    return needed, free


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
