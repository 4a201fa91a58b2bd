"""What do the attention reward and the RL objectives do here? Two ablations on the same runs machinery:

- shaping rows: the embedded default with the attention reward off, with `clip` and with
  `group_log_distance` / `group_zscore`, `--rounds` rounds (default `max_rounds`);
- objective rows: one per RL objective (`loss_type`, GSPO, two-sided clipping, high-entropy tokens, ...), on
  the embedded default and on an unseen A-OKVQA-layout dataset that `scripts/make_unseen_dataset.py` writes
  into a temp dir (the embedded model then trains its tokenizer on that data, as `make run DATASET=` does),
  `--objective-rounds` rounds, the same for every objective.

Per round: greedy eval accuracy and mean |ln MDI| per stage, mean ± std over seeds; a run whose update goes
non-finite is reported as `nan` (and a run that fails otherwise as `crash`) instead of stopping the ablation.

    python -m benchmarks.ablation [--seeds 0 1 2] [--rounds 8] [--objective-rounds 4] [--rows dapo sapo]
                                  [--datasets embedded unseen] [--jobs 2]          # `make ablation`

Every run is a subprocess (OMP_NUM_THREADS=1, its own DAPO_VLM_HOME), `--jobs` at a time. A run's result is
cached under `<out-dir>/.ablation-cache/` keyed by its whole config, the dataset and a hash of the library's
source, so a re-run after a crash (or with more rows) trains only what is missing, and two rows with the same
config (the objective `dapo` and the shaping default) train once. Rows that change only the loss, the rewards or
the update share one ckpt-0000 per dataset and seed, kept there too (`setup-<key>/`). Writes ablation.json (per-run curves,
per-row aggregates, the shaping `summary` and an `objectives` section), ablation.md and ablation.png.

Round k's MDI is that of the rollouts of ckpt-k; one extra attention pass over rollouts of the final
checkpoint gives the "last round" value, the attention after the last update.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapo_ops.attention.pathwise import PER_ROLLOUT_SHAPINGS
from dapo_ops.config.dapo import EMBEDDED, MDI_SHAPINGS, STAGES, DapoConfig

OUT_DIR = Path(__file__).resolve().parent
REPO = OUT_DIR.parent
CACHE_DIR_NAME = ".ablation-cache"
UNSEEN = "unseen"
DATASETS: tuple[str, ...] = (EMBEDDED, UNSEEN)
# The unseen dataset: the generator's own defaults (2048 train / 256 validation rows, seed 7).
UNSEEN_SCRIPT = REPO / "scripts" / "make_unseen_dataset.py"
UNSEEN_ARGS: tuple[str, ...] = ("--train", "2048", "--eval", "256", "--seed", "7")
DEFAULT_OBJECTIVE_ROUNDS = 3
DEFAULT_JOBS = 2


@dataclass(frozen=True)
class Row:
    """One ablation row: a name and the `DapoConfig` fields it changes from the default."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def attention_off(config: DapoConfig) -> list[float]:
    """The default reward weights with the attention reward's weight set to 0."""
    weights = list(config.reward_weights)
    weights[-1] = 0.0
    return weights


PATHWISE = "+pathwise"
# The pathwise rows' `mdi_pathwise_coef` when the default config has none (else the default's).
PATHWISE_COEF = 0.01


def shaping_row_name(config: DapoConfig) -> str:
    """The shaping row a config trains: its `mdi_shaping`, with `+pathwise` when the pathwise term is on."""
    return config.mdi_shaping + (PATHWISE if config.mdi_pathwise_coef > 0 else "")


def default_rows(config: DapoConfig | None = None) -> list[Row]:
    """Attention reward off, then one row per MDI shaping (named after it) and, for the per-rollout shapings,
    one with the pathwise gradient as well (`<shaping>+pathwise`, the default's `mdi_pathwise_coef`)."""
    config = config or DapoConfig()
    coef = config.mdi_pathwise_coef or PATHWISE_COEF
    rows = [Row("off", {"reward_weights": attention_off(config)})]
    for shaping in MDI_SHAPINGS:
        rows.append(Row(shaping, {"mdi_shaping": shaping, "mdi_pathwise_coef": 0.0}))
        if shaping in PER_ROLLOUT_SHAPINGS:
            rows.append(Row(shaping + PATHWISE, {"mdi_shaping": shaping, "mdi_pathwise_coef": coef}))
    return rows


def objective_rows() -> list[Row]:
    """One row per objective, TRL's names; `dapo` is the default config (the shaping ablation's default row)."""
    return [
        Row("dapo", {}),
        Row("grpo", {"loss_type": "grpo"}),
        Row("dr_grpo", {"loss_type": "dr_grpo"}),
        Row("bnpo", {"loss_type": "bnpo"}),
        Row("cispo", {"loss_type": "cispo", "epsilon_high": 5.0}),  # ScaleRL's / TRL's recommended cap
        Row("sapo", {"loss_type": "sapo"}),
        Row("luspo", {"loss_type": "luspo", "importance_sampling_level": "sequence"}),  # TRL: luspo is sequence-level
        Row("gspo", {"importance_sampling_level": "sequence"}),
        Row("delta_4", {"delta": 4.0}),
        Row("top_entropy_0.2", {"top_entropy_quantile": 0.2}),
        Row("normalize_then_sum", {"multi_objective_aggregation": "normalize_then_sum"}),
        Row("mask_truncated", {"mask_truncated_completions": True}),
        Row("entropy_coef_0.01", {"entropy_coef": 0.01}),
    ]


# VPPO's top-ρ of tokens and minimum advantage scale (its EasyR1 config defaults); PAPO-D's γ and η (paper Table 3),
# with PAPO's masks (60 % of the patches).
# Every visual row measures visual dependency (the masked pass and the blind eval change no training number).
DIAGNOSTICS: dict[str, Any] = {"visual_dependency": True}
VPPO_OVERRIDES: dict[str, Any] = {**DIAGNOSTICS, "vppo_token_ratio": 0.2, "vppo_advantage_weighting": True}
PAPO_OVERRIDES: dict[str, Any] = {**DIAGNOSTICS, "papo_coef": 0.01, "papo_entropy_coef": 0.03, "visual_mask": "patch"}


def visual_rows() -> list[Row]:
    """The visual-dependency training terms beside the default config (issue 28): `default` is the default
    config with the diagnostics on, `vppo` and `papo` add each paper's term."""
    return [Row("default", dict(DIAGNOSTICS)), Row("vppo", dict(VPPO_OVERRIDES)), Row("papo", dict(PAPO_OVERRIDES))]


def select_rows(rows: Sequence[Row], names: Sequence[str] | None, known: Sequence[str]) -> list[Row]:
    """The rows named in `names` (all when None); an unknown name is an error listing the known ones."""
    if names is None:
        return list(rows)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown ablation row(s) {', '.join(unknown)}; known rows: {', '.join(known)}")
    return [r for r in rows if r.name in names]


# ------------------------------------------------------------------------------------------ one run


def mean_abs_log_mdi(values: Sequence[float | None]) -> float:
    """Mean of |ln MDI| over the defined (finite, positive) MDIs; NaN when none is defined."""
    logs = [abs(math.log(v)) for v in values if v is not None and math.isfinite(v) and v > 0]
    return sum(logs) / len(logs) if logs else math.nan


def _visual_summary(table: Any) -> dict[str, float]:
    """Mean visual KL of a round's rollouts (completion and answer tokens); NaN without the masked pass."""
    return {name: float(table[f"visual/{name}"].drop_nans().mean()) if f"visual/{name}" in table.columns else math.nan
            for name in ("kl_mean", "kl_answer")}


def _attention_summary(table: Any) -> dict[str, float]:
    return {stage: mean_abs_log_mdi(table[f"attn/{stage}/mdi"].to_list()) for stage in STAGES}


def chance_accuracy(choices: Sequence[Sequence[str]]) -> float:
    """Expected accuracy of a uniform guess: the mean of 1/#choices."""
    return sum(1 / len(c) for c in choices) / len(choices) if choices else math.nan


# Fields that act only after ckpt-0000 (the loss, the rewards, the update): rows changing nothing else start
# from one shared ckpt-0000 per dataset and seed (the dataset and warm start are about 40 % of a short run).
POST_SETUP_FIELDS = frozenset({
    "loss_type", "epsilon", "epsilon_high", "beta", "scale_rewards", "importance_sampling_level", "delta",
    "top_entropy_quantile", "sapo_temperature_pos", "sapo_temperature_neg", "mask_truncated_completions",
    "entropy_coef", "use_bias_correction_kl", "multi_objective_aggregation", "reward_weights", "mdi_tolerance",
    "mdi_reward_stage", "mdi_shaping", "mdi_pathwise_coef", "learning_rate", "max_grad_norm", "num_iterations", "steps_per_generation",
    "vppo_token_ratio", "vppo_advantage_weighting", "vppo_advantage_min", "papo_coef", "papo_entropy_coef",
    "visual_mask", "visual_mask_ratio", "visual_dependency_threshold", "visual_dependency",
})


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_setup(config: DapoConfig, store: Any, setup_dir: Path, log: Any) -> dict[str, float]:
    """Copy ckpt-0000 (dataset, warm-started base checkpoint) into `store` from `setup_dir`, building it there
    first when no other run did; returns ckpt-0000's eval metrics."""
    import shutil

    from dapo_ops.run import phases as training
    from dapo_ops.store.layout import RunStore, write_json_atomic

    done = setup_dir / "eval.json"
    with _file_lock(setup_dir.with_name(setup_dir.name + ".lock")):
        if not done.exists():
            built = RunStore(setup_dir, config.run_name)
            training.prepare_dataset(config, built)
            policy = training.build_base_checkpoint(config, built, log)["policy"]
            write_json_atomic(done, {"run_dir": str(built.run_dir.relative_to(setup_dir)),
                                     "eval": training.evaluate(config, built, policy)})
    setup = json.loads(done.read_text())
    shutil.copytree(setup_dir / setup["run_dir"], store.run_dir)
    log(f"ckpt-0000 copied from the shared setup {setup_dir}")
    return {k: float(v) for k, v in setup["eval"].items()}


def train_one(config: DapoConfig, work_dir: Path, rounds: int, setup_dir: Path | None = None) -> dict[str, Any]:
    """Train `rounds` rounds through the library; per checkpoint 0..rounds: eval accuracy and |ln MDI|.
    With `setup_dir`, ckpt-0000 comes from there (`shared_setup`) and is loaded from disk, as `make run` does.

    A non-finite update ends the run with status "nan" and the curves measured so far."""
    import polars as pl

    from dapo_ops.run import phases as training
    from dapo_ops.run import round as dapo_round
    from dapo_ops.run.checkpoint_policy import load_checkpoint_policy
    from dapo_ops.run.policy_cache import PolicyCache
    from dapo_ops.store.layout import RunStore, checkpoint_key
    from dapo_ops.train.update import NonFiniteUpdateError

    store = RunStore(work_dir, config.run_name)
    log = training.RoundLog(work_dir / f"{config.run_name}.log")
    if setup_dir is None:
        training.prepare_dataset(config, store)
        policy = training.build_base_checkpoint(config, store, log)["policy"]
        first_eval = training.evaluate(config, store, policy)
    else:
        first_eval = shared_setup(config, store, setup_dir, log)
        policy = load_checkpoint_policy(store, checkpoint_key(0), config)
    chance = chance_accuracy(training.load_split(store, "eval")["choices"].to_list())
    optimizer = training.load_optimizer(store, checkpoint_key(0), policy, config)
    out: dict[str, Any] = {"status": "ok", "chance": chance, "eval_accuracy": [first_eval["eval/accuracy"]],
                           "visual_gain": [first_eval.get("eval/visual_gain", math.nan)], "train_accuracy": [],
                           "abs_log_mdi": [], "visual_kl": []}
    for k in range(rounds):
        files = store.round(checkpoint_key(k))
        try:
            result, failure = dapo_round.run_round(config, store, checkpoint_key(k), policy, optimizer, log), None
        except NonFiniteUpdateError as error:  # its rollouts, attention and rewards were measured
            result, failure = None, f"round {k}: {error}"
        attention = pl.read_parquet(files.attention_parquet)
        out["abs_log_mdi"].append(_attention_summary(attention))
        out["visual_kl"].append(_visual_summary(attention))
        out["train_accuracy"].append(float(pl.read_parquet(files.rewards)["mc_idx_reward"].mean()))
        if result is None:
            return {**out, "status": "nan", "error": failure}
        out["eval_accuracy"].append(float(result.record.eval["eval/accuracy"]))
        out["visual_gain"].append(float(result.record.eval.get("eval/visual_gain", math.nan)))
    # The final checkpoint's attention: the first two phases of its round.
    policies = PolicyCache()
    policies.put(store, checkpoint_key(rounds), policy, optimizer)
    dapo_round.rollouts_phase(config, store, checkpoint_key(rounds), log, policies)
    final = dapo_round.attention_phase(config, store, checkpoint_key(rounds), log, policies).table
    out["abs_log_mdi"].append(_attention_summary(final))
    out["visual_kl"].append(_visual_summary(final))
    return out


def truncate(run: dict[str, Any], rounds: int) -> dict[str, Any]:
    """A run's curves up to ckpt-`rounds` (a longer run's prefix: nothing in a round depends on max_rounds).
    A run that went NaN after ckpt-`rounds` was measured is a finished run of `rounds` rounds."""
    if run["status"] == "nan" and min(len(run["eval_accuracy"]), len(run["abs_log_mdi"])) > rounds:
        run = {k: v for k, v in run.items() if k != "error"} | {"status": "ok"}
    cut = {name: run[name][:rounds + 1] for name in ("eval_accuracy", "abs_log_mdi", "visual_gain", "visual_kl")
           if name in run}
    return {**run, **cut, "train_accuracy": run["train_accuracy"][:rounds]}


# ------------------------------------------------------------------------------------- jobs and cache


def source_fingerprint(root: Path = REPO) -> str:
    """Hash of the library's and the unseen generator's source: a cached run is stale once either changes."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "dapo_ops").rglob("*.py"), root / "scripts" / UNSEEN_SCRIPT.name]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """One training run: its dataset label, row, seed, rounds and the cache key of its config."""

    dataset: str
    row: str
    seed: int
    rounds: int
    overrides: dict[str, Any]
    key: str


def run_config(overrides: dict[str, Any], seed: int, dataset_path: str, run_name: str) -> DapoConfig:
    return DapoConfig(**{**overrides, "seed": seed, "dataset": dataset_path, "run_name": run_name})


def job_key(overrides: dict[str, Any], seed: int, dataset: str, fingerprint: str) -> str:
    """Same resolved config (defaults filled in), dataset label and source => same key; rounds excluded."""
    config = run_config(overrides, seed, EMBEDDED, "ablation").to_dict()
    config.pop("run_name"), config.pop("dataset")
    spec = json.dumps({"config": config, "dataset": dataset, "unseen_args": UNSEEN_ARGS if dataset == UNSEEN else None,
                       "source": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def setup_key(job: Job, fingerprint: str) -> str:
    """Rows that change only `POST_SETUP_FIELDS` share ckpt-0000 per dataset and seed; any other row has its own."""
    if set(job.overrides) <= POST_SETUP_FIELDS:
        return job_key({}, job.seed, job.dataset, fingerprint)
    return job.key


def make_job(dataset: str, row: Row, seed: int, rounds: int, fingerprint: str) -> Job:
    return Job(dataset, row.name, seed, rounds, row.overrides, job_key(row.overrides, seed, dataset, fingerprint))


def cached_result(cache_dir: Path, job: Job) -> dict[str, Any] | None:
    """The cached result of `job`'s config when it covers `job.rounds` (or ended in NaN before), else None."""
    path = cache_dir / f"{job.key}.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result["status"] == "crash":
        return None  # maybe the machine's fault (memory, a kill): try again
    if result["status"] == "ok" and result["rounds"] < job.rounds:
        return None  # trained fewer rounds than asked: train again
    return result


def unique_jobs(jobs: Sequence[Job]) -> list[Job]:
    """One job per cache key, with the most rounds any of them asks for (the shorter ones read its prefix)."""
    longest: dict[str, Job] = {}
    for job in jobs:
        if job.key not in longest or job.rounds > longest[job.key].rounds:
            longest[job.key] = job
    return list(longest.values())


def _worker_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.ablation", "--worker", str(spec_path)]


def run_jobs(jobs: Sequence[Job], cache_dir: Path, dataset_paths: dict[str, str], parallel: int,
             echo: Callable[[str], None] | None = None, cached_only: bool = False,
             fingerprint: str = "") -> dict[str, dict[str, Any]]:
    """Every job's result by key: cached ones read, the others trained `parallel` at a time in subprocesses
    (`cached_only`: left out instead)."""
    from dapo_ops.store.layout import write_json_atomic

    echo = echo or (lambda line: print(line, flush=True))
    cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    todo: list[Job] = []
    for job in unique_jobs(jobs):
        cached = cached_result(cache_dir, job)
        if cached is None:
            todo.append(job)
        else:
            results[job.key] = cached
    if cached_only:
        echo(f"{len(results)} run(s) cached in {cache_dir}; {len(todo)} not run (--cached-only)")
        return results
    echo(f"{len(results)} run(s) cached in {cache_dir}, {len(todo)} to train, {parallel} at a time")
    running: dict[str, tuple[Job, subprocess.Popen, Path, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dapo-ablation-") as tmp:
        while todo or running:
            while todo and len(running) < parallel:
                job = todo.pop(0)
                home = Path(tmp) / job.key
                home.mkdir()
                spec = {"config": run_config(job.overrides, job.seed, dataset_paths[job.dataset],
                                             f"ablation-{job.row}-s{job.seed}").to_dict(),
                        "rounds": job.rounds, "result": str(cache_dir / f"{job.key}.json"),
                        "setup_dir": str(cache_dir / f"setup-{setup_key(job, fingerprint)}"),
                        "job": {"dataset": job.dataset, "row": job.row, "seed": job.seed}}
                write_json_atomic(home / "spec.json", spec)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DAPO_VLM_HOME": str(home),
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
                with (home / "worker.log").open("w") as log_file:
                    proc = subprocess.Popen(_worker_command(home / "spec.json"), cwd=REPO, env=env,
                                            stdout=log_file, stderr=subprocess.STDOUT)
                running[job.key] = (job, proc, home, time.perf_counter())
            time.sleep(0.5)
            for key, (job, proc, home, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                path = cache_dir / f"{key}.json"
                if proc.returncode == 0 and path.exists():
                    results[key] = json.loads(path.read_text())
                else:  # killed or crashed outside train_one's handling: reported, not cached (a re-run retries)
                    tail = (home / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
                    results[key] = {"status": "crash", "rounds": job.rounds,
                                    "error": f"exit code {proc.returncode}: {' | '.join(tail)}"}
                echo(f"[{job.dataset}] {job.row} seed {job.seed}: {describe(results[key])} "
                     f"({time.perf_counter() - t0:.0f}s; {len(todo)} queued, {len(running)} running)")
    return results


def describe(result: dict[str, Any]) -> str:
    if result["status"] == "crash" or not result.get("eval_accuracy"):
        return f"{result['status']}: {result.get('error', '')}"
    mdi = result["abs_log_mdi"]
    text = (f"eval {result['eval_accuracy'][0]:.3f} -> {result['eval_accuracy'][-1]:.3f}, "
            f"|ln MDI| all {mdi[0]['all']:.3f} -> {mdi[-1]['all']:.3f}")
    return text if result["status"] == "ok" else f"{result['status']} ({result.get('error', '')}); {text}"


def worker(spec_path: Path) -> int:
    """Train one run from a spec file and write its result (status ok / nan / crash) to the cache, atomically."""
    from benchmarks.common import set_threads
    from dapo_ops.store.layout import write_json_atomic

    set_threads(1)
    spec = json.loads(spec_path.read_text())
    config = DapoConfig.from_dict(spec["config"])
    start = time.perf_counter()
    try:
        setup = spec.get("setup_dir")
        result = train_one(config, spec_path.parent / "runs", spec["rounds"], Path(setup) if setup else None)
    except Exception as error:  # a crash is a result of this row, reported beside the others
        traceback.print_exc()
        result = {"status": "crash", "error": f"{type(error).__name__}: {error}"}
    result = {**result, **spec["job"], "rounds": spec["rounds"], "seconds": time.perf_counter() - start}
    write_json_atomic(Path(spec["result"]), result)
    print(describe(result))
    return 0


# ------------------------------------------------------------------------------------------ aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def is_ok(run: dict[str, Any]) -> bool:
    return run.get("status", "ok") == "ok"


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per round mean and std over the finished (status ok) seeds of eval accuracy and of |ln MDI| per stage."""
    runs = [r for r in runs if is_ok(r)]
    if not runs:
        return {"eval_accuracy": [], **{f"abs_log_mdi/{stage}": [] for stage in STAGES}}
    n = min(len(r["eval_accuracy"]) for r in runs)
    out: dict[str, Any] = {"eval_accuracy": [_mean_std([r["eval_accuracy"][k] for r in runs]) for k in range(n)]}
    for stage in STAGES:
        out[f"abs_log_mdi/{stage}"] = [_mean_std([r["abs_log_mdi"][k][stage] for r in runs]) for k in range(n)]
    if all(len(r.get("visual_gain", [])) >= n for r in runs):  # runs measured with the masked pass
        out["visual_gain"] = [_mean_std([r["visual_gain"][k] for r in runs]) for k in range(n)]
        out["visual_kl"] = [_mean_std([r["visual_kl"][k]["kl_mean"] for r in runs]) for k in range(n)]
    return out


def failures(runs: Sequence[dict[str, Any]]) -> list[str]:
    """'seed S: status (error)' of every run that did not finish."""
    return [f"seed {r['seed']}: {r['status']} ({r.get('error', '')})" for r in runs if not is_ok(r)]


def summarize(rows: dict[str, dict[str, Any]], default_row: str, off_row: str = "off") -> dict[str, Any]:
    """Last-round ratio of mean |ln MDI| (stage all) and eval accuracy delta, default shaping vs off."""
    if not rows.get(default_row, {}).get("eval_accuracy") or not rows.get(off_row, {}).get("eval_accuracy"):
        return {"default_row": default_row, "mdi_log_ratio_vs_off": math.nan, "eval_accuracy_delta_vs_off": math.nan,
                "goal": f"needs the rows {off_row!r} and {default_row!r}"}
    mdi_default = rows[default_row]["abs_log_mdi/all"][-1][0]
    mdi_off = rows[off_row]["abs_log_mdi/all"][-1][0]
    acc_default = rows[default_row]["eval_accuracy"][-1][0]
    acc_off = rows[off_row]["eval_accuracy"][-1][0]
    return {
        "default_row": default_row,
        "mdi_log_ratio_vs_off": mdi_default / mdi_off if mdi_off else math.nan,
        "eval_accuracy_delta_vs_off": acc_default - acc_off,
        "goal": "mdi_log_ratio_vs_off <= 0.7 and |eval_accuracy_delta_vs_off| <= 0.03",
    }


def assemble(runs: dict[str, list[dict[str, Any]]], rounds: int, default_row: str, seconds: float,
             objectives: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
             objective_rounds: int | None = None) -> dict[str, Any]:
    """The result document from per-row lists of per-seed curves (shaping rows) and, optionally, per-dataset
    per-row lists of the objective rows' runs."""
    aggregated = {name: aggregate(r) for name, r in runs.items()}
    seeds = sorted({r["seed"] for row in runs.values() for r in row})
    result = {"rounds": rounds, "seeds": seeds, "rows": aggregated, "runs": runs,
              "failures": {name: failures(r) for name, r in runs.items() if failures(r)},
              "summary": summarize(aggregated, default_row), "seconds": seconds}
    if objectives:
        result["objectives"] = assemble_objectives(objectives, objective_rounds or rounds)
    return result


def assemble_visual(runs: dict[str, list[dict[str, Any]]], rounds: int) -> dict[str, Any]:
    """The visual-dependency rows (`visual_rows`): per-row aggregates, failures and a last-round summary."""
    overrides = {r.name: r.overrides for r in visual_rows()}
    aggregated = {name: aggregate(r) for name, r in runs.items()}
    summary = {}
    for name, agg in aggregated.items():
        last = {key: agg[key][-1] if agg.get(key) else (math.nan, math.nan)
                for key in ("eval_accuracy", "visual_gain", "abs_log_mdi/all", "visual_kl")}
        summary[name] = {"seeds_ok": sum(is_ok(r) for r in runs[name]), **{f"{k}_last": v for k, v in last.items()}}
    seeds = sorted({r["seed"] for row in runs.values() for r in row})
    return {"rounds": rounds, "seeds": seeds, "overrides": {n: overrides.get(n, {}) for n in runs},
            "rows": aggregated, "runs": runs, "failures": {n: failures(r) for n, r in runs.items() if failures(r)},
            "summary": summary}


def assemble_objectives(runs: dict[str, dict[str, list[dict[str, Any]]]], rounds: int) -> dict[str, Any]:
    """Per dataset: per-row aggregates, failures, chance and a last-round summary per row."""
    overrides = {r.name: r.overrides for r in objective_rows()}
    datasets: dict[str, Any] = {}
    for dataset, rows in runs.items():
        aggregated = {name: aggregate(r) for name, r in rows.items()}
        chances = [r["chance"] for row in rows.values() for r in row if is_ok(r) and "chance" in r]
        summary = {}
        for name, agg in aggregated.items():
            done = [r for r in rows[name] if is_ok(r)]
            summary[name] = {
                "seeds_ok": len(done), "seeds_failed": len(rows[name]) - len(done),
                "eval_accuracy_first": agg["eval_accuracy"][0] if agg["eval_accuracy"] else (math.nan, math.nan),
                "eval_accuracy_last": agg["eval_accuracy"][-1] if agg["eval_accuracy"] else (math.nan, math.nan),
                "abs_log_mdi_all_last": agg["abs_log_mdi/all"][-1] if agg["abs_log_mdi/all"] else (math.nan, math.nan),
            }
        datasets[dataset] = {"chance": statistics.fmean(chances) if chances else math.nan, "rows": aggregated,
                             "runs": rows, "failures": {n: failures(r) for n, r in rows.items() if failures(r)},
                             "summary": summary}
    seeds = sorted({r["seed"] for rows in runs.values() for row in rows.values() for r in row})
    return {"rounds": rounds, "seeds": seeds, "overrides": {n: overrides.get(n, {}) for rows in runs.values()
                                                             for n in rows},
            "unseen_dataset": f"python scripts/make_unseen_dataset.py DIR {' '.join(UNSEEN_ARGS)}",
            "datasets": datasets}


def merge(paths: Sequence[Path], default_row: str) -> dict[str, Any]:
    """One result from several ablation.json files (rows trained separately, e.g. a new objective's)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    objectives: dict[str, dict[str, list[dict[str, Any]]]] = {}
    visual: dict[str, list[dict[str, Any]]] = {}
    rounds, objective_rounds, visual_rounds, seconds = set(), set(), set(), 0.0
    for path in paths:
        part = json.loads(Path(path).read_text())
        if "visual" in part:
            visual_rounds.add(part["visual"]["rounds"])
            _extend_by_seed(visual, part["visual"]["runs"])
        seconds += part["seconds"]
        if part["runs"]:
            rounds.add(part["rounds"])
        _extend_by_seed(runs, part["runs"])
        if "objectives" in part:
            objective_rounds.add(part["objectives"]["rounds"])
            for dataset, section in part["objectives"]["datasets"].items():
                _extend_by_seed(objectives.setdefault(dataset, {}), section["runs"])
    for name, found in (("", rounds), ("objective ", objective_rounds), ("visual ", visual_rounds)):
        if len(found) > 1:
            raise ValueError(f"cannot merge ablations of different lengths: {name}rounds {sorted(found)} in "
                             f"{[str(p) for p in paths]}")
    result = assemble(runs, rounds.pop() if rounds else 0, default_row, seconds, objectives,
                      objective_rounds.pop() if objective_rounds else None)
    if visual:
        result["visual"] = assemble_visual(visual, visual_rounds.pop())
    result["command"] = "python -m benchmarks.ablation --merge " + " ".join(Path(p).name for p in paths)
    return result


def _extend_by_seed(into: dict[str, list[dict[str, Any]]], rows: dict[str, list[dict[str, Any]]]) -> None:
    for name, row_runs in rows.items():
        known = {r["seed"] for r in into.get(name, [])}
        into.setdefault(name, []).extend(r for r in row_runs if r["seed"] not in known)


# ---------------------------------------------------------------------------------------------- output


def _cell(pair: Sequence[float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def _overrides_text(overrides: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "(default)"


def markdown(result: dict[str, Any]) -> str:
    rows, summary = result["rows"], result["summary"]
    lines = [
        "# Attention-reward and objective ablation",
        "",
        f"Generated by `{result.get('command', 'make ablation')}`; {result['seconds'] / 60:.1f} min of wall time "
        "(cached runs count 0). Mean ± std over each row's finished seeds. Round k is ckpt-k: eval accuracy of "
        "ckpt-k and mean |ln MDI| of its rollouts (0 = balanced attention).",
        "",
        *([f"Note: {result['note']}", ""] if result.get("note") else []),
    ]
    if rows:
        lines += [
            "## Attention reward (shaping rows)",
            "",
            f"Embedded default, {result['rounds']} rounds. Summary (default shaping `{summary['default_row']}` vs "
            f"attention reward off, last round): mean |ln MDI| ratio **{summary['mdi_log_ratio_vs_off']:.3f}**, "
            f"eval accuracy delta **{summary['eval_accuracy_delta_vs_off']:+.3f}** (goal: {summary['goal']}).",
            "",
            *_failure_lines(result.get("failures", {})),
            "| row | seeds | round | eval accuracy | " + " | ".join(f"\\|ln MDI\\| {s}" for s in STAGES) + " |",
            "|---|---|---:|---:|" + "---:|" * len(STAGES),
        ]
        for name, agg in rows.items():
            seeds = ",".join(str(r["seed"]) for r in result["runs"][name] if is_ok(r))
            for k, acc in enumerate(agg["eval_accuracy"]):
                cells = [_cell(agg[f"abs_log_mdi/{s}"][k]) for s in STAGES]
                lines.append(f"| {name} | {seeds} | {k} | {_cell(acc)} | " + " | ".join(cells) + " |")
        lines.append("")
    if "objectives" in result:
        lines += objectives_markdown(result["objectives"], result["rounds"] if rows else None)
    if "visual" in result:
        lines += visual_markdown(result["visual"])
    return "\n".join(lines) + "\n"


def visual_markdown(section: dict[str, Any]) -> list[str]:
    """The visual-dependency rows: last round side by side, then per round."""
    rounds = section["rounds"]
    lines = ["## Visual dependency: VPPO and PAPO beside the default", "",
             f"Embedded default, {rounds} rounds, seeds {','.join(map(str, section['seeds']))}. Visual gain = greedy "
             "eval accuracy − the same with every image blanked (`eval/visual_gain`); visual KL = mean per-token "
             "KL to the masked input over the completions (`visual/kl_mean`, each row's own `visual_mask`).", "",
             *_failure_lines(section.get("failures", {})),
             f"| row | overrides | seeds ok | eval accuracy ckpt-{rounds} | visual gain ckpt-{rounds} | "
             rf"\|ln MDI\| all ckpt-{rounds} | visual KL ckpt-{rounds} |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in section["summary"].items():
        lines.append(f"| {name} | {_overrides_text(section['overrides'].get(name, {}))} | {s['seeds_ok']} | "
                     f"{_cell(s['eval_accuracy_last'])} | {_cell(s['visual_gain_last'])} | "
                     f"{_cell(s['abs_log_mdi/all_last'])} | {_cell(s['visual_kl_last'])} |")
    lines += ["", "### Per round", "", r"| row | round | eval accuracy | visual gain | \|ln MDI\| all | visual KL |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, agg in section["rows"].items():
        for k, acc in enumerate(agg["eval_accuracy"]):
            gain = _cell(agg["visual_gain"][k]) if agg.get("visual_gain") else "—"
            kl = _cell(agg["visual_kl"][k]) if agg.get("visual_kl") else "—"
            lines.append(f"| {name} | {k} | {_cell(acc)} | {gain} | {_cell(agg['abs_log_mdi/all'][k])} | {kl} |")
    return [*lines, ""]


def _failure_lines(found: dict[str, list[str]]) -> list[str]:
    if not found:
        return []
    return ["Runs that did not finish (left out of the means):", "",
            *(f"- {name}: {'; '.join(items)}" for name, items in found.items()), ""]


def objectives_markdown(section: dict[str, Any], shaping_rounds: int | None = None) -> list[str]:
    rounds = section["rounds"]
    versus = f"; the shaping rows: {shaping_rounds}" if shaping_rounds is not None else ""
    lines = ["## Objectives", "",
             f"Each row is the default config plus its overrides, {rounds} rounds (the same for every objective"
             f"{versus}), seeds {','.join(map(str, section['seeds']))}. `{EMBEDDED}`: the "
             f"embedded default task; `{UNSEEN}`: `{section['unseen_dataset']}` into a temp dir, the embedded model "
             "with a tokenizer trained on it (the same data for every seed; chance = mean 1/#choices of the eval "
             "split). NaN/crash: seeds whose update went non-finite (`nan`) or that failed "
             "(`crash`); they are left out of the means.", "", *objectives_overview(section), ""]
    for dataset, part in section["datasets"].items():
        lines += [f"### {dataset} (chance {part['chance']:.3f}): last round", "",
                  "| objective | overrides | seeds ok | NaN/crash | eval accuracy ckpt-0 | "
                  f"eval accuracy ckpt-{rounds} | \\|ln MDI\\| all ckpt-{rounds} |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for name, s in part["summary"].items():
            failed = "; ".join(part["failures"].get(name, [])) or "0"
            lines.append(f"| {name} | {_overrides_text(section['overrides'].get(name, {}))} | {s['seeds_ok']} | "
                         f"{failed} | {_cell(s['eval_accuracy_first'])} | {_cell(s['eval_accuracy_last'])} | "
                         f"{_cell(s['abs_log_mdi_all_last'])} |")
        lines += ["", f"### {dataset}: per round", "", "| objective | round | eval accuracy | \\|ln MDI\\| all |",
                  "|---|---:|---:|---:|"]
        for name, agg in part["rows"].items():
            for k, acc in enumerate(agg["eval_accuracy"]):
                lines.append(f"| {name} | {k} | {_cell(acc)} | {_cell(agg['abs_log_mdi/all'][k])} |")
        lines.append("")
    return lines


def objectives_overview(section: dict[str, Any]) -> list[str]:
    """One line per objective, every dataset side by side: eval accuracy ckpt-0 -> last (mean over seeds),
    last-round |ln MDI| (stage all) and the seeds that went NaN or crashed (docs/results.md's table)."""
    datasets = list(section["datasets"])
    rounds = section["rounds"]
    head = "| objective | " + " | ".join(
        f"{d} (chance {section['datasets'][d]['chance']:.2f}): eval ckpt-0 → ckpt-{rounds} | {d}: \\|ln MDI\\| all"
        for d in datasets) + " | NaN/crash |"
    lines = [head, "|---|" + "---:|---:|" * len(datasets) + "---|"]
    found = {n for d in datasets for n in section["datasets"][d]["summary"]}
    names = [r.name for r in objective_rows() if r.name in found] + sorted(found - {r.name for r in objective_rows()})
    for name in names:
        cells, failed = [], []
        for d in datasets:
            part = section["datasets"][d]
            s = part["summary"].get(name)
            if s is None or not s["seeds_ok"]:
                cells += ["—", "—"]
            else:
                first, last = s["eval_accuracy_first"], s["eval_accuracy_last"]
                seeds = ",".join(str(r["seed"]) for r in part["runs"][name] if is_ok(r))
                cells += [f"{first[0]:.3f} → {last[0]:.3f} ± {last[1]:.3f} (seeds {seeds})",
                          _cell(s["abs_log_mdi_all_last"])]
            failed += [f"{d} {item}" for item in part["failures"].get(name, [])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(failed) or 'none'} |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    from dapo_ops.reporting.charts import _new_figure, _save_atomic

    panels: list[tuple[str, dict[str, Any]]] = []
    if result["rows"]:
        panels.append(("shaping, embedded", result["rows"]))
    for dataset, part in result.get("objectives", {}).get("datasets", {}).items():
        panels.append((f"objectives, {dataset}", part["rows"]))
    if result.get("visual", {}).get("rows"):
        panels.append(("VPPO / PAPO, embedded", result["visual"]["rows"]))
    fig = _new_figure(12, 4 * max(len(panels), 1))
    for p, (label, rows) in enumerate(panels):
        for i, (key, title) in enumerate([("eval_accuracy", "eval accuracy"),
                                          ("abs_log_mdi/all", "mean |ln MDI| (stage all)")]):
            ax = fig.add_subplot(len(panels), 2, 2 * p + i + 1)
            for name, agg in rows.items():
                means = [m for m, _ in agg[key]]
                stds = [s for _, s in agg[key]]
                xs = list(range(len(means)))
                ax.plot(xs, means, marker="o", markersize=3, label=name)
                ax.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                                [m + s for m, s in zip(means, stds, strict=True)], alpha=0.15)
            ax.set_title(f"{title}: {label}", fontsize=10)
            ax.set_xlabel("round (checkpoint)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save_atomic(fig, path)


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    from dapo_ops.store.layout import write_json_atomic, write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "ablation.json", result)
    write_text_atomic(out_dir / "ablation.md", markdown(result))
    plot(result, out_dir / "ablation.png")


# ------------------------------------------------------------------------------------------------ main


def plan_jobs(shaping: Sequence[Row], objectives: Sequence[Row], datasets: Sequence[str], seeds: Sequence[int],
              rounds: int, objective_rounds: int, fingerprint: str) -> list[Job]:
    """Shaping rows on the embedded default, then objective rows, seed-major (a cut-short grid still has every
    row's first seeds) and alternating datasets (two parallel runs build different shared ckpt-0000s)."""
    jobs = [make_job(EMBEDDED, row, seed, rounds, fingerprint) for seed in seeds for row in shaping]
    jobs += [make_job(dataset, row, seed, objective_rounds, fingerprint)
             for seed in seeds for row in objectives for dataset in datasets]
    return jobs


def collect(jobs: Sequence[Job], results: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """dataset -> row -> per-seed runs, each truncated to its job's rounds and labelled with its row and seed
    (jobs without a result are left out)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for job in jobs:
        if job.key not in results:
            continue
        result = results[job.key]
        run = truncate(result, job.rounds) if result.get("eval_accuracy") else dict(result)
        run.update(dataset=job.dataset, row=job.row, seed=job.seed, rounds=job.rounds)
        out.setdefault(job.dataset, {}).setdefault(job.row, []).append(run)
    return out


def run(shaping: Sequence[Row], objectives: Sequence[Row], seeds: Sequence[int], rounds: int,
        objective_rounds: int, datasets: Sequence[str] = DATASETS, out_dir: Path = OUT_DIR,
        default_row: str | None = None, parallel: int = DEFAULT_JOBS, command: str = "make ablation",
        cached_only: bool = False, note: str | None = None, cache_dir: Path | None = None,
        visual: Sequence[Row] = ()) -> dict[str, Any]:
    start = time.perf_counter()
    fingerprint = source_fingerprint()
    shaping_jobs = plan_jobs(shaping, [], [], seeds, rounds, objective_rounds, fingerprint)
    visual_jobs = plan_jobs(visual, [], [], seeds, rounds, objective_rounds, fingerprint)
    objective_jobs = plan_jobs([], objectives, datasets, seeds, rounds, objective_rounds, fingerprint)
    with tempfile.TemporaryDirectory(prefix="dapo-ablation-data-") as tmp:
        paths = {EMBEDDED: EMBEDDED}
        if objectives and UNSEEN in datasets and not cached_only:
            paths[UNSEEN] = str(Path(tmp) / UNSEEN)
            subprocess.run([sys.executable, str(UNSEEN_SCRIPT), paths[UNSEEN], *UNSEEN_ARGS], check=True)
        results = run_jobs([*shaping_jobs, *visual_jobs, *objective_jobs], cache_dir or out_dir / CACHE_DIR_NAME, paths, parallel,
                           cached_only=cached_only, fingerprint=fingerprint)
    shaping_runs = collect(shaping_jobs, results).get(EMBEDDED, {})
    objective_runs = collect(objective_jobs, results)
    result = assemble(shaping_runs, rounds, default_row or shaping_row_name(DapoConfig()), time.perf_counter() - start,
                      objective_runs, objective_rounds)
    visual_runs = collect(visual_jobs, results).get(EMBEDDED, {})
    if visual_runs:
        result["visual"] = assemble_visual(visual_runs, rounds)
    result["command"] = command
    if note:
        result["note"] = note
    write_outputs(result, out_dir)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="attention-reward and objective ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=DapoConfig().max_rounds, help="rounds of the shaping rows")
    parser.add_argument("--objective-rounds", type=int, default=DEFAULT_OBJECTIVE_ROUNDS,
                        help="rounds of every objective row")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--rows", "--only", nargs="+", dest="rows", help="row names to train (default: all)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        help="datasets of the objective rows")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="runs trained at a time (one per core)")
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these ablation.json files instead of training")
    parser.add_argument("--default-row", help="the row compared with off (default: the default config's shaping row)")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: write the tables from the runs already cached in --out-dir")
    parser.add_argument("--cache-dir", type=Path, help=f"the run cache (default: <out-dir>/{CACHE_DIR_NAME})")
    parser.add_argument("--note", help="a sentence printed under the tables' header (what ran, what did not)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.exit(worker(args.worker))
    if args.merge:
        result = merge(args.merge, args.default_row or shaping_row_name(DapoConfig()))
        if args.note:
            result["note"] = args.note
        write_outputs(result, args.out_dir)
        print(markdown(result))
        return
    shaping_all, objective_all, visual_all = default_rows(), objective_rows(), visual_rows()
    known = [r.name for r in [*shaping_all, *objective_all, *visual_all]]
    try:
        shaping = select_rows(shaping_all, args.rows, known)
        objectives = select_rows(objective_all, args.rows, known)
        visual = select_rows(visual_all, args.rows, known)
    except ValueError as error:
        parser.error(str(error))
    command = "python -m benchmarks.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run(shaping, objectives, args.seeds, args.rounds, args.objective_rounds, args.datasets, args.out_dir,
                 args.default_row, args.jobs, command.strip(), args.cached_only, args.note, args.cache_dir, visual)
    print(markdown(result))


if __name__ == "__main__":
    main()
