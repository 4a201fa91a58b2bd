"""The blocking eval check of `policy_update`, read off the checkpoints' state files: the asset yields it,
the next-round sensor and `make run` ask it again before continuing from a checkpoint."""

from __future__ import annotations

from dapo_ops.common.names import EVAL_ACCURACY
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.reporting.health import Finding, eval_accuracy_drop
from dapo_ops.store.layout import STATE_FILE, RunStore, checkpoint_index, checkpoint_key, read_json

EVAL_DROP_CHECK = "eval_accuracy_drop"


def checkpoint_eval_accuracy(store: RunStore, key: str) -> float | None:
    """The greedy eval accuracy recorded in `key`'s state.json, None when it has none."""
    path = store.checkpoint_dir(key) / STATE_FILE
    if not path.exists():
        return None
    value = read_json(path).get("eval", {}).get(EVAL_ACCURACY)
    return None if value is None else float(value)


def eval_drop_finding(config: DapoConfig, store: RunStore, key: str) -> Finding | None:
    """The eval check of checkpoint `key` against the one before it (None for ckpt-0000; an unevaluated
    checkpoint fails, it cannot show that it did not get worse)."""
    index = checkpoint_index(key)
    if index == 0:
        return None
    current = checkpoint_eval_accuracy(store, key)
    previous_key = checkpoint_key(index - 1)
    return eval_accuracy_drop(checkpoint_eval_accuracy(store, previous_key),
                              float("nan") if current is None else current,
                              max_drop=config.max_eval_drop, previous_key=previous_key, current_key=key)


class EvalDropError(RuntimeError):
    """A checkpoint failed the blocking eval check: no round continues from it."""


def blocked_message(finding: Finding) -> str:
    return f"blocking check {finding.name} failed: {finding.message}; {finding.remedy}"
