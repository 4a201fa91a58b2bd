"""The round, without an orchestrator: one function per phase (`rollouts_phase` ... `update_phase`, the reports
and the DONE marker), each with what goes around its library step (the config record, health findings and
their files, the reference policy, in this process or on `num_processes` ranks through the caller's launcher),
and `run_round`, which runs them in the order of the asset graph. Each Dagster asset calls one phase; the
GPU script, the benchmarks and the tests call `run_round`, so all of them run the same round.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

from dapo_ops.common import faults
from dapo_ops.common.names import EVAL_ACCURACY, EVAL_FORMAT, attention_metric
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.data import loading as data
from dapo_ops.models import loading as models
from dapo_ops.reporting import charts, health, reports
from dapo_ops.reporting.health import Finding
from dapo_ops.rollout.engines import RolloutEngine
from dapo_ops.run import phases as training
from dapo_ops.run import resume, retention
from dapo_ops.run.policy_cache import PolicyCache
from dapo_ops.run.round_files import UpdateRecord, read_update_record
from dapo_ops.store import layout as store
from dapo_ops.store.layout import RunStore, checkpoint_index, checkpoint_key, resolve_model_dir
from dapo_ops.train.update import NonFiniteUpdateError

# ------------------------------------------------------------------------------------------- config


def config_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`name old -> new` for every field that differs (added and removed fields included)."""
    missing = object()
    changed = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, missing), after.get(name, missing)
        if old != new:
            changed.append(f"{name} {'(unset)' if old is missing else json.dumps(old)} -> "
                           f"{'(unset)' if new is missing else json.dumps(new)}")
    return changed


def record_config(config: DapoConfig, run_store: RunStore, log: training.RoundLog) -> list[str]:
    """Keep the run's config.json equal to the config the round runs with. The full config is logged once,
    at run start (and sent to MLflow as params); a resumed run that changes something logs one line."""
    values = config.to_dict()
    path = run_store.config_path
    if path.exists():
        changed = config_diff(store.read_json(path), values)
        if not changed:
            return []
        log(f"config changed since {path.name}: {'; '.join(changed)}")
    else:
        changed = config_diff({}, values)
    store.write_json_atomic(path, values)
    return changed


# ------------------------------------------------------------------------------------------- health


def log_findings(log: training.RoundLog, findings: list[Finding]) -> None:
    for finding in findings:
        if not finding.passed:
            log.warning(f"health check {finding.name}: {finding.message}. Remedy: {finding.remedy}")


def _write_findings(path: Path, findings: list[Finding]) -> None:
    store.write_json_atomic(path, [f.to_dict() for f in findings])


def reward_health(config: DapoConfig, run_store: RunStore, key: str, log: training.RoundLog,
                  metrics: dict[str, float]) -> list[Finding]:
    """The reward checks of a scored round (`metrics` from `training.batch_metrics`), logged and written."""
    findings = health.reward_findings(metrics, weights=config.weights)
    log_findings(log, findings)
    _write_findings(run_store.round(key).health_rewards, findings)
    return findings


def start_entropy(run_store: RunStore) -> float | None:
    """The sampling entropy of the run's first round: the baseline of the entropy-collapse check."""
    path = run_store.round(checkpoint_key(0)).attention_parquet
    if not path.exists():
        return None
    return float(pl.read_parquet(path)["entropy"].mean())


def update_health(run_store: RunStore, key: str, log: training.RoundLog,
                  metrics: dict[str, float]) -> list[Finding]:
    """The update checks (`metrics`: the update summary and eval), logged and written."""
    findings = health.update_findings(metrics, start_entropy=start_entropy(run_store))
    log_findings(log, findings)
    _write_findings(run_store.round(key).health_update, findings)
    return findings


def non_finite_health(run_store: RunStore, key: str, log: training.RoundLog, error: Exception) -> Finding:
    """The failed `non_finite` check of an update that stopped on a NaN/Inf, logged and written."""
    log.error(str(error))
    finding = health.non_finite({"grad_norm" if "gradient" in str(error) else "loss": float("nan")})
    _write_findings(run_store.round(key).health_update, [finding])
    return finding


def round_findings(run_store: RunStore, key: str) -> list[dict[str, Any]]:
    files = run_store.round(key)
    return [*store.read_json(files.health_rewards), *store.read_json(files.health_update)]


# ------------------------------------------------------------------------------------------ reports


@dataclass
class AttentionReport:
    text: str
    path: Path
    chart: Path
    tolerance: float
    stage_means: dict[str, dict[str, float]]
    visual: dict[str, float] | None = None  # the visual-dependency values (None without the masked pass)
    visual_chart: Path | None = None

    def metrics(self) -> dict[str, float]:
        """What a re-analysis logs to its MLflow run: the per-stage attention metrics, and the masked pass's
        values with the checkpoint's blind eval (the finite ones)."""
        from dapo_ops.attention.metrics import LOGGED_METRIC_NAMES

        out = {attention_metric(stage, name): self.stage_means[stage][name]
               for stage in self.stage_means for name in LOGGED_METRIC_NAMES}
        out.update({k: v for k, v in (self.visual or {}).items()
                    if k != "abs_log_mdi_kl_correlation" and math.isfinite(v)})
        return out


VISUAL_CHART = "visual_dependency.png"


def checkpoint_evaluation(run_store: RunStore, key: str) -> dict[str, float]:
    """The eval metrics of checkpoint `key` itself: a re-analysis's own (attention.json), else those written
    with the checkpoint (state.json); empty when neither has any."""
    attention_json = run_store.round(key).attention_json
    if attention_json.exists():
        found = store.read_json(attention_json).get("eval")
        if found:
            return dict(found)
    state = run_store.checkpoint_dir(key) / training.STATE_FILE
    return dict(store.read_json(state).get("eval") or {}) if state.exists() else {}


def visual_history(run_store: RunStore, key: str) -> list[dict[str, float]]:
    """Per round up to `key` whose attention table has the masked pass's columns: mean |ln MDI| (stage all)
    and mean visual KL over completions and answers."""
    history = []
    for k in range(checkpoint_index(key) + 1):
        path = run_store.round(checkpoint_key(k)).attention_parquet
        if not path.exists():
            continue
        table = pl.read_parquet(path)
        if "visual/kl_mean" not in table.columns:
            continue
        history.append({"round": k, "abs_log_mdi": reports.mean_std(reports.abs_log_mdi(table["attn/all/mdi"]))[0],
                        "kl_mean": reports.mean_std(table["visual/kl_mean"])[0],
                        "kl_answer": reports.mean_std(table["visual/kl_answer"])[0]})
    return history


def write_attention_report(run_store: RunStore, key: str) -> AttentionReport:
    """attention_diagnostics.md, its attention-balance chart and (with the masked pass) the per-round chart of
    |ln MDI| and visual KL, from the round's attention.parquet and the checkpoint's eval."""
    table = pl.read_parquet(run_store.round(key).attention_parquet)
    tolerance = float(table["mdi_tolerance"][0])
    out = run_store.reports_dir(key)
    stage_means = reports.attention_stage_means(table)
    chart = charts.attention_balance_png(stage_means, out / "attention_balance.png", tolerance=tolerance)
    evaluation = checkpoint_evaluation(run_store, key)
    visual, visual_chart = None, None
    if "visual/kl_mean" in table.columns:
        visual = reports.visual_dependency_summary(table, evaluation)
        visual_chart = charts.visual_dependency_png(visual_history(run_store, key), out / VISUAL_CHART)
    text = reports.render_attention_diagnostics(table, run_name=run_store.run_name, checkpoint=key,
                                                mdi_tolerance=tolerance, chart_file=chart.name, evaluation=evaluation,
                                                visual_chart_file=None if visual_chart is None else visual_chart.name)
    path = store.write_text_atomic(out / "attention_diagnostics.md", text)
    return AttentionReport(text, path, chart, tolerance, stage_means, visual, visual_chart)


# The round's rollout sample in its reports folder (logged to MLflow under `reports/<key>/`).
ROLLOUT_TABLE = "rollout_table.json"  # an MLflow logged table (`MlflowClient.log_table`'s file format)
ROLLOUT_IMAGES = "rollout_images"  # the sampled prompts' images, full size (.png) and 256 px (.webp)
ALL_ROLLOUTS = "all_rollouts.parquet"  # every rollout of the round (the round table), linked by the reports
_THUMBNAIL_PX = 256  # the size MLflow's own log_table compresses table images to


@dataclass
class RolloutSample:
    """The `report_samples` sample of a round as written to its reports folder."""

    table: pl.DataFrame  # the sampled rows of the round table
    table_path: Path | None  # rollout_table.json; None when the sample is empty
    images_dir: Path
    all_rollouts: Path
    markdown: str  # the sample as a markdown table, images linked relative to the reports folder

    def artifact_table(self, key: str) -> str | None:
        return None if self.table_path is None else f"reports/{key}/{self.table_path.name}"


def _image_name(prompt_index: int, k: int = 0) -> str:
    """`prompt-0003` for a prompt's first image, `prompt-0003-2` for its second, ..."""
    return f"prompt-{prompt_index:04d}" + (f"-{k + 1}" if k else "")


def _prompt_images(run_store: RunStore, sample: pl.DataFrame) -> dict[int, list[Any]]:
    """The sampled prompts' images (PIL, every image in prompt order), by `prompt_index`, from the train split
    the round drew them from."""
    prompts = sample.unique("prompt_index", keep="first", maintain_order=True)
    wanted = dict(zip(prompts["question_id"].to_list(), prompts["prompt_index"].to_list(), strict=True))
    train = training.load_split(run_store, "train").filter(pl.col("question_id").is_in(list(wanted)))
    column = "images" if "images" in train.columns else "image"
    found = dict(zip(train["question_id"].to_list(), train[column].to_list(), strict=True))
    missing = [q for q in wanted if q not in found]
    if missing:
        raise ValueError(f"question_id(s) {', '.join(map(str, missing))} of the rollout sample are not in "
                         f"{run_store.data_dir / 'train.parquet'}")
    return {int(p): [data.decode_image(b) for b in (found[q] if column == "images" else [found[q]])]
            for q, p in wanted.items()}


def _encoded(image: Any, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_rollout_sample(config: DapoConfig, run_store: RunStore, key: str, table: pl.DataFrame) -> RolloutSample:
    """all_rollouts.parquet (the whole round table), and the `report_samples` sample as rollout_table.json plus
    its prompts' images: the MLflow table of the round (images at their artifact paths)."""
    out = run_store.reports_dir(key)
    all_rollouts = store.write_parquet_atomic(out / ALL_ROLLOUTS, table.sort("rollout_index"))
    sample = reports.sample_rollouts(table, config.report_samples)
    images_dir = out / ROLLOUT_IMAGES
    images = _prompt_images(run_store, sample) if sample.height else {}
    keep: set[str] = set()
    for prompt, prompt_images in images.items():
        for k, image in enumerate(prompt_images):
            name = _image_name(prompt, k)
            scale = _THUMBNAIL_PX / max(image.size)
            thumbnail = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
            store.write_bytes_atomic(images_dir / f"{name}.png", _encoded(image, "PNG"))
            store.write_bytes_atomic(images_dir / f"{name}.webp", _encoded(thumbnail, "WEBP"))
            keep |= {f"{name}.png", f"{name}.webp"}
    for stale in images_dir.glob("*") if images_dir.is_dir() else []:
        if stale.name not in keep:  # a sample of another report_samples
            stale.unlink()
    artifact_dir = f"reports/{key}/{ROLLOUT_IMAGES}"
    cells = {p: [{"type": "image", "filepath": f"{artifact_dir}/{_image_name(p, k)}.png",
                  "compressed_filepath": f"{artifact_dir}/{_image_name(p, k)}.webp"} for k in range(len(ims))]
             for p, ims in images.items()}
    table_path = None
    if sample.height:
        columns = reports.rollout_sample_columns(sample, cells, reward_names=config.reward_names)
        table_path = store.write_text_atomic(out / ROLLOUT_TABLE, reports.mlflow_table_json(columns))
    else:
        (out / ROLLOUT_TABLE).unlink(missing_ok=True)
    links = {p: [f"![prompt {p}{f' image {k + 1}' if k else ''}]({ROLLOUT_IMAGES}/{_image_name(p, k)}.png)"
                 for k in range(len(ims))] for p, ims in images.items()}
    markdown = reports.render_rollout_sample(reports.rollout_sample_columns(sample, links,
                                                                            reward_names=config.reward_names))
    return RolloutSample(sample, table_path, images_dir, all_rollouts, markdown)


@dataclass
class RoundReports:
    metrics: dict[str, float]
    table: pl.DataFrame
    findings: list[dict[str, Any]]
    curves: Path
    terminal: str
    terminal_path: Path
    started: float
    sample: RolloutSample

    def artifacts(self, key: str) -> dict[str, list[Path]]:
        """What MLflow receives for the round: the three reports, both charts, every rollout and the sample's
        table with its images."""
        out = self.terminal_path.parent
        files = {f"reports/{key}": [out / "rollout_results.md", out / "attention_diagnostics.md", self.terminal_path,
                                    self.curves, out / "attention_balance.png", self.sample.all_rollouts]}
        if (out / VISUAL_CHART).exists():
            files[f"reports/{key}"].append(out / VISUAL_CHART)
        if self.sample.table_path is not None:
            files[f"reports/{key}"].append(self.sample.table_path)
            files[f"reports/{key}/{ROLLOUT_IMAGES}"] = [self.sample.images_dir]
        return files

    def tables(self, key: str) -> list[str]:
        """The round's MLflow logged tables (artifact paths)."""
        table = self.sample.artifact_table(key)
        return [] if table is None else [table]


def write_round_reports(config: DapoConfig, run_store: RunStore, key: str, log: training.RoundLog,
                        update: UpdateRecord) -> RoundReports:
    """metrics.json, learning curves, the rollout sample (`write_rollout_sample`), rollout_results.md and
    run_terminal.md of a trained round."""
    table = training.round_table(run_store, key)
    metrics = training.round_metrics(config, table, update)
    started = time.time()
    store.write_json_atomic(run_store.round(key).metrics, metrics)
    out = run_store.reports_dir(key)
    curves = charts.learning_curves_png(training.metrics_history(run_store), out / "learning_curves.png")
    sample = write_rollout_sample(config, run_store, key, table)
    rollout_md = reports.render_rollout_results(table, mdi_reward_stage=config.mdi_reward_stage,
                                                run_name=config.run_name, checkpoint=key,
                                                reward_names=config.reward_names,
                                                report_samples=config.report_samples,
                                                all_rollouts_link=sample.all_rollouts.name)
    store.write_text_atomic(out / "rollout_results.md", rollout_md)
    faults.point("mid_report_write")
    findings = round_findings(run_store, key)
    accuracy = metrics.get(reports.accuracy_metric(config.reward_names) or "", float("nan"))
    log(f"round {checkpoint_index(key)} done: reward {metrics['reward']:.3f}, accuracy "
        f"{accuracy:.3f}, eval accuracy {metrics['eval/accuracy']:.3f}, "
        f"MDI {metrics['attention/all/mdi']:.3f}, entropy {metrics['entropy']:.4f}")
    result = RoundReports(metrics, table, findings, curves, "", out / "run_terminal.md", started, sample)
    rewrite_terminal(config, key, log, result)
    return result


def rewrite_terminal(config: DapoConfig, key: str, log: training.RoundLog, result: RoundReports) -> None:
    """run_terminal.md from the round log as it is now (again after a late warning, e.g. MLflow down)."""
    result.terminal = reports.render_run_terminal(log.lines(), result.metrics, run_name=config.run_name,
                                                  checkpoint=key, health=result.findings,
                                                  reward_names=config.reward_names)
    store.write_text_atomic(result.terminal_path, result.terminal)


def mark_done(run_store: RunStore, key: str, started: float) -> Path:
    """Marks the round finished for resumption (`make run` skips it from now on)."""
    faults.point("before_round_done")
    return store.write_text_atomic(run_store.round(key).done, f"{time.time() - started:.3f}\n")


def is_done(run_store: RunStore, key: str) -> bool:
    return run_store.round(key).done.exists()


# -------------------------------------------------------------------------------------------- setup


def dataset_phase(config: DapoConfig, run_store: RunStore, log: training.RoundLog) -> training.DatasetSummary:
    """The run's config record and its validated train/eval splits (the embedded dataset generated), with the
    counts in ckpt-0000's round log so that they reach run_terminal.md too."""
    record_config(config, run_store, log)
    summary = training.prepare_dataset(config, run_store)
    faults.point("after_dataset")
    line = (f"dataset: {summary.num_train} train, {summary.num_eval} eval, {summary.num_quarantined} quarantined "
            f"rows from {summary.source}")
    if summary.num_quarantined:
        counts = ", ".join(f"{n}x {reason}" for reason, n in sorted(summary.quarantine_reasons.items()))
        line += f" ({counts}; rows and reasons in {run_store.data_dir / 'quarantine.parquet'})"
    log(line)
    return summary


def base_checkpoint_phase(config: DapoConfig, run_store: RunStore, log: training.RoundLog,
                          policies: PolicyCache) -> dict[str, float]:
    """ckpt-0000 (the embedded tiny model with its warm start, or the model directory), configured for training
    and evaluated; `policies` then holds it. A complete ckpt-0000 (left by an interrupted setup) is kept, never
    rebuilt under checkpoints trained from it. Returns its evaluation (also in its state.json)."""
    from dapo_ops.run.checkpoint_policy import configure

    key = checkpoint_key(0)
    if run_store.is_complete_checkpoint(key):
        log(f"run {config.run_name}: {key} is complete; finishing the setup with it")
        policy = policies.get(run_store, key, config)
        state = training.checkpoint_state(run_store, key)
    else:
        log(f"run {config.run_name}: building {key} from {config.model_name_or_path}")
        built = training.build_base_checkpoint(config, run_store, log)
        policy, state = built["policy"], built["state"]
        faults.point("after_base_checkpoint")
    policy = configure(policy, config)  # the adapter (use_peft), frozen vision tower, fp32 master weights
    evaluation = training.evaluate(config, run_store, policy)
    store.write_json_atomic(run_store.checkpoint_dir(key) / training.STATE_FILE, {**state, "eval": evaluation})
    log(f"{key}: eval accuracy {evaluation[EVAL_ACCURACY]:.3f}, format {evaluation[EVAL_FORMAT]:.3f}")
    policies.put(run_store, key, policy, None)
    return evaluation


# ------------------------------------------------------------------------------- phases, one per asset

Launch = Callable[..., dict[str, Any]]
"""`launch(phase, config, reanalysis=False)`: runs `phase` ("rollouts", "attention" or "update") of the round
with `config` on `config.num_processes` processes and returns the metadata rank 0 reported. The orchestrator supplies it (the
Dagster assets start the ranks through Pipes); with num_processes 1 a phase runs in this process."""


class NonFiniteRoundError(NonFiniteUpdateError):
    """The update stopped on a NaN/Inf loss or gradient and wrote nothing; `finding` is its failed check."""

    def __init__(self, message: str, finding: Finding) -> None:
        super().__init__(message)
        self.finding = finding


def reference_policy(config: DapoConfig, run_store: RunStore, **load: Any) -> Any:
    """The frozen reference policy of the KL term: None without the term (`beta` 0) or with LoRA, whose
    reference is the policy itself with its adapter disabled; else the base checkpoint ckpt-0000, loaded with
    `load` (device, torch_dtype)."""
    if config.beta <= 0 or config.use_peft:
        return None
    return models.load_policy(resolve_model_dir(run_store, checkpoint_key(0)), **load)


def _launched(config: DapoConfig, policies: PolicyCache, launch: Launch | None, phase: str,
              **kwargs: Any) -> dict[str, Any] | None:
    """The metadata of `phase` run on num_processes > 1 processes; None: it runs in this process."""
    if config.num_processes <= 1:
        return None
    if launch is None:
        raise ValueError(f"num_processes={config.num_processes}: the {phase} phase needs a launcher")
    # The ranks load checkpoint k themselves: this process's copy would only hold memory (rank 0 shares its
    # GPU), and after the update it is stale (the next phase reloads ckpt-(k+1) from disk).
    policies.invalidate()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return launch(phase, config, **kwargs)


@dataclass
class PhaseResult:
    table: pl.DataFrame  # what the phase wrote: the round's rollouts or attention table
    launched: dict[str, Any]  # the metadata the ranks reported; empty in this process


def rollouts_phase(config: DapoConfig, run_store: RunStore, key: str, log: training.RoundLog,
                   policies: PolicyCache, *, launch: Launch | None = None,
                   engine: RolloutEngine | None = None) -> PhaseResult:
    """The round's config record and disk-space check (stop before the round, never halfway through its
    checkpoint), then G completions per prompt sampled from checkpoint `key`."""
    log(f"round {checkpoint_index(key)} of run {config.run_name}")
    record_config(config, run_store, log)
    retention.check_disk_space(run_store, key, config)
    launched = _launched(config, policies, launch, "rollouts")
    if launched is not None:
        return PhaseResult(pl.read_parquet(run_store.round(key).rollouts_parquet), launched)
    policy = policies.get(run_store, key, config)
    return PhaseResult(training.generate_round_rollouts(config, run_store, key, policy, log, engine=engine), {})


def attention_phase(config: DapoConfig, run_store: RunStore, key: str, log: training.RoundLog,
                    policies: PolicyCache, *, launch: Launch | None = None, reanalysis: bool = False) -> PhaseResult:
    """The teacher-forced pass with checkpoint `key`: old log-probs, entropy and the attention metrics (a
    `reanalysis` of a stored round keeps the round's old log-probs)."""
    if reanalysis:
        # A re-analysis always measures visual dependency, whatever the run's `visual_dependency`.
        config = config.replace(visual_dependency=True)
        log(f"re-analysis of {key} with mdi_tolerance {config.mdi_tolerance} and the masked pass ({config.visual_mask})")
    launched = _launched(config, policies, launch, "attention", reanalysis=reanalysis)
    if launched is not None:
        return PhaseResult(pl.read_parquet(run_store.round(key).attention_parquet), launched)
    policy = policies.get(run_store, key, config)
    return PhaseResult(training.compute_attention(config, run_store, key, policy, log,
                                                  write_old_logps=not reanalysis), {})


def rewards_phase(config: DapoConfig, run_store: RunStore, key: str,
                  log: training.RoundLog) -> tuple[dict[str, float], list[Finding]]:
    """The rewards, their total and the group advantages; returns the batch metrics and the reward checks."""
    training.compute_rewards(config, run_store, key, log)
    metrics = training.batch_metrics(config, training.round_table(run_store, key))
    return metrics, reward_health(config, run_store, key, log, metrics)


@dataclass
class UpdateResult:
    record: UpdateRecord
    findings: list[Finding]  # the update checks, then the blocking eval check of the new checkpoint
    launched: dict[str, Any]


def update_phase(config: DapoConfig, run_store: RunStore, key: str, log: training.RoundLog,
                 policies: PolicyCache, *, launch: Launch | None = None) -> UpdateResult:
    """The policy update from checkpoint `key` to ckpt-(k+1), which `policies` then holds, and its checks. A
    NaN/Inf loss or gradient writes only its failed check and raises `NonFiniteRoundError`."""
    try:
        launched = _launched(config, policies, launch, "update")
        if launched is not None:
            record = read_update_record(run_store, key)
            run_store.require_checkpoint(record.next_checkpoint)
        else:
            policy = policies.get(run_store, key, config)
            optimizer = policies.optimizer(run_store, key, config)
            record = training.run_update(config, run_store, key, policy, optimizer, log,
                                         ref_policy=reference_policy(config, run_store))
            policies.put(run_store, record.next_checkpoint, policy, optimizer)
    except NonFiniteUpdateError as error:
        policies.invalidate()  # the policy in memory matches no checkpoint any more
        raise NonFiniteRoundError(str(error), non_finite_health(run_store, key, log, error)) from error
    except BaseException:
        policies.invalidate()
        raise
    findings = update_health(run_store, key, log, {**record.summary, **record.eval})
    eval_finding = resume.eval_drop_finding(config, run_store, record.next_checkpoint)
    assert eval_finding is not None  # the next checkpoint is past ckpt-0000
    log_findings(log, [eval_finding])
    return UpdateResult(record, [*findings, eval_finding], launched or {})


# -------------------------------------------------------------------------------------------- round


@dataclass
class RoundResult:
    record: UpdateRecord
    metrics: dict[str, float]
    findings: list[dict[str, Any]]
    seconds: dict[str, float]


def run_round(config: DapoConfig, run_store: RunStore, key: str, policy: Any, optimizer: Any,
              log: training.RoundLog, *, engine: RolloutEngine | None = None,
              clock: Callable[[], float] = time.perf_counter) -> RoundResult:
    """Round `key` from checkpoint k (`policy`, `optimizer`) to ckpt-(k+1) and its reports: the phases of the
    assets in their order (rollouts, attention_metrics, rewards, policy_update, attention_report,
    training_report) in this process, minus MLflow. `policy` and `optimizer` are trained in place. `seconds`
    times each phase by `clock` (on a GPU, one that synchronises). A NaN/Inf update writes its failed check
    and raises `NonFiniteRoundError`."""
    policies = PolicyCache()
    policies.put(run_store, key, policy, optimizer)
    seconds: dict[str, float] = {}
    last = clock()

    def lap(phase: str) -> None:
        nonlocal last
        now = clock()
        seconds[phase] = now - last
        last = now

    rollouts_phase(config, run_store, key, log, policies, engine=engine)
    lap("rollouts")
    attention_phase(config, run_store, key, log, policies)
    lap("attention_metrics")
    rewards_phase(config, run_store, key, log)
    lap("rewards")
    record = update_phase(config, run_store, key, log, policies).record
    lap("policy_update")
    write_attention_report(run_store, key)
    lap("attention_report")
    result = write_round_reports(config, run_store, key, log, record)
    mark_done(run_store, key, result.started)
    lap("training_report")
    return RoundResult(record, result.metrics, result.findings, seconds)
