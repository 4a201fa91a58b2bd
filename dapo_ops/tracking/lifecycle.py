"""The MLflow run of one `make run`: its status through the run's life (RUNNING, then FINISHED, FAILED or
KILLED on SIGTERM/SIGINT), system metrics while rounds run, and sending what the journal holds.

Every status goes through the journal (see `facade.Tracker`), so one that MLflow misses now is sent by the next
sync; what stays unsent is said once, through the caller's `echo`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dapo_ops.store.layout import RunStore
from dapo_ops.tracking.facade import Tracker, redact_uri, resolve_tracking_uri


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT reached `make run`: its MLflow run ends KILLED (kill -9 cannot be caught: the
    run then stays RUNNING until the next `make run` of the same RUN_NAME continues it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def catch_termination() -> Iterator[list[int]]:
    """SIGTERM/SIGINT raise `RunInterrupted` in the main thread; yields the signals received so far
    (an orchestrator may turn the exception into a step failure: the list still says it was a kill)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, _frame) -> None:
        received.append(signum)
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def tracked_run(store: RunStore, echo: Callable[[str], None]) -> Iterator[Tracker]:
    """The MLflow run's lifecycle around one `make run`: RUNNING (the same run id when resumed) while it
    trains, then FINISHED when every round is done, FAILED when a round fails, KILLED on SIGTERM/SIGINT.
    (Rounds that an orchestrator's sensor launches leave the run RUNNING between rounds; the round that
    reaches `max_rounds` ends it FINISHED.) Yields the run's tracker."""
    tracker = Tracker(store.run_dir, store.run_name, tracking_uri=resolve_tracking_uri(store.root),
                      data_root=store.root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an outage here is reported by the rounds themselves
        tracker.set_status("RUNNING")
    status = "FAILED"
    with catch_termination() as received:
        try:
            yield tracker
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "KILLED" if received else "FAILED"
            raise
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shown = tracker.end(status)
            _report_unsent(tracker, status, shown, echo)


def _report_unsent(tracker: Tracker, status: str, shown: bool, echo: Callable[[str], None]) -> None:
    """Say so when rounds or the run's end wait in the journal (MLflow unreachable)."""
    left = tracker.pending()
    if left:
        echo(f"WARNING: MLflow at {redact_uri(tracker.tracking_uri)} is unreachable: {len(left)} round(s) wait in "
             f"{tracker.journal_path}; the next round or `make sync-mlflow` sends them, each metric once.")
    elif not shown and tracker.last_error is not None:
        echo(f"WARNING: MLflow at {redact_uri(tracker.tracking_uri)} is unreachable: the run's end ({status}) "
             f"waits in {tracker.state_dir}; `make sync-mlflow` sends it.")


@contextlib.contextmanager
def system_metrics(tracker: Tracker) -> Iterator[None]:
    """MLflow system metrics (CPU, memory, GPU when present) on the training run while rounds run (its id is
    known by then: setup created the run, and `tracker` reads it from the journal's cache)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an outage is reported by the rounds themselves
        with tracker.system_metrics():
            yield


@dataclass
class SyncResult:
    run_name: str
    uri: str  # where it was sent (credentials redacted)
    sent: int  # journaled rounds sent now
    left: int  # rounds still journaled
    journal: Path
    error: str | None  # why something stayed unsent (the run status too when `left` is 0)

    @property
    def complete(self) -> bool:
        return self.left == 0 and self.error is None


def sync_runs(data_root: Path, run_name: str | None = None) -> list[SyncResult]:
    """Send the journaled rounds and run status of `run_name` (of every run under `data_root` when None) to
    the tracking URI; raises FileNotFoundError when `run_name` has no run directory."""
    runs_dir = data_root / "runs"
    if run_name and not (runs_dir / run_name).is_dir():
        raise FileNotFoundError(f"no run {run_name!r} under {runs_dir}")
    uri = resolve_tracking_uri(data_root)
    results = []
    for run_dir in [runs_dir / run_name] if run_name else sorted(runs_dir.glob("*")):
        if run_dir.is_dir():
            tracker = Tracker(run_dir, run_dir.name, tracking_uri=uri, data_root=data_root)
            sent = tracker.sync()
            error = None if tracker.last_error is None else str(tracker.last_error)
            results.append(SyncResult(run_dir.name, redact_uri(uri), sent, len(tracker.pending()),
                                      tracker.journal_path, error))
    return results
