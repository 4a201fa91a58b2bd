"""The run store on disk: where a run's data, checkpoints, rounds and reports live (`RunStore`, `RoundFiles`),
the contract file names, atomic writes (temporary name, fsync, rename) and code-free reads
(`torch.load(weights_only=True)`, JSON, parquet).

May import: `common`, `config`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
