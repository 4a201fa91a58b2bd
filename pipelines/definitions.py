"""The dapo-vlm code location (`workspace.yaml` loads `pipelines.definitions:defs`)."""

from __future__ import annotations

import dagster as dg

from pipelines.assets import ALL_ASSETS
from pipelines.config import RESOURCE_KEY, TrainingConfig
from pipelines.jobs import reanalysis_job, setup_run_job, training_round_job
from pipelines.resources import POLICY_CACHE, MlflowResource, RunStoreResource
from pipelines.schedules import retrain
from pipelines.sensors import next_round_sensor

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[setup_run_job, training_round_job, reanalysis_job],
    sensors=[next_round_sensor],
    schedules=[retrain],
    resources={
        # The run's config, shared by every asset: `resources: {training_config: {config: ...}}` in the launchpad.
        RESOURCE_KEY: TrainingConfig(),
        "run_store": RunStoreResource(),
        "mlflow": MlflowResource(),
        "policy_cache": POLICY_CACHE,
    },
    # Torch + transformers + mlflow take seconds to import: one process per run, not one per step.
    executor=dg.in_process_executor,
)
