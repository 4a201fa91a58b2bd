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
    """The config of `model_dir`'s family (its `model_type`; Qwen2.5-VL for a file that names none)."""
    from transformers import CONFIG_MAPPING, Qwen2_5_VLConfig

    if str(model_dir) == EMBEDDED:
        from dapo_ops import models

        return models.tiny_config(models.EMBEDDED_VOCAB_SIZE)
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: the memory plan needs a model directory")
    values = json.loads(path.read_text(encoding="utf-8"))
    if "model_type" not in values:
        return Qwen2_5_VLConfig.from_dict(values)
    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def meta_model(model_dir: str | Path) -> torch.nn.Module:
    """The model of `model_dir` with no storage behind its parameters (shapes only)."""
    from transformers import AutoModelForImageTextToText

    config = _model_config(model_dir)
    with torch.device("meta"), contextlib.redirect_stderr(None):
        return AutoModelForImageTextToText.from_config(config)


def _lora_targets(name: str, config: DapoConfig) -> bool:
    from dapo_ops import lora

    if config.freeze_vision_tower and re.fullmatch(lora.VISION_TOWER, name):
        return False
    if config.lora_target_modules is None:
        return re.fullmatch(lora.LANGUAGE_MODEL_LINEARS, name) is not None
    return any(name == t or name.endswith("." + t) for t in config.lora_target_modules)


def parameter_counts(model_dir: str | Path, config: DapoConfig) -> ParameterCounts:
    """Parameters of the model (tied weights once), the trained ones under `config`, and the weight bytes."""
    from dapo_ops import lora

    model = meta_model(model_dir)
    params = {id(p): (n, p) for n, p in model.named_parameters()}
    total = sum(p.numel() for _, p in params.values())
    vision = sum(p.numel() for n, p in params.values() if lora.in_vision_tower(n))
    lora_params = 0
    if config.use_peft:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and _lora_targets(name, config):
                lora_params += config.lora_r * (module.in_features + module.out_features)
    trainable = lora_params if config.use_peft else total - (vision if config.freeze_vision_tower else 0)
    return ParameterCounts(total=total, trainable=trainable, lora=lora_params,
                           weight_bytes=total * DTYPE_BYTES[config.torch_dtype])


# A 640x480 photo (A-OKVQA's typical size) is ~392 merged image tokens in Qwen2.5-VL; the chat template,
# question and choices ~80 text tokens.
REAL_IMAGE_TOKENS = 392
PROMPT_TEXT_TOKENS = 80
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process; `peak` = the resident state plus the largest phase."""

    counts: ParameterCounts
    weights: int
    master_weights: int
    gradients: int
    optimizer: int
    update_activations: int
    generation_kv_cache: int
    attention_lean: int
    attention_eager: int

    @property
    def resident(self) -> int:
        return self.weights + self.master_weights + self.optimizer

    @property
    def peak(self) -> int:
        return self.resident + max(self.gradients + self.update_activations, self.generation_kv_cache,
                                   self.attention_lean)


def estimate(model_dir: str | Path, config: DapoConfig, *, image_tokens: int | None = None) -> MemoryPlan:
    """The memory plan of `config` on the model of `model_dir` (config.json only)."""
    counts = parameter_counts(model_dir, config)
    text = _model_config(model_dir).get_text_config()
    h, layers, inter = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    vocab = text.vocab_size
    load = DTYPE_BYTES[config.torch_dtype]
    act = 2 if config.bf16 else load  # activation bytes under autocast
    if image_tokens is None:
        image_tokens = 4 if str(model_dir) == EMBEDDED or config.model_name_or_path == EMBEDDED else REAL_IMAGE_TOKENS
    tc = config.max_completion_length
    seq = image_tokens + PROMPT_TEXT_TOKENS + tc
    micro = -(-config.batch_size // (config.steps_per_generation * config.gradient_accumulation_steps
                                     * config.num_processes))
    # Saved for the backward per token and layer: norms, q/k/v/o inputs and outputs, the SwiGLU branches.
    per_layer = (6 * h + 2 * kv_heads * head_dim + 4 * inter) * act
    kept_layers = 1 if config.gradient_checkpointing else layers
    stored = micro * seq * (per_layer * kept_layers + (h * act * layers if config.gradient_checkpointing else 0))
    logits = micro * (tc + 1) * vocab * 4 * 3  # fp32 logits, log-softmax and its gradient
    trained_master = counts.trainable * (4 - load) if (config.bf16 or load != 4) else 0
    n = config.batch_size
    kv = 2 * layers * kv_heads * head_dim * n * seq * load
    # The teacher-forced pass (no grad) over the round: one layer's working set and the completion logits;
    # eager attention would hold [heads, T, T] probabilities of a layer, the lean path O(T) per head.
    tf_base = n * seq * (4 * h + 2 * inter) * act + n * (tc + 1) * vocab * 4
    lean = tf_base + n * heads * seq * 4 * 4
    eager = tf_base + n * heads * seq * seq * 4
    return MemoryPlan(counts=counts, weights=counts.total * load, master_weights=trained_master,
                      gradients=counts.trainable * 4, optimizer=counts.trainable * 8,
                      update_activations=stored + logits, generation_kv_cache=kv, attention_lean=lean,
                      attention_eager=eager)


def render(plan: MemoryPlan, config: DapoConfig, gpu_memory_gb: float | None = None) -> str:
    """The plan as the lines `make plan` prints."""
    c = plan.counts

    def gb(n: int) -> str:
        return f"{n / GIB:8.2f} GiB"

    lines = [
        f"memory plan for {config.model_name_or_path} ({c.total / 1e9:.3f} B parameters, {config.torch_dtype}"
        f"{', bf16 autocast' if config.bf16 else ''}{', gradient checkpointing' if config.gradient_checkpointing else ''}"
        f"{f', LoRA r={config.lora_r}' if config.use_peft else ', full fine-tune'}; trained "
        f"{c.trainable / 1e6:.2f} M), per process of {config.num_processes}:",
        f"  weights                     {gb(plan.weights)}",
        f"  fp32 master weights         {gb(plan.master_weights)}",
        f"  gradients                   {gb(plan.gradients)}",
        f"  AdamW state                 {gb(plan.optimizer)}",
        f"  update micro-batch activ.   {gb(plan.update_activations)}",
        f"  generation KV cache         {gb(plan.generation_kv_cache)}",
        f"  attention metric, lean      {gb(plan.attention_lean)}",
        f"  attention metric, eager     {gb(plan.attention_eager)}  (not used: for comparison)",
        f"  peak                        {gb(plan.peak)}",
    ]
    if gpu_memory_gb is not None:
        fits = plan.peak <= gpu_memory_gb * GIB
        lines.append(f"  {'fits' if fits else 'does NOT fit'} in --gpu-memory {gpu_memory_gb:g} GiB")
    return "\n".join(lines)
