"""Opt-in fault injection for the reliability tests: named points in the production code path.

Production code calls `point("after_rollouts")` (or `poison("advantages", tensor)`) at the moments a
crash or a bad value matters. Nothing happens unless the environment asks for it:

- `DAPO_VLM_FAULT="kill:<point>[@<n>]"` sends SIGKILL to this process the n-th time (default 1st) it
  reaches `<point>`: no cleanup handler, no flush, exactly like `kill -9` or a power cut.
- `DAPO_VLM_FAULT="nan:<point>[@<n>]"` makes `poison(<point>, tensor)` return the tensor with its
  first element set to NaN (a real non-finite value flows into the loss).
- Several faults are comma-separated.
- `DAPO_VLM_FAULT_TRACE=<file>` appends `<unix time> <pid> <point>` for every point reached, so a test
  that kills at a random time can tell which phase it interrupted.

Hit counts are per process, so `kill:mid_checkpoint_write@2` hits the second checkpoint this process
writes (a resumed process counts from 1 again).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import TypeVar

FAULT_ENV = "DAPO_VLM_FAULT"
TRACE_ENV = "DAPO_VLM_FAULT_TRACE"

# Every named point, in the order a round reaches them (the tests pick kill points from this list).
POINTS: tuple[str, ...] = (
    "run_start",              # the run lock is held, before any work
    "before_setup",           # the setup's Dagster run (dataset, ckpt-0000) is about to start
    "after_dataset",          # data/{train,eval,quarantine}.parquet written
    "after_base_checkpoint",  # ckpt-0000 complete, before its evaluation reaches MLflow
    "before_round",           # a round's Dagster run is about to start
    "before_rollouts",        # a round starts sampling
    "after_rollouts",         # rollouts written, before the teacher-forced pass
    "after_attention",        # old log-probs and attention written, before rewards
    "after_rewards",          # rewards and advantages written, before the update
    "mid_file_write",         # an atomic file write: temporary written and fsynced, not yet renamed
    "mid_checkpoint_write",   # a checkpoint directory fully written under its temporary name, not renamed
    "after_checkpoint",       # ckpt-(k+1) complete, before the round's update.json
    "mid_report_write",       # rollout_results.md written, run_terminal.md not yet
    "before_mlflow_send",     # a journaled round is about to be sent to MLflow
    "after_mlflow_send",      # MLflow holds the round's metrics, the journal does not know yet
    "before_round_done",      # reports and MLflow done, the round's DONE marker not yet written
)

T = TypeVar("T")


@dataclass(frozen=True)
class Fault:
    action: str  # "kill" or "nan"
    point: str
    hit: int = 1


def parse(spec: str) -> list[Fault]:
    """`"kill:after_rollouts@2,nan:advantages"` -> faults; raises ValueError naming the bad item."""
    faults: list[Fault] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, _, rest = item.partition(":")
        name, _, count = rest.partition("@")
        if action not in ("kill", "nan") or not name or (count and not count.isdigit()) or count == "0":
            raise ValueError(f"{FAULT_ENV} item {item!r} is not kill:<point>[@n] or nan:<point>[@n]")
        faults.append(Fault(action, name, int(count) if count else 1))
    return faults


_hits: dict[str, int] = {}
_parsed: tuple[str, list[Fault]] | None = None


def _active() -> list[Fault]:
    global _parsed
    spec = os.environ.get(FAULT_ENV, "")
    if _parsed is None or _parsed[0] != spec:
        _parsed = (spec, parse(spec))
    return _parsed[1]


def _reach(name: str) -> int:
    """Count and trace one arrival at `name`; returns the hit number."""
    _hits[name] = _hits.get(name, 0) + 1
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.3f} {os.getpid()} {name}\n")
    return _hits[name]


def point(name: str) -> None:
    """A named moment in the code: killed here when `DAPO_VLM_FAULT` says `kill:<name>` (this hit)."""
    if not os.environ.get(FAULT_ENV) and not os.environ.get(TRACE_ENV):
        return
    hit = _reach(name)
    for fault in _active():
        if fault.action == "kill" and fault.point == name and fault.hit == hit:
            os.kill(os.getpid(), signal.SIGKILL)


def poison(name: str, tensor: T) -> T:
    """`tensor`, or a copy with a NaN in its first element when `DAPO_VLM_FAULT` says `nan:<name>`."""
    if not os.environ.get(FAULT_ENV):
        return tensor
    hit = _reach(name)
    for fault in _active():
        if fault.action == "nan" and fault.point == name and fault.hit == hit:
            poisoned = tensor.clone()  # type: ignore[attr-defined]
            poisoned.view(-1)[0] = float("nan")
            return poisoned
    return tensor
