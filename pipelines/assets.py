"""The asset graph: dataset → base_checkpoint → (per checkpoint) rollouts → attention_metrics → rewards →
policy_update → attention_report, training_report. Thin: each asset calls `dapo_ops.run.phases`, moves files
and attaches metadata. Heavy imports (torch, transformers, mlflow) happen inside the assets, so loading the
code location stays fast."""


import base64
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from dapo_ops.common.names import EVAL_ACCURACY, EVAL_FORMAT, attention_metric, attn_column, reward_metric
from dapo_ops.rl.rewards import ACCURACY_REWARDS
from dapo_ops.run.policy_cache import PolicyCache
from dapo_ops.run.resume import EVAL_DROP_CHECK
from dapo_ops.store.layout import (
    checkpoint_index,
    checkpoint_key,
    write_text_atomic,
)
from pipelines.config import TrainingConfig
from pipelines.resources import MlflowResource, RunStoreResource

if TYPE_CHECKING:
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.run.phases import RoundLog
    from dapo_ops.run.round import Launch
    from dapo_ops.store.layout import RunStore

GROUP = "dapo"
checkpoints = dg.DynamicPartitionsDefinition(name="checkpoints")


def _open(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
          key: str | None = None) -> "tuple[DapoConfig, RunStore, str, RoundLog]":
    """What every asset starts from: the run's validated config, its store, the asset's checkpoint (its
    partition, or `key`) and that round's log."""
    from dapo_ops.run.phases import round_log

    cfg = training_config.to_dapo()
    store = run_store.for_run(cfg.run_name)
    key = key or context.partition_key
    return cfg, store, key, round_log(store, key, echo=None)


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s:]+\.png)\)")
MAX_INLINE_IMAGE_BYTES = 256_000


def _inline_images(markdown: str, folder: Path) -> str:
    """The report files link their charts by relative path, which the Dagster UI cannot load: embed each
    chart as a data URI (its markdown renderer allows them); one that is missing or too big becomes its path."""

    def embed(match: re.Match) -> str:
        alt, name = match.groups()
        path = folder / name
        if path.is_file() and path.stat().st_size <= MAX_INLINE_IMAGE_BYTES:
            return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
        return f"*{alt}: `{path}`*"

    return _IMAGE_LINK.sub(embed, markdown)


def add_checkpoint_partitions(instance: dg.DagsterInstance, keys: list[str]) -> None:
    """Register checkpoint partitions. Runs share the partition keys (every run has a ckpt-0000), and two
    `make run`s on one instance can race between Dagster's existence check and its insert."""
    for attempt in range(5):
        missing = [k for k in keys if not instance.has_dynamic_partition(checkpoints.name, k)]
        if not missing:
            return
        try:
            instance.add_dynamic_partitions(checkpoints.name, missing)
            return
        except Exception:  # noqa: BLE001 - SQLite IntegrityError / "database is locked": look again
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _checkpoint_model(cfg, store, key: str) -> dict:
    """What the tracker registers as checkpoint `key`'s MLflow logged model (see dapo_ops.tracking.logged_model)."""
    return {"name": key, "path": str(store.checkpoint_dir(key)), "max_completion_length": cfg.max_completion_length}


DAGSTER_UI_URL = os.environ.get("DAGSTER_UI_URL", "http://127.0.0.1:3000")


def _mlflow_link(mlflow: MlflowResource, store) -> dict:
    """`mlflow_run`: the URL of the run's MLflow page, once the run exists (metadata of every materialization)."""
    url = mlflow.tracker(store).run_url(mlflow.ui_url or None)
    return {"mlflow_run": dg.MetadataValue.url(url)} if url else {}


def _run_tags(context: dg.AssetExecutionContext, run_name: str, key: str | None = None) -> dict[str, str]:
    # The MLflow run links back to the Dagster run that last wrote it: its id and its page in the Dagster UI.
    tags = {"dagster.run_id": context.run.run_id, "dagster.run_url": f"{DAGSTER_UI_URL.rstrip('/')}/runs/"
            f"{context.run.run_id}", "dapo.run_name": run_name}
    if key:
        tags["dapo.checkpoint"] = key
    return tags


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def dataset(context: dg.AssetExecutionContext, training_config: TrainingConfig,
            run_store: RunStoreResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """Validated train/eval tables in the A-OKVQA layout, plus the quarantined rows and their reasons."""
    from dapo_ops.run import round as dapo_round
    cfg, store, _, log = _open(context, training_config, run_store, checkpoint_key(0))
    summary = dapo_round.dataset_phase(cfg, store, log)
    reasons = "\n".join(f"| {reason} | {count} |" for reason, count in sorted(summary.quarantine_reasons.items()))
    quarantine_path = store.data_dir / "quarantine.parquet"
    # The MLflow run exists from the first asset on, so every materialization can link it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an outage: base_checkpoint and the rounds report and journal it
        mlflow.tracker(store).start(params=cfg.to_dict(), tags=_run_tags(context, cfg.run_name))
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        **_mlflow_link(mlflow, store),
        "source": summary.source,
        "num_train": summary.num_train,
        "num_eval": summary.num_eval,
        "num_quarantined": summary.num_quarantined,
        "quarantine": dg.MetadataValue.md(
            "| Reason | Rows |\n|---|---|\n" + reasons if reasons else "No row was quarantined."
        ),
        "path": dg.MetadataValue.path(str(store.data_dir)),
        "quarantine_path": dg.MetadataValue.path(str(quarantine_path)),
    })


@dg.asset(group_name=GROUP, deps=[dataset], kinds={"pytorch"})
def base_checkpoint(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
                    mlflow: MlflowResource, policy_cache: dg.ResourceParam[PolicyCache]) -> dg.MaterializeResult:
    """ckpt-0000: the embedded tiny Qwen2.5-VL (locally trained tokenizer, supervised warm start) or a
    real model directory. Registers the `ckpt-0000` partition. A complete ckpt-0000 (left by an interrupted
    setup, or a re-materialization) is kept, never rebuilt under checkpoints trained from it."""
    from dapo_ops.run import round as dapo_round
    cfg, store, key, log = _open(context, training_config, run_store, checkpoint_key(0))
    evaluation = dapo_round.base_checkpoint_phase(cfg, store, log, policy_cache)
    add_checkpoint_partitions(context.instance, [key])
    tracker = mlflow.tracker(store)
    tracker.start(params=cfg.to_dict(), tags=_run_tags(context, cfg.run_name, key))
    # ckpt-0000 becomes the run's first logged model; the splits become its dataset inputs (source + digest).
    tracker.log_round(f"{key}-eval", step=0, metrics=evaluation, model=_checkpoint_model(cfg, store, key),
                      inputs=[{"name": f"{cfg.run_name}-{split}", "path": str(store.data_dir / f"{split}.parquet"),
                               "context": split} for split in ("train", "eval")])
    # Journaled (sent or pending): `make run` may skip the setup from now on.
    write_text_atomic(store.setup_marker, f"{key}\n")
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        **_mlflow_link(mlflow, store),
        "checkpoint": key,
        "path": dg.MetadataValue.path(str(store.checkpoint_dir(key))),
        "eval_accuracy": evaluation[EVAL_ACCURACY],
        "eval_format": evaluation[EVAL_FORMAT],
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[base_checkpoint], kinds={"pytorch", "parquet"})
def rollouts(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
             mlflow: MlflowResource, policy_cache: dg.ResourceParam[PolicyCache]) -> dg.MaterializeResult:
    """G completions per prompt sampled from checkpoint k (KV cache, batched, left padding)."""
    from dapo_ops.run import round as dapo_round
    cfg, store, key, log = _open(context, training_config, run_store)
    store.require_checkpoint(key)
    # A journal left by an MLflow outage is sent before new work (no duplicates: see dapo_ops.tracking.facade).
    sent = mlflow.tracker(store).sync()
    if sent:
        log(f"sent {sent} journaled round(s) to MLflow")
    result = dapo_round.rollouts_phase(cfg, store, key, log, policy_cache, launch=_launcher(context, store, key,
                                                                                            log))
    child, table = result.launched, result.table
    sample = table.head(3).select("question", "completion").to_dicts()
    return dg.MaterializeResult(metadata={
        **child,
        "run_name": cfg.run_name,
        "num_processes": cfg.num_processes,
        **_mlflow_link(mlflow, store),
        "num_rollouts": table.height,
        "mean_completion_length": float(table["completion_length"].mean()),
        "eos_ratio": float(table["is_eos"].mean()),
        "sample": dg.MetadataValue.json(sample),
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[rollouts], kinds={"pytorch", "parquet"})
def attention_metrics(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
                      mlflow: MlflowResource, policy_cache: dg.ResourceParam[PolicyCache]) -> dg.MaterializeResult:
    """One teacher-forced pass with checkpoint k: old log-probs, entropy and per-stage modality attention
    (MDI, AEI) through the O(T)-memory attention function. Re-materializing it alone re-analyses a stored
    round without touching rollouts, rewards or checkpoints."""
    from dapo_ops.config.dapo import STAGES
    from dapo_ops.run import phases as training
    from dapo_ops.run import round as dapo_round

    cfg, store, key, log = _open(context, training_config, run_store)
    result = dapo_round.attention_phase(cfg, store, key, log, policy_cache, launch=_launcher(context, store, key,
                                                                                            log),
                                        reanalysis=training_config.reanalysis)
    child, table = result.launched, result.table
    return dg.MaterializeResult(metadata={
        **child,
        "run_name": cfg.run_name,
        **_mlflow_link(mlflow, store),
        "num_processes": cfg.num_processes,
        "reanalysis": training_config.reanalysis,
        "mdi_tolerance": cfg.mdi_tolerance,
        **{f"mdi_{stage}": training.nanmean(table[attn_column(stage, "mdi")]) for stage in STAGES},
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[attention_metrics], kinds={"parquet"},
          check_specs=[
              dg.AssetCheckSpec("format_collapse", asset="rewards"),
              dg.AssetCheckSpec("clipped_completions", asset="rewards"),
              dg.AssetCheckSpec("zero_variance_groups", asset="rewards"),
              dg.AssetCheckSpec("attention_reward_no_variance", asset="rewards"),
          ])
def rewards(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
            mlflow: MlflowResource):
    """The configured rewards (`reward_funcs`: accuracy, think-format and attention balance by default), their
    weighted total, group advantages and the keep-mask of groups that enter the update; stores the attention
    values it used."""
    from dapo_ops.reporting.reports import reward_label
    from dapo_ops.run import round as dapo_round

    cfg, store, key, log = _open(context, training_config, run_store)
    metrics, findings = dapo_round.rewards_phase(cfg, store, key, log)
    yield dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        **_mlflow_link(mlflow, store),
        **{reward_label(name): metrics[f"rewards/{name}/mean"] for name in cfg.reward_names},
        "total_reward": metrics["rewards/total_reward"],
        "frac_reward_zero_std": metrics["frac_reward_zero_std"],
    })
    for finding in findings:
        yield _check_result(finding)


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[rewards], kinds={"pytorch"},
          check_specs=[
              dg.AssetCheckSpec("entropy_collapse", asset="policy_update"),
              dg.AssetCheckSpec("non_finite", asset="policy_update"),
              # Blocking: a failed eval check skips the round's reports (the round stays undone), and the
              # next-round sensor and `make run` refuse to continue from the checkpoint (dapo_ops.run.resume).
              dg.AssetCheckSpec(EVAL_DROP_CHECK, asset="policy_update", blocking=True,
                                description="eval accuracy did not fall by more than max_eval_drop from the "
                                            "previous checkpoint"),
          ])
def policy_update(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
                  mlflow: MlflowResource, policy_cache: dg.ResourceParam[PolicyCache]):
    """μ = num_iterations epochs of clipped policy-gradient steps; writes ckpt-(k+1) atomically and
    registers its partition. A NaN/Inf loss or gradient fails the round and writes nothing."""
    from dapo_ops.run import round as dapo_round
    cfg, store, key, log = _open(context, training_config, run_store)
    try:
        result = dapo_round.update_phase(cfg, store, key, log, policy_cache,
                                         launch=_launcher(context, store, key, log))
    except dapo_round.NonFiniteRoundError as error:
        yield _check_result(error.finding)  # the failed health check is recorded with the failed round
        raise dg.Failure(description=str(error), metadata={"health": "non_finite"}) from error
    record, child_metadata = result.record, result.launched
    next_key = record.next_checkpoint
    add_checkpoint_partitions(context.instance, [next_key])
    _observe_pruned(context, store)
    yield dg.MaterializeResult(metadata={
        **child_metadata,
        "run_name": cfg.run_name,
        **_mlflow_link(mlflow, store),
        "num_processes": cfg.num_processes,
        "next_checkpoint": next_key,
        "global_step": record.global_step,
        "optimizer_steps": len(record.steps),
        **({"loss": record.loss} if record.steps else {}),  # absent: no optimizer step, nothing measured
        "entropy": record.summary["entropy"],
        "eval_accuracy": record.eval_accuracy,
        "path": dg.MetadataValue.path(str(store.checkpoint_dir(next_key))),
    })
    for finding in result.findings:
        yield _check_result(finding)


def _observe_pruned(context: dg.AssetExecutionContext, store) -> None:
    """Partitions whose weights `save_total_limit` deleted show as not re-analysable on attention_metrics (an
    observation per partition, once); their rollouts, rewards and reports stay materialized."""
    from dapo_ops.run import retention

    for key in retention.pruned_checkpoints(store):
        marker = store.checkpoint_dir(key) / retention.PRUNED_MARKER
        observed = store.checkpoint_dir(key) / retention.OBSERVED_MARKER
        if observed.exists():
            continue
        context.log_event(dg.AssetObservation(
            asset_key="attention_metrics", partition=key,
            metadata={"reanalysable": False, "pruned": marker.read_text(encoding="utf-8").strip(),
                      "checkpoint": dg.MetadataValue.path(str(store.checkpoint_dir(key)))}))
        write_text_atomic(observed, "")


def pipes_client_class(deployment) -> type:
    """The Dagster Pipes client class `deployment` names (e.g. `dagster_k8s.PipesK8sClient`)."""
    import importlib

    module, _, name = deployment.pipes_client.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"configs/deploy/{deployment.name}.yaml names pipes_client {deployment.pipes_client}, "
                          f"which cannot be imported ({error}); install its package (e.g. pip install "
                          f"{module.replace('_', '-')})") from error


def pipes_client_for(deployment, launch) -> tuple[dg.PipesClient, dict]:
    """The client that starts the ranks, and the extra `run` arguments of the deployment (a subprocess
    client runs in the repository; a pod gets the image, namespace and pod spec of the config)."""
    cls = pipes_client_class(deployment)
    if issubclass(cls, dg.PipesSubprocessClient):
        return cls(cwd=str(launch.cwd)), dict(deployment.run_args)
    return cls(), dict(deployment.run_args)


def _launcher(context: dg.AssetExecutionContext, store, key: str, log) -> "Launch":
    """The round's `Launch` (see dapo_ops.run.round): a phase (rollouts, attention, update) on `num_processes`
    processes, `accelerate launch` of `pipelines.pipes_update --phase` through Dagster Pipes under the
    supervisor (no orphans, a dead rank named). Rank 0 writes the phase's round files and reports its logs and
    metadata back; the launch returns that metadata."""

    def launch(phase: str, cfg, *, reanalysis: bool = False) -> dict:
        from dapo_ops.distributed import launch as distributed
        from dapo_ops.distributed import process_hygiene
        from dapo_ops.train.update import NonFiniteUpdateError

        launch = distributed.prepare_launch(cfg, store, key, phase=phase, reanalysis=reanalysis,
                                            child_module="pipelines.pipes_update")
        what = "the update" if phase == distributed.UPDATE else phase
        log(f"launching {what} on {cfg.num_processes} processes with accelerate ({launch.accelerate_config.name}) "
            f"through Dagster Pipes")
        try:
            with warnings.catch_warnings():  # Pipes' message reader flags a preview API on every launch
                warnings.simplefilter("ignore", dg.PreviewWarning)
                client, run_args = pipes_client_for(distributed.deployment(), launch)
                invocation = client.run(context=context, command=launch.supervised, env=launch.env,
                                        extras=launch.extras, **run_args)
        except Exception as error:
            failure = distributed.read_failure(store, key, phase)
            if failure and failure.get("kind") == distributed.NON_FINITE:
                raise NonFiniteUpdateError(failure["message"]) from error
            if failure and failure.get("kind") == process_hygiene.RANK_FAILED:
                log.error(failure["message"])
                raise dg.Failure(description=failure["message"],
                                 metadata={f"{phase}_failure": failure["kind"]}) from error
            raise
        finally:
            # However the call ended (interrupted, failed), nothing it started outlives it.
            process_hygiene.kill_supervisors()
        metadata: dict = {}
        for result in invocation.get_results():
            if isinstance(result, dg.MaterializeResult):
                metadata.update(result.metadata or {})
        return metadata

    return launch


def _check_result(finding) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=finding.name,
        passed=finding.passed,
        severity=dg.AssetCheckSeverity.ERROR if finding.severity == "ERROR" else dg.AssetCheckSeverity.WARN,
        metadata={"finding": finding.message, "remedy": finding.remedy, "value": float(finding.value)},
    )


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[attention_metrics], kinds={"markdown"})
def attention_report(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
                     mlflow: MlflowResource) -> dg.MaterializeResult:
    """attention_diagnostics.md (+ an attention-balance chart per stage). In a re-analysis it is logged to
    an MLflow run of its own, tagged with the training run and checkpoint."""
    from dapo_ops.run import round as dapo_round
    cfg, store, key, _ = _open(context, training_config, run_store)
    report = dapo_round.write_attention_report(store, key)
    if training_config.reanalysis:
        tracker = mlflow.tracker(store)
        metrics = report.metrics()
        run_id = tracker.start_reanalysis_run(cfg.run_name, key, {"mdi_tolerance": report.tolerance,
                                                                   "dagster_run_id": context.run.run_id})
        charts = [report.chart] + ([report.visual_chart] if report.visual_chart is not None else [])
        tracker.log_reanalysis(run_id, metrics, {f"reports/{key}": [report.path, *charts]})
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        **_mlflow_link(mlflow, store),
        "report": dg.MetadataValue.md(_inline_images(report.text, store.reports_dir(key))),
        "path": dg.MetadataValue.path(str(report.path)),
        "mdi_all": report.stage_means["all"]["mdi"],
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[policy_update, attention_report],
          kinds={"markdown", "mlflow"})
def training_report(context: dg.AssetExecutionContext, training_config: TrainingConfig, run_store: RunStoreResource,
                    mlflow: MlflowResource) -> dg.MaterializeResult:
    """rollout_results.md and run_terminal.md, the 44 metrics (+ eval accuracy) in MLflow at the round's
    global step, learning curves, and the three reports attached to the MLflow run."""
    from dapo_ops.reporting import reports
    from dapo_ops.run import round as dapo_round
    from dapo_ops.run.round_files import read_update_record

    cfg, store, key, log = _open(context, training_config, run_store)
    update = read_update_record(store, key)
    written = dapo_round.write_round_reports(cfg, store, key, log, update)
    metrics, table, curves, out = written.metrics, written.table, written.curves, store.reports_dir(key)
    tracker = mlflow.tracker(store)
    tracker.start(params=cfg.to_dict(), tags=_run_tags(context, cfg.run_name, key))
    sent = tracker.log_round(key, step=update.global_step, metrics=metrics,
                             artifacts=written.artifacts(key), tags=_run_tags(context, cfg.run_name, key),
                             model=_checkpoint_model(cfg, store, update.next_checkpoint), tables=written.tables(key))
    if checkpoint_index(key) + 1 >= cfg.max_rounds:
        # The round that reaches max_rounds ends the MLflow run FINISHED (what ends rounds that `dagster dev`'s
        # sensor launches; `make run` also ends it, FAILED/KILLED too, in pipelines.cli). A later round reopens it.
        tracker.end("FINISHED")
    if not sent:
        log.warning(f"MLflow at {mlflow.uri(store.root)} is unreachable: round {key} is journaled and will be sent "
                    f"later (make sync-mlflow)")
        # The report says so too; the journal sends the file as it is at sending time.
        dapo_round.rewrite_terminal(cfg, key, log, written)
    terminal = written.terminal
    summary_md = (f"![Learning curves]({curves.name})\n\n| Metric | Value |\n|---|---|\n" + "\n".join(
        f"| {name} | {metrics[name]:.4f} |" for name in (
            "reward", *[reward_metric(n, "mean") for n in ACCURACY_REWARDS if n in cfg.reward_names], EVAL_ACCURACY,
            reward_metric("think_format_reward", "mean"), attention_metric("all", "mdi"), "entropy",
            "completions/mean_length")
        if name in metrics))
    dapo_round.mark_done(store, key, written.started)
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        **_mlflow_link(mlflow, store),
        "global_step": update.global_step,
        "summary": dg.MetadataValue.md(_inline_images(summary_md, out)),
        # The `report_samples` sample, as the MLflow table of the round shows it (all_rollouts.parquet has all).
        "rollout_sample": dg.MetadataValue.md(_inline_images(written.sample.markdown, out)),
        "all_rollouts": dg.MetadataValue.path(str(written.sample.all_rollouts)),
        # The UI shows the tables and the first samples.
        "rollout_results": dg.MetadataValue.md(reports.render_rollout_results(
            table, mdi_reward_stage=cfg.mdi_reward_stage, run_name=cfg.run_name, checkpoint=key, max_samples=8,
            reward_names=cfg.reward_names, report_samples=cfg.report_samples)),
        "run_terminal": dg.MetadataValue.md(terminal),
        "mlflow_logged": sent,
        "reports": dg.MetadataValue.path(str(out)),
        **{name: float(metrics[name]) for name in ("reward", EVAL_ACCURACY, "entropy")},
    })


ALL_ASSETS = [dataset, base_checkpoint, rollouts, attention_metrics, rewards, policy_update, attention_report,
              training_report]
