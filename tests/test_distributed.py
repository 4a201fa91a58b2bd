"""The policy update on several processes (accelerate, DDP over gloo on CPU) equals the in-process update.

One small round is prepared once (dataset, ckpt-0000, rollouts, old log-probs, rewards); copies of it are
updated in process and by `accelerate launch -m dapo_ops.distributed.worker` with 2 processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.distributed import launch as distributed
from dapo_ops.models import loading as models
from dapo_ops.run import phases as training
from dapo_ops.run.round_files import UpdateRecord
from dapo_ops.store.layout import RunStore, checkpoint_key
from dapo_ops.tracking.facade import default_tracking_uri
from dapo_ops.train.update import rank_micro_batches
from tests.conftest import SMALL_RUN
from tests.process_checks import alive, kill_once_phase_ranks_run, stuck_dagster_runs, temporaries

KEY = checkpoint_key(0)
NEXT = checkpoint_key(1)

# 16 rollouts; 7 kept in 4 groups → (steps take whole groups) optimizer steps of 5 and 2 rollouts; the 5-rollout
# step has 2 micro-batches per rank, so DDP's no_sync is exercised, and its group [8, 11] runs the shared-prefix
# forward on rank 0. (The zero-weight placeholder piece of a rank is covered by the split test below.)
CONFIG = DapoConfig(
    run_name="dist-eq", prompts_per_round=4, num_generations=4, max_completion_length=8,
    steps_per_generation=2, num_iterations=2, gradient_accumulation_steps=2, learning_rate=1e-3,
    num_train_examples=16, num_eval_examples=8, eval_subset_size=4, warmup_steps=0, num_processes=2,
)
KEPT = [0, 1, 2, 5, 8, 11, 14]


def _prepare_round(root: Path) -> RunStore:
    store = RunStore(root, CONFIG.run_name)
    log = training.round_log(store, KEY)
    training.prepare_dataset(CONFIG, store)
    policy = training.build_base_checkpoint(CONFIG, store, log)["policy"]
    training.generate_round_rollouts(CONFIG, store, KEY, policy, log)
    training.compute_attention(CONFIG, store, KEY, policy, log)
    training.compute_rewards(CONFIG, store, KEY, log)
    _perturb_round(store, KEY)
    return store


def _perturb_round(store: RunStore, key: str) -> None:
    out = store.round_dir(key)
    # Advantages of both signs and old log-probs off the current ones, so that ratios clip both ways.
    generator = torch.Generator().manual_seed(7)
    rewards = pl.read_parquet(out / "rewards.parquet")
    advantages = torch.randn(rewards.height, generator=generator).tolist()
    kept = [i in KEPT for i in range(rewards.height)]
    rewards.with_columns(pl.Series("advantage", advantages), pl.Series("kept", kept)).write_parquet(
        out / "rewards.parquet")
    old = torch.load(out / "old_logps.pt", weights_only=True)
    old["per_token_logps"] = old["per_token_logps"] + 0.3 * torch.randn(
        old["per_token_logps"].shape, generator=generator)
    torch.save(old, out / "old_logps.pt")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "prepared"
    _prepare_round(root)
    return root


def _copy(prepared: Path, name: str) -> RunStore:
    root = prepared.parent / name
    shutil.copytree(prepared, root)
    return RunStore(root, CONFIG.run_name)


def _update_in_process(store: RunStore, *, shared_prefix: bool = True) -> UpdateRecord:
    config = CONFIG.replace(num_processes=1, shared_prefix=shared_prefix)
    policy = models.load_policy(training.resolve_model_dir(store, KEY))
    optimizer = training.load_optimizer(store, KEY, policy, config)
    return training.run_update(config, store, KEY, policy, optimizer, training.round_log(store, KEY))


def _launch(store: RunStore, config: DapoConfig = CONFIG) -> subprocess.CompletedProcess:
    launch = distributed.prepare_launch(config, store, KEY)
    env = {**os.environ, **launch.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launch.command, cwd=launch.cwd, env=env, capture_output=True, text=True, timeout=300)


def _weights(store: RunStore, key: str) -> dict[str, torch.Tensor]:
    return load_file(str(store.checkpoint_dir(key) / "model.safetensors"))


@pytest.fixture(scope="module")
def both_updates(prepared: Path) -> tuple[RunStore, RunStore]:
    single, multi = _copy(prepared, "single"), _copy(prepared, "multi")
    _update_in_process(single)
    done = _launch(multi)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return single, multi


def test_each_step_splits_its_rollouts_over_the_ranks_into_equally_many_micro_batches():
    for size in range(1, 12):
        chunk = torch.arange(size)
        for world in (1, 2, 3):
            for accumulation in (1, 2, 4):
                per_rank = [rank_micro_batches(chunk, accumulation, world_size=world, rank=r) for r in range(world)]
                assert len({len(pieces) for pieces in per_rank}) == 1
                assert torch.cat([p for pieces in per_rank for p in pieces]).tolist() == list(range(size))
        # One process: the plain split into min(accumulation, size) non-empty micro-batches.
        assert [len(p) for p in rank_micro_batches(chunk, 4)] == [len(p) for p in torch.tensor_split(chunk, min(4, size))]


def test_launch_command_uses_this_python_and_a_ready_accelerate_config(tmp_path: Path):
    store = RunStore(tmp_path, "r")
    launch = distributed.prepare_launch(CONFIG.replace(device="cpu"), store, KEY)
    assert launch.command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert launch.command[launch.command.index("--num_processes") + 1] == "2"
    assert launch.accelerate_config.name == "cpu_ddp.yaml"
    assert launch.env["ACCELERATE_USE_CPU"] == "true"
    written = json.loads((store.round_dir(KEY) / distributed.UPDATE_CONFIG_FILE).read_text())
    assert DapoConfig.from_dict(written) == CONFIG.replace(device="cpu")


def test_each_phase_launches_the_child_with_its_own_config_failure_file_and_rank_logs(tmp_path: Path):
    store = RunStore(tmp_path, "r")
    for phase in ("rollouts", "attention"):
        launch = distributed.prepare_launch(CONFIG.replace(device="cpu"), store, KEY, phase=phase, reanalysis=True)
        command = launch.command
        assert command[command.index("--phase") + 1] == phase and "--reanalysis" in command
        config_file = Path(command[command.index("--config") + 1])
        assert config_file == store.round_dir(KEY) / f"{phase}_config.json" and config_file.exists()
        supervised = launch.supervised
        assert supervised[supervised.index("--failure-file") + 1] == str(store.round_dir(KEY) / f"{phase}_failure.json")
        assert supervised[supervised.index("--rank-logs") + 1] == str(store.round_dir(KEY) / f"{phase}_logs")
        assert launch.extras["phase"] == phase
    with pytest.raises(ValueError, match="num_processes=2 exceeds prompts_per_round=1"):
        distributed.prepare_launch(CONFIG.replace(device="cpu", prompts_per_round=1), store, KEY, phase="rollouts")
    with pytest.raises(ValueError, match="phase 'rewards'"):
        distributed.prepare_launch(CONFIG, store, KEY, phase="rewards")


@pytest.mark.parametrize("name", sorted(distributed.ACCELERATE_CONFIGS))
def test_every_ready_accelerate_config_loads(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    path = distributed.accelerate_config_path(CONFIG, name)
    assert load_config_from_file(str(path)).compute_environment.value == "LOCAL_MACHINE"


@pytest.mark.slow
def test_two_processes_give_the_same_loss_and_statistics_per_step(both_updates):
    single, multi = (json.loads((s.round_dir(KEY) / "update.json").read_text()) for s in both_updates)
    assert multi["num_processes"] == 2 and single["num_processes"] == 1
    assert len(single["steps"]) == len(multi["steps"]) == 4
    for one, two in zip(single["steps"], multi["steps"], strict=True):
        assert one.keys() == two.keys()
        for name in one:
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), name
    assert any(abs(s["loss"]) > 1e-3 for s in single["steps"])
    assert any(s["clip_ratio/region_mean"] > 0 for s in single["steps"])


@pytest.mark.slow
def test_two_processes_give_the_same_updated_weights(both_updates):
    single, multi = both_updates
    before, one, two = _weights(single, KEY), _weights(single, NEXT), _weights(multi, NEXT)
    assert one.keys() == two.keys()
    moved = max(float((one[k] - before[k]).abs().max()) for k in one)
    assert moved > 1e-4  # the update did change the weights
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name
    optimizer = torch.load(multi.checkpoint_dir(NEXT) / training.OPTIMIZER_FILE, weights_only=True)
    assert optimizer["state"] and len(optimizer["param_groups"][0]["params"]) == len(
        torch.load(single.checkpoint_dir(NEXT) / training.OPTIMIZER_FILE, weights_only=True)["param_groups"][0]["params"])


@pytest.mark.slow
def test_two_processes_sharing_prompts_match_one_process_without_sharing(prepared: Path, both_updates):
    """The 2-process update runs the shared-prefix forward (the default); one process without sharing agrees."""
    _, multi = both_updates
    assert CONFIG.shared_prefix
    unshared = _copy(prepared, "unshared")
    _update_in_process(unshared, shared_prefix=False)
    one, two = _weights(unshared, NEXT), _weights(multi, NEXT)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.slow
def test_a_non_finite_loss_stops_every_process_and_writes_nothing(prepared: Path):
    store = _copy(prepared, "nan")
    path = store.round_dir(KEY) / "rewards.parquet"
    rewards = pl.read_parquet(path)
    rewards.with_columns(pl.lit(float("nan")).alias("advantage")).write_parquet(path)
    done = _launch(store)
    assert done.returncode != 0
    failure = distributed.read_failure(store, KEY)
    assert failure is not None and failure["kind"] == distributed.NON_FINITE, done.stderr[-3000:]
    assert "non-finite loss" in failure["message"]
    assert not store.checkpoint_dir(NEXT).exists()
    assert not (store.round_dir(KEY) / "update.json").exists()


def _one_process_round(run: RunStore, root: Path) -> RunStore:
    """The rollouts, teacher-forced pass and rewards of `run`'s round ckpt-0000 redone in this process,
    with one process, from a copy of its data and ckpt-0000."""
    store = RunStore(root, run.run_name)
    shutil.copytree(run.data_dir, store.data_dir)
    shutil.copytree(run.checkpoint_dir(KEY), store.checkpoint_dir(KEY))
    config = DapoConfig.from_dict(json.loads(run.config_path.read_text())).replace(num_processes=1)
    policy = models.load_policy(training.resolve_model_dir(store, KEY))
    log = training.round_log(store, KEY)
    training.generate_round_rollouts(config, store, KEY, policy, log)
    training.compute_attention(config, store, KEY, policy, log)
    training.compute_rewards(config, store, KEY, log)
    return store


# `NUM_PROCESSES=2 make run ROUNDS=1` on conftest's SMALL_RUN, cold.
TWO_PROCESS_RUN = {**{k: v for k, v in SMALL_RUN.items() if k != "run_name"}, "warmup_steps": 0}


@dataclass
class KilledTwoProcessRun:
    root: Path
    kill_returncode: int
    survivors: list[str]  # command lines of the killed run's descendants still alive 10 s after the kill
    complete_after_kill: list[str]
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> KilledTwoProcessRun:
    """`NUM_PROCESSES=2 make run ROUNDS=1` killed -9 while its rollouts run on 2 ranks (the first launch),
    then run again to the end, as a user re-runs a crashed command."""
    root = tmp_path_factory.mktemp("two-process-run")
    args = [sys.executable, "-m", "pipelines.cli", "run", "--rounds", "1", "--num-processes", "2",
            "--run-name", "dist-run", "--quiet", *(f"--set={name}={value}" for name, value in TWO_PROCESS_RUN.items())]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DAPO_VLM_", "DAGSTER_", "MLFLOW_"))},
           "DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
           "MLFLOW_TRACKING_URI": default_tracking_uri(root), "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(args, cwd=distributed.REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        survivors = kill_once_phase_ranks_run(killed, "rollouts")
    finally:
        killed.kill()
    complete = RunStore(root, "dist-run").complete_checkpoints()
    resumed = subprocess.run(args, cwd=distributed.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    return KilledTwoProcessRun(root, killed.returncode, survivors, complete, resumed)


@pytest.mark.slow
def test_kill_9_of_make_run_during_a_two_process_phase_leaves_no_child_and_the_next_run_resumes(two_process_run):
    """The CI sample of the multi-process kills (the full loop of tests/test_reliability.py kills the update;
    `test_kill_9_of_the_parent_during_a_two_process_update...` below, a bare update)."""
    run = two_process_run
    assert run.kill_returncode == -signal.SIGKILL
    assert run.survivors == []
    assert run.complete_after_kill == [KEY]
    assert run.resumed.returncode == 0, run.resumed.stdout[-3000:] + run.resumed.stderr[-5000:]
    assert RunStore(run.root, "dist-run").complete_checkpoints() == [KEY, NEXT]
    assert temporaries(RunStore(run.root, "dist-run").run_dir) == []
    assert stuck_dagster_runs(run.root, "dist-run") == []


@pytest.mark.slow
def test_make_run_with_two_processes_runs_rollouts_attention_update_and_eval_through_dagster_pipes(two_process_run):
    """`NUM_PROCESSES=2 make run ROUNDS=1` on a CI-sized run (the resumed run above): the rollouts,
    attention_metrics and policy_update assets each launch their phase with accelerate through Pipes; the round's
    files are those of one process (the same rollouts token for token, the same schemas and counts), and MLflow
    has each metric once, although the first run was killed mid-round."""
    import dagster as dg
    from mlflow.tracking import MlflowClient

    from dapo_ops.reporting.reports import round_metric_names

    tmp_path, done = two_process_run.root, two_process_run.resumed
    uri = default_tracking_uri(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    store = RunStore(tmp_path, "dist-run")
    assert store.complete_checkpoints() == [KEY, NEXT]
    files = store.round(KEY)
    for record in (files.rollouts_json, files.attention_json, files.update):
        assert json.loads(record.read_text())["num_processes"] == 2, record.name
    terminal = files.log.read_text()
    for line in ("rollouts on 2 processes", "attention on 2 processes", "update on 2 processes"):
        assert line in terminal
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster"))
    for asset in ("rollouts", "attention_metrics"):
        metadata = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata
        assert metadata["num_processes"].value == 2, asset
    event = instance.get_latest_materialization_event(dg.AssetKey("policy_update"))
    metadata = event.asset_materialization.metadata
    assert metadata["num_processes"].value == 2 and metadata["next_checkpoint"].value == NEXT
    assert "update_seconds" in metadata  # reported by the child through Pipes
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dapo-vlm").experiment_id])
    assert [run.data.params["num_processes"] for run in runs] == ["2"]
    for name in (*round_metric_names(), "eval/accuracy"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, name)]
        assert steps.count(2) == 1, name  # once, at the round's global step (ckpt-0000's eval is at step 0)

    one = _one_process_round(store, tmp_path / "one")
    single = one.round(KEY)
    two_rollouts, one_rollouts = pl.read_parquet(files.rollouts_parquet), pl.read_parquet(single.rollouts_parquet)
    assert two_rollouts.schema == one_rollouts.schema
    assert two_rollouts["completion_ids"].to_list() == one_rollouts["completion_ids"].to_list()  # per-prompt seeds
    assert two_rollouts.equals(one_rollouts)
    for name in ("attention_parquet", "rewards"):
        two_table, one_table = pl.read_parquet(getattr(files, name)), pl.read_parquet(getattr(single, name))
        assert two_table.schema == one_table.schema and two_table.height == one_table.height, name
    two_attention, one_attention = pl.read_parquet(files.attention_parquet), pl.read_parquet(single.attention_parquet)
    for column in one_attention.columns:
        assert torch.allclose(torch.tensor(two_attention[column].to_list(), dtype=torch.float64),
                              torch.tensor(one_attention[column].to_list(), dtype=torch.float64),
                              rtol=1e-4, atol=1e-5, equal_nan=True), column
    two_old, one_old = (torch.load(f.old_logps, weights_only=True) for f in (files, single))
    assert two_old["per_token_logps"].shape == one_old["per_token_logps"].shape
    assert torch.allclose(two_old["per_token_logps"], one_old["per_token_logps"], atol=1e-5)
    for name in ("rollouts_json", "attention_json"):
        assert json.loads(getattr(files, name).read_text()).keys() == json.loads(getattr(single, name).read_text()).keys()
    assert json.loads(single.rollouts_json.read_text())["num_processes"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the smoke script measures instead")
def test_gpu_smoke_script_says_no_gpu_is_present_and_exits_0_or_3_when_a_gpu_is_required():
    script = distributed.REPO_ROOT / "scripts" / "gpu_smoke.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    skipped = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.startswith("SKIPPED: no GPU present")
    required = subprocess.run([str(script)], env={**env, "REQUIRE_GPU": "1"}, capture_output=True, text=True,
                              timeout=120)
    assert required.returncode == 3 and "SKIPPED: no GPU present" in required.stdout


# ------------------------------------------------------------------------------------ process hygiene

# A stand-in for the Dagster process: it starts the supervised launch as `pipelines.assets._launcher` does.
PARENT = ("import os, subprocess, sys; from dapo_ops.distributed import process_hygiene as h; "
          "os.environ[h.PARENT_PID_ENV] = str(os.getpid()); sys.exit(subprocess.run(sys.argv[1:]).returncode)")


def _supervised_env(launch: distributed.UpdateLaunch, **extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DAPO_VLM_")}, **launch.env,
            "OMP_NUM_THREADS": "1", **extra}


def test_a_parent_death_signal_kills_the_child_when_its_parent_is_killed(tmp_path: Path):
    import psutil

    # parent -> child (asks for SIGKILL at its parent's death, then sleeps); kill -9 the parent.
    child = "from dapo_ops.distributed import process_hygiene as h; import time; h.set_parent_death_signal(); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               f"'-c', {child!r}]); time.sleep(60)"], cwd=distributed.REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(distributed.REPO_ROOT)})
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = psutil.Process(parent.pid).children()
        assert len(children) == 1
        time.sleep(1.0)  # the child has asked for its signal (its interpreter is up)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(children) == []
    finally:
        parent.kill()


def test_torchruns_failure_summary_names_the_rank_and_its_last_log_line(tmp_path: Path):
    from dapo_ops.distributed import process_hygiene

    (tmp_path / "rank-1.log").write_text("rank 1: loading ckpt-0000\noptimizer step 1: backward of micro-batch 1 done\n")
    summary = ("Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-01_20:50:00\n  host      : h\n"
               "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n")
    assert process_hygiene.rank_failure(summary) == (1, -9)
    message = process_hygiene.failure_message(summary, 1, tmp_path)
    assert message.startswith("rank 1 of the update died (signal SIGKILL)")
    assert "'optimizer step 1: backward of micro-batch 1 done'" in message
    assert "exited with code 1 and named no failed rank" in process_hygiene.failure_message("boom\n", 1, tmp_path)
    # Rollouts and the teacher-forced pass run on ranks too: the message names the phase that died.
    assert process_hygiene.failure_message(summary, 1, tmp_path, "rollouts").startswith("rank 1 of the rollouts died")


@pytest.mark.slow
def test_kill_9_of_the_parent_during_a_two_process_update_leaves_no_child_alive_after_10_s(prepared: Path):
    import psutil

    store = _copy(prepared, "parent-killed")
    launch = distributed.prepare_launch(CONFIG, store, KEY)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *launch.supervised], cwd=launch.cwd,
                              env=_supervised_env(launch), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        logs = distributed.rank_log_dir(store, KEY)
        deadline = time.monotonic() + 240
        while not all((logs / f"rank-{r}.log").exists() for r in (0, 1)):
            assert parent.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        family = psutil.Process(parent.pid).children(recursive=True)  # supervisor, launcher, 2 ranks
        assert sum(distributed.CHILD_MODULE in " ".join(p.cmdline()) for p in alive(family)) >= 2, family
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(family) == [], [p.cmdline() for p in alive(family)]
        assert not store.checkpoint_dir(NEXT).exists()
    finally:
        parent.kill()


@pytest.mark.slow
def test_a_rank_that_dies_mid_step_fails_the_update_naming_it_and_writes_no_checkpoint(prepared: Path):
    from dapo_ops.common import faults
    from dapo_ops.distributed import process_hygiene

    store = _copy(prepared, "rank-killed")
    launch = distributed.prepare_launch(CONFIG, store, KEY)
    done = subprocess.run([sys.executable, "-c", PARENT, *launch.supervised], cwd=launch.cwd,
                          env=_supervised_env(launch, **{faults.FAULT_ENV: "kill:mid_update_step_rank1"}),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    failure = distributed.read_failure(store, KEY)
    assert failure is not None and failure["kind"] == process_hygiene.RANK_FAILED, done.stdout[-3000:]
    assert failure["message"].startswith("rank 1 of the update died (signal SIGKILL)")
    assert "its last log line: 'optimizer step 1: backward of micro-batch 1 done'" in failure["message"]
    assert not store.checkpoint_dir(NEXT).exists()
    assert not (store.round_dir(KEY) / "update.json").exists()


# ------------------------------------------------------------------------------------ FSDP2 on CPU (gloo)


def _launch_fsdp(store: RunStore, key: str, num_processes: int = 2) -> None:
    launch = distributed.prepare_launch(CONFIG.replace(num_processes=num_processes), store, key,
                                        accelerate_config="fsdp_cpu")
    env = {**os.environ, **launch.env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch.command, cwd=launch.cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _in_process(store: RunStore, key: str) -> None:
    config = CONFIG.replace(num_processes=1)
    policy = models.load_policy(training.resolve_model_dir(store, key))
    optimizer = training.load_optimizer(store, key, policy, config)
    training.run_update(config, store, key, policy, optimizer, training.round_log(store, key))


def _moments_by_name(store: RunStore, key: str) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state per parameter name, from optimizer.pt (id-keyed) or the sharded optimizer_dcp/."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = store.checkpoint_dir(key)
    if (checkpoint / "optimizer_dcp").is_dir():
        whole = checkpoint.parent / f"{key}-optimizer.pt"
        dcp_to_torch_save(checkpoint / "optimizer_dcp", whole)
        return torch.load(whole, weights_only=True)["state"]
    saved = torch.load(checkpoint / training.OPTIMIZER_FILE, weights_only=True)
    names = [n for n, p in models.load_policy(checkpoint).model.named_parameters() if p.requires_grad]
    return {names[i]: state for i, state in saved["state"].items()}


@dataclass
class FsdpRuns:
    plain: RunStore
    sharded: RunStore
    first_moments: tuple[dict, dict]  # AdamW state after round 1 (plain, sharded): round 2 deletes it
    first_checkpoint_files: list[str]  # what the sharded ckpt-0001 held before round 2


@pytest.fixture(scope="module")
def fsdp_runs(prepared: Path) -> FsdpRuns:
    """Two rounds updated in process (AdamW state in optimizer.pt) and with FSDP2 on 2 processes (round 2
    resumes AdamW from round 1's optimizer_dcp/); both rounds' rollouts are the same files."""
    plain, sharded = _copy(prepared, "fsdp-plain"), _copy(prepared, "fsdp-sharded")
    _in_process(plain, KEY)
    _launch_fsdp(sharded, KEY)
    first = (_moments_by_name(plain, NEXT), _moments_by_name(sharded, NEXT))
    files = sorted(str(p.relative_to(sharded.checkpoint_dir(NEXT))) for p in sharded.checkpoint_dir(NEXT).rglob("*"))
    log = training.round_log(plain, NEXT)
    policy = models.load_policy(training.resolve_model_dir(plain, NEXT))
    training.generate_round_rollouts(CONFIG, plain, NEXT, policy, log)
    training.compute_attention(CONFIG, plain, NEXT, policy, log)
    training.compute_rewards(CONFIG, plain, NEXT, log)
    _perturb_round(plain, NEXT)
    shutil.copytree(plain.round_dir(NEXT), sharded.round_dir(NEXT))
    _in_process(plain, NEXT)
    _launch_fsdp(sharded, NEXT)
    return FsdpRuns(plain, sharded, first, files)


@pytest.mark.slow
def test_fsdp2_checkpoints_hold_consolidated_weights_and_the_sharded_adamw_state(fsdp_runs: FsdpRuns):
    sharded = fsdp_runs.sharded
    files = fsdp_runs.first_checkpoint_files
    assert {"model.safetensors", "optimizer_dcp/.metadata", "optimizer_dcp/__0_0.distcp",
            "optimizer_dcp/__1_0.distcp"} <= set(files)
    assert training.OPTIMIZER_FILE not in files
    assert "FSDP2 fully_shard over gloo" in (sharded.round_dir(KEY) / "terminal.log").read_text()
    last = sharded.checkpoint_dir(checkpoint_key(2))
    assert models.load_policy(last).model.config.model_type  # a save_pretrained reader loads it
    # As with optimizer.pt, only the newest checkpoint keeps its optimizer state.
    assert (last / "optimizer_dcp").is_dir() and not (sharded.checkpoint_dir(NEXT) / "optimizer_dcp").exists()


@pytest.mark.slow
def test_fsdp2_on_two_processes_updates_the_weights_and_moments_of_one_process_within_1e_5(fsdp_runs: FsdpRuns):
    plain, sharded = fsdp_runs.plain, fsdp_runs.sharded
    one, two = _weights(plain, NEXT), _weights(sharded, NEXT)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), name
    single, shards = fsdp_runs.first_moments
    assert single.keys() == shards.keys()
    for name, state in single.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[moment], shards[name][moment], rtol=0, atol=1e-5), (name, moment)


@pytest.mark.slow
def test_fsdp2_resumes_adamw_from_the_sharded_checkpoint_like_an_uninterrupted_optimizer(fsdp_runs: FsdpRuns):
    plain, sharded = fsdp_runs.plain, fsdp_runs.sharded
    last = checkpoint_key(2)
    assert "sharded AdamW state from ckpt-0001/optimizer_dcp" in (sharded.round_dir(NEXT) / "terminal.log").read_text()
    one, two = _weights(plain, last), _weights(sharded, last)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), name
    single, shards = _moments_by_name(plain, last), _moments_by_name(sharded, last)
    for name, state in single.items():
        assert int(state["step"]) == int(shards[name]["step"]) == 8  # two rounds of 4 optimizer steps each
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[moment], shards[name][moment], rtol=0, atol=1e-6), (name, moment)


# ------------------------------------------------------------------------------------ deployments


def test_the_local_deployment_starts_the_ranks_with_the_subprocess_pipes_client(tmp_path: Path, monkeypatch):
    import dagster as dg

    from pipelines.assets import pipes_client_for

    monkeypatch.delenv(distributed.DEPLOYMENT_ENV, raising=False)
    deployment = distributed.deployment()
    assert deployment.pipes_client == "dagster.PipesSubprocessClient"
    launch = distributed.prepare_launch(CONFIG.replace(device="cpu"), RunStore(tmp_path, "r"), KEY)
    client, run_args = pipes_client_for(deployment, launch)
    assert type(client) is dg.PipesSubprocessClient and run_args == {}


def test_the_k8s_deployment_names_the_k8s_pipes_client_and_the_multi_node_accelerate_config(tmp_path: Path,
                                                                                            monkeypatch):
    import importlib.util

    from pipelines.assets import pipes_client_class

    monkeypatch.setenv(distributed.DEPLOYMENT_ENV, "k8s")
    monkeypatch.delenv(distributed.CONFIG_ENV, raising=False)
    deployment = distributed.deployment()
    assert deployment.pipes_client == "dagster_k8s.PipesK8sClient"
    assert deployment.run_args["image"] and deployment.run_args["base_pod_spec"]["volumes"]
    launch = distributed.prepare_launch(CONFIG.replace(num_processes=16), RunStore(tmp_path, "r"), KEY)
    assert launch.accelerate_config.name == "multi_node.yaml"
    assert "--num_machines" not in launch.command  # the yaml's 2 machines and rendezvous address stand
    import yaml

    instance = yaml.safe_load((distributed.DEPLOY_DIR / "k8s" / "dagster.yaml").read_text())
    assert (instance["run_launcher"]["module"], instance["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    if importlib.util.find_spec("dagster_k8s") is None:
        with pytest.raises(ImportError, match="pip install dagster-k8s"):
            pipes_client_class(deployment)
    else:
        import dagster_k8s

        assert pipes_client_class(deployment) is dagster_k8s.PipesK8sClient


def test_an_unknown_deployment_is_refused_naming_the_known_ones(monkeypatch):
    monkeypatch.setenv(distributed.DEPLOYMENT_ENV, "cloud")
    with pytest.raises(FileNotFoundError, match="set DAPO_VLM_DEPLOYMENT to one of k8s, local"):
        distributed.deployment()
