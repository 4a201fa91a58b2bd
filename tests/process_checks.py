"""What the kill tests check after a run or a kill: no temporary left, no Dagster run stuck, no descendant of a
killed `make run` alive."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from dapo_ops.store.layout import TEMPORARY_RE


def temporaries(run_dir: Path) -> list[Path]:
    """The temporary files and folders (the store's `.tmp-` convention) left anywhere under `run_dir`."""
    return [p for p in run_dir.rglob(".*") if TEMPORARY_RE.match(p.name)]


def stuck_dagster_runs(root: Path, run_name: str) -> list[str]:
    """Ids of the Dagster runs of `run_name` on the data root `root` that never reached an end status."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(root / "dagster"))
    runs = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED],
        tags={"dapo/run_name": run_name}))
    return [r.run_id for r in runs]


def alive(processes: list) -> list:
    """The psutil processes of `processes` still running (zombies count as gone)."""
    import psutil

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if running(p)]


def kill_once_phase_ranks_run(process: subprocess.Popen, phase: str, delay: float = 0.0) -> list[str]:
    """kill -9 of the `make run` `process` once 2 ranks of its multi-process `phase` (rollouts, attention,
    update) run (+ `delay` s); the command lines of its descendants (supervisor, launcher, ranks) still alive
    10 s later, which are then killed too."""
    import psutil

    deadline = time.monotonic() + 300
    family: list = []
    while process.poll() is None:
        assert time.monotonic() < deadline, f"the {phase} ranks never started"
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(process.pid).children(recursive=True)
            # Each multi-process phase launches ranks of its own: wait for those of `phase`.
            if sum("pipelines.pipes_update" in (line := " ".join(p.cmdline())) and f"--phase {phase}" in line
                   for p in alive(family)) >= 2:
                break
        time.sleep(0.05)
    time.sleep(delay)
    with contextlib.suppress(psutil.Error):
        family = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = []
    for p in alive(family):
        with contextlib.suppress(psutil.Error):
            survivors.append(" ".join(p.cmdline()))
            p.kill()
    return survivors
