"""The memory plan (`make plan`, `dapo_ops.train.memory_plan`) against measured peak memory, phase by phase.

Two models, each in its own fresh process, through the library's own code:
- embedded: the embedded default model and config (64 prompts x 8, micro-batches of 128, completions of 24);
- realistic: a Qwen2.5-VL-shaped model (text decoder 8 layers, hidden 512, 8 heads / 2 KV heads, MLP 1536,
  a vocabulary of 32768 rows, tied embeddings), 448x448 images (256 merged image tokens), 2 prompts x 8
  completions of 48 tokens, micro-batches of 4.

Both train in full, fp32. The phases, in the order of a round after the first (the optimizer state exists):
1. update: two optimizer steps of one micro-batch each (`policy_update`; forward, backward, AdamW step);
2. generation: the round's P x G completions sampled with the KV cache (`generate_rollouts`);
3. teacher-forced: the attention pass over the round (`teacher_forced_pass` + `rollout_attention_metrics`).

Measurement. CPU: the peak resident set size (`VmHWM`) of the process above a baseline taken after the imports,
a warm-up of every phase on a throwaway tiny model (thread pools, kernels and code pages are then resident)
and `malloc_trim`, before the measured model is built. Before each phase glibc's free memory is returned
(`malloc_trim(0)`) and the peak is reset (`/proc/self/clear_refs` = 5), so each phase's peak counts what
stays resident (weights, AdamW state) plus the phase's own working set, as the plan does. CUDA:
`max_memory_allocated` over `memory_allocated` before the model. The plan is `memory_plan.estimate` on the
model's config.json with the measured prompt lengths; error = |estimate - measured| / measured.

    python -m benchmarks.memory_plan [--device auto] [--quick] [--json-out F]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common

PHASES = ("update", "generation", "teacher_forced")
GOAL = 0.25  # the plan within 25 % of the measured peak


@dataclass(frozen=True)
class Case:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vocab_size: int | None  # None: the tokenizer's size (the embedded model)
    image_side: int
    prompts: int
    num_generations: int
    completion_length: int
    steps_per_generation: int

    def describe(self) -> str:
        vocab = "the tokenizer's vocabulary" if self.vocab_size is None else f"vocabulary {self.vocab_size}"
        return (f"text decoder {self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads}/"
                f"{self.num_kv_heads} heads, MLP {self.intermediate_size}, {vocab}; {self.image_side}² images; "
                f"{self.prompts} x {self.num_generations} completions of {self.completion_length}")


EMBEDDED = Case("embedded", 128, 4, 4, 2, 384, 64, 128, None, 56, 64, 8, 24, 4)
REALISTIC = Case("realistic", 512, 8, 8, 2, 1536, 128, 256, 32768, 448, 2, 8, 48, 4)
QUICK = {"embedded": Case("embedded", 128, 4, 4, 2, 384, 64, 128, None, 56, 4, 4, 8, 2),
         "realistic": Case("realistic", 128, 2, 4, 2, 256, 32, 64, 4096, 112, 2, 4, 8, 2)}
WARMUP = Case("warmup", 32, 2, 2, 1, 64, 32, 64, None, 56, 1, 2, 2, 1)


def case_config(case: Case, device: str):
    """The run config of `case`: the embedded default's update settings at the case's sizes."""
    from dapo_ops.config.dapo import DapoConfig

    return DapoConfig(prompts_per_round=case.prompts, num_generations=case.num_generations,
                      max_completion_length=case.completion_length, steps_per_generation=case.steps_per_generation,
                      gradient_accumulation_steps=1, num_iterations=1, device=device)


# ----------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: freed memory may stay resident (the next phase reads high)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """Peak memory above a baseline, per block (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = 0

    def now(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def set_baseline(self) -> None:
        _trim()
        self.baseline = self.now()

    def peak_of(self, fn: Callable[[], Any]) -> tuple[int, Any]:
        """(peak bytes above the baseline while `fn` runs, its result)."""
        _trim()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            result = fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline, result
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        result = fn()
        return _status_kib("VmHWM") * 1024 - self.baseline, result


# ----------------------------------------------------------------------------------------------- phases


def build_policy(case: Case, device: str, processor: Any = None):
    """The case's model (random weights) with the embedded tokenizer of `benchmarks.shared_prefix`'s words and
    an image processor that sizes every image to `image_side`²; `processor` reuses an existing one."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks import shared_prefix
    from dapo_ops.models import loading as models

    if processor is None:
        corpus = [" ".join(shared_prefix._WORDS), *(w.capitalize() for w in shared_prefix._WORDS)]
        processor = models.build_embedded_processor(models.build_tokenizer(corpus))
        processor.image_processor = models.build_image_processor(pixels=case.image_side**2)
    tokenizer = processor.tokenizer
    token_ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in models._TOKEN_ROLES}
    config = models.tiny_config(
        case.vocab_size or len(tokenizer), token_ids=token_ids, hidden_size=case.hidden_size,
        num_hidden_layers=case.num_layers, num_attention_heads=case.num_heads, num_key_value_heads=case.num_kv_heads,
        intermediate_size=case.intermediate_size, vision_hidden_size=case.vision_hidden_size,
        vision_intermediate_size=case.vision_intermediate_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").to(device)
    model.generation_config.eos_token_id = token_ids["eos"]
    model.generation_config.pad_token_id = token_ids["pad"]
    model.generation_config.bos_token_id = None
    model.eval()
    return models.Policy(model=model, processor=processor, path=None)


def _shape(case: Case):
    from benchmarks import shared_prefix

    return shared_prefix.Shape(image_side=case.image_side, prompts=case.prompts,
                               num_generations=case.num_generations, completion_length=case.completion_length)


def phase_functions(case: Case, policy, device: str) -> dict[str, Callable[[], Any]]:
    """The three phases of `case` on `policy` (the optimizer is made here: its state appears in `update`)."""
    import torch

    from benchmarks import shared_prefix
    from dapo_ops.attention.teacher_forced import rollout_attention_metrics, teacher_forced_pass
    from dapo_ops.rollout.generate import generate_rollouts
    from dapo_ops.run import phases as training
    from dapo_ops.train.update import make_optimizer, policy_update

    config = case_config(case, device)
    shape = _shape(case)
    micro = config.per_device_train_batch_size
    prompts = training.encode_rows(policy, shared_prefix.prompt_rows(shape, case.prompts))
    # Two optimizer steps of one micro-batch each: the second runs with AdamW's state already allocated.
    update_prompts = max(1, -(-2 * micro // case.num_generations))
    update_batch = shared_prefix.fixed_rollouts(policy, shape, prompts=update_prompts).select(list(range(2 * micro)))
    update_config = config.replace(prompts_per_round=update_prompts, steps_per_generation=2)
    round_batch = shared_prefix.fixed_rollouts(policy, shape)
    optimizer = make_optimizer(policy.model, config)
    old = torch.zeros(update_batch.completion_ids.shape)  # [2M, Tc]
    advantages = torch.linspace(-1, 1, len(update_batch))  # [2M]
    keep = torch.ones(len(update_batch), dtype=torch.bool)  # [2M]

    def update() -> Any:
        batch = update_batch.to(device)
        result = policy_update(policy.model, optimizer, batch, old, advantages, keep, update_config, global_step=0,
                               seed=0)
        optimizer.zero_grad(set_to_none=True)
        return result

    def generation() -> Any:
        return generate_rollouts(policy, prompts, num_generations=case.num_generations,
                                 max_completion_length=case.completion_length, temperature=1.0, seed=0)

    def teacher_forced() -> Any:
        batch = round_batch.to(device)
        outputs = teacher_forced_pass(policy, batch, batch_size=config.local_rollout_forward_batch_size,
                                      shared_prefix=config.shared_prefix)
        return rollout_attention_metrics(outputs, batch)

    return {"update": update, "generation": generation, "teacher_forced": teacher_forced}


def measure_case(case: Case, device: str) -> dict[str, Any]:
    """Measured and planned peak bytes of each phase of `case` in THIS (fresh) process."""
    from dapo_ops.models import loading as models
    from dapo_ops.train import memory_plan

    meter = Meter(device)
    warm = build_policy(WARMUP, device)
    for fn in phase_functions(WARMUP, warm, device).values():  # thread pools, kernels, code pages
        fn()
    processor = warm.processor
    processor.image_processor = models.build_image_processor(pixels=case.image_side**2)
    del warm, fn
    meter.set_baseline()
    policy = build_policy(case, device, processor)
    functions = phase_functions(case, policy, device)
    measured: dict[str, int] = {}
    for phase in PHASES:
        measured[phase], _ = meter.peak_of(functions[phase])
    config = case_config(case, device)
    probe = shared_prefix_rollouts(case, policy)
    image_tokens = int(probe.prompt_vision_mask[0].sum())
    text_tokens = int(probe.prompt_mask[0].sum()) - image_tokens
    with tempfile.TemporaryDirectory() as tmp:
        policy.model.config.save_pretrained(tmp)
        plan = memory_plan.estimate(tmp, config, image_tokens=image_tokens, prompt_text_tokens=text_tokens)
    return {"case": case.name, "describe": case.describe(), "parameters": plan.counts.total,
            "image_tokens": image_tokens, "prompt_text_tokens": text_tokens,
            "micro_batch": config.per_device_train_batch_size, "baseline_bytes": meter.baseline,
            "measured_bytes": measured, "planned_bytes": plan.phases(),
            "terms": {name: int(getattr(plan, name)) for name in memory_plan.TERMS}}


def shared_prefix_rollouts(case: Case, policy):
    """One rollout of the case's prompt layout (its image and text token counts)."""
    from benchmarks import shared_prefix

    return shared_prefix.fixed_rollouts(policy, _shape(case), prompts=1, generations=1)


def errors(result: dict[str, Any]) -> dict[str, float]:
    """|planned - measured| / measured per phase, and of the peak (the largest phase on each side)."""
    measured, planned = result["measured_bytes"], result["planned_bytes"]
    out = {phase: abs(planned[phase] - measured[phase]) / measured[phase] for phase in PHASES}
    peak_measured, peak_planned = max(measured.values()), max(planned.values())
    out["peak"] = abs(peak_planned - peak_measured) / peak_measured
    return out


def run(device: str, quick: bool) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for name in ("embedded", "realistic"):
        args = ["--case", name, "--device", device, *(["--quick"] if quick else [])]
        cases[name] = common.run_json_subprocess("benchmarks.memory_plan", args, timeout=600)
        cases[name]["errors"] = errors(cases[name])
    summary = {f"memory_plan_error_{name}": max(result["errors"][p] for p in PHASES)
               for name, result in cases.items()}
    return {"device": device, "quick": quick, "goal": GOAL, "cases": cases, "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for name, case in result["cases"].items():
        for phase in (*PHASES, "peak"):
            measured = max(case["measured_bytes"].values()) if phase == "peak" else case["measured_bytes"][phase]
            planned = max(case["planned_bytes"].values()) if phase == "peak" else case["planned_bytes"][phase]
            rows.append([name, phase, common.mib(measured), common.mib(planned), case["errors"][phase]])
    lines = [
        f"Device {result['device']}. The plan (`dapo_ops.train.memory_plan.estimate`, from config.json and the prompt "
        "lengths) against the peak memory of each phase, measured in a fresh process per model: the update "
        "(two optimizer steps of one micro-batch: forward, backward, AdamW), the generation of the round "
        "(KV cache) and the teacher-forced attention pass over the round. CPU: peak RSS (`VmHWM`, reset by "
        "`/proc/self/clear_refs` before each phase, glibc's free memory returned by `malloc_trim`) above a "
        "baseline taken after the imports and a warm-up of every phase on a throwaway tiny model, before the "
        "measured model is built; each phase thus counts the weights and AdamW state it runs with. Error = "
        f"|plan − measured| / measured; goal ≤ {result['goal']:.0%} per phase.",
        "",
    ]
    for name, case in result["cases"].items():
        lines.append(f"- {name}: {case['describe']}; {case['parameters'] / 1e6:.2f} M parameters, "
                     f"{case['image_tokens']} image + {case['prompt_text_tokens']} text prompt tokens, "
                     f"micro-batch {case['micro_batch']}.")
    lines += ["", common.markdown_table(["model", "phase", "measured MiB", "plan MiB", "error"], rows)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.cli("benchmarks.memory_plan", __doc__, quick_help="tiny models (smoke test)")
    parser.add_argument("--case", choices=("embedded", "realistic"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    if args.case:
        common.set_threads()
        case = (QUICK if args.quick else {"embedded": EMBEDDED, "realistic": REALISTIC})[args.case]
        print(json.dumps(measure_case(case, device)))
        return 0
    result = run(device, args.quick)
    common.emit(result, markdown(result), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
