"""The round's heavy phases on several processes under `accelerate`: rollouts, the teacher-forced pass
(attention_metrics) and the policy update with its eval (DDP on CPU/GPU, FSDP, DeepSpeed ZeRO-3).

Parent side (no orchestrator here: Dagster's assets run the command through Pipes, with their own child):
`prepare_launch` writes the round's config and returns the `accelerate launch` command of the child
entry point (`dapo_ops.distributed.worker` unless given), with the same Python interpreter, and the same command under the
supervisor of `dapo_ops.distributed.process_hygiene` (what the parent runs: no orphans, a dead rank named).
`deployment()` reads `configs/deploy/<name>.yaml`: which Pipes client starts the ranks.

Child side, rollouts and attention (`run_phase_distributed`): every rank loads checkpoint k, takes its
share of the round's prompt groups (`dapo_ops.run.shards`), and rank 0 writes the gathered result: the files
of one process, with `num_processes` in rollouts.json / attention.json.

Child side, update: `run_update_distributed` — every rank loads checkpoint k and its optimizer state and the
round's rollouts.pt / old_logps.pt / rewards.parquet, then runs `training.run_update` (the same code as
in process) with an `AcceleratorCollective`: each optimizer step's rollouts (same seeded shuffle on all
ranks) are split across the ranks, gradients are synchronized by DDP (or sharded by FSDP/ZeRO-3), and
rank 0 evaluates and writes ckpt-(k+1) and update.json atomically, exactly as in process. With the
`fsdp_cpu` config the model is sharded by `dapo_ops.train.fsdp` (FSDP2) instead of wrapped in DDP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dapo_ops.common import faults
from dapo_ops.common.names import attn_column
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.distributed import process_hygiene
from dapo_ops.run.shards import SINGLE, DataParallel
from dapo_ops.store import layout as store_io
from dapo_ops.store.layout import RunStore
from dapo_ops.train import fsdp
from dapo_ops.train.update import LocalCollective

if TYPE_CHECKING:
    from dapo_ops.run.round_files import UpdateRecord

logger = logging.getLogger("dapo_vlm")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs" / "accelerate"
# Short names for the ready configs; DAPO_ACCELERATE_CONFIG takes one of them or a path to a yaml file.
ACCELERATE_CONFIGS = {
    "cpu": "cpu_ddp.yaml",
    "single_gpu": "single_gpu.yaml",
    "ddp": "multi_gpu_ddp.yaml",
    "fsdp": "fsdp.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "fsdp_cpu": "fsdp_cpu.yaml",
    "multi_node": "multi_node.yaml",
}
# Configs whose sharding this project applies itself (`dapo_ops.train.fsdp`): accelerate only launches the ranks.
FSDP2_CONFIGS = {"fsdp_cpu.yaml"}
CONFIG_ENV = "DAPO_ACCELERATE_CONFIG"
DEPLOYMENT_ENV = "DAPO_VLM_DEPLOYMENT"  # a configs/deploy/<name>.yaml: which Pipes client runs the ranks
DEPLOY_DIR = REPO_ROOT / "configs" / "deploy"
# The child each rank runs; an orchestrator passes its own (e.g. one that reports through its protocol).
CHILD_MODULE = "dapo_ops.distributed.worker"
UPDATE_CONFIG_FILE = "update_config.json"
UPDATE = "update"
ROLLOUTS = "rollouts"
ATTENTION = "attention"
PHASES = (ROLLOUTS, ATTENTION, UPDATE)  # what the child's `--phase` runs
NON_FINITE = "non_finite"


def uses_cuda(config: DapoConfig) -> bool:
    """Whether the update's processes would run on GPUs (`device` "auto" with CUDA present, or "cuda...")."""
    if config.device == "auto":
        return torch.cuda.is_available()
    return config.device.startswith("cuda")


@dataclass(frozen=True)
class Deployment:
    """Where the ranks run (`configs/deploy/<name>.yaml`): the Dagster Pipes client (`module.Class`)
    that starts them, the accelerate config it implies, and the client's extra `run` arguments."""

    name: str
    pipes_client: str
    accelerate_config: str | None
    run_args: dict[str, Any]


def deployment(name: str | None = None) -> Deployment:
    """`name`, else `DAPO_VLM_DEPLOYMENT`, else "local"; a clear error naming the file and key."""
    import yaml

    name = name or os.environ.get(DEPLOYMENT_ENV) or "local"
    path = DEPLOY_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DEPLOY_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"deployment {name!r}: no {path}; set {DEPLOYMENT_ENV} to one of {known}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    client = data.get("pipes_client")
    if not isinstance(client, str) or "." not in client:
        raise ValueError(f"{path}: key pipes_client must name a class as module.Class, got {client!r}")
    return Deployment(name, client, data.get("accelerate_config"), dict(data.get("run_args") or {}))


def accelerate_config_path(config: DapoConfig, choice: str | None = None) -> Path:
    """The accelerate yaml for this run: `choice`, else `DAPO_ACCELERATE_CONFIG`, else the deployment's,
    else multi-GPU DDP on GPUs and DDP over gloo on CPU. A name from `ACCELERATE_CONFIGS`, a file of
    `configs/accelerate/`, or a path."""
    choice = (choice or os.environ.get(CONFIG_ENV) or deployment().accelerate_config
              or ("ddp" if uses_cuda(config) else "cpu"))
    if choice not in ACCELERATE_CONFIGS and (CONFIG_DIR / choice).is_file():
        choice = str(CONFIG_DIR / choice)
    path = CONFIG_DIR / ACCELERATE_CONFIGS[choice] if choice in ACCELERATE_CONFIGS else Path(choice)
    if not path.is_file():
        raise FileNotFoundError(
            f"accelerate config {choice!r} not found at {path}; set {CONFIG_ENV} to one of "
            f"{', '.join(ACCELERATE_CONFIGS)} or to a yaml file"
        )
    return path.resolve()


def _machines(path: Path) -> int:
    import yaml

    return int((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("num_machines", 1))


@dataclass
class UpdateLaunch:
    """The `accelerate launch` argv, the same under the supervisor (what the parent runs), extra
    environment, working directory, and Pipes extras."""

    command: list[str]
    env: dict[str, str]
    cwd: Path
    accelerate_config: Path
    extras: dict[str, Any] = field(default_factory=dict)
    supervised: list[str] = field(default_factory=list)


def phase_config_path(run_store: RunStore, key: str, phase: str = UPDATE) -> Path:
    """The config the ranks of `phase` read: update_config.json, rollouts_config.json, attention_config.json."""
    files = run_store.round(key)
    return files.update_config if phase == UPDATE else files.dir / f"{phase}_config.json"


def failure_path(run_store: RunStore, key: str, phase: str = UPDATE) -> Path:
    """Where the supervisor (or rank 0) accounts for a failed launch of `phase`."""
    files = run_store.round(key)
    return files.update_failure if phase == UPDATE else files.dir / f"{phase}_failure.json"


def prepare_launch(config: DapoConfig, run_store: RunStore, key: str, *, accelerate_config: str | None = None,
                   python: str | None = None, phase: str = UPDATE, reanalysis: bool = False,
                   child_module: str = CHILD_MODULE) -> UpdateLaunch:
    """Write ``rounds/<key>/<phase>_config.json`` and build the `accelerate launch` command of `phase`
    (`PHASES`; `reanalysis`: the attention pass keeps the round's old log-probs) running `child_module`
    (`python -m`) on each rank.

    The child runs with this interpreter (`sys.executable`: the project's .venv). On CPU every process
    gets `cpu_count / num_processes` threads (at least one) unless OMP_NUM_THREADS is set, and
    ACCELERATE_USE_CPU makes accelerate pick the gloo backend (its MULTI_CPU type otherwise expects mpirun).
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: the multi-process phases are {', '.join(PHASES)}")
    n = config.num_processes
    if phase != UPDATE and config.prompts_per_round < n:
        raise ValueError(f"num_processes={n} exceeds prompts_per_round={config.prompts_per_round}: each rank of "
                         f"{phase} needs at least one prompt group")
    yaml = accelerate_config_path(config, accelerate_config)
    config_path = store_io.write_json_atomic(phase_config_path(run_store, key, phase), config.to_dict())
    failure = failure_path(run_store, key, phase)
    failure.unlink(missing_ok=True)
    logs = rank_log_dir(run_store, key, phase)
    for old in logs.glob("rank-*.log"):  # a previous, failed attempt's lines would name the wrong moment
        old.unlink()
    launcher = [
        python or sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(yaml),
        "--num_processes", str(n),
        # One machine: a free port, as several runs (or test sessions) may share it. Several: the yaml's
        # rendezvous address, and each node passes its own --machine_rank.
        *(["--num_machines", "1", "--main_process_port", "0"] if _machines(yaml) == 1 else []),
        "-m", child_module,
        "--data-root", str(Path(run_store.root).resolve()),
        "--run-name", run_store.run_name,
        "--checkpoint", key,
        "--config", str(config_path),
        "--phase", phase,
        *(["--reanalysis"] if reanalysis else []),
    ]
    # What the parent runs: the launcher under the supervisor, so that it and the ranks die with the
    # parent and a dead rank is named (`dapo_ops.distributed.process_hygiene`).
    supervised = process_hygiene.supervised(launcher, failure_file=failure, rank_logs=logs,
                                            python=python, phase=phase)
    env = {
        process_hygiene.PARENT_PID_ENV: str(os.getpid()),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if yaml.name in FSDP2_CONFIGS:
        env[fsdp.SHARDING_ENV] = fsdp.FSDP2
    if not uses_cuda(config):
        env["ACCELERATE_USE_CPU"] = "true"
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    extras = {"run_name": run_store.run_name, "checkpoint": key, "num_processes": n,
              "accelerate_config": yaml.name, "phase": phase}
    return UpdateLaunch(command=launcher, env=env, cwd=REPO_ROOT, accelerate_config=yaml, extras=extras,
                        supervised=supervised)


def rank_log_dir(run_store: RunStore, key: str, phase: str = UPDATE) -> Path:
    """`rounds/<key>/<phase>_logs/`: one `rank-<r>.log` per rank, what a failed round quotes."""
    return run_store.round_dir(key) / f"{phase}_logs"


class RankLog:
    """Appends a rank's progress lines to its `rank-<r>.log` (flushed per line: a SIGKILL loses none)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __call__(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"{line}\n")


def write_failure(run_store: RunStore, key: str, kind: str, message: str, phase: str = UPDATE) -> Path:
    """The child's account of a refused update (read by the parent, whose Pipes call only sees an exit code)."""
    return store_io.write_json_atomic(failure_path(run_store, key, phase), {"kind": kind, "message": message})


def read_failure(run_store: RunStore, key: str, phase: str = UPDATE) -> dict[str, str] | None:
    path = failure_path(run_store, key, phase)
    return store_io.read_json(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------- child


class AcceleratorCollective(LocalCollective):
    """`LocalCollective` over an `accelerate.Accelerator`: its backward (mixed precision, DeepSpeed), an
    all-reduce of the step statistics, DDP's `no_sync` between micro-batches, clipping of the synchronized
    gradients, and whole weights gathered from FSDP/ZeRO-3 shards for the checkpoint."""

    def __init__(self, accelerator: Any, *, reload: Callable[[], Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.progress = progress or (lambda line: None)
        self.steps_done = 0
        self.backwards = 0
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.reload = reload
        self.sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.ddp = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)

    @property
    def eval_data_parallel(self) -> DataParallel:
        """Who evaluates the trained policy: every rank under DDP (each holds it whole), else the main alone."""
        return SINGLE if self.sharded else DataParallel(self.rank, self.world_size)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)
        self.backwards += 1
        self.progress(f"optimizer step {self.steps_done + 1}: backward of micro-batch {self.backwards} done")
        # A rank dying mid-step (`DAPO_VLM_FAULT=kill:mid_update_step_rank<r>`): the reliability tests' case.
        faults.point(f"mid_update_step_rank{self.rank}")

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        tensor = values.to(self.accelerator.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor.cpu()

    def sync_context(self, model: torch.nn.Module, *, sync: bool) -> contextlib.AbstractContextManager[Any]:
        # Only DDP: FSDP's no_sync would hold unsharded gradients, and DeepSpeed accumulates by itself.
        if sync or not self.ddp:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def clip_grad_norm(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       max_norm: float) -> torch.Tensor:
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        self.steps_done += 1
        self.backwards = 0
        self.progress(f"optimizer step {self.steps_done}: gradients synchronized and clipped")
        # DeepSpeed clips inside its step (gradient_clipping in its config) and may report no norm.
        return torch.tensor(0.0) if norm is None else torch.as_tensor(norm).detach().float().cpu()

    def full_policy(self, policy: Any, model: torch.nn.Module) -> Any:
        if not self.sharded:
            return policy if self.is_main else None
        state = self.accelerator.get_state_dict(model)  # a collective: every rank takes part
        if not self.is_main:
            return None
        if self.reload is None:
            raise RuntimeError("sharded training needs `reload` to build the whole model for the checkpoint")
        whole = self.reload()
        result = whole.model.load_state_dict(state, strict=False)
        if result.missing_keys:
            logger.warning("gathered state dict lacks %s (tied weights are expected here)", result.missing_keys)
        return whole

    def optimizer_to_save(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        if self.sharded:
            # Sharded optimizer state is not the plain torch format `training.load_optimizer` reads; the
            # next round then starts AdamW afresh (its moments), as a warning in the round log says.
            return None
        return optimizer if self.is_main else None


def make_accelerator(config: DapoConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Every parameter takes part in each forward (vision tower included): no unused-parameter search.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(cpu=not uses_cuda(config), kwargs_handlers=[ddp])


def run_update_distributed(config: DapoConfig, run_store: RunStore, key: str, log: Any, *,
                           accelerator: Any = None, progress: Callable[[str], None] | None = None) -> UpdateRecord:
    """One rank of the update (run under `accelerate launch`). Returns the round's update record
    (rank 0: with eval, after writing ckpt-(k+1) and update.json; other ranks: without)."""
    from dapo_ops.models import loading as models
    from dapo_ops.run import phases as training
    from dapo_ops.run.round import reference_policy

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    accelerator = accelerator or make_accelerator(config)
    from dapo_ops.run.checkpoint_policy import load_checkpoint_policy

    def load() -> models.Policy:
        # Base + adapter for a LoRA checkpoint (a sharded model's gathered state then fits it key for key).
        return load_checkpoint_policy(run_store, key, config, device=accelerator.device)

    progress = progress or (lambda line: None)
    progress(f"rank {accelerator.process_index}: loading {key}")
    policy = load()
    optimizer = training.load_optimizer(run_store, key, policy, config)
    collective: LocalCollective
    if fsdp.wanted():
        # Every FSDP forward is a collective (all-gathers); the shared-prefix forward makes one model call
        # or two depending on the rank's rollouts, so under FSDP each rank runs the plain forward.
        config = config.replace(shared_prefix=False)
        model, optimizer, origin = _shard_for_fsdp2(config, run_store, key, policy, optimizer)
        collective = fsdp.FSDPCollective(optimizer, rank_log_dir(run_store, key) / ".tmp-optimizer_dcp",
                                         reload=load, progress=progress)
        kind = f"FSDP2 fully_shard over {torch.distributed.get_backend()}, {origin}"
    else:
        model, optimizer = accelerator.prepare(policy.model, optimizer)
        collective = AcceleratorCollective(accelerator, reload=load, progress=progress)
        kind = accelerator.distributed_type.value
    progress(f"rank {accelerator.process_index}: model and optimizer prepared ({kind})")
    if collective.is_main:
        log(f"update on {collective.world_size} processes ({kind}, "
            f"device {accelerator.device}, mixed precision {accelerator.mixed_precision})")
        if getattr(collective, "sharded", False):
            log.warning("sharded optimizer state is not saved with the checkpoint; the next round restarts AdamW")
    ref_policy = reference_policy(config, run_store, device=accelerator.device, torch_dtype=config.torch_dtype)
    record = training.run_update(config, run_store, key, policy, optimizer, log, ref_policy=ref_policy,
                                 collective=collective, model=model)
    progress(f"rank {accelerator.process_index}: update done after {collective.steps_done} optimizer steps")
    accelerator.wait_for_everyone()
    return record


def run_phase_distributed(phase: str, config: DapoConfig, run_store: RunStore, key: str, log: Any, *,
                          reanalysis: bool = False, accelerator: Any = None,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One rank of the rollouts or attention phase (run under `accelerate launch`): checkpoint k on this
    rank's device, its share of the round's groups; rank 0 writes the round's files. Returns the phase's
    materialization metadata (the same on every rank)."""
    from dapo_ops.run import phases as training
    from dapo_ops.run.checkpoint_policy import load_checkpoint_policy

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    accelerator = accelerator or make_accelerator(config)
    dp = DataParallel(accelerator.process_index, accelerator.num_processes)
    progress = progress or (lambda line: None)
    progress(f"rank {dp.rank}: loading {key} for {phase}")
    policy = load_checkpoint_policy(run_store, key, config, device=accelerator.device)
    if dp.is_main:
        log(f"{phase} on {dp.world_size} processes ({accelerator.distributed_type.value}, device {accelerator.device})")
    if phase == ROLLOUTS:
        table = training.generate_round_rollouts(config, run_store, key, policy, log, dp=dp)
        metadata = {"num_rollouts": table.height, "mean_completion_length": float(table["completion_length"].mean())}
    elif phase == ATTENTION:
        table = training.compute_attention(config, run_store, key, policy, log, write_old_logps=not reanalysis, dp=dp)
        metadata = {"num_rollouts": table.height,
                    f"mdi_{config.mdi_reward_stage}": training.nanmean(table[attn_column(config.mdi_reward_stage, "mdi")])}
    else:
        raise ValueError(f"phase {phase!r} is not run by run_phase_distributed (the update: run_update_distributed)")
    progress(f"rank {dp.rank}: {phase} done")
    accelerator.wait_for_everyone()
    return {"num_processes": dp.world_size, **metadata}


def _shard_for_fsdp2(config: DapoConfig, run_store: RunStore, key: str, policy: Any,
                     whole_optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """Shard `policy.model` in place, then a new AdamW over its shards, filled from the checkpoint's DCP
    folder or (whole, from optimizer.pt) from `whole_optimizer`. Returns (model, optimizer, origin)."""
    from dapo_ops.train.update import make_optimizer

    has_plain = (run_store.checkpoint_dir(key) / store_io.OPTIMIZER_FILE).exists()
    plain = fsdp.plain_state_by_name(policy.model, whole_optimizer) if has_plain else None
    model = fsdp.shard(policy.model)
    optimizer = make_optimizer(model, config)
    origin = fsdp.load_sharded_optimizer(model, optimizer, run_store.checkpoint_dir(key), plain, config.learning_rate)
    return model, optimizer, origin


class SilentLog:
    """The round log of ranks other than 0 (only rank 0 writes terminal.log)."""

    def __call__(self, message: str, level: int = logging.INFO) -> None:
        logger.debug(message)

    def warning(self, message: str) -> None:
        logger.debug(message)

    def error(self, message: str) -> None:
        logger.debug(message)
