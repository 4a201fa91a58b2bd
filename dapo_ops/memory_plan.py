"""How much accelerator memory a configuration needs, from a model directory's config.json alone (no
weights: the model is built on the meta device), before the first round.

Per process, at the peak of each phase:
- weights (`torch_dtype`), plus the fp32 master copy of trained parameters under `bf16`;
- gradients and AdamW's two moments of the trained parameters (fp32 with master weights);
- activations of one update micro-batch (kept for the backward; with gradient checkpointing only each
  decoder layer's input plus one layer's working set), and the logits of its completion positions;
- the generation KV cache of a round's P x G sequences;
- the attention metric of the teacher-forced pass: the lean path keeps O(T) per head, eager attention
  would materialise [heads, T, T] per layer.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dapo_ops.config import EMBEDDED, DapoConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    lora: int
    weight_bytes: int


def _model_config(model_dir: str | Path):
    from transformers import Qwen2_5_VLConfig

    if str(model_dir) == EMBEDDED:
        from dapo_ops import models

        return models.tiny_config(models.EMBEDDED_VOCAB_SIZE)
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: the memory plan needs a model directory")
    return Qwen2_5_VLConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def meta_model(model_dir: str | Path) -> torch.nn.Module:
    """The model of `model_dir` with no storage behind its parameters (shapes only)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = _model_config(model_dir)
    with torch.device("meta"), contextlib.redirect_stderr(None):
        return Qwen2_5_VLForConditionalGeneration._from_config(config)


def _lora_targets(name: str, config: DapoConfig) -> bool:
    from dapo_ops import lora

    if config.freeze_vision_tower and re.fullmatch(lora.VISION_TOWER, name):
        return False
    if config.lora_target_modules is None:
        return re.fullmatch(lora.LANGUAGE_MODEL_LINEARS, name) is not None
    return any(name == t or name.endswith("." + t) for t in config.lora_target_modules)


def parameter_counts(model_dir: str | Path, config: DapoConfig) -> ParameterCounts:
    """Parameters of the model (tied weights once), the trained ones under `config`, and the weight bytes."""
    model = meta_model(model_dir)
    params = {id(p): (n, p) for n, p in model.named_parameters()}
    total = sum(p.numel() for _, p in params.values())
    vision = sum(p.numel() for n, p in params.values() if ".visual." in f".{n}")
    lora_params = 0
    if config.use_peft:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and _lora_targets(name, config):
                lora_params += config.lora_r * (module.in_features + module.out_features)
    trainable = lora_params if config.use_peft else total - (vision if config.freeze_vision_tower else 0)
    return ParameterCounts(total=total, trainable=trainable, lora=lora_params,
                           weight_bytes=total * DTYPE_BYTES[config.torch_dtype])
