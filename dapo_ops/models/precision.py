"""bf16 and gradient checkpointing as a TRL user expects them: `torch_dtype` is the dtype the weights load
in; `bf16` runs the forwards of the update and the teacher-forced pass under bf16 autocast while the
trained parameters (and so AdamW's state) stay float32 master weights; `gradient_checkpointing`
recomputes activations in the update's backward (`use_reentrant=False`, as TRL sets it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dapo_ops.config.dapo import DapoConfig


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(config: DapoConfig, model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the model's device when `config.bf16`, else nothing."""
    if not config.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model_device(model).type, dtype=torch.bfloat16)


def fp32_master_weights(model: torch.nn.Module) -> int:
    """Cast the trainable parameters to float32 (a LoRA adapter of a bf16 base, or a bf16 model trained in
    full); returns how many were cast. Frozen weights keep their dtype."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, *, enabled: bool) -> Iterator[None]:
    """Activations recomputed in the backward while inside; generation afterwards keeps its KV cache."""
    if not enabled:
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()
