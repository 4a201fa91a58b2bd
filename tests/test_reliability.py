"""Reliability: nothing is lost under kill -9, bad data, an MLflow outage, NaNs and concurrent runs.

Every case drives real `python -m pipelines.cli` processes (what `make run` calls) on a temporary data root
with its own Dagster instance and MLflow store, and compares against an uninterrupted run of the same
config and seed: same checkpoint weights and optimizer state, the same MLflow value at every step, once.
Faults come from `dapo_ops.common.faults` (`DAPO_VLM_FAULT=kill:<point>` / `nan:<point>`), random-time SIGKILLs
from the test; the fault trace (`DAPO_VLM_FAULT_TRACE`) tells which phase a random kill interrupted.

CI runs a sample (3 kills: 1 at a random time, 2 at named points). `DAPO_VLM_FULL_FAULTS=1` adds the
long loop (`DAPO_VLM_FAULT_KILLS`, default 12 kills; `DAPO_VLM_FAULT_SEED`; the coverage table is printed
and, with `DAPO_VLM_FAULT_REPORT=<file>`, written as JSON).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dapo_ops.common import faults
from dapo_ops.store.layout import COMPLETE_MARKER, RunStore
from dapo_ops.tracking.facade import default_tracking_uri
from tests.conftest import TINY_RUN
from tests.process_checks import kill_once_phase_ranks_run, stuck_dagster_runs, temporaries

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RUN = "rel"
ROUNDS = 2
# A round of seconds: what matters here is the sequence of writes, not learning.
TINY = TINY_RUN
PROCESS_TIMEOUT = 600
SEED = int(os.environ.get("DAPO_VLM_FAULT_SEED", "20261126"))

# The phase a process was in when it died, from the last fault point it passed.
PHASE_AFTER = {
    None: "startup (imports, before the run lock)",
    "run_start": "start-up with the lock held (Dagster instance, clean-up)",
    "before_setup": "setup: imports, dataset validation",
    "after_dataset": "setup: tokenizer, warm start, ckpt-0000 write",
    "after_base_checkpoint": "setup: ckpt-0000 evaluation + MLflow",
    "before_round": "round start-up (Dagster run, imports, MLflow sync)",
    "before_rollouts": "generation",
    "after_rollouts": "teacher-forced attention pass",
    "after_attention": "rewards",
    "after_rewards": "policy update + evaluation + checkpoint write",
    "mid_checkpoint_write": "checkpoint rename",
    "after_checkpoint": "update.json",
    "mid_report_write": "report rendering",
    "before_mlflow_send": "MLflow logging",
    "after_mlflow_send": "MLflow sent-marker",
    "before_round_done": "round end (DONE marker, Dagster run bookkeeping)",
    "advantages": "policy update + evaluation + checkpoint write",
}


# ----------------------------------------------------------------------------------------------- helpers


def env_for(root: Path, *, tracking_uri: str | None = None, fault: str | None = None,
            trace: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAPO_VLM_", "DAGSTER_", "MLFLOW_"))}
    env.update({
        "DAPO_VLM_HOME": str(root),
        "DAGSTER_HOME": str(root / "dagster"),
        "MLFLOW_TRACKING_URI": tracking_uri or default_tracking_uri(root),
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        # One intra-op thread: the same float reductions in every process (and a quiet 2-core machine).
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    if fault:
        env[faults.FAULT_ENV] = fault
    if trace:
        env[faults.TRACE_ENV] = str(trace)
    return env


def run_args(run_name: str = RUN, rounds: int = ROUNDS, *extra: str, **overrides: object) -> list[str]:
    args = [PYTHON, "-m", "pipelines.cli", "run", "--quiet", "--rounds", str(rounds), "--run-name", run_name]
    for name, value in {**TINY, **overrides}.items():
        args += ["--set", f"{name}={value}"]
    return args + list(extra)


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True, scope="module")
def _no_process_outlives_the_tests():
    yield
    for process in _started:
        if process.poll() is None:
            process.kill()
            process.wait()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")  # noqa: SIM115 - closed by `finish`
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    process.log_handle = handle  # type: ignore[attr-defined]
    process.log_path = log  # type: ignore[attr-defined]
    _started.append(process)
    return process


def finish(process: subprocess.Popen, timeout: float = PROCESS_TIMEOUT) -> tuple[int, str]:
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        process.log_handle.close()  # type: ignore[attr-defined]
    return rc, Path(process.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def cli(args: list[str], env: dict[str, str], log: Path, timeout: float = PROCESS_TIMEOUT) -> tuple[int, str]:
    start_at = log.stat().st_size if log.exists() else 0
    rc, text = finish(start(args, env, log), timeout)
    return rc, text[start_at:]


def trace_events(trace: Path, pid: int | None = None) -> list[tuple[float, str]]:
    """(unix time, point) of every fault point process `pid` (or any) passed, in order."""
    if not trace.exists():
        return []
    events = []
    for line in trace.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and (pid is None or int(parts[1]) == pid):
            events.append((float(parts[0]), parts[2]))
    return events


def trace_points(trace: Path, pid: int | None = None) -> list[str]:
    return [name for _, name in trace_events(trace, pid)]


def wait_for_point(trace: Path, pid: int, name: str, process: subprocess.Popen, timeout: float = 300) -> bool:
    """True once process `pid` passed `name`; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in trace_points(trace, pid):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"process {pid} did not reach {name} in {timeout} s")


def phase_of(trace: Path, pid: int) -> str:
    """Which phase process `pid` was in when it died, named by the last point it passed."""
    points = trace_points(trace, pid)
    named = [p for p in points if p != "mid_file_write"]
    phase = PHASE_AFTER.get(named[-1] if named else None, named[-1] if named else "startup")
    return phase


def load_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def load_optimizer_state(checkpoint: Path) -> dict:
    """optimizer.pt, or FSDP2's sharded optimizer_dcp/ consolidated into one state dict."""
    import tempfile

    import torch

    if (checkpoint / "optimizer_dcp").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(checkpoint / "optimizer_dcp", Path(tmp) / "optimizer.pt")
            return torch.load(Path(tmp) / "optimizer.pt", map_location="cpu", weights_only=True)
    return torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)


def same_tensors(a, b) -> bool:
    """Exact equality of nested optimizer/weight structures."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def training_runs(tracking_uri: str, run_name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dapo-vlm")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`dapo.run_name` = '{run_name}' and tags.`dapo.kind` = 'training'")


def metric_histories(tracking_uri: str, run_name: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of the run's single MLflow training run, every value MLflow holds
    (MLflow's `system/*` samples of CPU and memory differ between any two runs: not training results)."""
    from mlflow import MlflowClient

    runs = training_runs(tracking_uri, run_name)
    assert len(runs) == 1, f"expected one MLflow training run for {run_name!r}, found {len(runs)}"
    client = MlflowClient(tracking_uri)
    run = runs[0]
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            for name in run.data.metrics if not name.startswith("system/")}


def differences_from(reference: Reference, root: Path, run_name: str = RUN, rounds: int = ROUNDS) -> list[str]:
    """Everything by which a finished run differs from the uninterrupted reference (empty: nothing lost)."""
    problems: list[str] = []
    store = RunStore(root, run_name)
    expected = [f"ckpt-{i:04d}" for i in range(rounds + 1)]
    if store.complete_checkpoints() != expected:
        problems.append(f"complete checkpoints {store.complete_checkpoints()} != {expected}")
        return problems
    last = store.checkpoint_dir(expected[-1])
    ref_last = RunStore(reference.root, reference.run_name).checkpoint_dir(expected[-1])
    if not same_tensors(load_weights(last), load_weights(ref_last)):
        problems.append(f"{expected[-1]} weights differ from the uninterrupted run")
    if not same_tensors(load_optimizer_state(last), load_optimizer_state(ref_last)):
        problems.append(f"{expected[-1]} optimizer state differs from the uninterrupted run")
    history = metric_histories(default_tracking_uri(root), run_name)
    if history != reference.history:
        bad = sorted(k for k in set(history) | set(reference.history) if history.get(k) != reference.history.get(k))
        problems.append(f"MLflow histories differ for {len(bad)} metric(s), e.g. {bad[:3]}: "
                        f"{[history.get(k) for k in bad[:1]]} vs {[reference.history.get(k) for k in bad[:1]]}")
    for key in expected[:-1]:
        for name in ("rollout_results.md", "attention_diagnostics.md", "run_terminal.md"):
            if not (store.reports_dir(key) / name).is_file():
                problems.append(f"missing report {key}/{name}")
    if leftovers := temporaries(store.run_dir):
        problems.append(f"temporary files left: {[str(p.relative_to(store.run_dir)) for p in leftovers]}")
    if stuck := stuck_dagster_runs(root, run_name):
        problems.append(f"Dagster runs left STARTED: {stuck}")
    return problems


@dataclass
class Reference:
    root: Path
    run_name: str
    history: dict[str, list[tuple[int, float]]]
    work_seconds: float  # from the run lock to the end of the process: the span random kills aim at
    events: list[tuple[float, str]]  # its fault points and when it passed them


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uninterrupted `make run` of the tiny config: what every interrupted run must end up equal to."""
    root = tmp_path_factory.mktemp("reference")
    trace = root / "trace.txt"
    process = start(run_args(), env_for(root, trace=trace), root / "run.log")
    wait_for_point(trace, process.pid, "run_start", process)
    began = time.monotonic()
    rc, text = finish(process)
    assert rc == 0, text
    return Reference(root, RUN, metric_histories(default_tracking_uri(root), RUN), time.monotonic() - began,
                     trace_events(trace, process.pid))


# ------------------------------------------------------------------------------------- 1. kill -9 / resume


@dataclass
class Kill:
    how: str  # "random after X s" or the fault spec
    pid: int
    rc: int
    phase: str


@dataclass
class KilledRun:
    root: Path
    kills: list[Kill] = field(default_factory=list)
    after_checkpoint_kill: dict = field(default_factory=dict)
    final_output: str = ""
    first_mlflow_run_ids: list[str] = field(default_factory=list)


def kill_at_random_time(root: Path, trace: Path, delay: float, log: Path) -> Kill:
    process = start(run_args(), env_for(root, trace=trace), log)
    if wait_for_point(trace, process.pid, "run_start", process):
        time.sleep(delay)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    rc, _ = finish(process)
    return Kill(f"random, {delay:.2f} s after the run lock", process.pid, rc, phase_of(trace, process.pid))


def kill_fresh_run_at_random_moment(root: Path, trace: Path, reference: Reference, rng: random.Random,
                                    log: Path) -> Kill:
    """Kill a fresh run at a moment drawn uniformly from the reference run's timeline up to its last
    checkpoint write, anchored to the process's own progress (a fresh run passes the same fault points in
    the same order): after the point preceding that moment, plus the reference's time since that point.
    So the kill lands mid-phase, at random, but never after the run has finished, whatever the load."""
    times = [t for t, _ in reference.events]
    names = [n for _, n in reference.events]
    end = max(i for i, n in enumerate(names) if n == "mid_checkpoint_write") - 3
    moment = rng.uniform(times[0], times[end])
    anchor = max(i for i in range(end + 1) if times[i] <= moment)
    process = start(run_args(), env_for(root, trace=trace), log)
    deadline = time.monotonic() + 300
    while len(trace_events(trace, process.pid)) <= anchor and process.poll() is None:
        assert time.monotonic() < deadline, "the run did not progress"
        time.sleep(0.01)
    time.sleep(moment - times[anchor])
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    rc, _ = finish(process)
    return Kill(f"random, {moment - times[0]:.2f} s into the reference timeline (after {names[anchor]})",
                process.pid, rc, phase_of(trace, process.pid))


def kill_at_point(root: Path, trace: Path, spec: str, log: Path) -> Kill:
    process = start(run_args(), env_for(root, fault=spec, trace=trace), log)
    rc, _ = finish(process)
    phase = phase_of(trace, process.pid)
    if spec.startswith("kill:mid_file_write"):
        phase += " (inside an atomic file write)"
    return Kill(spec, process.pid, rc, phase)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> KilledRun:
    """The CI sample: the same `make run` killed three times (at a random moment, mid checkpoint write,
    between MLflow accepting a round and the journal recording it), then run once more to the end."""
    root = tmp_path_factory.mktemp("killed")
    trace, log = root / "trace.txt", root / "runs.log"
    rng = random.Random(SEED)
    result = KilledRun(root)
    result.kills.append(kill_fresh_run_at_random_moment(root, trace, reference, rng, log))
    result.first_mlflow_run_ids = [r.info.run_id for r in training_runs(default_tracking_uri(root), RUN)]
    kill = kill_at_point(root, trace, "kill:mid_checkpoint_write", log)
    result.kills.append(kill)
    # What a reader sees right after the crash: the checkpoint being written exists only under a temporary
    # name, marker included, and is not listed as complete.
    store = RunStore(root, RUN)
    result.after_checkpoint_kill = {
        "complete": store.complete_checkpoints(),
        "temporary_with_marker": [p.name for p in store.checkpoints_dir.glob(".tmp-*") if (p / COMPLETE_MARKER).exists()],
    }
    result.kills.append(kill_at_point(root, trace, "kill:after_mlflow_send", log))
    rc, result.final_output = cli(run_args(), env_for(root, trace=trace), log)
    assert rc == 0, result.final_output
    return result


@pytest.mark.slow
def test_the_sample_killed_the_run_three_times_at_the_intended_moments(killed_run: KilledRun):
    assert [k.rc for k in killed_run.kills] == [-signal.SIGKILL] * 3, killed_run.kills
    phases = [k.phase for k in killed_run.kills]
    assert phases[1] == "checkpoint rename" and phases[2] == "MLflow sent-marker", phases
    print("\n" + "\n".join(f"kill {i + 1}: {k.how} -> killed during {k.phase}" for i, k in enumerate(killed_run.kills)))


@pytest.mark.slow
def test_a_checkpoint_killed_mid_write_is_never_readable_as_complete(killed_run: KilledRun):
    seen = killed_run.after_checkpoint_kill
    assert seen["temporary_with_marker"], "the kill should have caught a fully written temporary checkpoint"
    written = seen["temporary_with_marker"][0].removeprefix(".tmp-").split(".")[0]
    assert written not in seen["complete"]


@pytest.mark.slow
def test_the_resumed_run_ends_with_the_weights_and_optimizer_of_an_uninterrupted_run(killed_run, reference):
    store, ref = RunStore(killed_run.root, RUN), RunStore(reference.root, RUN)
    assert store.complete_checkpoints() == ref.complete_checkpoints() == ["ckpt-0000", "ckpt-0001", "ckpt-0002"]
    for key in store.complete_checkpoints():
        assert same_tensors(load_weights(store.checkpoint_dir(key)), load_weights(ref.checkpoint_dir(key))), key
    assert same_tensors(load_optimizer_state(store.checkpoint_dir("ckpt-0002")),
                        load_optimizer_state(ref.checkpoint_dir("ckpt-0002")))


@pytest.mark.slow
def test_the_resumed_run_logs_every_metric_once_per_step_with_the_uninterrupted_values(killed_run, reference):
    history = metric_histories(default_tracking_uri(killed_run.root), RUN)
    assert history == reference.history
    assert [step for step, _ in history["reward"]] == [2, 4]
    assert [step for step, _ in history["eval/accuracy"]] == [0, 2, 4]


@pytest.mark.slow
def test_the_resumed_run_continues_the_same_mlflow_run(killed_run):
    runs = training_runs(default_tracking_uri(killed_run.root), RUN)
    assert len(runs) == 1
    if killed_run.first_mlflow_run_ids:  # the random kill may come before MLflow was first reached
        assert killed_run.first_mlflow_run_ids == [runs[0].info.run_id]


@pytest.mark.slow
def test_the_resume_leaves_no_temporaries_stuck_dagster_runs_or_missing_reports(killed_run, reference):
    assert differences_from(reference, killed_run.root) == []


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DAPO_VLM_FULL_FAULTS") != "1",
                    reason="the long kill loop runs with DAPO_VLM_FULL_FAULTS=1")
def test_many_kills_at_random_moments_and_points_lose_nothing(tmp_path: Path, reference: Reference):
    """≥ 10 kills, alternately at a random time and at a named point (every point in turn, in a seeded
    order, with a random hit count), over as many runs as it takes; each run, once finished, must equal
    the uninterrupted one."""
    wanted = int(os.environ.get("DAPO_VLM_FAULT_KILLS", "12"))
    rng = random.Random(SEED)
    points = [p for p in faults.POINTS if p != "run_start"]
    rng.shuffle(points)
    max_hits = {"mid_file_write": 24, "mid_checkpoint_write": 2, "before_mlflow_send": 3, "after_mlflow_send": 3,
                "before_round": 2, "before_rollouts": 2, "after_rollouts": 2, "after_attention": 2, "after_rewards": 2,
                "after_checkpoint": 2, "mid_report_write": 2, "before_round_done": 2}
    kills: list[Kill] = []
    misses = 0
    trials: list[dict] = []
    started = time.monotonic()
    trial = 0
    while len(kills) < wanted:
        trial += 1
        root = tmp_path / f"trial-{trial}"
        root.mkdir()
        trace, log = root / "trace.txt", root / "runs.log"
        trial_kills = 0
        while len(kills) < wanted:
            if (len(kills) + misses) % 2 == 0:
                kill = kill_at_random_time(root, trace, rng.uniform(0, 1.0) * reference.work_seconds, log)
            else:
                point = points[(len(kills) + misses) // 2 % len(points)]
                kill = kill_at_point(root, trace, f"kill:{point}@{rng.randint(1, max_hits.get(point, 1))}", log)
            if kill.rc == 0:  # finished before the fault fired: this run is done
                misses += 1
                break
            assert kill.rc == -signal.SIGKILL, Path(log).read_text()[-3000:]
            kills.append(kill)
            trial_kills += 1
        rc, text = cli(run_args(), env_for(root, trace=trace), log)
        assert rc == 0, text[-3000:]
        trials.append({"trial": trial, "kills": trial_kills, "problems": differences_from(reference, root)})
    coverage = Counter(k.phase for k in kills)
    report = {
        "kills": len(kills),
        "random_time_kills": sum(k.how.startswith("random") for k in kills),
        "named_point_kills": sum(not k.how.startswith("random") for k in kills),
        "faults_that_came_after_the_run_finished": misses,
        "runs": len(trials),
        "runs_differing_from_uninterrupted": sum(bool(t["problems"]) for t in trials),
        "seconds": round(time.monotonic() - started),
        "phases": dict(coverage.most_common()),
        "kill_list": [k.__dict__ for k in kills],
        "trials": trials,
    }
    print("\n" + json.dumps({k: v for k, v in report.items() if k != "kill_list"}, indent=2))
    if path := os.environ.get("DAPO_VLM_FAULT_REPORT"):
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    assert [t for t in trials if t["problems"]] == []
    assert len(coverage) >= 4, coverage


# ------------------------------------------------------------------- 1b. kill -9 of a multi-process update

TWO = ("--num-processes", "2")


def kill_parent_during_distributed_update(root: Path, trace: Path, log: Path, rounds: int = ROUNDS,
                                          delay: float = 0.0, extra_env: dict | None = None,
                                          phase: str = "update") -> tuple[Kill, list[str]]:
    """kill -9 of `make run` once the ranks of `phase` (rollouts, attention, update) run (+ `delay` s); the
    command lines of its descendants still alive 10 s later."""
    process = start(run_args(RUN, rounds, *TWO), {**env_for(root, trace=trace), **(extra_env or {})}, log)
    survivors = kill_once_phase_ranks_run(process, phase, delay)
    rc, _ = finish(process)
    return Kill(f"kill -9 of make run during the 2-process {phase} (+{delay:.2f} s)", process.pid, rc,
                f"distributed {phase}"), survivors


@pytest.mark.skipif(os.environ.get("DAPO_VLM_FULL_FAULTS") != "1",
                    reason="the long kill loop runs with DAPO_VLM_FULL_FAULTS=1")
@pytest.mark.parametrize("accelerate_config", ["cpu", "fsdp_cpu"])
def test_many_kills_of_a_two_process_update_lose_nothing(tmp_path_factory: pytest.TempPathFactory,
                                                         accelerate_config: str):
    """The multi-process cases of `make test-faults`, DDP and FSDP2: kill -9 of `make run` at random
    moments of the 2-process update (no child alive 10 s later), and a rank killed mid-step (the round
    fails naming rank 1 and its last log line, no checkpoint); the resumed run equals an uninterrupted
    2-process run, weights and AdamW state (FSDP2: its sharded optimizer_dcp/) included."""
    extra = {"DAPO_ACCELERATE_CONFIG": accelerate_config}
    rng = random.Random(SEED)
    ref_root = tmp_path_factory.mktemp("reference-2p")
    rc, text = cli(run_args(RUN, ROUNDS, *TWO), {**env_for(ref_root), **extra}, ref_root / "run.log")
    assert rc == 0, text[-3000:]
    reference = Reference(ref_root, RUN, metric_histories(default_tracking_uri(ref_root), RUN), 0.0, [])
    root = tmp_path_factory.mktemp("killed-2p")
    trace, log = root / "trace.txt", root / "runs.log"
    wanted = int(os.environ.get("DAPO_VLM_FAULT_KILLS", "4"))
    for n in range(wanted):
        if n == 1:  # round 1 to its end, so that the next kills hit round 2 (which resumes AdamW from ckpt-0001)
            rc, text = cli(run_args(RUN, 1, *TWO), {**env_for(root, trace=trace), **extra}, log)
            assert rc == 0, text[-3000:]
        if n % 2 == 0:
            kill, survivors = kill_parent_during_distributed_update(root, trace, log, delay=rng.uniform(0, 2),
                                                                    extra_env=extra)
            assert kill.rc == -signal.SIGKILL and survivors == [], (kill, survivors)
        else:
            rc, text = cli(run_args(RUN, ROUNDS, *TWO),
                           {**env_for(root, fault="kill:mid_update_step_rank1", trace=trace), **extra}, log)
            assert rc != 0 and "rank 1 of the update died (signal SIGKILL)" in text, text[-3000:]
            assert "its last log line: 'optimizer step 1: backward of micro-batch 1 done'" in text
    rc, text = cli(run_args(RUN, ROUNDS, *TWO), {**env_for(root, trace=trace), **extra}, log)
    assert rc == 0, text[-3000:]
    assert differences_from(reference, root) == []


def test_every_kind_of_interrupted_write_is_cleaned_up_and_nothing_else(tmp_path: Path):
    """The temporaries a kill can leave: ours, `models.save_policy`'s (nested in a checkpoint's temporary
    directory) and the MLflow journal's; `.lock`, `mlflow/lock` and real files stay."""
    store = RunStore(tmp_path, RUN)
    checkpoints = store.checkpoints_dir
    nested = checkpoints / ".tmp-ckpt-0002.ab12" / "..tmp-ckpt-0002.ab12.tmp-cd34"
    nested.mkdir(parents=True)
    (nested / "model.safetensors").write_bytes(b"half")
    (checkpoints / ".ckpt-0001.old-ef56").mkdir()
    (checkpoints / ".tmp-old-ckpt-0001-123").mkdir()
    (store.round_dir("ckpt-0000")).mkdir(parents=True)
    (store.round_dir("ckpt-0000") / ".tmp-rollouts.pt.xyz").write_bytes(b"half")
    (store.run_dir / "mlflow").mkdir()
    (store.run_dir / "mlflow" / ".run.json.4242.tmp").write_text("{")
    keep = [store.run_dir / ".lock", store.run_dir / "mlflow" / "lock", store.run_dir / "mlflow" / "journal.jsonl",
            store.round_dir("ckpt-0000") / "rollouts.pt"]
    for path in keep:
        path.write_text("x")
    store.remove_temporaries()
    assert temporaries(store.run_dir) == []
    assert sorted(p for p in store.run_dir.rglob("*") if p.is_file()) == sorted(keep)


def test_fault_specs_are_parsed_strictly():
    assert faults.parse("kill:after_rollouts@2, nan:advantages") == [
        faults.Fault("kill", "after_rollouts", 2), faults.Fault("nan", "advantages", 1)]
    for bad in ("boom:after_rollouts", "kill:", "kill:x@0", "kill:x@two"):
        with pytest.raises(ValueError, match="DAPO_VLM_FAULT"):
            faults.parse(bad)


# ------------------------------------------------------------------------------------------- 2. bad data


def _bad_rows_parquet(path: Path, *, all_bad: bool = False) -> Path:
    import polars as pl

    from dapo_ops.data import synthetic

    rows = synthetic.generate_rows(40, seed=3).to_dicts()
    rows[0]["question"] = None
    rows[1]["correct_choice_idx"] = 7
    rows[2]["choices"] = ["red"]
    rows[3]["image"] = b"\x89PNG\r\n\x1a\n not really"
    if all_bad:
        for row in rows[4:]:
            row["question"] = None
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def bad_data_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    return bad_data_scenario(tmp_path_factory.mktemp("bad_data_run"))


def bad_data_scenario(root: Path) -> tuple[Path, int, str]:
    source = _bad_rows_parquet(root / "vqa_with_bad_rows.parquet")
    rc, text = cli(run_args("bad", 1, "--dataset", str(source)), env_for(root), root / "run.log")
    return root, rc, text


@pytest.fixture(scope="module")
def unusable_data_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, str]:
    return unusable_data_scenario(tmp_path_factory.mktemp("unusable_data_run"))


def unusable_data_scenario(root: Path) -> tuple[Path, Path, int, str]:
    source = _bad_rows_parquet(root / "all_bad.parquet", all_bad=True)
    rc, text = cli(run_args("empty", 1, "--dataset", str(source)), env_for(root), root / "run.log")
    return root, source, rc, text


@pytest.mark.slow
def test_bad_rows_are_quarantined_with_reasons_and_the_run_goes_on(bad_data_run):
    import polars as pl

    root, rc, text = bad_data_run
    assert rc == 0, text
    quarantine = pl.read_parquet(root / "runs" / "bad" / "data" / "quarantine.parquet")
    assert sorted(quarantine["kind"].to_list()) == ["fewer than 2 choices", "image does not decode",
                                                    "index out of range", "missing question"]
    assert all(reason.startswith(f"row {row} ") for reason, row in
               zip(quarantine["reason"].to_list(), quarantine["source_row"].to_list(), strict=True))
    assert RunStore(root, "bad").complete_checkpoints() == ["ckpt-0000", "ckpt-0001"]


@pytest.mark.slow
def test_quarantine_counts_reach_the_dataset_asset_and_the_report(bad_data_run):
    import dagster as dg

    root, rc, _ = bad_data_run
    instance = dg.DagsterInstance.from_config(str(root / "dagster"))
    event = instance.get_latest_materialization_event(dg.AssetKey("dataset"))
    metadata = event.asset_materialization.metadata
    assert metadata["num_quarantined"].value == 4
    assert "image does not decode" in metadata["quarantine"].value
    report = (root / "runs" / "bad" / "reports" / "ckpt-0000" / "run_terminal.md").read_text()
    assert "4 quarantined rows" in report and "quarantine.parquet" in report


@pytest.mark.slow
def test_a_dataset_without_a_usable_row_stops_before_training_and_names_the_file(unusable_data_run):
    root, source, rc, text = unusable_data_run
    assert rc != 0
    assert f"{source}: no usable rows" in text
    assert not (root / "runs" / "empty" / "checkpoints").exists()


@pytest.mark.parametrize(("setting", "message"), [
    (["--set", "loss_type=ppo"], "loss_type='ppo' is unknown; use one of grpo, bnpo, dr_grpo, dapo"),
    (["--set", "num_generations=1"], "num_generations=1 gives no group statistics; set it to 2 or more"),
    (["--set", "steps_per_generation=3"], "is not divisible by steps_per_generation=3; choose a divisor of 8"),
    (["--model", "/nonexistent/qwen2.5-vl"], "model_name_or_path='/nonexistent/qwen2.5-vl' does not exist"),
])
def test_bad_configuration_fails_at_once_saying_what_to_change(tmp_path: Path, setting, message):
    began = time.monotonic()
    rc, text = cli(run_args("cfg", 1, *setting), env_for(tmp_path), tmp_path / "run.log", timeout=60)
    assert rc == 2
    assert message in text
    assert time.monotonic() - began < 30  # no Dagster, torch or MLflow start-up
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ 3. MLflow outage


class ToggleProxy:
    """A loopback TCP proxy in front of the MLflow server that can refuse connections (an outage)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones (pooled keep-alive connections included)."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        for s in [listener, *sockets]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on loopback (SQLite backend in tmp_path); yields its port."""
    from dapo_ops.tracking.mlflow_sink import ensure_store

    port = _free_port()
    ensure_store(f"sqlite:///{tmp_path}/server.db")  # as `make mlflow-ui` does: a copy of the store template
    log = open(tmp_path / "mlflow-server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [str(Path(PYTHON).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**env_for(tmp_path), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_an_mlflow_outage_loses_no_round_and_duplicates_none(tmp_path: Path, mlflow_server: int):
    """MLflow down for round 0 (journaled, warning, reports written), back for round 1 (which sends round 0
    first), down again for its own logging; `make sync-mlflow` then sends the rest: one value per step."""
    from mlflow import MlflowClient

    from dapo_ops.store.layout import read_json
    from dapo_ops.tracking.facade import Tracker

    proxy = ToggleProxy(mlflow_server)
    uri = f"http://127.0.0.1:{proxy.port}"
    root, trace, log = tmp_path / "root", tmp_path / "trace.txt", tmp_path / "run.log"
    root.mkdir()
    env = env_for(root, tracking_uri=uri, trace=trace)
    process = start(run_args("outage"), env, log)
    # Outage while round 0 runs; MLflow back once round 0 is done; down again once round 1 has generated.
    assert wait_for_point(trace, process.pid, "before_round_done", process)
    proxy.up()
    while trace_points(trace, process.pid).count("after_rollouts") < 2:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)
    proxy.down()
    rc, text = finish(process)
    assert rc == 0, text[-3000:]
    assert f"MLflow at {uri} is unavailable" in text  # the warning names MLflow
    store = RunStore(root, "outage")
    for key in ("ckpt-0000", "ckpt-0001"):
        assert (store.reports_dir(key) / "run_terminal.md").is_file()
    assert "MLflow at" in (store.reports_dir("ckpt-0000") / "run_terminal.md").read_text()
    direct = f"http://127.0.0.1:{mlflow_server}"
    tracker = Tracker(store.run_dir, "outage", tracking_uri=uri, data_root=root)
    assert [e["key"] for e in tracker.pending()] == ["ckpt-0001"]  # round 0 went out with round 1
    assert [s for s, _ in metric_histories(direct, "outage")["reward"]] == [2]

    proxy.up()
    env.pop(faults.TRACE_ENV)
    rc, text = cli([PYTHON, "-m", "pipelines.cli", "sync-mlflow", "--run-name", "outage"], env, log)
    assert rc == 0 and "outage: sent 1 journaled round(s)" in text, text
    history = metric_histories(direct, "outage")
    for k, key in enumerate(("ckpt-0000", "ckpt-0001")):
        metrics = read_json(store.round_dir(key) / "metrics.json")
        step = 2 * (k + 1)
        for name in ("reward", "loss", "entropy", "attention/all/mdi"):
            assert [v for s, v in history[name] if s == step] == [pytest.approx(metrics[name])], name
    assert [s for s, _ in history["reward"]] == [2, 4]
    assert [s for s, _ in history["eval/accuracy"]] == [0, 2, 4]
    run = training_runs(direct, "outage")[0]
    artifacts = {a.path for a in MlflowClient(direct).list_artifacts(run.info.run_id, "reports/ckpt-0000")}
    assert "reports/ckpt-0000/run_terminal.md" in artifacts
    proxy.down()


# ------------------------------------------------------------------------------------------------ 4. NaN/Inf


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return nan_scenario(tmp_path_factory.mktemp("nan_run"))


def nan_scenario(root: Path) -> dict:
    """Round 0 of a run with one NaN advantage (a real NaN loss), then the same command without the fault."""
    rc, text = cli(run_args(RUN, 1), env_for(root, fault="nan:advantages"), root / "run.log")
    store = RunStore(root, RUN)
    seen = {
        "rc": rc,
        "output": text,
        "complete": store.complete_checkpoints(),
        "entries": sorted(p.name for p in store.checkpoints_dir.iterdir()),
        "health": json.loads((store.round_dir("ckpt-0000") / "health_update.json").read_text()),
        "done": (store.round_dir("ckpt-0000") / "DONE").exists(),
        "log": (store.round_dir("ckpt-0000") / "terminal.log").read_text(),
    }
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(root / "dagster"))
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("policy_update"), "non_finite")])
    seen["check"] = next(iter(check.values())).status.value if check else None
    seen["rerun_rc"], seen["rerun_output"] = cli(run_args(RUN, 1), env_for(root), root / "run.log")
    seen["root"] = root
    return seen


@pytest.mark.slow
def test_a_nan_loss_fails_the_round_with_a_message_naming_the_cause(nan_run):
    assert nan_run["rc"] == 1
    assert "policy_update" in nan_run["output"] and "non-finite loss (nan)" in nan_run["output"]
    assert "the optimizer step was skipped and no checkpoint will be written" in nan_run["output"]
    assert "ERROR non-finite loss" in nan_run["log"]
    assert not nan_run["done"]


@pytest.mark.slow
def test_a_nan_loss_writes_no_checkpoint(nan_run):
    assert nan_run["complete"] == ["ckpt-0000"]
    assert nan_run["entries"] == ["ckpt-0000"]  # no ckpt-0001, not even a temporary one


@pytest.mark.slow
def test_a_nan_loss_fails_the_non_finite_health_check(nan_run):
    assert [(f["name"], f["passed"]) for f in nan_run["health"]] == [("non_finite", False)]
    assert nan_run["check"] == "FAILED"


@pytest.mark.slow
def test_after_a_nan_the_next_run_continues_as_if_nothing_happened(nan_run, reference):
    assert nan_run["rerun_rc"] == 0, nan_run["rerun_output"]
    store, ref = RunStore(nan_run["root"], RUN), RunStore(reference.root, RUN)
    assert store.complete_checkpoints() == ["ckpt-0000", "ckpt-0001"]
    assert same_tensors(load_weights(store.checkpoint_dir("ckpt-0001")), load_weights(ref.checkpoint_dir("ckpt-0001")))
    history = metric_histories(default_tracking_uri(nan_run['root']), RUN)
    assert history == {k: [(s, v) for s, v in values if s <= 2] for k, values in reference.history.items()}


def test_a_non_finite_gradient_skips_the_optimizer_step(embedded_policy_for):
    """In process: a gradient hook turns one gradient into Inf; the step must not touch any weight."""
    import torch

    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.data import synthetic
    from dapo_ops.models.inputs import encode_prompts
    from dapo_ops.rollout.generate import generate_rollouts
    from dapo_ops.train.update import NonFiniteUpdateError, make_optimizer, policy_update

    torch.manual_seed(0)
    policy = embedded_policy_for(list(synthetic.corpus())[:200], seed=0)
    rows = synthetic.generate_rows(2, seed=0)
    from dapo_ops.data.loading import decode_image

    prompts = encode_prompts(policy, rows["question"].to_list(), rows["choices"].to_list(),
                             [decode_image(b) for b in rows["image"].to_list()])
    batch = generate_rollouts(policy, prompts, num_generations=2, max_completion_length=4, seed=0)
    config = DapoConfig(prompts_per_round=2, num_generations=2, steps_per_generation=1, num_iterations=1)
    optimizer = make_optimizer(policy.model, config)
    before = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    weight = next(p for p in policy.model.parameters() if p.requires_grad)
    weight.register_hook(lambda grad: grad * float("inf"))
    old = torch.zeros(batch.completion_ids.shape)
    with pytest.raises(NonFiniteUpdateError, match="non-finite gradient norm"):
        policy_update(policy.model, optimizer, batch, old, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                      torch.ones(4, dtype=torch.bool), config, global_step=0, seed=0)
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
    assert not optimizer.state  # AdamW never stepped


# ------------------------------------------------------------------------------------------- 5. concurrency


@pytest.mark.slow
def test_two_run_names_on_one_data_root_both_finish_and_a_second_same_name_is_refused(tmp_path, reference):
    traces = {name: tmp_path / f"{name}.trace" for name in ("alpha", "beta")}
    processes = {name: start(run_args(name, 1), env_for(tmp_path, trace=traces[name]), tmp_path / f"{name}.log")
                 for name in ("alpha", "beta")}
    assert wait_for_point(traces["alpha"], processes["alpha"].pid, "run_start", processes["alpha"])
    began = time.monotonic()
    rc, text = cli(run_args("alpha", 1), env_for(tmp_path), tmp_path / "alpha-again.log", timeout=120)
    refused_in = time.monotonic() - began
    assert rc == 3
    assert f"run 'alpha' is already in use by pid {processes['alpha'].pid}" in text
    assert "choose another RUN_NAME" in text
    assert refused_in < 30, refused_in
    for name, process in processes.items():
        rc, text = finish(process)
        assert rc == 0, f"{name}: {text[-3000:]}"
    ref = RunStore(reference.root, RUN)
    uri = default_tracking_uri(tmp_path)
    for name in ("alpha", "beta"):
        store = RunStore(tmp_path, name)
        assert store.complete_checkpoints() == ["ckpt-0000", "ckpt-0001"]
        # Same config and seed as the reference, another run name: no cross-talk between the two runs.
        assert same_tensors(load_weights(store.checkpoint_dir("ckpt-0001")), load_weights(ref.checkpoint_dir("ckpt-0001")))
        assert (store.reports_dir("ckpt-0000") / "run_terminal.md").is_file()
        assert metric_histories(uri, name) == {
            k: [(s, v) for s, v in values if s <= 2] for k, values in reference.history.items()}
        assert not temporaries(store.run_dir)
    assert len({r.info.run_id for name in ("alpha", "beta") for r in training_runs(uri, name)}) == 2
