"""Child entry point of the multi-process phases (rollouts, attention, the policy update), one process per rank:

    accelerate launch --config_file configs/accelerate/<x>.yaml --num_processes N \\
        -m dapo_ops.distributed.worker --data-root DIR --run-name NAME --checkpoint ckpt-NNNN --config FILE \\
        [--phase rollouts|attention|update] [--reanalysis]

Rank 0 echoes the round-log lines on stdout (the parent forwards them: live progress) and hands them, and the
phase's result, to a `Reporter`: an orchestrator's child (Dagster Pipes in `pipelines`) passes its own, the
plain command prints only. Exit codes: 0 done, 3 update refused for a non-finite loss or gradient (nothing
written), 1 other errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

NON_FINITE_EXIT = 3


class Reporter(Protocol):
    """Where rank 0's lines and the phase's result go besides stdout."""

    def info(self, line: str) -> None: ...

    def error(self, line: str) -> None: ...

    def materialized(self, metadata: dict[str, Any]) -> None: ...


def parse_args(argv: Sequence[str] | None, prog: str = "python -m dapo_ops.distributed.worker") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--checkpoint", required=True, help="the round's checkpoint k (ckpt-NNNN)")
    parser.add_argument("--config", required=True, type=Path, help="DapoConfig as JSON (<phase>_config.json)")
    parser.add_argument("--phase", default="update", choices=("rollouts", "attention", "update"))
    parser.add_argument("--reanalysis", action="store_true", help="attention: keep the round's old log-probs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, reporter: Reporter | None = None) -> int:
    """Run this rank's share of `args.phase`; rank 0 reports to `reporter`. Returns the exit code."""
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.distributed import launch
    from dapo_ops.run import phases
    from dapo_ops.store.layout import RunStore, read_json
    from dapo_ops.train.update import NonFiniteUpdateError

    config = DapoConfig.from_dict(read_json(args.config))
    store = RunStore(args.data_root.resolve(), args.run_name)
    key = args.checkpoint
    rank = int(os.environ.get("RANK", "0"))
    report = reporter if rank == 0 else None
    if rank == 0:
        def echo(line: str) -> None:
            print(f"    {line}", flush=True)  # the parent forwards stdout: live progress on `make run`
            if report is not None:
                report.info(line)

        log: Any = phases.round_log(store, key, echo=echo)
    else:
        log = launch.SilentLog()
    progress = launch.RankLog(launch.rank_log_dir(store, key, args.phase) / f"rank-{rank}.log")
    if args.phase != launch.UPDATE:
        metadata = launch.run_phase_distributed(args.phase, config, store, key, log,
                                                reanalysis=args.reanalysis, progress=progress)
        if report is not None:
            report.materialized(metadata)
        return 0
    try:
        record = launch.run_update_distributed(config, store, key, log, progress=progress)
    except NonFiniteUpdateError as error:
        if rank == 0:
            launch.write_failure(store, key, launch.NON_FINITE, str(error))
            if report is not None:
                report.error(str(error))
        return NON_FINITE_EXIT
    if report is not None:
        report.materialized({
            "num_processes": record.num_processes,
            "update_seconds": float((record.seconds or {})["update"]),
            "next_checkpoint": record.next_checkpoint,
            **({"loss": record.loss} if record.steps else {}),  # absent: no optimizer step, nothing measured
            "eval_accuracy": record.eval_accuracy,
        })
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from dapo_ops.distributed.process_hygiene import guard_rank

    guard_rank()  # first: this rank dies with its launcher (kill -9 of the parent leaves no orphan)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
