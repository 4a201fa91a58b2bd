"""The policy of a checkpoint as training, eval and re-analysis use it: the model directory it refers to
(its own weights, or the base model of a LoRA checkpoint) plus its adapter, set up for `config` (a fresh
adapter under `use_peft`, a frozen vision tower, fp32 master weights under `bf16`)."""

from __future__ import annotations

import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models import loading as models
from dapo_ops.models import lora, precision
from dapo_ops.run import retention
from dapo_ops.store.layout import RunStore, resolve_model_dir


def load_checkpoint_policy(run_store: RunStore, key: str, config: DapoConfig,
                           device: str | torch.device | None = None) -> models.Policy:
    """Checkpoint `key` of the run, ready to sample from and to train with `config`. A checkpoint whose
    weights `save_total_limit` pruned is refused (`retention.PrunedCheckpointError`) before anything loads."""

    path = run_store.require_checkpoint(key)
    retention.require_weights(run_store, key)
    policy = models.load_policy(resolve_model_dir(run_store, key), device=config.device if device is None else device,
                                torch_dtype=config.torch_dtype)
    if lora.is_adapter_dir(path):
        if not config.use_peft:
            raise ValueError(
                f"checkpoint {key} of run {run_store.run_name!r} holds a LoRA adapter ({path / lora.ADAPTER_CONFIG}); "
                f"set use_peft: true to continue it, or `make export CHECKPOINT={key} MERGE=1` and start a new run "
                f"from the merged model")
        lora.load_adapter(policy.model, path)
    return configure(policy, config)


def configure(policy: models.Policy, config: DapoConfig) -> models.Policy:
    """`policy` set up for `config`: a fresh adapter under `use_peft` when it has none (its outputs are
    unchanged: LoRA's B starts at zero), then `prepare_for_training`."""
    if config.use_peft and not lora.has_adapter(policy.model):
        lora.add_adapter(policy.model, config)
    prepare_for_training(policy.model, config)
    return policy


def prepare_for_training(model: torch.nn.Module, config: DapoConfig) -> None:
    """Freeze the vision tower (`freeze_vision_tower`) and keep the trained parameters in fp32 (`bf16`)."""
    if config.freeze_vision_tower:
        for name, param in model.named_parameters():
            if lora.in_vision_tower(name) and "lora_" not in name:
                param.requires_grad_(False)
    if config.bf16 or config.torch_dtype != "float32":
        precision.fp32_master_weights(model)
