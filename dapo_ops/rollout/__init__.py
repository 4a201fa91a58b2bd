"""Sampling completions: batched KV-cache generation (`generate`; its preallocated cache: `kv_cache`), the
`RolloutEngine` seam that picks the sampler (`engines`) and DAPO's dynamic sampling with refill
(`dynamic_sampling`). A new engine is one module
plus its entry in `engines.ENGINES`.

May import: `common`, `config`, `store`, `data`, `models`, `rl`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
