"""Continue training: when `policy_update[k]` registers ckpt-(k+1), launch round k+1 until `max_rounds`.

Why a sensor and not declarative automation (`AutomationCondition`): round k+1 is partition ckpt-(k+1) of
the same assets, and its input is `policy_update[ckpt-k]`, i.e. the asset's own previous partition. Dagster
models such self-dependencies only through time-window partition mappings; for dynamic partitions there is
no mapping from ckpt-(k+1) to ckpt-k, so no automation condition can see that round k+1 became ready. The
stop conditions (`max_rounds`, the blocking eval check) are run state, not partition state, too. An
`asset_sensor` on `policy_update` is Dagster's built-in way to react to one asset's materializations.
"""


import dagster as dg

from dapo_ops.store.layout import checkpoint_index
from pipelines.checks import blocked_message, eval_drop_finding
from pipelines.config import TrainingConfig, run_config_for
from pipelines.jobs import training_round_job
from pipelines.resources import RunStoreResource


def next_round_request(run_name: str, next_key: str, store_root: RunStoreResource) -> dg.RunRequest | dg.SkipReason:
    from dapo_ops.store.layout import read_json

    store = store_root.for_run(run_name)
    if not store.config_path.exists():
        return dg.SkipReason(f"run {run_name!r} has no config.json at {store.config_path}")
    config = TrainingConfig(**read_json(store.config_path))
    if checkpoint_index(next_key) >= config.max_rounds:
        return dg.SkipReason(f"run {run_name!r} reached max_rounds={config.max_rounds} at {next_key}")
    if not store.is_complete_checkpoint(next_key):
        return dg.SkipReason(f"{next_key} of run {run_name!r} is not complete")
    finding = eval_drop_finding(config.to_dapo(), store, next_key)
    if finding is not None and not finding.passed:
        return dg.SkipReason(f"run {run_name!r} stops at {next_key}: {blocked_message(finding)}")
    return dg.RunRequest(
        run_key=f"{run_name}:{next_key}",
        partition_key=next_key,
        run_config=run_config_for(config),
        tags={"dapo/run_name": run_name},
    )


@dg.asset_sensor(asset_key=dg.AssetKey("policy_update"), job=training_round_job,
                 default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=5)
def next_round_sensor(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry, run_store: RunStoreResource):
    """Launches the next training round after each policy update, up to the run's `max_rounds`."""
    materialization = asset_event.asset_materialization
    if materialization is None:
        return dg.SkipReason("no materialization")
    metadata = materialization.metadata
    run_name = metadata["run_name"].value if "run_name" in metadata else None
    next_key = metadata["next_checkpoint"].value if "next_checkpoint" in metadata else None
    if not run_name or not next_key:
        return dg.SkipReason("policy_update materialization without run_name/next_checkpoint metadata")
    return next_round_request(str(run_name), str(next_key), run_store)
