"""A round over the run store, phase by phase: each phase function reads the previous phase's files and writes
its own atomically (`phases`), the round itself (`round`), the round's file contents (`round_files`), the
policy of a checkpoint (`checkpoint_policy`), retention and disk checks (`retention`), export of a checkpoint
(`export`) and each rank's share of a round (`shards`).

May import: every layer below it: `common` to `reporting`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
