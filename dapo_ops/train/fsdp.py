"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the multi-process update, with sharded AdamW checkpoints.

accelerate 1.15 enables its FSDP plugin only on accelerators (on CPU it silently falls back to DDP), so
the `fsdp_cpu` config launches the ranks with accelerate's torchrun launcher and this module shards the
model itself, the same way on CPU (gloo) and GPU:

- every decoder layer / vision block, then the root, is a `fully_shard` unit: parameters, gradients
  (reduce-scattered, averaged like DDP's) and hence AdamW's moments live as 1/world shards (DTensors);
- the checkpoint keeps the consolidated weights (`save_pretrained` readers) and, instead of optimizer.pt,
  the sharded optimizer state as a `torch.distributed.checkpoint` folder `optimizer_dcp/` that every rank
  writes its shard into; the next round's ranks load it back (any world size: DCP reshards on load);
- a checkpoint with a plain optimizer.pt (a 1-process or DDP round) is loaded into the shards too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dapo_ops.train.update import LocalCollective

OPTIMIZER_DCP_DIR = "optimizer_dcp"
SHARDING_ENV = "DAPO_VLM_SHARDING"  # "fsdp2": set by the parent for the `fsdp_cpu` accelerate config
FSDP2 = "fsdp2"


def wanted() -> bool:
    return os.environ.get(SHARDING_ENV, "") == FSDP2


def _is_layer(module: torch.nn.Module) -> bool:
    # The repeated blocks of the VLM families (Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock, ...).
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name.endswith("VisionBlock")


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """`fully_shard` every decoder layer and vision block, then the root (in place; returns `model`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    for module in [m for m in model.modules() if _is_layer(m)]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path,
                           plain_state: dict[str, Any] | None, learning_rate: float) -> str:
    """Fill `optimizer` (over the sharded `model`) from `checkpoint/optimizer_dcp` or a plain whole
    state (FQN-keyed, from optimizer.pt). Returns where the state came from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    source = checkpoint / OPTIMIZER_DCP_DIR
    if source.is_dir():
        state = get_optimizer_state_dict(model, optimizer)  # the shards' layout, moments allocated
        dcp.load(state, checkpoint_id=str(source))
        set_optimizer_state_dict(model, optimizer, state)
        origin = f"sharded AdamW state from {source.parent.name}/{OPTIMIZER_DCP_DIR}"
    elif plain_state is not None:
        set_optimizer_state_dict(model, optimizer, plain_state, options=StateDictOptions(full_state_dict=True))
        origin = f"whole AdamW state from {checkpoint.name}/optimizer.pt, sharded"
    else:
        return "a fresh AdamW"
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    return origin


def plain_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole (unsharded) optimizer's state keyed by parameter name, the form `set_optimizer_state_dict`
    takes with `full_state_dict=True`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


class ShardedOptimizerState:
    """The ranks' DCP folder of the optimizer, moved into the checkpoint's temporary directory by
    `training.save_checkpoint` (rank 0) as `optimizer_dcp/`."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging

    def write_into(self, directory: Path) -> None:
        os.replace(self.staging, directory / OPTIMIZER_DCP_DIR)


class FSDPCollective(LocalCollective):
    """The update over FSDP2 shards: plain backward (FSDP2 reduce-scatters and averages the gradients, as
    DDP all-reduces and averages them), all-reduced step statistics, clipping of the sharded gradients by
    the global norm, whole weights gathered for the checkpoint and the optimizer state saved sharded."""

    def __init__(self, optimizer: torch.optim.Optimizer, staging: Path, *, reload: Any,
                 progress: Any = None) -> None:
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.optimizer = optimizer
        self.staging = staging
        self.reload = reload
        self.progress = progress or (lambda line: None)
        self.steps_done = 0
        self.backwards = 0

    def backward(self, loss: torch.Tensor) -> None:
        from dapo_ops.common import faults

        loss.backward()
        self.backwards += 1
        self.progress(f"optimizer step {self.steps_done + 1}: backward of micro-batch {self.backwards} done")
        faults.point(f"mid_update_step_rank{self.rank}")

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        tensor = values.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def clip_grad_norm(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       max_norm: float) -> torch.Tensor:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # a DTensor: the norm over all shards
        self.steps_done += 1
        self.backwards = 0
        self.progress(f"optimizer step {self.steps_done}: gradients synchronized and clipped")
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return full.detach().float().cpu()

    def full_policy(self, policy: Any, model: torch.nn.Module) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Collectives, every rank: the sharded optimizer state into the staging folder, then whole weights.
        if self.rank == 0:
            shutil.rmtree(self.staging, ignore_errors=True)
        torch.distributed.barrier()
        dcp.save(get_optimizer_state_dict(model, self.optimizer), checkpoint_id=str(self.staging))
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        whole = self.reload()
        whole.model.load_state_dict(state, strict=False)
        return whole

    def optimizer_to_save(self, optimizer: torch.optim.Optimizer) -> Any:
        return ShardedOptimizerState(self.staging) if self.is_main else None
