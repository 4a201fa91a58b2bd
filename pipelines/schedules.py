"""Scheduled retraining: continue the latest run from its newest checkpoint for a few more rounds."""


import os

import dagster as dg

from pipelines.config import TrainingConfig, run_config_for
from pipelines.jobs import training_round_job
from pipelines.resources import RunStoreResource

RETRAIN_CRON = os.environ.get("DAPO_RETRAIN_CRON", "0 3 * * *")


def latest_run_name(run_store: RunStoreResource) -> str | None:
    runs = run_store.root() / "runs"
    configs = sorted(runs.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if runs.exists() else []
    return configs[-1].parent.name if configs else None


def retrain_request(run_store: RunStoreResource, *, run_name: str | None, rounds: int,
                    tick: str) -> dg.RunRequest | dg.SkipReason:
    from dapo_ops.store.layout import checkpoint_index, read_json

    name = run_name or latest_run_name(run_store)
    if name is None:
        return dg.SkipReason(f"no training run under {run_store.root() / 'runs'} to continue")
    store = run_store.for_run(name)
    latest = store.latest_checkpoint()
    if latest is None:
        return dg.SkipReason(f"run {name!r} has no complete checkpoint yet")
    config = TrainingConfig(**{**read_json(store.config_path), "max_rounds": checkpoint_index(latest) + rounds})
    return dg.RunRequest(
        run_key=f"retrain:{name}:{latest}:{tick}",
        partition_key=latest,
        run_config=run_config_for(config),
        tags={"dapo/run_name": name, "dapo/trigger": "retrain"},
    )


@dg.schedule(cron_schedule=RETRAIN_CRON, job=training_round_job, default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Continue the latest run (or DAPO_RETRAIN_RUN_NAME) from its newest checkpoint for "
                         "DAPO_RETRAIN_ROUNDS rounds (default 2); the next_round_sensor chains the rounds.")
def retrain(context: dg.ScheduleEvaluationContext, run_store: RunStoreResource):
    rounds = int(os.environ.get("DAPO_RETRAIN_ROUNDS", "2"))
    tick = context.scheduled_execution_time.isoformat()
    return retrain_request(run_store, run_name=os.environ.get("DAPO_RETRAIN_RUN_NAME"), rounds=rounds, tick=tick)
