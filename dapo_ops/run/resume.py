"""Which rounds of a run are left and where each continues (the resume rule of `make run`), the blocking eval
check that it and the next-round sensor ask before continuing from a checkpoint, and the config of a
re-analysis of a stored checkpoint.

A round is DONE once its marker exists. A round whose next checkpoint and update.json exist lost only its
reports (and MLflow); any other unfinished round runs again from its checkpoint (rounds are deterministic
per seed: the same result).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dapo_ops.common.names import EVAL_ACCURACY
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.reporting.health import Finding, eval_accuracy_drop
from dapo_ops.run import retention
from dapo_ops.store.layout import STATE_FILE, RunStore, checkpoint_index, checkpoint_key, read_json

EVAL_DROP_CHECK = "eval_accuracy_drop"
# The phases of a round in order, named as the assets that run them.
ROUND_PHASES = ("rollouts", "attention_metrics", "rewards", "policy_update", "attention_report", "training_report")
REPORT_PHASES = ("attention_report", "training_report")


class EvalDropError(RuntimeError):
    """A checkpoint failed the blocking eval check: no round continues from it."""


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


def blocked_message(finding: Finding) -> str:
    return f"blocking check {finding.name} failed: {finding.message}; {finding.remedy}"


def require_eval_check(config: DapoConfig, store: RunStore, key: str) -> None:
    """Refuse to continue from a checkpoint that failed the blocking eval check (asked again with today's
    `max_eval_drop`, so `--set max_eval_drop=...` accepts it)."""
    finding = eval_drop_finding(config, store, key)
    if finding is not None and not finding.passed:
        raise EvalDropError(f"policy_update: {blocked_message(finding)}")


def needs_setup(store: RunStore) -> bool:
    """Whether the run's setup (dataset, ckpt-0000, its evaluation journaled for MLflow) is still to do."""
    return not (store.is_complete_checkpoint(checkpoint_key(0)) and store.setup_marker.exists())


@dataclass(frozen=True)
class PendingRound:
    index: int  # k: the round trains ckpt-k into ckpt-(k+1)
    key: str  # ckpt-k, the round's partition
    phases: tuple[str, ...]  # what is left: ROUND_PHASES, or REPORT_PHASES after an interruption

    @property
    def whole(self) -> bool:
        return self.phases == ROUND_PHASES


def pending_rounds(config: DapoConfig, store: RunStore) -> Iterator[PendingRound]:
    """The rounds up to `config.max_rounds` that are not DONE, in order, each worked out when the previous one
    has run (lazily). A round left with only its reports first passes the eval check of its checkpoint; an
    interrupted round says in its log that it resumes; a whole round first checks the disk space for its
    checkpoint (stopping before the round, never halfway through writing it)."""
    from dapo_ops.run.phases import round_log  # torch: not for the callers that only ask the eval check

    for k in range(config.max_rounds):
        key = checkpoint_key(k)
        files = store.round(key)
        if files.done.exists():
            continue
        phases = ROUND_PHASES
        if store.is_complete_checkpoint(checkpoint_key(k + 1)) and files.update.exists():
            phases = REPORT_PHASES
            require_eval_check(config, store, checkpoint_key(k + 1))
        if files.dir.exists() and any(p != files.log for p in files.dir.iterdir()):
            round_log(store, key)(f"resuming {key} after an interruption: {', '.join(phases)}")
        if phases == ROUND_PHASES:
            retention.check_disk_space(store, key, config)
        yield PendingRound(k, key, phases)


def reanalysis_config(store: RunStore, checkpoint: str, *, mdi_tolerance: float | None = None,
                      num_processes: int | None = None) -> dict[str, Any]:
    """The config values of a re-analysis of `checkpoint`: the run's own (config.json) with another
    `mdi_tolerance` and the teacher-forced pass on `num_processes` ranks when given. Refuses, saying why, a run
    that does not exist (FileNotFoundError), a missing checkpoint, or one whose weights were pruned."""
    if not store.config_path.exists():
        raise FileNotFoundError(f"no run {store.run_name!r} under {store.root / 'runs'}; pass RUN_NAME=<an existing "
                                f"run>")
    values = read_json(store.config_path)
    store.require_checkpoint(checkpoint)
    retention.require_weights(store, checkpoint)
    if mdi_tolerance is not None:
        values["mdi_tolerance"] = mdi_tolerance
    if num_processes is not None:
        values["num_processes"] = num_processes
    return values
