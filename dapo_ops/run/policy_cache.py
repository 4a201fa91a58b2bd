"""The newest checkpoint's policy and optimizer, kept in memory between the phases of a round and from one
round to the next, so that a run of several rounds in one process loads each checkpoint once (the update of
round k hands ckpt-(k+1) straight over). Light to import (torch loads with the first policy): the Dagster code
location holds one."""

from __future__ import annotations

import threading
from typing import Any

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.store.layout import RunStore


class PolicyCache:
    """One entry: (data root, run, checkpoint) -> policy and, once asked for, its optimizer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[tuple[str, str, str], Any, Any] | None = None

    @staticmethod
    def _key(store: RunStore, checkpoint: str) -> tuple[str, str, str]:
        return (str(store.root), store.run_name, checkpoint)

    def get(self, store: RunStore, checkpoint: str, config: DapoConfig) -> Any:
        from dapo_ops.run.checkpoint_policy import load_checkpoint_policy

        with self._lock:
            key = self._key(store, checkpoint)
            if self._entry is not None and self._entry[0] == key:
                return self._entry[1]
            # The base model + adapter of a LoRA checkpoint; a pruned checkpoint is refused, saying so.
            policy = load_checkpoint_policy(store, checkpoint, config)
            self._entry = (key, policy, None)
            return policy

    def optimizer(self, store: RunStore, checkpoint: str, config: DapoConfig) -> Any:
        from dapo_ops.run import phases

        policy = self.get(store, checkpoint, config)
        with self._lock:
            assert self._entry is not None
            if self._entry[2] is None:
                self._entry = (self._entry[0], policy, phases.load_optimizer(store, checkpoint, policy, config))
            return self._entry[2]

    def put(self, store: RunStore, checkpoint: str, policy: Any, optimizer: Any) -> None:
        with self._lock:
            self._entry = (self._key(store, checkpoint), policy, optimizer)

    def invalidate(self) -> None:
        """Forget the in-memory policy (after a failed update it no longer matches any checkpoint)."""
        with self._lock:
            self._entry = None
