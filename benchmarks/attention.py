"""Attention metrics: cost of the lean O(T) path vs a plain forward vs eager `output_attentions` + oracle.

Model: a wider copy of the embedded Qwen2.5-VL (text decoder hidden 512, 8 heads, 2 KV heads, 4 layers;
vision tower hidden 128), random weights. Inputs: one teacher-forced micro-batch of rollouts whose prompt
holds one image (a share `--image-share` of the prompt tokens are `<|image_pad|>`, the vision tower
encodes the matching patches) plus text, followed by a completion of 64–256 tokens.

Three cases per prompt length, all through the library's own code:
- plain: `teacher_forced_pass(with_attention=False)` (SDPA forward, per-token log-probs, entropy);
- lean:  `teacher_forced_pass(with_attention=True)` + `rollout_attention_metrics` (the training path);
- eager: the same forward with the decoder on eager attention and `output_attentions=True`, log-probs and
         entropy, then the oracle `metrics_from_attention_weights`.
Times: interleaved repeats after a warm-up, medians (the overhead is the median of per-repeat ratios).
Memory: each case once in a fresh process, extra peak over the process after model load and warm-up.

    python -m benchmarks.attention [--device cpu|cuda|auto] [--lengths 256,512,...] [--quick] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from benchmarks import common


# Completion tokens per prompt length (the 64–256).
def completion_length_for(prompt_length: int, quick: bool = False) -> int:
    if quick:
        return 16
    return 64 if prompt_length <= 512 else 128 if prompt_length <= 1024 else 256


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vocab_size: int = 514

    def describe(self) -> str:
        return (f"text hidden {self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads / "
                f"{self.num_kv_heads} KV heads (GQA), MLP {self.intermediate_size}; vision hidden "
                f"{self.vision_hidden_size}, depth 2")


WIDE = ModelShape(512, 4, 8, 2, 1536, 128, 256)
# The embedded model itself: the smoke-test configuration.
TINY = ModelShape(128, 4, 4, 2, 384, 64, 128)

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
QUICK_LENGTHS = (64, 128)
CASES = ("plain", "lean", "eager")


def build_model(shape: ModelShape, device: str, seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dapo_ops.models import loading as models

    config = models.tiny_config(
        shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size, vision_hidden_size=shape.vision_hidden_size,
        vision_intermediate_size=shape.vision_intermediate_size,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.to(device).eval()


def image_grid(num_tokens: int) -> tuple[int, int]:
    """A near-square (h, w) patch grid with h·w/4 = about `num_tokens` merged image tokens."""
    a = max(1, int(math.sqrt(num_tokens)))
    b = max(1, num_tokens // a)
    return 2 * a, 2 * b


def make_rollouts(prompt_length: int, completion_length: int, *, batch_size: int = 1, image_share: float = 0.75,
                  vocab_size: int = 514, seed: int = 0, pad_step: int = 8):
    """A RolloutBatch of `batch_size` rows: prompt = template tokens + one image + text, left padded (row b
    is `pad_step·b` tokens shorter; row 0 fills the prompt exactly), then `completion_length` completion tokens
    (no EOS)."""
    import torch

    from dapo_ops.models import loading as models
    from dapo_ops.models.inputs import VisionInputs
    from dapo_ops.rollout.generate import RolloutBatch

    special = {token: i for i, token in enumerate(models.SPECIAL_TOKENS)}
    pad, im_start, im_end = special[models.PAD_TOKEN], special[models.IM_START], special[models.IM_END]
    v_start, v_end, image_pad = special[models.VISION_START], special[models.VISION_END], special[models.IMAGE_PAD]
    first_text = len(models.SPECIAL_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    room = prompt_length - 16 - pad_step * (batch_size - 1)  # every row keeps >= 8 text tokens
    h, w = image_grid(int(image_share * room))
    num_image = h * w // 4
    rows, masks = [], []
    for b in range(batch_size):
        text = prompt_length - num_image - 7 - pad_step * b  # 7 template/vision tokens around the image
        if text < 8:
            raise ValueError(f"prompt length {prompt_length} leaves no room for text beside {num_image} image tokens")
        words = torch.randint(first_text, vocab_size, (text,), generator=generator)
        system, user = words[: text // 4], words[text // 4 : -2]
        ids = torch.cat([
            torch.tensor([im_start]), system, torch.tensor([im_end, im_start, v_start]),
            torch.full((num_image,), image_pad), torch.tensor([v_end]), user, torch.tensor([im_end, im_start]),
            words[-2:],
        ])
        padding = prompt_length - len(ids)
        assert padding == pad_step * b, (padding, b)
        rows.append(torch.cat([torch.full((padding,), pad), ids]))
        masks.append(torch.cat([torch.zeros(padding, dtype=torch.long), torch.ones(len(ids), dtype=torch.long)]))
    prompt_ids, prompt_mask = torch.stack(rows), torch.stack(masks)
    grid = torch.tensor([[1, h, w]] * batch_size)
    pixel_values = torch.randn(batch_size * h * w, 3 * 2 * 14 * 14, generator=generator)
    completion_ids = torch.randint(first_text, vocab_size, (batch_size, completion_length), generator=generator)
    completion_mask = torch.ones(batch_size, completion_length, dtype=torch.long)
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, vision=VisionInputs.from_patches(pixel_values, grid),
        completion_ids=completion_ids, completion_mask=completion_mask,
        completion_lengths=torch.full((batch_size,), completion_length), is_eos=torch.zeros(batch_size, dtype=torch.bool),
        completions=[""] * batch_size, prompt_index=torch.arange(batch_size), num_generations=1,
        prompt_vision_mask=prompt_ids == image_pad,
        prompt_text_mask=prompt_mask.bool() & (prompt_ids >= first_text),
        prompt_token_inputs={"mm_token_type_ids": (prompt_ids == image_pad).long()},
    )


@contextmanager
def eager_decoder(model) -> Iterator[None]:
    """The decoder (only: the vision tower keeps SDPA) on eager attention, restored afterwards."""
    config = model.config.text_config
    previous = config._attn_implementation
    config._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        config._attn_implementation_internal = previous


def case_function(name: str, model, batch) -> Callable[[], Any]:
    """One call of case `name` over `batch` (already on the model's device)."""
    import torch

    import dapo_ops.attention as attention
    from dapo_ops.rl.loss import entropy_from_logits, selective_log_softmax

    if name == "plain":
        return lambda: attention.teacher_forced_pass(model, batch, with_attention=False)
    if name == "lean":
        def lean() -> Any:
            outputs = attention.teacher_forced_pass(model, batch, with_attention=True)
            return attention.rollout_attention_metrics(outputs, batch)
        return lean
    if name == "eager":
        num_completion = int(batch.completion_ids.shape[1])
        query_mask = torch.cat([torch.zeros_like(batch.prompt_mask, dtype=torch.bool), batch.completion_mask.bool()], 1)

        @torch.no_grad()
        def eager() -> Any:
            with eager_decoder(model):
                out = model(**batch.model_inputs(), use_cache=False, logits_to_keep=num_completion + 1,
                            output_attentions=True)
            logits = out.logits[:, :-1]
            selective_log_softmax(logits, batch.completion_ids).cpu()
            entropy_from_logits(logits).cpu()
            attentions = out.attentions
            del out
            return attention.metrics_from_attention_weights(attentions, query_mask, batch.vision_mask, batch.text_mask)
        return eager
    raise ValueError(f"unknown case {name!r}; use one of {CASES}")


def check_agreement(model, batch) -> float:
    """max |lean − oracle| over the per-layer masses (the lean path is exact: ~1e-7)."""
    import torch

    import dapo_ops.attention as attention

    lean = attention.teacher_forced_pass(model, batch, with_attention=True)
    query_mask = torch.cat([torch.zeros_like(batch.prompt_mask, dtype=torch.bool), batch.completion_mask.bool()], 1)
    with torch.no_grad(), eager_decoder(model):
        out = model(**batch.model_inputs(), use_cache=False, logits_to_keep=1, output_attentions=True)
    vision, text = attention.masses_from_attention_weights(out.attentions, query_mask, batch.vision_mask,
                                                           batch.text_mask)
    return float(max((lean.vision_mass.double() - vision).abs().max(), (lean.text_mass.double() - text).abs().max()))


# ------------------------------------------------------------------------------------------------ timing


def time_cases(model, batch, device: str, *, repeats: int, eager_repeats: int, warm_eager: bool = True
               ) -> dict[str, Any]:
    """Interleaved repeats after a warm-up; eager only in the first `eager_repeats` rounds."""
    functions = {name: case_function(name, model, batch) for name in CASES}
    # Warm-up (lazy init, allocator, kernels for this shape). Eager shares the plain forward's kernels, so at
    # long lengths, where one eager call costs as much as several plain ones, its warm-up is skipped.
    for name in CASES if warm_eager else CASES[:2]:
        functions[name]()
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    for r in range(repeats):
        order = ["plain", "lean"] if r % 2 == 0 else ["lean", "plain"]
        if r < eager_repeats:
            order.append("eager")
        for name in order:
            seconds[name].append(common.time_call(functions[name], device))
    ratios = [lean / plain - 1 for plain, lean in zip(seconds["plain"], seconds["lean"], strict=True)]
    inside = common.median(time_inside_extra_attention(functions["lean"], device) for _ in range(3))
    return {
        "extra_attention_seconds": inside,
        "extra_attention_share": inside / common.median(seconds["plain"]),
        "seconds": seconds,
        "median_seconds": {name: common.median(values) for name, values in seconds.items()},
        "lean_overhead": common.median(ratios),
        "eager_slowdown": (common.median(seconds["eager"]) / common.median(seconds["plain"])
                           if seconds["eager"] else float("nan")),
    }


def time_inside_extra_attention(lean: Callable[[], Any], device: str) -> float:
    """Seconds one lean call spends in `ModalityMassRecorder.accumulate` (the metric's own work per layer),
    from an extra instrumented call: a noise-robust view of what the overhead is made of."""
    import dapo_ops.attention as attention

    original = attention.ModalityMassRecorder.accumulate
    spent = [0.0]

    def timed(self, *args: Any, **kwargs: Any) -> None:
        common.synchronize(device)
        begin = time.perf_counter()
        original(self, *args, **kwargs)
        common.synchronize(device)
        spent[0] += time.perf_counter() - begin

    attention.ModalityMassRecorder.accumulate = timed
    try:
        lean()
    finally:
        attention.ModalityMassRecorder.accumulate = original
    return spent[0]


# ------------------------------------------------------------------------------------------------ memory


def memory_case(case: str, length: int, shape: ModelShape, device: str, batch_size: int, image_share: float,
                quick: bool) -> dict[str, Any]:
    """Extra peak memory of one case, measured in THIS (fresh) process after model load and a small warm-up."""
    common.set_threads()
    model = build_model(shape, device)
    warm = make_rollouts(64, 8, batch_size=batch_size, image_share=image_share,
                         vocab_size=shape.vocab_size).to(device)
    case_function(case, model, warm)()  # lazy init (thread pools, kernels) stays out of the measurement
    del warm
    batch = make_rollouts(length, completion_length_for(length, quick), batch_size=batch_size,
                          image_share=image_share, vocab_size=shape.vocab_size).to(device)
    run = case_function(case, model, batch)
    with common.PeakMemory(device) as peak:
        run()
    return {"case": case, "length": length, "extra_bytes": peak.extra_bytes, "baseline_bytes": peak.baseline_bytes}


def measure_memory(lengths: Sequence[int], shape_name: str, device: str, batch_size: int, image_share: float,
                   quick: bool, timeout: float) -> dict[str, dict[str, int]]:
    """{case: {length: extra bytes}}, one fresh process per (case, length)."""
    memory: dict[str, dict[str, int]] = {case: {} for case in CASES}
    for length in lengths:
        for case in CASES:
            args = ["--memory-case", case, "--lengths", str(length), "--device", device, "--shape", shape_name,
                    "--batch-size", str(batch_size), "--image-share", str(image_share)]
            result = common.run_json_subprocess("benchmarks.attention", args + (["--quick"] if quick else []),
                                                timeout=timeout)
            memory[case][str(length)] = int(result["extra_bytes"])
    return memory


# ------------------------------------------------------------------------------------------------ driver


def run(*, device: str = "auto", lengths: Sequence[int] | None = None, quick: bool = False, batch_size: int = 1,
        image_share: float = 0.75, repeats: int | None = None, memory: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    device = common.resolve_device(device)
    common.set_threads()
    shape_name = "tiny" if quick else "wide"
    shape = TINY if quick else WIDE
    lengths = list(lengths or (QUICK_LENGTHS if quick else DEFAULT_LENGTHS))
    repeats = repeats or (1 if quick else 9)
    model = build_model(shape, device)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for length in lengths:
        tc = completion_length_for(length, quick)
        batch = make_rollouts(length, tc, batch_size=batch_size, image_share=image_share,
                              vocab_size=shape.vocab_size).to(device)
        # Eager+oracle costs several plain forwards at long prompts: 2 repeats there (its ratio needs no more).
        eager_repeats = min(repeats, 3) if length <= 1024 else min(repeats, 2)
        timing = time_cases(model, batch, device, repeats=repeats, eager_repeats=eager_repeats,
                            warm_eager=length <= 1024)
        row = {
            "prompt_length": length,
            "completion_length": tc,
            "total_length": int(batch.input_ids.shape[1]),
            "image_tokens": int(batch.vision_mask[0].sum()),
            "text_tokens": int(batch.text_mask[0].sum()),
            **timing,
        }
        rows.append(row)
        m = row["median_seconds"]
        log(f"  attention T={length}+{tc}: plain {m['plain'] * 1e3:.0f} ms, lean {m['lean'] * 1e3:.0f} ms "
            f"({100 * row['lean_overhead']:+.1f}%; {100 * row['extra_attention_share']:.1f}% inside the extra "
            f"attention), eager+oracle {m['eager'] * 1e3:.0f} ms")
        del batch
    check = make_rollouts(lengths[0], completion_length_for(lengths[0], quick), batch_size=max(2, batch_size),
                          image_share=image_share, vocab_size=shape.vocab_size).to(device)
    max_abs_diff = check_agreement(model, check)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    memory_by_case: dict[str, dict[str, int]] = {}
    if memory:
        memory_by_case = measure_memory(lengths, shape_name, device, batch_size, image_share, quick,
                                        timeout=900)
        for row in rows:
            key = str(row["prompt_length"])
            row["extra_peak_bytes"] = {case: memory_by_case[case][key] for case in CASES}
            extra = row["extra_peak_bytes"]
            log(f"  attention T={key}: extra peak plain {common.mib(extra['plain']):.0f} MiB, "
                f"lean {common.mib(extra['lean']):.0f} MiB, eager {common.mib(extra['eager']):.0f} MiB")
    longest = rows[-1]
    summary = {
        "attention_time_overhead": longest["lean_overhead"],
        "attention_extra_sdpa_share": longest["extra_attention_share"],
        "attention_memory_ratio_vs_eager": (
            longest["extra_peak_bytes"]["lean"] / longest["extra_peak_bytes"]["eager"]
            if memory and longest["extra_peak_bytes"]["eager"] > 0 else float("nan")
        ),
        # What the metric itself adds: (lean − plain) / (eager − plain); lean's extra peak over the model is
        # otherwise the plain forward's own activations.
        "attention_metric_memory_ratio_vs_eager": (
            (longest["extra_peak_bytes"]["lean"] - longest["extra_peak_bytes"]["plain"])
            / (longest["extra_peak_bytes"]["eager"] - longest["extra_peak_bytes"]["plain"])
            if memory and longest["extra_peak_bytes"]["eager"] > longest["extra_peak_bytes"]["plain"]
            else float("nan")
        ),
        "attention_longest_prompt_length": longest["prompt_length"],
        "attention_eager_slowdown": longest["eager_slowdown"],
    }
    return {
        "name": "attention",
        "device": device,
        "model": shape.describe(),
        "batch_size": batch_size,
        "image_share": image_share,
        "repeats": repeats,
        "memory_method": ("torch.cuda.max_memory_allocated − allocated before, fresh process per case"
                          if device.startswith("cuda") else
                          "peak RSS (VmHWM, i.e. ru_maxrss of this address space) after − before the case, fresh process per "
                          "case, after model load + warm-up"),
        "lean_vs_oracle_max_abs_diff": max_abs_diff,
        "rows": rows,
        "summary": summary,
        "seconds": time.perf_counter() - started,
    }


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for row in result["rows"]:
        m = row["median_seconds"]
        extra = row.get("extra_peak_bytes", {})
        rows.append([
            f"{row['prompt_length']} + {row['completion_length']}",
            f"{row['image_tokens']} / {row['text_tokens']}",
            m["plain"] * 1e3, m["lean"] * 1e3, m["eager"] * 1e3,
            f"{100 * row['lean_overhead']:+.1f}%",
            f"{100 * row['extra_attention_share']:.1f}%",
            f"{row['eager_slowdown']:.1f}x",
            common.mib(extra.get("plain", math.nan)), common.mib(extra.get("lean", math.nan)),
            common.mib(extra.get("eager", math.nan)),
            (f"{extra['lean'] / extra['eager']:.3f}" if extra.get("eager") else "n/a"),
        ])
    table = common.markdown_table(
        ["prompt + completion tokens", "image / text keys", "plain ms", "lean ms", "eager+oracle ms",
         "lean overhead", "of which in the metric's own SDPA", "eager / plain",
         "plain MiB", "lean MiB", "eager MiB", "lean / eager memory"],
        rows,
    )
    return (f"Model: {result['model']}; {result['batch_size']} rollout(s) per forward, "
            f"{int(100 * result['image_share'])}% of the prompt is image tokens; device {result['device']}. "
            f"Times: medians of {result['repeats']} interleaved plain/lean repeats (eager+oracle: up to 3, 2 at T > 1024); "
            "the overhead is the median of per-pair ratios lean/plain − 1; \"of which in the metric's own SDPA\" is "
            "the time a lean call spends in the metric's per-layer work (median of 3 instrumented calls), as a share "
            f"of plain: a view of the overhead that other work on the machine hardly disturbs. Memory: extra peak over the process after model load ({result['memory_method']}). Lean vs "
            f"oracle masses: max |diff| {result['lean_vs_oracle_max_abs_diff']:.1e}.\n\n{table}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.cli("benchmarks.attention", __doc__, quick_help="the embedded model, tiny lengths (smoke test)")
    parser.add_argument("--lengths", default=None, help="comma-separated prompt lengths")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-share", type=float, default=0.75)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-case", choices=CASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=("wide", "tiny"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    if args.memory_case:
        shape = {"wide": WIDE, "tiny": TINY}[args.shape or ("tiny" if args.quick else "wide")]
        result = memory_case(args.memory_case, lengths[0], shape, common.resolve_device(args.device),
                             args.batch_size, args.image_share, args.quick)
        print(json.dumps(result), flush=True)
        return 0
    result = run(device=args.device, lengths=lengths, quick=args.quick, batch_size=args.batch_size,
                 image_share=args.image_share, repeats=args.repeats, memory=not args.no_memory,
                 log=common.log)
    common.emit(result, markdown(result), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
