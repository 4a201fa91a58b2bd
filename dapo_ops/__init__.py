"""dapo-vlm's library: GRPO/DAPO training of vision-language models with attention diagnostics."""

from __future__ import annotations

import importlib
from typing import Any

# Public functions re-exported lazily (importing the package stays cheap): name -> defining module.
_EXPORTS: dict[str, str] = {
    "load_rl_dataset": "dapo_ops.rldata",
    "accuracy_reward": "dapo_ops.rewards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dapo_ops' has no attribute {name!r}")
