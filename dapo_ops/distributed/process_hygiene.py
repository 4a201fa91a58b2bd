"""No orphan processes: the multi-process phases die with the process that started them.

The chain under `NUM_PROCESSES=n` is

    make run / Dagster (parent) -> supervisor (this module's `main`) -> `accelerate launch` -> rank 0..n-1

and `kill -9` of any link must take everything below it along, within seconds:

- every link below the parent asks Linux for a parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`):
  the supervisor at its start, the launcher in the supervisor's `preexec_fn`, each rank first thing in
  `pipelines.pipes_update` (`guard_rank`). A SIGKILLed parent runs no clean-up, so nothing else could;
- the supervisor leads its own process group, which the parent kills when its Pipes call ends for any
  reason (`kill_supervisors`), e.g. a Dagster run terminated from the UI;
- the supervisor tees the launcher's output and, when the launcher fails, writes `update_failure.json`
  naming the rank that died (from torchrun's failure summary) and that rank's last log line.

Linux only: elsewhere `set_parent_death_signal` returns False and only the process group remains.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "DAPO_VLM_PARENT_PID"          # the Dagster process, for the supervisor's start-up race check
SUPERVISOR_PID_ENV = "DAPO_VLM_SUPERVISOR_PID"  # the supervisor, for each rank's start-up race check
RANK_FAILED = "rank_failed"
SUPERVISOR_MODULE = "dapo_ops.distributed.process_hygiene"
# torchrun's failure summary: "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 123)".
_FAILURE_RE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (None: gone or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may contain spaces and parentheses


def die_with_parent(expected_parent: int | None) -> None:
    """Parent-death signal, then exit at once if the expected parent already died before it was set."""
    set_parent_death_signal()
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(128 + signal.SIGKILL)


def guard_rank() -> None:
    """First thing in each rank: die with the launcher. The launcher's own parent must be the supervisor
    (else the launcher already died and this rank was reparented before it could ask)."""
    set_parent_death_signal()
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor and parent_of(os.getppid()) != int(supervisor):
        os._exit(128 + signal.SIGKILL)


def supervised(command: list[str], *, failure_file: Path, rank_logs: Path, python: str | None = None,
               phase: str = "update") -> list[str]:
    """`command` run under the supervisor, which accounts for a failure of `phase` in `failure_file`."""
    return [python or sys.executable, "-m", SUPERVISOR_MODULE, "--failure-file", str(failure_file),
            "--rank-logs", str(rank_logs), "--phase", phase, "--", *command]


def rank_failure(output: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first failure in torchrun's summary ("Root Cause" comes first)."""
    root = output.rfind("Root Cause")
    match = _FAILURE_RE.search(output, root if root >= 0 else 0) or _FAILURE_RE.search(output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log line: it died before writing one)"
    return lines[-1].strip() if lines else "(no log line: it died before writing one)"


def failure_message(output: str, returncode: int, rank_logs: Path, phase: str = "update") -> str:
    """The round's failure: which rank of `phase` died, how, and the last thing it logged."""
    failed = rank_failure(output)
    if failed is None:
        tail = " | ".join(line.strip() for line in output.splitlines()[-3:] if line.strip())
        return f"the {phase}'s launcher exited with code {returncode} and named no failed rank; last output: {tail}"
    rank, code = failed
    how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit code {code}"
    return (f"rank {rank} of the {phase} died ({how}); its last log line: "
            f"{last_line(rank_logs / f'rank-{rank}.log')!r}; no checkpoint was written, run again to resume")


def _write_failure(path: Path, message: str) -> None:
    from dapo_ops.store import layout as store

    store.write_json_atomic(path, {"kind": RANK_FAILED, "message": message})


def supervise(command: list[str], *, failure_file: Path | None, rank_logs: Path | None,
              phase: str = "update") -> int:
    """Run the launcher `command` as a child that dies with us; tee its output; account for its failure."""
    parent = os.environ.get(PARENT_PID_ENV)
    die_with_parent(int(parent) if parent else None)
    os.setpgid(0, 0)  # our own group: the parent kills it (launcher included) when its call ends
    me = os.getpid()

    def child_setup() -> None:  # after fork, before exec: the launcher dies with this supervisor
        die_with_parent(me)

    env = {**os.environ, SUPERVISOR_PID_ENV: str(me)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=child_setup)
    tail: deque[str] = deque(maxlen=400)
    assert process.stdout is not None
    for raw in iter(process.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        tail.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    returncode = process.wait()
    if returncode != 0 and failure_file is not None and not failure_file.exists():
        # A refusal the ranks explained themselves (non-finite update) is kept as they wrote it.
        _write_failure(failure_file, failure_message("".join(tail), returncode, rank_logs or failure_file.parent,
                                                     phase))
    return returncode


def supervisors_of(parent: int) -> list[int]:
    """Live supervisor processes whose parent is `parent` (from /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if SUPERVISOR_MODULE.encode() in cmdline and parent_of(int(entry.name)) == parent:
            found.append(int(entry.name))
    return found


def kill_supervisors(parent: int | None = None) -> list[int]:
    """SIGKILL the process group of every supervisor `parent` (default: this process) started; the ranks,
    in sessions of their own, follow by their parent-death signal. Returns the groups killed."""
    killed = []
    for pid in supervisors_of(os.getpid() if parent is None else parent):
        try:
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            continue
    return killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {SUPERVISOR_MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--failure-file", type=Path, help="where to account for a failed launch (JSON)")
    parser.add_argument("--rank-logs", type=Path, help="folder of the ranks' rank-<r>.log files")
    parser.add_argument("--phase", default="update", help="the phase the ranks run, for the failure message")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the launcher's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    return supervise(command, failure_file=args.failure_file, rank_logs=args.rank_logs, phase=args.phase)


if __name__ == "__main__":
    sys.exit(main())
