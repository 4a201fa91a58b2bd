"""Dagster resources: the run store (paths + atomic writes), the policy cache of this process, and MLflow."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from dapo_ops.config.dapo import data_root
from dapo_ops.run.policy_cache import PolicyCache
from dapo_ops.store.layout import RunStore


class RunStoreResource(dg.ConfigurableResource):
    """Where runs live: `DAPO_VLM_HOME` (default ./var) unless `data_root` is set."""

    data_root: str = ""

    def root(self) -> Path:
        return Path(self.data_root).resolve() if self.data_root else data_root()

    def for_run(self, run_name: str) -> RunStore:
        return RunStore(self.root(), run_name)


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
