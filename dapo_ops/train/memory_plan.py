"""How much accelerator memory a configuration needs, from a model directory's config.json alone (no
weights: the model is built on the meta device), before the first round.

Per process, at the peak of each phase:
- weights (`torch_dtype`), plus the fp32 master copy of trained parameters under `bf16`;
- gradients and AdamW's two moments of the trained parameters (fp32 with master weights);
- activations of one update micro-batch (kept for the backward; with gradient checkpointing only each
  decoder layer's input plus one layer's working set), and the logits of its completion positions;
- generation: the KV cache of a round's P x G sequences (twice: it grows by concatenation), the prefill of
  the P prompts, the rollouts' image inputs and the decoding logits;
- the teacher-forced (attention) pass in chunks of `local_rollout_forward_batch_size` rollouts: the chunk's
  KV cache, one layer's working set and its fp32 completion logits; the lean attention metric keeps O(T)
  per head, eager attention would materialise [heads, T, T] per layer.

Each phase's peak is the resident state (weights, master weights, AdamW) plus the phase's own terms;
`benchmarks.memory_plan` checks every phase against measured peak memory (within 25 %).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dapo_ops.attention.pathwise import pathwise_weight
from dapo_ops.config.dapo import EMBEDDED, DapoConfig

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
        from dapo_ops.models import loading as models

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
    from dapo_ops.models import lora

    if config.freeze_vision_tower and re.fullmatch(lora.VISION_TOWER, name):
        return False
    if config.lora_target_modules is None:
        return re.fullmatch(lora.LANGUAGE_MODEL_LINEARS, name) is not None
    return any(name == t or name.endswith("." + t) for t in config.lora_target_modules)


@dataclass(frozen=True)
class ModelShapes:
    """What the plan reads off a meta model: its parameters (tied weights once) and its linear layers."""

    parameters: tuple[tuple[str, int], ...]  # (name, numel)
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features)


@functools.lru_cache(maxsize=8)
def _shapes(model_dir: str, stamp: int) -> ModelShapes:
    model = meta_model(model_dir)
    params = {id(p): (n, p.numel()) for n, p in model.named_parameters()}
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    return ModelShapes(tuple(params.values()), linears)


def model_shapes(model_dir: str | Path) -> ModelShapes:
    """`ModelShapes` of `model_dir`, built on the meta device once per directory and config.json version
    (the disk check before every round asks again)."""
    path = Path(model_dir) / "config.json"
    stamp = path.stat().st_mtime_ns if str(model_dir) != EMBEDDED and path.is_file() else 0
    return _shapes(str(model_dir), stamp)


def parameter_counts(model_dir: str | Path, config: DapoConfig) -> ParameterCounts:
    """Parameters of the model (tied weights once), the trained ones under `config`, and the weight bytes."""
    from dapo_ops.models import lora

    shapes = model_shapes(model_dir)
    total = sum(n for _, n in shapes.parameters)
    vision = sum(n for name, n in shapes.parameters if lora.in_vision_tower(name))
    lora_params = 0
    if config.use_peft:
        lora_params = sum(config.lora_r * (i + o) for name, i, o in shapes.linears if _lora_targets(name, config))
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
    images_per_prompt: int = 1
    image_tokens: int = 0  # a prompt's image tokens (all its images)

    @property
    def resident(self) -> int:
        return self.weights + self.master_weights + self.optimizer

    def phases(self) -> dict[str, int]:
        """The peak of each phase: the resident state plus the phase's own working set."""
        return {"update": self.resident + self.gradients + self.update_activations,
                "generation": self.resident + self.generation_kv_cache,
                "teacher_forced": self.resident + self.attention_lean}

    @property
    def peak(self) -> int:
        return max(self.phases().values())


TERMS = ("weights", "master_weights", "gradients", "optimizer", "update_activations", "generation_kv_cache",
         "attention_lean", "attention_eager")


# Bytes per token and decoder layer, counted off a Qwen2-style layer (h hidden, i MLP, kv = KV heads x head_dim),
# in units of the activation dtype. Kept for the backward: two RMSNorms (fp32 input, normalised copy, output:
# 3h each), q/k/v and their rotary copies (4h + 4kv), the attention output and o_proj input (2h), two residual
# sums (2h) and the SwiGLU branch (gate, up, SiLU, product and down_proj input: 5i). Without grad only one
# layer lives at a time: its input, norm, attention output and residual (4h) and the MLP's gate, up, SiLU and
# product (4i).
def _stored_per_token(h: int, inter: int, kv: int) -> int:
    return 14 * h + 4 * kv + 5 * inter


def _working_per_token(h: int, inter: int) -> int:
    return 4 * h + 4 * inter


def estimate(model_dir: str | Path, config: DapoConfig, *, image_tokens: int | None = None,
             prompt_text_tokens: int = PROMPT_TEXT_TOKENS, images_per_prompt: int | None = None) -> MemoryPlan:
    """The memory plan of `config` on the model of `model_dir` (config.json only); prompts of
    `images_per_prompt` images (default `config.images_per_prompt`, else 1) of `image_tokens` merged image
    tokens each (default: an A-OKVQA photo, 4 for the embedded model) and `prompt_text_tokens`.

    With `shared_prefix` (the default) every micro-batch computes each prompt once for its rollouts, so a
    forward holds ceil(rollouts / G) prompts plus the rollouts' completions, and the prompt's KV cache is
    gathered to every rollout (`dapo_ops.attention.shared_prefix`)."""
    counts = parameter_counts(model_dir, config)
    model_config = _model_config(model_dir)
    text = model_config.get_text_config()
    h, layers, inter = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = kv_heads * head_dim
    vocab = text.vocab_size
    load = DTYPE_BYTES[config.torch_dtype]
    act = 2 if config.bf16 else load  # activation bytes under autocast
    if image_tokens is None:
        image_tokens = 4 if str(model_dir) == EMBEDDED or config.model_name_or_path == EMBEDDED else REAL_IMAGE_TOKENS
    images = images_per_prompt or config.images_per_prompt or 1
    image_tokens *= images  # a prompt's image tokens, all its images together
    tc, g = config.max_completion_length, config.num_generations
    prompt = image_tokens + prompt_text_tokens
    seq = prompt + tc

    def prompts_of(rollouts: int) -> int:  # prompts one forward over `rollouts` computes
        return -(-rollouts // g) if config.shared_prefix else rollouts

    def cache(rows: int, tokens: int) -> int:  # keys + values of every layer
        return 2 * layers * kv * rows * tokens * act

    def expanded_kv(rows: int) -> int:  # one layer's keys + values repeated to the query heads (GQA) for SDPA
        return 2 * heads * head_dim * rows * seq * act

    def logits(rows: int, copies: int) -> int:  # fp32 completion logits and `copies` vocabulary-sized temporaries
        return rows * (tc + 1) * vocab * 4 * copies

    # Update: one micro-batch's activations kept for the backward (with gradient checkpointing only each
    # layer's input plus one layer recomputed), its gathered prompt cache and GQA-expanded keys/values, the
    # logits with log-softmax and its gradient; the vision tower's activations when it is trained.
    micro = config.per_device_train_batch_size
    # transformers turns the KV cache off under gradient checkpointing, so the update then runs the unshared
    # forward (one prompt per rollout).
    update_prompts = micro if config.gradient_checkpointing else prompts_of(micro)
    tokens = update_prompts * prompt + micro * tc
    per_layer = _stored_per_token(h, inter, kv) * act
    # SDPA's backward keeps each layer's attention probabilities (scores and softmax, fp32) of the prompt
    # forward and of the completions over prompt + completion.
    probabilities = 2 * heads * 4 * (update_prompts * prompt * prompt + micro * tc * seq)
    if config.gradient_checkpointing:
        stored = (tokens * (h * act * layers + per_layer) + micro * seq * 2 * kv * act + expanded_kv(micro)
                  + probabilities)
    else:
        stored = tokens * per_layer * layers + cache(micro, seq) + layers * (expanded_kv(micro) + probabilities)
    vision_trained = not config.use_peft and not config.freeze_vision_tower
    vision = getattr(model_config, "vision_config", None)
    if vision_trained and vision is not None and hasattr(vision, "depth"):
        patches = image_tokens * getattr(vision, "spatial_merge_size", 2) ** 2
        vh, vi = vision.hidden_size, vision.intermediate_size
        vision_layers = 1 if config.gradient_checkpointing else vision.depth
        stored += update_prompts * patches * _stored_per_token(vh, vi, vh) * act * vision_layers
    if pathwise_weight(config):
        # The attention reward's pathwise term (dapo_ops.attention.pathwise): per layer, the completion rows' queries
        # and the extra SDPA's output kept for its backward, its fp32 probabilities when SDPA takes the math
        # kernel, and, under checkpointing, the keys the deferred call holds until after the forward.
        rows = micro * heads * tc
        stored += layers * (2 * rows * head_dim * act + rows * seq * 4)
        if config.gradient_checkpointing:
            stored += layers * micro * kv * seq * act
    update_activations = stored + logits(micro, 3)
    # Generation: the KV cache of the round's N sequences, twice (each decoding step concatenates a layer's
    # grown cache while the old one is alive, and freed blocks of the old size cannot hold the next), the
    # prefill of the P prompts (one layer's working set) and the rollouts' image inputs (pixel values per
    # rollout, fp32); the decoding logits are N x vocab.
    n = config.batch_size
    pixels = n * image_tokens * 4 * 1176 * 4 if image_tokens else 0  # merge 2x2 patches of 3x2x14x14 values
    generation = (2 * cache(n, seq) + config.prompts_per_round * prompt * _working_per_token(h, inter) * act
                  + pixels + n * vocab * 4 * 3)
    # Teacher-forced pass (no grad) in chunks of local_rollout_forward_batch_size: the gathered cache of the
    # chunk, one layer's GQA-expanded keys/values and working set over the completions, the attention
    # probabilities of the forward and of the metric's extra SDPA over the completion rows, and the fp32
    # logits with the log-softmax and entropy temporaries. Eager attention would instead hold [heads, T, T]
    # probabilities of a layer.
    chunk = min(n, config.local_rollout_forward_batch_size or n)
    tf_base = (cache(chunk, seq) + expanded_kv(chunk) + chunk * tc * _working_per_token(h, inter) * act
               + logits(chunk, 4))
    lean = tf_base + 2 * chunk * heads * tc * seq * 4
    eager = tf_base + chunk * heads * seq * seq * 4
    trained_master = counts.trainable * (4 - load) if (config.bf16 or load != 4) else 0
    return MemoryPlan(counts=counts, weights=counts.total * load, master_weights=trained_master,
                      gradients=counts.trainable * 4, optimizer=counts.trainable * 8,
                      update_activations=update_activations, generation_kv_cache=generation, attention_lean=lean,
                      attention_eager=eager, images_per_prompt=images, image_tokens=image_tokens)


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
        f"  images per prompt           {plan.images_per_prompt:8d}  ({plan.image_tokens} image tokens a prompt)",
        f"  weights                     {gb(plan.weights)}",
        f"  fp32 master weights         {gb(plan.master_weights)}",
        f"  gradients                   {gb(plan.gradients)}",
        f"  AdamW state                 {gb(plan.optimizer)}",
        f"  update micro-batch activ.   {gb(plan.update_activations)}",
        f"  generation: KV + prefill    {gb(plan.generation_kv_cache)}",
        f"  attention metric, lean      {gb(plan.attention_lean)}",
        f"  attention metric, eager     {gb(plan.attention_eager)}  (not used: for comparison)",
        f"  peak                        {gb(plan.peak)}",
    ]
    if gpu_memory_gb is not None:
        fits = plan.peak <= gpu_memory_gb * GIB
        lines.append(f"  {'fits' if fits else 'does NOT fit'} in --gpu-memory {gpu_memory_gb:g} GiB")
    return "\n".join(lines)
