"""Datasets: loading and validating user data with its quarantine of bad rows (`loading`) and the embedded
synthetic visual tasks (`synthetic`). Tables are polars frames with one schema.

May import: `common`, `config`, `store`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
