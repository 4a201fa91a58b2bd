"""The RL math as pure functions over tensors and tables: reward functions, their registry and the scorer
(`rewards`), group advantages (`advantages`) and TRL's policy-loss objectives (`loss`).

May import: `common`, `config`, `store`, `data`, `models`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
