"""LoRA through peft, with TRL's `ModelConfig` names (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_target_modules`), on the model itself: peft's `inject_adapter_in_model` puts the adapter layers in
place, so a `Policy` keeps its Qwen2.5-VL model and every forward, generation and attention hook works
unchanged. (transformers' own `add_adapter` would do the same but asks for a newer peft than PyPI has.)

A LoRA checkpoint holds `adapter_model.safetensors` + `adapter_config.json` in peft's format
(`PeftModel.from_pretrained` reads it) and the adapter's AdamW state, never the base weights: its
state.json names the base model directory. The reference policy for `beta > 0` is the same model with the
adapter disabled (`adapter_disabled`, what `PeftModel.disable_adapter()` does), not a second copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dapo_ops.config.dapo import DapoConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every linear layer of the language model (attention and MLP), not the vision tower's nor lm_head. The
# language model is `language_model` in every family but Idefics3, whose is `text_model`.
LANGUAGE_MODEL_LINEARS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The vision tower's module per family: Qwen-VL `visual`, LLaVA and Gemma 3 `vision_tower`, Idefics3 `vision_model`.
VISION_TOWER_NAMES: tuple[str, ...] = ("visual", "vision_tower", "vision_model")
VISION_TOWER = rf".*\.({'|'.join(VISION_TOWER_NAMES)})\..*"


def in_vision_tower(name: str) -> bool:
    """Whether parameter or module `name` belongs to the vision tower (of any family)."""
    return any(f".{part}." in f".{name}" for part in VISION_TOWER_NAMES)


def lora_config(config: DapoConfig) -> Any:
    """peft's `LoraConfig` for `config` (targets: `lora_target_modules`, default the language model's linears;
    with `freeze_vision_tower` nothing in the vision tower is adapted even when a name matches there)."""
    from peft import LoraConfig

    targets: list[str] | str = config.lora_target_modules or LANGUAGE_MODEL_LINEARS
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, exclude_modules=VISION_TOWER if config.freeze_vision_tower else None,
                      bias="none")


ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."  # peft's saved keys are those of a PeftModel around the model


def has_adapter(model: torch.nn.Module) -> bool:
    return ADAPTER_NAME in (getattr(model, "peft_config", None) or {})


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def add_adapter(model: torch.nn.Module, config: DapoConfig) -> None:
    """A fresh adapter (B = 0: the model's outputs are unchanged), initialised from `config.seed`, so a
    round re-run from ckpt-0000 starts from the same adapter. Only the adapter is trainable."""
    from peft import inject_adapter_in_model

    peft_config = lora_config(config)
    peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)


def load_adapter(model: torch.nn.Module, path: Path) -> None:
    """The adapter stored in checkpoint directory `path`, injected into `model` and trainable."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_config = LoraConfig.from_pretrained(str(path))
    peft_config.inference_mode = False
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(Path(path) / ADAPTER_WEIGHTS)).items()}
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} has weights the model lacks: {', '.join(unexpected[:5])}")


def write_adapter(model: torch.nn.Module, directory: Path) -> None:
    """adapter_model.safetensors + adapter_config.json of `model`'s adapter into `directory` (peft's format)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))


def _tuner_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model: every adapter layer bypassed, as inside `PeftModel.disable_adapter()`. Which
    parameters are trainable is restored afterwards (peft's toggle also flips requires_grad)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def merge_adapter_dir(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """`base` with the adapter of `adapter_dir` merged into its weights: a plain transformers model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), local_files_only=True).merge_and_unload()
