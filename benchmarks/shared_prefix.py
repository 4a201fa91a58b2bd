"""Realistic VLM shapes: the shared-prefix forward vs one forward per rollout, and a round vs TRL.

Model: a Qwen2.5-VL architecture with a text decoder of 8 layers, hidden 512 (8 heads, 2 KV heads), MLP
1536 and a 2-block vision tower (hidden 128), random weights, the embedded tokenizer's layout. Prompts:
the chat template with one 448×448 image (256 merged image tokens) and about 60 text tokens; G = 8
completions of 48 tokens each (EOS suppressed, so every side does the same work).

Measured in one run, through the library's own code:
- the teacher-forced pass (old log-probs, entropy, attention masses) and one update step (forward +
  backward + AdamW over the whole batch in one micro-batch), each with `shared_prefix` on and off:
  interleaved repeats after a warm-up, wall and process CPU time, medians; the speedup is the median of
  per-pair ratios; peak memory of each case once in a fresh process (as `benchmarks.attention` measures it);
- max |log-prob difference| shared vs unshared over the completion tokens;
- a whole round, dapo-vlm (generation, teacher-forced pass + attention metrics, 3 rewards, update) vs TRL's
  `GRPOTrainer` (generation, old log-probs, 2 rewards, update), same model, images, prompts and rewards,
  interleaved rounds after a warm-up (the machinery of `benchmarks.round_vs_trl`).
Every process of this benchmark runs one intra-op thread (`THREADS`, see there why).

    python -m benchmarks.shared_prefix [--device auto] [--repeats 3] [--rounds 3] [--quick] [--json-out F]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import common, round_vs_trl


@dataclass(frozen=True)
class Shape:
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 1536
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    image_side: int = 448  # pixels: (448/14)² = 1024 patches, 256 merged image tokens
    question_words: int = 14  # with the system prompt and 4 choices: about 60 text tokens
    prompts: int = 2
    num_generations: int = 8
    completion_length: int = 48

    @property
    def rollouts(self) -> int:
        return self.prompts * self.num_generations

    def describe(self) -> str:
        return (f"Qwen2.5-VL, text decoder {self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads} "
                f"heads / {self.num_kv_heads} KV heads, MLP {self.intermediate_size}; vision tower depth 2, hidden "
                f"{self.vision_hidden_size}; {self.image_side}x{self.image_side} images")


REALISTIC = Shape()
QUICK = Shape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vision_hidden_size=32,
              vision_intermediate_size=64, image_side=56, question_words=4, prompts=2, num_generations=2,
              completion_length=4)
CASES = ("tfp-shared", "tfp-unshared", "update-shared", "update-unshared")
# One intra-op thread for every case and side of this benchmark. On 2 cores that other work shares, a 2-thread
# process waits at every op's parallel region until both its threads hold a core: each op then costs a
# scheduler time slice, whatever its size, so a case's time follows its op count rather than its work (small
# element-wise ops measured at ~40 ms), which hides the shared path's 4x fewer tokens behind its twice as many
# (smaller) ops. With one thread a busy machine slows every op by about the same factor, and process CPU time
# (recorded beside wall time) is the work itself.
THREADS = 1

_TEXT = ("red green blue small large round square left right top bottom near far under over behind front "
         "color shape object animal person table chair window door tree sky road car boat bird dog cat "
         "which what where how many is the of in on a an and or to this that picture image shows")
_WORDS = tuple(_TEXT.split(" "))


# ----------------------------------------------------------------------------------------------- inputs


def prompt_rows(shape: Shape, count: int, seed: int = 0):
    """`count` A-OKVQA-layout rows (question, 4 choices, a noise image of `image_side`² pixels as PNG)."""
    import numpy as np
    import polars as pl
    from PIL import Image

    rng = np.random.default_rng(seed)
    records: dict[str, list[Any]] = {"question_id": [], "question": [], "choices": [], "correct_choice_idx": [],
                                     "image": []}
    for i in range(count):
        words = rng.choice(_WORDS, size=shape.question_words)
        records["question_id"].append(f"q{i}")
        records["question"].append(" ".join(words).capitalize() + "?")
        records["choices"].append([str(w) for w in rng.choice(_WORDS, size=4, replace=False)])
        records["correct_choice_idx"].append(int(rng.integers(4)))
        pixels = rng.integers(0, 256, (shape.image_side, shape.image_side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        records["image"].append(buffer.getvalue())
    return pl.DataFrame(records)


def build_policy(shape: Shape, device: str, seed: int = 0):
    """The policy: embedded tokenizer (trained on the benchmark's words), the shape's model, random weights,
    an image processor that sizes every image to `image_side`²."""
    from dapo_ops.models import loading as models

    corpus = [" ".join(_WORDS), *(w.capitalize() for w in _WORDS)]
    policy = models.build_embedded_policy(
        corpus, seed, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size, vision_hidden_size=shape.vision_hidden_size,
        vision_intermediate_size=shape.vision_intermediate_size,
    )
    policy.processor.image_processor = models.build_image_processor(pixels=shape.image_side**2)
    policy.model.to(device)
    return policy


def fixed_rollouts(policy, shape: Shape, *, prompts: int | None = None, generations: int | None = None,
                   completion_length: int | None = None, seed: int = 0):
    """A group-major RolloutBatch: the shape's prompts x G random text completions (deterministic, no sampling)."""
    import torch

    from dapo_ops.rollout.generate import RolloutBatch
    from dapo_ops.run import phases as training

    p, g = prompts or shape.prompts, generations or shape.num_generations
    tc = completion_length or shape.completion_length
    encoded = training.encode_rows(policy, prompt_rows(shape, p, seed))
    index = torch.arange(p).repeat_interleave(g)  # [N]
    generator = torch.Generator().manual_seed(seed)
    suppressed = set(policy.suppressed_token_ids) | {policy.eos_token_id}
    allowed = torch.tensor([i for i in range(len(policy.tokenizer)) if i not in suppressed])
    completion_ids = allowed[torch.randint(len(allowed), (p * g, tc), generator=generator)]  # [N, Tc]
    return RolloutBatch(
        prompt_ids=encoded.input_ids[index], prompt_mask=encoded.attention_mask[index],
        vision=encoded.vision.select(index), completion_ids=completion_ids,
        completion_mask=torch.ones(p * g, tc, dtype=torch.long), completion_lengths=torch.full((p * g,), tc),
        is_eos=torch.zeros(p * g, dtype=torch.bool), completions=[""] * (p * g), prompt_index=index,
        num_generations=g, prompt_vision_mask=encoded.vision_mask[index], prompt_text_mask=encoded.text_mask[index],
        prompt_token_inputs={k: v[index] for k, v in encoded.token_inputs.items()},
        completion_values=dict(encoded.completion_values),
    )


def update_config(shape: Shape, shared: bool, device: str):
    """One optimizer step over the whole batch in one micro-batch."""
    from dapo_ops.config.dapo import DapoConfig

    return DapoConfig(prompts_per_round=shape.prompts, num_generations=shape.num_generations,
                      max_completion_length=shape.completion_length, num_iterations=1, steps_per_generation=1,
                      gradient_accumulation_steps=1, learning_rate=1e-5, shared_prefix=shared, device=device)


def case_function(case: str, policy, batch, shape: Shape, device: str) -> Callable[[], Any]:
    import torch

    from dapo_ops.attention.teacher_forced import rollout_attention_metrics, teacher_forced_pass
    from dapo_ops.train.update import make_optimizer, policy_update

    kind, sharing = case.split("-")
    shared = sharing == "shared"
    if kind == "tfp":
        def tfp() -> Any:
            outputs = teacher_forced_pass(policy.model, batch, shared_prefix=shared)
            return rollout_attention_metrics(outputs, batch)
        return tfp
    config = update_config(shape, shared, device)
    optimizer = make_optimizer(policy.model, config)
    old = torch.zeros(batch.completion_ids.shape)  # [N, Tc]
    advantages = torch.linspace(-1, 1, len(batch))  # [N]
    keep = torch.ones(len(batch), dtype=torch.bool)

    def update() -> Any:
        return policy_update(policy.model, optimizer, batch, old, advantages, keep, config, global_step=0, seed=0)
    return update


# ----------------------------------------------------------------------------------------------- timing


def time_cases(policy, batch, shape: Shape, device: str, repeats: int) -> dict[str, Any]:
    functions = {case: case_function(case, policy, batch, shape, device) for case in CASES}
    for fn in functions.values():  # warm-up: lazy init, allocator, the optimizer's state
        fn()
    seconds: dict[str, list[float]] = {case: [] for case in CASES}
    cpu_seconds: dict[str, list[float]] = {case: [] for case in CASES}
    for r in range(repeats):
        order = list(CASES) if r % 2 == 0 else list(reversed(CASES))
        for case in order:
            cpu_start = time.process_time()
            seconds[case].append(common.time_call(functions[case], device))
            cpu_seconds[case].append(time.process_time() - cpu_start)

    def speedup(kind: str, times: dict[str, list[float]]) -> float:
        return common.median(u / s for s, u in zip(times[f"{kind}-shared"], times[f"{kind}-unshared"], strict=True))

    return {"wall_seconds": seconds, "cpu_seconds": cpu_seconds,
            "median_seconds": {c: common.median(v) for c, v in seconds.items()},
            "median_cpu_seconds": {c: common.median(v) for c, v in cpu_seconds.items()},
            "update_speedup": speedup("update", seconds), "tfp_speedup": speedup("tfp", seconds),
            "update_cpu_speedup": speedup("update", cpu_seconds), "tfp_cpu_speedup": speedup("tfp", cpu_seconds)}


def max_logp_diff(policy, batch) -> dict[str, float]:
    from dapo_ops.attention.teacher_forced import teacher_forced_pass

    shared = teacher_forced_pass(policy.model, batch, shared_prefix=True)
    unshared = teacher_forced_pass(policy.model, batch, shared_prefix=False)
    mask = batch.completion_mask.bool()
    return {
        "logp": float((shared.per_token_logps - unshared.per_token_logps)[mask].abs().max()),
        "entropy": float((shared.entropy - unshared.entropy)[mask].abs().max()),
        "mass": float(max((shared.vision_mass - unshared.vision_mass).abs().max(),
                          (shared.text_mass - unshared.text_mass).abs().max())),
    }


def memory_case(case: str, shape: Shape, device: str) -> dict[str, Any]:
    """Extra peak memory of one case in THIS (fresh) process, after model load and a small warm-up."""
    common.set_threads(THREADS)
    policy = build_policy(shape, device)
    warm = fixed_rollouts(policy, shape, prompts=1, generations=2, completion_length=4).to(device)
    case_function(case, policy, warm, shape, device)()  # thread pools, kernels, AdamW state
    del warm
    batch = fixed_rollouts(policy, shape).to(device)
    run = case_function(case, policy, batch, shape, device)
    with common.PeakMemory(device) as peak:
        run()
    return {"case": case, "extra_bytes": peak.extra_bytes, "baseline_bytes": peak.baseline_bytes}


def measure_memory(device: str, quick: bool) -> dict[str, int]:
    memory: dict[str, int] = {}
    for case in CASES:
        args = ["--memory-case", case, "--device", device, *(["--quick"] if quick else [])]
        result = common.run_json_subprocess("benchmarks.shared_prefix", args, timeout=1200, threads=THREADS)
        memory[case] = int(result["extra_bytes"])
    return memory


# ------------------------------------------------------------------------------------------------ round


def realistic_round(shape: Shape, device: str, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved rounds: TRL's GRPOTrainer, then the dapo-vlm library round, on copies of one policy
    (`round_vs_trl`'s round driver, without the pipeline side)."""
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.train.update import make_optimizer

    round_shape = round_vs_trl.RoundShape(
        prompts_per_round=shape.prompts, num_generations=shape.num_generations,
        max_completion_length=shape.completion_length, num_iterations=1, steps_per_generation=2,
        measured_rounds=rounds)
    config = DapoConfig(
        run_name="bench-realistic", prompts_per_round=shape.prompts, num_generations=shape.num_generations,
        max_completion_length=shape.completion_length, num_iterations=1, steps_per_generation=2,
        gradient_accumulation_steps=1, learning_rate=1e-5, device=device)
    clock = round_vs_trl.Clock(device)
    undo: list[Callable[[], None]] = [round_vs_trl.suppress_eos()]
    workdir = tempfile.TemporaryDirectory(prefix="dapo-bench-shared-")
    try:
        base = build_policy(shape, device)
        rows_per_round = [prompt_rows(shape, shape.prompts, seed=100 + r) for r in range(rounds + 1)]
        library = type(base)(copy.deepcopy(base.model), base.processor, base.path)
        optimizer = make_optimizer(library.model, config)
        processor, processor_note = round_vs_trl.trl_processor(base)
        dataset = round_vs_trl.trl_dataset(rows_per_round)
        prompts_match = round_vs_trl.same_prompt_tokens(base, processor, dataset)
        profile = round_vs_trl.TrlProfile()
        undo.append(profile.install())
        library_rounds: list[dict[str, float]] = []
        state = {"global_step": 0}

        def library_side(r: int) -> None:
            phases, state["global_step"] = round_vs_trl.library_round(
                library, optimizer, rows_per_round[r], config, r, state["global_step"], clock)
            library_rounds.append(phases)
            log(f"  realistic round {r}: TRL {interleaver.trl[-1]['total']:.1f}s, library {phases['total']:.1f}s"
                + (" (warm-up)" if r == 0 else ""))

        interleaver = round_vs_trl.RoundInterleaver(
            clock, profile, round_shape.steps_per_generation * round_shape.num_iterations,
            shape.rollouts * shape.completion_length, library_side)
        trainer = round_vs_trl.make_trl_trainer(
            copy.deepcopy(base.model), processor, dataset, round_shape, config, device, workdir.name,
            interleaver.callback(), base.suppressed_token_ids)
        trainer.train()
    finally:
        for fn in reversed(undo):
            fn()
        workdir.cleanup()
    measured = {"trl": interleaver.trl[1:], "library": library_rounds[1:]}  # round 0: the warm-up
    pairs = [lib["total"] / trl["total"] for lib, trl in zip(measured["library"], measured["trl"], strict=True)]
    cpu_pairs = [lib[round_vs_trl.CPU_SECONDS] / trl[round_vs_trl.CPU_SECONDS]
                 for lib, trl in zip(measured["library"], measured["trl"], strict=True)]
    return {
        "shape": asdict(round_shape),
        "trl_input": f"VLM with images; processor: {processor_note}",
        "prompt_tokens_identical": prompts_match,
        "rounds": measured,
        "medians": {side: round_vs_trl._median_phases(rows) for side, rows in measured.items()},
        "round_time_ratio": common.median(pairs),
        "round_cpu_time_ratio": common.median(cpu_pairs),
    }


# ----------------------------------------------------------------------------------------------- driver


def run(*, device: str = "auto", quick: bool = False, repeats: int | None = None, rounds: int | None = None,
        memory: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    device = common.resolve_device(device)
    common.set_threads(THREADS)
    hf_logging.set_verbosity_error()
    shape = QUICK if quick else REALISTIC
    repeats = repeats or (1 if quick else 3)  # CPU times of one case vary by ~5% between repeats
    rounds = rounds or (1 if quick else 3)
    started = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    policy = build_policy(shape, device)
    batch = fixed_rollouts(policy, shape).to(device)
    tokens = {
        "image_tokens": int(batch.prompt_vision_mask[0].sum()),
        "text_tokens": int(batch.prompt_text_mask[0].sum()),
        "prompt_tokens": int(batch.prompt_mask[0].sum()),
        "completion_tokens": int(batch.completion_mask[0].sum()),
    }
    log(f"  shared prefix: {shape.prompts} prompts of {tokens['prompt_tokens']} tokens ({tokens['image_tokens']} "
        f"image, {tokens['text_tokens']} text keys) x {shape.num_generations} completions of "
        f"{tokens['completion_tokens']}")
    diffs = max_logp_diff(policy, batch)
    timing = time_cases(policy, batch, shape, device, repeats)
    m = timing["median_seconds"]
    log(f"  update: shared {m['update-shared']:.2f}s, unshared {m['update-unshared']:.2f}s "
        f"({timing['update_speedup']:.2f}x, CPU time {timing['update_cpu_speedup']:.2f}x); teacher-forced pass: "
        f"shared {m['tfp-shared']:.2f}s, unshared {m['tfp-unshared']:.2f}s ({timing['tfp_speedup']:.2f}x, CPU time "
        f"{timing['tfp_cpu_speedup']:.2f}x); max |logp diff| {diffs['logp']:.1e}")
    del policy, batch
    peaks = measure_memory(device, quick) if memory else {}
    if peaks:
        log("  extra peak memory: " + ", ".join(f"{c} {common.mib(b):.0f} MiB" for c, b in peaks.items()))
    round_result = realistic_round(shape, device, rounds, log)

    def ratio(kind: str) -> float:
        unshared = peaks.get(f"{kind}-unshared", 0)
        return peaks[f"{kind}-shared"] / unshared if unshared > 0 else float("nan")

    summary = {
        "shared_prefix_update_speedup": timing["update_speedup"],
        "shared_prefix_update_memory_ratio": ratio("update") if peaks else float("nan"),
        "round_time_ratio_vs_trl_realistic": round_result["round_time_ratio"],
        "shared_prefix_max_logp_diff": diffs["logp"],
        "shared_prefix_teacher_forced_speedup": timing["tfp_speedup"],
        "shared_prefix_teacher_forced_memory_ratio": ratio("tfp") if peaks else float("nan"),
        "shared_prefix_update_speedup_cpu": timing["update_cpu_speedup"],
        "shared_prefix_teacher_forced_speedup_cpu": timing["tfp_cpu_speedup"],
        "round_cpu_time_ratio_vs_trl_realistic": round_result["round_cpu_time_ratio"],
    }
    return {
        "name": "shared_prefix",
        "device": device,
        "model": shape.describe(),
        "shape": asdict(shape),
        "tokens": tokens,
        "repeats": repeats,
        "threads": THREADS,
        "load_average": {"start": load_start, "end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "max_abs_diff": diffs,
        **timing,
        "extra_peak_bytes": peaks,
        "memory_method": ("torch.cuda.max_memory_allocated − allocated before, fresh process per case"
                          if device.startswith("cuda") else
                          "peak RSS (VmHWM) after − before the case, fresh process per case, after model load + "
                          "warm-up"),
        "round": round_result,
        "summary": summary,
        "seconds": time.perf_counter() - started,
    }


def _load(values: Sequence[float] | None) -> str:
    return "n/a" if not values else " / ".join(f"{v:.1f}" for v in values)


def time_shares(phases: dict[str, float]) -> str:
    """The phases of one side's median round, largest first, as shares of its total."""
    total = phases.get("total", float("nan"))
    parts = sorted(((v, n) for n, v in phases.items() if n not in _NOT_PHASES and v == v), reverse=True)
    return ", ".join(f"{name} {value / total:.0%}" for value, name in parts if value / total >= 0.01)


_NOT_PHASES = frozenset({"total", "generated tokens", round_vs_trl.CPU_SECONDS})


def markdown(result: dict[str, Any]) -> str:
    tokens, shape, summary = result["tokens"], result["shape"], result["summary"]
    m, peaks = result["median_seconds"], result.get("extra_peak_bytes", {})
    cpu = result.get("median_cpu_seconds", {})
    load = result.get("load_average", {})
    head = (f"Model: {result['model']}, random weights; {shape['prompts']} prompts of {tokens['prompt_tokens']} "
            f"tokens ({tokens['image_tokens']} image tokens, {tokens['text_tokens']} text keys) x "
            f"{shape['num_generations']} completions of {tokens['completion_tokens']} tokens; device "
            f"{result['device']}, {result.get('threads', 'n/a')} intra-op thread(s) in every process (on 2 cores "
            f"shared with other work, 2 threads wait for each other at every op, so times follow op counts rather "
            f"than work: `THREADS` in `benchmarks/shared_prefix.py`); load average (1 / 5 / 15 min) at the start of this "
            f"benchmark {_load(load.get('start'))}, at its end {_load(load.get('end'))}; the whole benchmark took "
            f"{result.get('seconds', float('nan')) / 60:.1f} min. Times: medians of "
            f"{result['repeats']} interleaved repeats after a warm-up, wall clock and process CPU time (the "
            f"speedups are medians of per-pair ratios); memory: extra peak over the process after model load "
            f"({result['memory_method']}). Shared vs unshared: max |diff| log-probs "
            f"{result['max_abs_diff']['logp']:.1e}, entropy {result['max_abs_diff']['entropy']:.1e}, attention "
            f"masses {result['max_abs_diff']['mass']:.1e}.")
    rows = []
    for kind, title in (("tfp", "teacher-forced pass + attention metrics"),
                        ("update", "update step (forward + backward + AdamW)")):
        shared, unshared = peaks.get(f"{kind}-shared", float("nan")), peaks.get(f"{kind}-unshared", float("nan"))
        rows.append([title, m[f"{kind}-unshared"], m[f"{kind}-shared"], f"{result[f'{kind}_speedup']:.2f}x",
                     cpu.get(f"{kind}-unshared", float("nan")), cpu.get(f"{kind}-shared", float("nan")),
                     f"{result.get(f'{kind}_cpu_speedup', float('nan')):.2f}x",
                     common.mib(unshared), common.mib(shared),
                     f"{shared / unshared:.2f}" if unshared == unshared and unshared > 0 else "n/a"])
    table = common.markdown_table(["phase", "unshared s", "shared s", "speedup", "unshared CPU s", "shared CPU s",
                                   "CPU speedup", "unshared MiB", "shared MiB", "memory shared / unshared"], rows)
    tokens_unshared = shape["prompts"] * shape["num_generations"]
    arithmetic = (f"Tokens per update: unshared {tokens_unshared} x ({tokens['prompt_tokens']} + "
                  f"{tokens['completion_tokens']}), shared {shape['prompts']} x {tokens['prompt_tokens']} + "
                  f"{tokens_unshared} x {tokens['completion_tokens']}: "
                  f"{_token_ratio(tokens, shape):.2f}x fewer; the optimizer step and the completion tokens' "
                  f"logits are the same work on both paths.")
    round_result = result["round"]
    medians = round_result["medians"]
    names: list[str] = []
    for side in ("trl", "library"):
        names += [n for n in medians[side] if n not in names and n not in _NOT_PHASES]
    phases = common.markdown_table(
        ["phase (median seconds per round)", "TRL GRPOTrainer", "dapo-vlm library (shared prefix)"],
        [[name, medians["trl"].get(name, float("nan")), medians["library"].get(name, float("nan"))]
         for name in [*names, "total", round_vs_trl.CPU_SECONDS]],
    )
    rs = round_result["shape"]
    round_head = (f"A whole round on the same model, images, prompts and rewards: TRL (generation, old log-probs, 2 "
                  f"rewards, update) vs dapo-vlm (generation, teacher-forced pass + attention metrics, 3 rewards, "
                  f"update), num_iterations={rs['num_iterations']}, steps_per_generation={rs['steps_per_generation']}"
                  f", EOS suppressed; TRL input: {round_result['trl_input']}; identical prompt tokens: "
                  f"{round_result['prompt_tokens_identical']}. Medians of {rs['measured_rounds']} interleaved rounds "
                  f"after a warm-up: library / TRL = {summary['round_time_ratio_vs_trl_realistic']:.2f} (process "
                  f"CPU time: {round_result.get('round_cpu_time_ratio', float('nan')):.2f}).")
    shares = (f"Where the time goes (share of the median round's wall time): TRL: {time_shares(medians['trl'])}; "
              f"dapo-vlm: {time_shares(medians['library'])}. TRL prefills every prompt once per completion (G "
              f"copies of the image tokens, in generation and again in the old log-probs and in each update "
              f"step); dapo-vlm prefills each prompt once in generation (KV cache repeated G times) and computes "
              f"it once in the teacher-forced pass and once per optimizer step (shared prefix).")
    return f"{head}\n\n{table}\n\n{arithmetic}\n\n{round_head}\n\n{phases}\n\n{shares}"


def _token_ratio(tokens: dict[str, int], shape: dict[str, Any]) -> float:
    n, p = shape["prompts"] * shape["num_generations"], shape["prompts"]
    tp, tc = tokens["prompt_tokens"], tokens["completion_tokens"]
    return n * (tp + tc) / (p * tp + n * tc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.cli("benchmarks.shared_prefix", __doc__)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds vs TRL (after one warm-up)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-case", choices=CASES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        shape = QUICK if args.quick else REALISTIC
        print(json.dumps(memory_case(args.memory_case, shape, common.resolve_device(args.device))), flush=True)
        return 0
    result = run(device=args.device, quick=args.quick, repeats=args.repeats, rounds=args.rounds,
                 memory=not args.no_memory, log=common.log)
    common.emit(result, markdown(result), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
