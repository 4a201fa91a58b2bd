"""The asset graph: dataset → base_checkpoint → (per checkpoint) rollouts → attention_metrics → rewards →
policy_update → attention_report, training_report. Thin: each asset calls `dapo_ops.training`, moves files
and attaches metadata. Heavy imports (torch, transformers, mlflow) happen inside the assets, so loading the
code location stays fast."""


import base64
import json
import re
import time
from pathlib import Path

import dagster as dg

from dapo_ops import faults
from dapo_ops.store import checkpoint_index, checkpoint_key, write_json_atomic, write_text_atomic
from pipelines.config import TrainingConfig
from pipelines.resources import MlflowResource, PolicyCache, RunStoreResource

GROUP = "dapo"
checkpoints = dg.DynamicPartitionsDefinition(name="checkpoints")


def _round_log(context: dg.AssetExecutionContext, store, key: str):
    from dapo_ops.training import round_log

    return round_log(store, key, echo=None)


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


def _run_tags(context: dg.AssetExecutionContext, run_name: str, key: str | None = None) -> dict[str, str]:
    tags = {"dagster.run_id": context.run.run_id, "dapo.run_name": run_name}
    if key:
        tags["dapo.checkpoint"] = key
    return tags


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def dataset(context: dg.AssetExecutionContext, config: TrainingConfig,
            run_store: RunStoreResource) -> dg.MaterializeResult:
    """Validated train/eval tables in the A-OKVQA layout, plus the quarantined rows and their reasons."""
    from dapo_ops import training

    cfg = config.to_dapo()
    store = run_store.for_run(cfg.run_name)
    write_json_atomic(store.config_path, cfg.to_dict())
    summary = training.prepare_dataset(cfg, store)
    faults.point("after_dataset")
    reasons = "\n".join(f"| {reason} | {count} |" for reason, count in sorted(summary.quarantine_reasons.items()))
    quarantine_path = store.data_dir / "quarantine.parquet"
    # Into ckpt-0000's round log too, so the count reaches run_terminal.md, not only the Dagster UI.
    line = (f"dataset: {summary.num_train} train, {summary.num_eval} eval, {summary.num_quarantined} quarantined "
            f"rows from {summary.source}")
    if summary.num_quarantined:
        counts = ", ".join(f"{n}x {reason}" for reason, n in sorted(summary.quarantine_reasons.items()))
        line += f" ({counts}; rows and reasons in {quarantine_path})"
    _round_log(context, store, checkpoint_key(0))(line)
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
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
def base_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig, run_store: RunStoreResource,
                    mlflow: MlflowResource, policy_cache: dg.ResourceParam[PolicyCache]) -> dg.MaterializeResult:
    """ckpt-0000: the embedded tiny Qwen2.5-VL (locally trained tokenizer, supervised warm start) or a
    real model directory. Registers the `ckpt-0000` partition. A complete ckpt-0000 (left by an interrupted
    setup, or a re-materialization) is kept, never rebuilt under checkpoints trained from it."""
    from dapo_ops import training

    cfg = config.to_dapo()
    store = run_store.for_run(cfg.run_name)
    key = checkpoint_key(0)
    log = _round_log(context, store, key)
    if store.is_complete_checkpoint(key):
        log(f"run {cfg.run_name}: {key} is complete; finishing the setup with it")
        policy = policy_cache.get(store, key, cfg)
        state = training.checkpoint_state(store, key)
    else:
        log(f"run {cfg.run_name}: building {key} from {cfg.model_name_or_path}")
        built = training.build_base_checkpoint(cfg, store, log)
        policy, state = built["policy"], built["state"]
        faults.point("after_base_checkpoint")
    evaluation = training.evaluate(cfg, store, policy)
    state = {**state, "eval": evaluation}
    write_json_atomic(store.checkpoint_dir(key) / training.STATE_FILE, state)
    log(f"{key}: eval accuracy {evaluation['eval/accuracy']:.3f}, format {evaluation['eval/format']:.3f}")
    policy_cache.put(store, key, policy, None)
    add_checkpoint_partitions(context.instance, [key])
    tracker = mlflow.tracker(store)
    tracker.start(params=cfg.to_dict(), tags=_run_tags(context, cfg.run_name, key))
    tracker.log_round(f"{key}-eval", step=0, metrics=evaluation)
    # Journaled (sent or pending): `make run` may skip the setup from now on.
    write_text_atomic(store.setup_marker, f"{key}\n")
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        "checkpoint": key,
        "path": dg.MetadataValue.path(str(store.checkpoint_dir(key))),
        "eval_accuracy": evaluation["eval/accuracy"],
        "eval_format": evaluation["eval/format"],
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[base_checkpoint], kinds={"pytorch", "parquet"})
def rollouts(context: dg.AssetExecutionContext, config: TrainingConfig, run_store: RunStoreResource,
             mlflow: MlflowResource, policy_cache: dg.ResourceParam[PolicyCache]) -> dg.MaterializeResult:
    """G completions per prompt sampled from checkpoint k (KV cache, batched, left padding)."""
    from dapo_ops import training

    cfg = config.to_dapo()
    key = context.partition_key
    store = run_store.for_run(cfg.run_name)
    store.require_checkpoint(key)
    log = _round_log(context, store, key)
    # A journal left by an MLflow outage is sent before new work (no duplicates: see dapo_ops.tracking).
    sent = mlflow.tracker(store).sync()
    if sent:
        log(f"sent {sent} journaled round(s) to MLflow")
    log(f"round {checkpoint_index(key)} of run {cfg.run_name}: config {json.dumps(cfg.to_dict(), sort_keys=True)}")
    policy = policy_cache.get(store, key, cfg)
    table = training.generate_round_rollouts(cfg, store, key, policy, log)
    sample = table.head(3).select("question", "completion").to_dicts()
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        "num_rollouts": table.height,
        "mean_completion_length": float(table["completion_length"].mean()),
        "eos_ratio": float(table["is_eos"].mean()),
        "sample": dg.MetadataValue.json(sample),
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[rollouts], kinds={"pytorch", "parquet"})
def attention_metrics(context: dg.AssetExecutionContext, config: TrainingConfig, run_store: RunStoreResource,
                      policy_cache: dg.ResourceParam[PolicyCache]) -> dg.MaterializeResult:
    """One teacher-forced pass with checkpoint k: old log-probs, entropy and per-stage modality attention
    (MDI, AEI) through the O(T)-memory attention function. Re-materializing it alone re-analyses a stored
    round without touching rollouts, rewards or checkpoints."""
    from dapo_ops import training
    from dapo_ops.config import STAGES

    cfg = config.to_dapo()
    key = context.partition_key
    store = run_store.for_run(cfg.run_name)
    log = _round_log(context, store, key)
    if config.reanalysis:
        log(f"re-analysis of {key} with mdi_tolerance {cfg.mdi_tolerance}")
    policy = policy_cache.get(store, key, cfg)
    table = training.compute_attention(cfg, store, key, policy, log, write_old_logps=not config.reanalysis)
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        "reanalysis": config.reanalysis,
        "mdi_tolerance": cfg.mdi_tolerance,
        **{f"mdi_{stage}": training.nanmean(table[f"attn/{stage}/mdi"]) for stage in STAGES},
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[attention_metrics], kinds={"parquet"},
          check_specs=[
              dg.AssetCheckSpec("format_collapse", asset="rewards"),
              dg.AssetCheckSpec("clipped_completions", asset="rewards"),
              dg.AssetCheckSpec("zero_variance_groups", asset="rewards"),
              dg.AssetCheckSpec("attention_reward_no_variance", asset="rewards"),
          ])
def rewards(context: dg.AssetExecutionContext, config: TrainingConfig, run_store: RunStoreResource):
    """Accuracy, think-format and attention-balance rewards, their weighted total, group advantages and
    the keep-mask of groups that enter the update; stores the attention values it used."""
    from dapo_ops import health, training

    cfg = config.to_dapo()
    key = context.partition_key
    store = run_store.for_run(cfg.run_name)
    log = _round_log(context, store, key)
    training.compute_rewards(cfg, store, key, log)
    metrics = training.batch_metrics(cfg, training.round_table(store, key))
    findings = health.reward_findings(metrics, mdi_weight=cfg.weights["mdi_reward"])
    _log_findings(log, findings)
    write_json_atomic(store.round(key).health_rewards, [f.to_dict() for f in findings])
    yield dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        "accuracy": metrics["rewards/mc_idx_reward/mean"],
        "format": metrics["rewards/think_format_reward/mean"],
        "mdi_reward": metrics["rewards/mdi_reward/mean"],
        "total_reward": metrics["rewards/total_reward"],
        "frac_reward_zero_std": metrics["frac_reward_zero_std"],
    })
    for finding in findings:
        yield _check_result(finding)


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[rewards], kinds={"pytorch"},
          check_specs=[
              dg.AssetCheckSpec("entropy_collapse", asset="policy_update"),
              dg.AssetCheckSpec("non_finite", asset="policy_update"),
          ])
def policy_update(context: dg.AssetExecutionContext, config: TrainingConfig, run_store: RunStoreResource,
                  policy_cache: dg.ResourceParam[PolicyCache]):
    """μ = num_iterations epochs of clipped policy-gradient steps; writes ckpt-(k+1) atomically and
    registers its partition. A NaN/Inf loss or gradient fails the round and writes nothing."""
    from dapo_ops import health, training
    from dapo_ops.update import NonFiniteUpdateError

    cfg = config.to_dapo()
    key = context.partition_key
    store = run_store.for_run(cfg.run_name)
    log = _round_log(context, store, key)
    child_metadata: dict = {}
    try:
        if cfg.num_processes > 1:
            record, child_metadata = _update_in_subprocesses(context, cfg, store, key, log, policy_cache)
        else:
            policy = policy_cache.get(store, key, cfg)
            optimizer = policy_cache.optimizer(store, key, cfg)
            ref_policy = None
            if cfg.beta > 0:
                from dapo_ops import models

                ref_policy = models.load_policy(training.resolve_model_dir(store, checkpoint_key(0)))
            record = training.run_update(cfg, store, key, policy, optimizer, log, ref_policy=ref_policy)
            policy_cache.put(store, record.next_checkpoint, policy, optimizer)
    except NonFiniteUpdateError as error:
        policy_cache.invalidate()
        log.error(str(error))
        finding = health.non_finite({"grad_norm" if "gradient" in str(error) else "loss": float("nan")})
        write_json_atomic(store.round(key).health_update, [finding.to_dict()])
        yield _check_result(finding)  # the failed health check is recorded with the failed round
        raise dg.Failure(description=str(error), metadata={"health": "non_finite"}) from error
    except BaseException:
        policy_cache.invalidate()
        raise
    next_key = record.next_checkpoint
    add_checkpoint_partitions(context.instance, [next_key])
    start_entropy = _start_entropy(store)
    metrics = {**record.summary, **record.eval}
    findings = health.update_findings(metrics, start_entropy=start_entropy)
    _log_findings(log, findings)
    write_json_atomic(store.round(key).health_update, [f.to_dict() for f in findings])
    yield dg.MaterializeResult(metadata={
        **child_metadata,
        "run_name": cfg.run_name,
        "num_processes": cfg.num_processes,
        "next_checkpoint": next_key,
        "global_step": record.global_step,
        "optimizer_steps": len(record.steps),
        "loss": record.loss,
        "entropy": record.summary["entropy"],
        "eval_accuracy": record.eval_accuracy,
        "path": dg.MetadataValue.path(str(store.checkpoint_dir(next_key))),
    })
    for finding in findings:
        yield _check_result(finding)


def _update_in_subprocesses(context: dg.AssetExecutionContext, cfg, store, key: str, log, policy_cache: PolicyCache):
    """The update on `num_processes` processes: `accelerate launch` of `pipelines.pipes_update` through
    Dagster Pipes. The children write ckpt-(k+1) and update.json as the in-process update does; rank 0
    reports its logs and materialization metadata back. Returns (update record, the child's metadata)."""
    import gc
    import warnings

    import torch

    from dapo_ops import distributed
    from dapo_ops.round_files import read_update_record
    from dapo_ops.update import NonFiniteUpdateError

    # The children load checkpoint k themselves: the parent's copy would only hold memory (rank 0 shares
    # its GPU), and after the update it is stale (the next asset reloads ckpt-(k+1) from disk).
    policy_cache.invalidate()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    launch = distributed.prepare_launch(cfg, store, key)
    log(f"launching the update on {cfg.num_processes} processes with accelerate ({launch.accelerate_config.name}) "
        f"through Dagster Pipes")
    try:
        with warnings.catch_warnings():  # Pipes' message reader flags a preview API on every launch
            warnings.simplefilter("ignore", dg.PreviewWarning)
            invocation = dg.PipesSubprocessClient(cwd=str(launch.cwd)).run(
                context=context, command=launch.command, env=launch.env, extras=launch.extras)
    except Exception as error:
        failure = distributed.read_failure(store, key)
        if failure and failure.get("kind") == distributed.NON_FINITE:
            raise NonFiniteUpdateError(failure["message"]) from error
        raise
    record = read_update_record(store, key)
    store.require_checkpoint(record.next_checkpoint)
    metadata: dict = {}
    for result in invocation.get_results():
        if isinstance(result, dg.MaterializeResult):
            metadata.update(result.metadata or {})
    return record, metadata


def _start_entropy(store) -> float | None:
    import polars as pl

    path = store.round(checkpoint_key(0)).attention_parquet
    if not path.exists():
        return None
    return float(pl.read_parquet(path)["entropy"].mean())


def _log_findings(log, findings) -> None:
    for finding in findings:
        if not finding.passed:
            log.warning(f"health check {finding.name}: {finding.message}. Remedy: {finding.remedy}")


def _check_result(finding) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=finding.name,
        passed=finding.passed,
        severity=dg.AssetCheckSeverity.ERROR if finding.severity == "ERROR" else dg.AssetCheckSeverity.WARN,
        metadata={"finding": finding.message, "remedy": finding.remedy, "value": float(finding.value)},
    )


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[attention_metrics], kinds={"markdown"})
def attention_report(context: dg.AssetExecutionContext, config: TrainingConfig, run_store: RunStoreResource,
                     mlflow: MlflowResource) -> dg.MaterializeResult:
    """attention_diagnostics.md (+ an attention-balance chart per stage). In a re-analysis it is logged to
    an MLflow run of its own, tagged with the training run and checkpoint."""
    import polars as pl

    from dapo_ops import charts, reports, training
    from dapo_ops.config import STAGES

    cfg = config.to_dapo()
    key = context.partition_key
    store = run_store.for_run(cfg.run_name)
    table = pl.read_parquet(store.round(key).attention_parquet)
    tolerance = float(table["mdi_tolerance"][0])
    out = store.reports_dir(key)
    stage_means = reports.attention_stage_means(table)
    chart = charts.attention_balance_png(stage_means, out / "attention_balance.png", tolerance=tolerance)
    text = reports.render_attention_diagnostics(table, run_name=cfg.run_name, checkpoint=key,
                                                mdi_tolerance=tolerance, chart_file=chart.name)
    path = write_text_atomic(out / "attention_diagnostics.md", text)
    if config.reanalysis:
        tracker = mlflow.tracker(store)
        metrics = {f"attention/{s}/{n}": stage_means[s][n] for s in STAGES for n in training.LOGGED_ATTENTION_NAMES}
        run_id = tracker.start_reanalysis_run(cfg.run_name, key, {"mdi_tolerance": tolerance,
                                                                   "dagster_run_id": context.run.run_id})
        tracker.log_reanalysis(run_id, metrics, {f"reports/{key}": [path, chart]})
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        "report": dg.MetadataValue.md(_inline_images(text, out)),
        "path": dg.MetadataValue.path(str(path)),
        "mdi_all": stage_means["all"]["mdi"],
    })


@dg.asset(group_name=GROUP, partitions_def=checkpoints, deps=[policy_update, attention_report],
          kinds={"markdown", "mlflow"})
def training_report(context: dg.AssetExecutionContext, config: TrainingConfig, run_store: RunStoreResource,
                    mlflow: MlflowResource) -> dg.MaterializeResult:
    """rollout_results.md and run_terminal.md, the 44 metrics (+ eval accuracy) in MLflow at the round's
    global step, learning curves, and the three reports attached to the MLflow run."""

    from dapo_ops import charts, reports, training
    from dapo_ops import store as store_io
    from dapo_ops.round_files import read_update_record

    cfg = config.to_dapo()
    key = context.partition_key
    store = run_store.for_run(cfg.run_name)
    log = _round_log(context, store, key)
    files = store.round(key)
    update = read_update_record(store, key)
    table = training.round_table(store, key)
    metrics = training.round_metrics(cfg, table, update)
    start = time.time()
    write_json_atomic(files.metrics, metrics)
    out = store.reports_dir(key)
    history = training.metrics_history(store)
    curves = charts.learning_curves_png(history, out / "learning_curves.png")
    rollout_md = reports.render_rollout_results(table, mdi_reward_stage=cfg.mdi_reward_stage, run_name=cfg.run_name,
                                                checkpoint=key)
    write_text_atomic(out / "rollout_results.md", rollout_md)
    faults.point("mid_report_write")
    findings = [*store_io.read_json(files.health_rewards), *store_io.read_json(files.health_update)]
    log(f"round {checkpoint_index(key)} done: reward {metrics['reward']:.3f}, accuracy "
        f"{metrics['rewards/mc_idx_reward/mean']:.3f}, eval accuracy {metrics['eval/accuracy']:.3f}, "
        f"MDI {metrics['attention/all/mdi']:.3f}, entropy {metrics['entropy']:.4f}")
    terminal = reports.render_run_terminal(log.lines(), metrics, run_name=cfg.run_name, checkpoint=key,
                                           health=findings)
    terminal_path = write_text_atomic(out / "run_terminal.md", terminal)
    tracker = mlflow.tracker(store)
    tracker.start(params=cfg.to_dict(), tags=_run_tags(context, cfg.run_name, key))
    artifacts = {f"reports/{key}": [out / "rollout_results.md", out / "attention_diagnostics.md", terminal_path,
                                     curves, out / "attention_balance.png"]}
    sent = tracker.log_round(key, step=update.global_step, metrics=metrics, artifacts=artifacts,
                             tags=_run_tags(context, cfg.run_name, key))
    if not sent:
        log.warning(f"MLflow at {mlflow.uri(store.root)} is unreachable: round {key} is journaled and will be sent "
                    f"later (make sync-mlflow)")
        # The report says so too; the journal sends the file as it is at sending time.
        terminal = reports.render_run_terminal(log.lines(), metrics, run_name=cfg.run_name, checkpoint=key,
                                               health=findings)
        write_text_atomic(terminal_path, terminal)
    summary_md = (f"![Learning curves]({curves.name})\n\n| Metric | Value |\n|---|---|\n" + "\n".join(
        f"| {name} | {metrics[name]:.4f} |" for name in (
            "reward", "rewards/mc_idx_reward/mean", "eval/accuracy", "rewards/think_format_reward/mean",
            "attention/all/mdi", "entropy", "completions/mean_length")))
    # Marks the round finished for resumption (`make run` skips it from now on).
    faults.point("before_round_done")
    write_text_atomic(files.done, f"{time.time() - start:.3f}\n")
    return dg.MaterializeResult(metadata={
        "run_name": cfg.run_name,
        "global_step": update.global_step,
        "summary": dg.MetadataValue.md(_inline_images(summary_md, out)),
        # The file holds every rollout; the UI shows the tables and the first samples.
        "rollout_results": dg.MetadataValue.md(reports.render_rollout_results(
            table, mdi_reward_stage=cfg.mdi_reward_stage, run_name=cfg.run_name, checkpoint=key, max_samples=8)),
        "run_terminal": dg.MetadataValue.md(terminal),
        "mlflow_logged": sent,
        "reports": dg.MetadataValue.path(str(out)),
        **{name: float(metrics[name]) for name in ("reward", "eval/accuracy", "entropy")},
    })


ALL_ASSETS = [dataset, base_checkpoint, rollouts, attention_metrics, rewards, policy_update, attention_report,
              training_report]
