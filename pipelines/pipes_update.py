"""Child entry point of the multi-process phases when Dagster launches them: the library's worker
(`dapo_ops.distributed.worker`) with rank 0 reporting through Dagster Pipes.

The `rollouts`, `attention_metrics` and `policy_update` assets run this through `PipesSubprocessClient` when
`num_processes > 1`: rank 0's round-log lines become Dagster logs and the phase's result the asset's
materialization metadata. Without a Pipes context in the environment it is the plain worker.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from dapo_ops.distributed import worker

NON_FINITE_EXIT = worker.NON_FINITE_EXIT


class PipesReporter:
    """`worker.Reporter` over an open Dagster Pipes context."""

    def __init__(self, pipes: Any) -> None:
        self.pipes = pipes

    def info(self, line: str) -> None:
        self.pipes.log.info(line)

    def error(self, line: str) -> None:
        self.pipes.log.error(line)

    def materialized(self, metadata: dict[str, Any]) -> None:
        self.pipes.report_asset_materialization(metadata=metadata)


def main(argv: Sequence[str] | None = None) -> int:
    from dapo_ops.distributed.process_hygiene import guard_rank

    guard_rank()  # first: this rank dies with its launcher (kill -9 of the parent leaves no orphan)
    args = worker.parse_args(argv, prog="python -m pipelines.pipes_update")
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    rank = int(os.environ.get("RANK", "0"))
    # One Pipes session per launch: several writers on the message channel would repeat open/close.
    in_pipes = rank == 0 and bool(os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR))
    with open_dagster_pipes() if in_pipes else contextlib.nullcontext() as pipes:
        return worker.run(args, PipesReporter(pipes) if pipes is not None else None)


if __name__ == "__main__":
    sys.exit(main())
