"""Changing the weights: the clipped policy-gradient update and its optimizer (`update`), the supervised warm
start (`warmstart`), the peak-memory plan (`memory_plan`) and FSDP2 wrapping (`fsdp`).

May import: every layer below it: `common` to `attention`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
