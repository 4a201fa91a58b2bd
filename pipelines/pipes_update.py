"""Child entry point of the multi-process phases (rollouts, attention, the policy update), one process per rank:

    accelerate launch --config_file configs/accelerate/<x>.yaml --num_processes N \\
        -m pipelines.pipes_update --data-root DIR --run-name NAME --checkpoint ckpt-NNNN --config FILE \\
        [--phase rollouts|attention|update] [--reanalysis]

The `rollouts`, `attention_metrics` and `policy_update` assets run this through Dagster Pipes
(`PipesSubprocessClient`) when `num_processes > 1`. Rank 0 opens the Pipes session: its round-log lines become Dagster logs, and it
reports the materialization (metadata: next checkpoint, loss, eval accuracy...) back to the parent. It
also runs without Dagster (no Pipes context in the environment), e.g. to redo one round's update by hand.
Exit codes: 0 done, 3 update refused for a non-finite loss or gradient (nothing written), 1 other errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

NON_FINITE_EXIT = 3


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.pipes_update", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--checkpoint", required=True, help="the round's checkpoint k (ckpt-NNNN)")
    parser.add_argument("--config", required=True, type=Path, help="DapoConfig as JSON (<phase>_config.json)")
    parser.add_argument("--phase", default="update", choices=("rollouts", "attention", "update"))
    parser.add_argument("--reanalysis", action="store_true", help="attention: keep the round's old log-probs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dapo_ops.process_hygiene import guard_rank

    guard_rank()  # first: this rank dies with its launcher (kill -9 of the parent leaves no orphan)
    args = _parse(argv)
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    from dapo_ops import distributed, training
    from dapo_ops.config import DapoConfig
    from dapo_ops.store import RunStore, read_json
    from dapo_ops.update import NonFiniteUpdateError

    config = DapoConfig.from_dict(read_json(args.config))
    store = RunStore(args.data_root.resolve(), args.run_name)
    key = args.checkpoint
    rank = int(os.environ.get("RANK", "0"))
    # One Pipes session per launch: several writers on the message channel would repeat open/close.
    in_pipes = rank == 0 and bool(os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR))
    with open_dagster_pipes() if in_pipes else contextlib.nullcontext() as pipes:
        if rank == 0:
            printed = os.environ.get(training.CONSOLE_ECHO_ENV) != "0"

            def echo(line: str) -> None:
                if printed:  # the parent forwards stdout: the round log on `make run --verbose`
                    print(f"    {line}", flush=True)
                if pipes is not None:
                    pipes.log.info(line)

            log = training.round_log(store, key, echo=echo)
        else:
            log = distributed.SilentLog()
        progress = distributed.RankLog(distributed.rank_log_dir(store, key, args.phase) / f"rank-{rank}.log")
        if args.phase != distributed.UPDATE:
            metadata = distributed.run_phase_distributed(args.phase, config, store, key, log,
                                                         reanalysis=args.reanalysis, progress=progress)
            if pipes is not None:
                pipes.report_asset_materialization(metadata=metadata)
            return 0
        try:
            record = distributed.run_update_distributed(config, store, key, log, progress=progress)
        except NonFiniteUpdateError as error:
            if rank == 0:
                distributed.write_failure(store, key, distributed.NON_FINITE, str(error))
                if pipes is not None:
                    pipes.log.error(str(error))
            return NON_FINITE_EXIT
        if pipes is not None:
            pipes.report_asset_materialization(metadata={
                "num_processes": record.num_processes,
                "update_seconds": float((record.seconds or {})["update"]),
                "next_checkpoint": record.next_checkpoint,
                **({"loss": record.loss} if record.steps else {}),  # absent: no optimizer step, nothing measured
                "eval_accuracy": record.eval_accuracy,
            })
    return 0


if __name__ == "__main__":
    sys.exit(main())
