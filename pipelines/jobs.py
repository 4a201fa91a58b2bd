"""Jobs: set up a run, train one round of a checkpoint partition, re-analyse a stored round."""

from __future__ import annotations

import dagster as dg

from dapo_ops.config.dapo import DapoConfig
from pipelines.assets import checkpoints
from pipelines.config import REANALYSIS_ASSETS, RESOURCE_KEY, ROUND_ASSETS, SETUP_ASSETS

# Every run of a job carries its `dapo/kind` tag (filter by it in the runs view); `make run` executes these jobs
# too, so its runs are listed under their job's name like those launched from the UI or the sensor.
setup_run_job = dg.define_asset_job(
    "setup_run", selection=list(SETUP_ASSETS), tags={"dapo/kind": "setup"},
    description="Validate (or generate) the dataset and build ckpt-0000.",
)
training_round_job = dg.define_asset_job(
    "training_round", selection=list(ROUND_ASSETS), partitions_def=checkpoints, tags={"dapo/kind": "round"},
    description="One GRPO/DAPO round on checkpoint k: rollouts → attention → rewards → update → reports.",
)
# What the launchpad scaffolds for a partition: launches as is (the default run), and shows the two knobs a
# re-analysis changes; every other field keeps the default it has in the training_config resource.
REANALYSIS_DEFAULTS = {"resources": {RESOURCE_KEY: {"config": {
    "run_name": DapoConfig.field_default("run_name"), "reanalysis": True,
    "mdi_tolerance": DapoConfig.field_default("mdi_tolerance")}}}}
reanalysis_job = dg.define_asset_job(
    "reanalysis", selection=list(REANALYSIS_ASSETS), partitions_def=checkpoints, config=REANALYSIS_DEFAULTS,
    tags={"dapo/kind": "reanalysis"},
    description="Re-run only the attention analysis of a stored round (optionally with another mdi_tolerance); "
                "rollouts, rewards and checkpoints are left untouched.",
)
