"""Cross-cutting utilities with no project dependencies: named fault-injection points for the reliability tests
(`faults`) and the progress hooks that long phases report to (`progress`).

May import: the standard library and torch only; no other dapo_ops subpackage.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
