"""Dagster resources: the run store (paths + atomic writes), a policy cache, and MLflow."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dagster as dg

from dapo_ops.config.dapo import DapoConfig, data_root
from dapo_ops.store.layout import RunStore


class RunStoreResource(dg.ConfigurableResource):
    """Where runs live: `DAPO_VLM_HOME` (default ./var) unless `data_root` is set."""

    data_root: str = ""

    def root(self) -> Path:
        return Path(self.data_root).resolve() if self.data_root else data_root()

    def for_run(self, run_name: str) -> RunStore:
        return RunStore(self.root(), run_name)


class PolicyCache:
    """Keeps the newest checkpoint's policy and optimizer in memory, so that an in-process run of
    several rounds loads each checkpoint once (`policy_update[k]` hands ckpt-(k+1) straight over)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[tuple[str, str, str], Any, Any] | None = None

    @staticmethod
    def _key(store: RunStore, checkpoint: str) -> tuple[str, str, str]:
        return (str(store.root), store.run_name, checkpoint)

    def get(self, store: RunStore, checkpoint: str, config: DapoConfig):
        from dapo_ops.run.checkpoint_policy import load_checkpoint_policy

        with self._lock:
            key = self._key(store, checkpoint)
            if self._entry is not None and self._entry[0] == key:
                return self._entry[1]
            # The base model + adapter of a LoRA checkpoint; a pruned checkpoint is refused, saying so.
            policy = load_checkpoint_policy(store, checkpoint, config)
            self._entry = (key, policy, None)
            return policy

    def optimizer(self, store: RunStore, checkpoint: str, config: DapoConfig):
        from dapo_ops.run import phases as training

        policy = self.get(store, checkpoint, config)
        with self._lock:
            assert self._entry is not None
            if self._entry[2] is None:
                self._entry = (self._entry[0], policy, training.load_optimizer(store, checkpoint, policy, config))
            return self._entry[2]

    def put(self, store: RunStore, checkpoint: str, policy, optimizer) -> None:
        with self._lock:
            self._entry = (self._key(store, checkpoint), policy, optimizer)

    def invalidate(self) -> None:
        """Forget the in-memory policy (after a failed update it no longer matches any checkpoint)."""
        with self._lock:
            self._entry = None


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking: `MLFLOW_TRACKING_URI`, default `sqlite:///<data root>/mlflow.db`."""

    tracking_uri: str = ""
    experiment_name: str = "dapo-vlm"
    # The MLflow UI that materializations link to; default: the tracking server, or `make mlflow-ui`'s address.
    ui_url: str = ""

    def uri(self, root: Path) -> str:
        from dapo_ops.tracking.facade import resolve_tracking_uri

        return resolve_tracking_uri(root, self.tracking_uri or None)

    def tracker(self, store: RunStore):
        from dapo_ops.tracking.facade import Tracker

        return Tracker(store.run_dir, store.run_name, tracking_uri=self.uri(store.root),
                       experiment_name=self.experiment_name, data_root=store.root)


# One per code-location process: `dagster dev` runs and `make run` rounds share it within a process.
POLICY_CACHE = PolicyCache()
