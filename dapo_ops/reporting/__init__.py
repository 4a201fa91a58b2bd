"""Pure functions from a round's metrics and tables to what people read: health findings (`health`), the markdown
reports (`reports`) and PNG charts (`charts`).

May import: every layer below it: `common` to `train`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
