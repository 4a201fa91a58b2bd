"""Several processes: the multi-process phases under `accelerate` and the child entry point of each rank
(`launch`), and process hygiene so that no rank outlives its launcher (`process_hygiene`).

May import: every layer below it: `common` to `tracking`. Never the orchestrator: the launcher is given the
child command to run.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
