"""The typed training config: `DapoConfig` with every field, its default, its choices and its validation
(`dapo`), TRL's names throughout; and run-config files, YAML plus `--set NAME=VALUE` (`runconfig`). Names that
other layers register (rewards, rollout engines) are checked here against their lists, not by importing those
layers.

May import: `common`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
