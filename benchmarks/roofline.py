"""Rollouts with the preallocated KV cache, and each phase against the peak this machine reaches.

At the realistic shape of `benchmarks.shared_prefix` (256 image tokens, G = 8, 48-token completions, one
intra-op thread, fp32), in one process:

1. **Generation, side by side**: today's path (the growing `DynamicCache`, one `torch.multinomial` per group),
   the dynamic cache with the batched sampler, and the preallocated cache (`rollout_cache: static`), interleaved
   after a warm-up; medians of per-pair ratios, wall and process CPU time. The same at the embedded size.
2. **The machine's limit**: dense fp32 matmul FLOP/s (1024³, and the realistic MLP shape 1426×512×1536) and
   memory bandwidth, (bytes read + written) / time of a 256 MiB copy; medians.
3. **Each phase against it**: the matmul FLOPs each phase actually executes, counted while it runs
   (`torch.utils.flop_counter.FlopCounterMode` for mm/addmm/bmm/conv, forward and backward; the CPU SDPA
   kernels it does not count are added from their shapes, 4·B·H·Lq·Lk·D forward and twice that backward; the
   optimizer step has no matmul), divided by the phase's time: the update (forward + backward + AdamW, shared
   prefix), the teacher-forced pass (+ attention metrics) and the prefill, as fractions of the matmul peak;
   each decoding step against its roofline bound max(FLOPs / peak, bytes / bandwidth), the bytes being the text
   decoder's and LM head's weights plus the KV cache each step reads.
   Fractions use process CPU time (the work of this one-thread process, which other work on a shared machine
   does not inflate as it does wall time); the wall-time fractions are reported beside them.

    python -m benchmarks.roofline [--repeats 3] [--quick] [--json-out F]
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from benchmarks import common, round_vs_trl, shared_prefix

THREADS = 1
GENERATION_CASES = ("today", "dynamic", "static")
COPY_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------------------- machine peak


def _median_rate(fn: Callable[[], Any], work: float, repeats: int, min_seconds: float = 0.2) -> dict[str, float]:
    """Median work per second of `fn` over `repeats` timings (each long enough to time), wall and CPU."""
    fn()
    calls, begin = 1, time.perf_counter()
    fn()
    calls = max(1, int(min_seconds / max(time.perf_counter() - begin, 1e-6)))
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall.append(work * calls / (time.perf_counter() - w0))
        cpu.append(work * calls / max(time.process_time() - c0, 1e-9))
    return {"wall": common.median(wall), "cpu": common.median(cpu)}


def machine_peak(repeats: int, quick: bool) -> dict[str, Any]:
    """fp32 matmul FLOP/s (1024³ and the realistic MLP shape) and 256 MiB copy bandwidth, one thread."""
    import torch

    n = 256 if quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    square = _median_rate(lambda: torch.mm(a, b, out=out), 2 * n**3, repeats)
    m, k, j = (64, 64, 128) if quick else (1426, 512, 1536)
    x, w = torch.randn(m, k), torch.randn(k, j)
    mlp = _median_rate(lambda: torch.mm(x, w), 2 * m * k * j, repeats)
    elements = (COPY_BYTES // 64 if quick else COPY_BYTES) // 4
    src, dst = torch.ones(elements), torch.empty(elements)
    copy = _median_rate(lambda: dst.copy_(src), 2 * elements * 4, repeats)
    peak = {clock: max(square[clock], mlp[clock]) for clock in ("wall", "cpu")}
    return {"matmul_square": {"shape": [n, n, n], "flops_per_second": square},
            "matmul_mlp": {"shape": [m, k, j], "flops_per_second": mlp},
            "matmul_peak_flops_per_second": peak,
            "copy": {"bytes": 2 * elements * 4, "bytes_per_second": copy}}


# ---------------------------------------------------------------------------------------------- counting


class WorkCounter:
    """Matmul FLOPs executed inside `count()`: FlopCounterMode's (mm, addmm, bmm, convolution, forward and
    backward) plus the SDPA calls it does not count on the CPU, from their shapes."""

    def __init__(self) -> None:
        self.sdpa_flops = 0

    @contextlib.contextmanager
    def count(self) -> Iterator[WorkCounter]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        original = torch.nn.functional.scaled_dot_product_attention
        counter = self

        def counted(query, key, value, *args: Any, **kwargs: Any):
            *batch, lq, d = query.shape
            heads = 1
            for size in batch:
                heads *= size
            flops = 4 * heads * lq * key.shape[-2] * d
            if torch.is_grad_enabled() and query.requires_grad:
                flops *= 3  # forward + backward (2x forward)
            counter.sdpa_flops += flops
            return original(query, key, value, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = counted
        self.mode = FlopCounterMode(display=False)
        try:
            with self.mode:
                yield self
        finally:
            torch.nn.functional.scaled_dot_product_attention = original

    @property
    def flops(self) -> int:
        return int(self.mode.get_total_flops()) + self.sdpa_flops


# -------------------------------------------------------------------------------------------- generation


def _legacy_multinomial(probs, generator, noise=None):
    """Today's sampler: one `torch.multinomial` per group (what `rollout._multinomial` replaced)."""
    import torch

    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    blocks = probs.split(probs.shape[0] // len(generator))
    return torch.cat([torch.multinomial(b, 1, generator=g) for b, g in zip(blocks, generator, strict=True)]).squeeze(-1)


def generation_functions(policy, prompts, *, generations: int, completion_length: int) -> dict[str, Callable]:
    from dapo_ops.rollout import generate as rollout

    kwargs = {"num_generations": generations, "max_completion_length": completion_length, "seed": 0}

    def today():
        batched, rollout._multinomial = rollout._multinomial, _legacy_multinomial
        try:
            return rollout.generate_rollouts(policy, prompts, rollout_cache="dynamic", **kwargs)
        finally:
            rollout._multinomial = batched

    return {"today": today,
            "dynamic": lambda: rollout.generate_rollouts(policy, prompts, rollout_cache="dynamic", **kwargs),
            "static": lambda: rollout.generate_rollouts(policy, prompts, rollout_cache="static", **kwargs)}


def interleaved(functions: dict[str, Callable], repeats: int) -> dict[str, Any]:
    """Wall and CPU seconds of each function, interleaved (A B C, C B A, ...) after a warm-up."""
    outputs = {name: fn() for name, fn in functions.items()}
    wall: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    for r in range(repeats):
        for name in (list(functions) if r % 2 == 0 else list(reversed(functions))):
            w0, c0 = time.perf_counter(), time.process_time()
            functions[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {"wall_seconds": wall, "cpu_seconds": cpu, "outputs": outputs}


def _speedup(times: dict[str, list[float]], slow: str, fast: str) -> float:
    return common.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def compare_generation(policy, prompts, *, generations: int, completion_length: int, repeats: int) -> dict[str, Any]:
    import torch

    timing = interleaved(generation_functions(policy, prompts, generations=generations,
                                              completion_length=completion_length), repeats)
    outputs = timing.pop("outputs")
    tokens = int(outputs["static"].completion_mask.sum())
    same = all(torch.equal(outputs["today"].completion_ids, outputs[c].completion_ids) for c in ("dynamic", "static"))
    return {**timing, "completion_tokens": tokens, "token_identical": same,
            "tokens_per_second": {c: tokens / common.median(v) for c, v in timing["wall_seconds"].items()},
            "speedup": _speedup(timing["wall_seconds"], "today", "static"),
            "speedup_cpu": _speedup(timing["cpu_seconds"], "today", "static"),
            "speedup_vs_dynamic": _speedup(timing["wall_seconds"], "dynamic", "static")}


# ------------------------------------------------------------------------------------------------ phases


def _fraction(flops: float, seconds: dict[str, float], peak: dict[str, float]) -> dict[str, float]:
    return {clock: flops / seconds[clock] / peak[clock] for clock in ("wall", "cpu")}


class PeakProbe:
    """The machine's matmul and copy rates measured right before each timed repeat (a ~0.1 s burst each), so
    that a phase is divided by the peak of the same moment: on a shared machine the load changes between the
    start of the benchmark and a phase, and wall-time fractions against an earlier peak mean nothing."""

    def __init__(self, quick: bool) -> None:
        import torch

        n = 128 if quick else 1024
        self.a, self.b, self.out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        elements = (COPY_BYTES // 64 if quick else COPY_BYTES) // 4
        self.src, self.dst = torch.ones(elements), torch.empty(elements)
        self.samples: list[dict[str, dict[str, float]]] = []

    def __call__(self) -> None:
        import torch

        n = self.a.shape[0]
        matmul = _median_rate(lambda: torch.mm(self.a, self.b, out=self.out), 2 * n**3, 1, min_seconds=0.1)
        copy = _median_rate(lambda: self.dst.copy_(self.src), 2 * self.src.numel() * 4, 1, min_seconds=0.05)
        self.samples.append({"matmul": matmul, "copy": copy})

    def peak(self, what: str = "matmul") -> dict[str, float]:
        return {c: common.median(s[what][c] for s in self.samples) for c in ("wall", "cpu")}


def _timed(fn: Callable[[], Any], repeats: int, probe: PeakProbe | None = None) -> dict[str, float]:
    """Median wall and CPU seconds of `fn` after a warm-up (the probe measuring the peak before each repeat)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        if probe is not None:
            probe()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall": common.median(wall), "cpu": common.median(cpu)}


def trained_phases(policy, shape, repeats: int, quick: bool) -> dict[str, Any]:
    """The update and the teacher-forced pass (shared prefix, the defaults), FLOPs counted while they run."""
    batch = shared_prefix.fixed_rollouts(policy, shape)
    phases: dict[str, Any] = {}
    for name, case in (("update", "update-shared"), ("teacher_forced", "tfp-shared")):
        fn = shared_prefix.case_function(case, policy, batch, shape, "cpu")
        fn()  # warm-up (the optimizer's state) before counting
        with WorkCounter().count() as counter:
            fn()
        probe = PeakProbe(quick)
        seconds = _timed(fn, repeats, probe)
        phases[name] = {"flops": counter.flops, "sdpa_flops": counter.sdpa_flops, "seconds": seconds,
                        "peak_flops_per_second": probe.peak(),
                        "flops_per_second": {c: counter.flops / s for c, s in seconds.items()},
                        "fraction_of_peak": _fraction(counter.flops, seconds, probe.peak())}
    return phases


def generation_phases(policy, prompts, shape, repeats: int, quick: bool) -> dict[str, Any]:
    """Prefill against the matmul peak, the decoding steps against their roofline bound (static cache)."""
    from dapo_ops.rollout import generate as rollout
    from dapo_ops.rollout import kv_cache

    original = rollout._prefill
    record: dict[str, Any] = {"prefill": []}

    def prefill(*args: Any, **kwargs: Any):
        w0, c0 = time.perf_counter(), time.process_time()
        flops = counter.flops if counting else 0
        state = original(*args, **kwargs)
        record["prefill"].append({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0,
                                  "flops": (counter.flops - flops) if counting else 0,
                                  "prompt_length": int(state.attention_mask.shape[1])})
        return state

    run = generation_functions(policy, prompts, generations=shape.num_generations,
                               completion_length=shape.completion_length)["static"]
    rollout._prefill = prefill
    try:
        counting, counter = True, WorkCounter()
        with counter.count():
            batch = run()
        total_flops, prefill_flops = counter.flops, record["prefill"][0]["flops"]
        counting, record["prefill"] = False, []
        probe = PeakProbe(quick)
        seconds = _timed(run, repeats, probe)
    finally:
        rollout._prefill = original
    prefill_seconds = {c: common.median(r[c] for r in record["prefill"]) for c in ("wall", "cpu")}
    decode_seconds = {c: seconds[c] - prefill_seconds[c] for c in ("wall", "cpu")}
    steps = int(batch.completion_ids.shape[1]) - 1  # decoding forwards: the last sampled token is not fed back
    rows, prompt_length = len(batch), record["prefill"][0]["prompt_length"]
    step_bytes, weight_bytes = kv_cache.decode_read_bytes(policy.model, rows, prompt_length, steps)
    decode_flops = total_flops - prefill_flops
    peak, bandwidth = probe.peak("matmul"), probe.peak("copy")
    bound = {c: sum(max(decode_flops / steps / peak[c], b / bandwidth[c]) for b in step_bytes) for c in ("wall", "cpu")}
    return {
        "prefill": {"flops": prefill_flops, "seconds": prefill_seconds, "peak_flops_per_second": peak,
                    "flops_per_second": {c: prefill_flops / s for c, s in prefill_seconds.items()},
                    "fraction_of_peak": _fraction(prefill_flops, prefill_seconds, peak)},
        "decode": {"flops": decode_flops, "steps": steps, "rows": rows, "prompt_length": prompt_length,
                   "bytes": sum(step_bytes), "weight_bytes_per_step": weight_bytes, "seconds": decode_seconds,
                   "peak_flops_per_second": peak, "bandwidth_bytes_per_second": bandwidth,
                   "roofline_seconds": bound,
                   "compute_bound_seconds": {c: decode_flops / peak[c] for c in ("wall", "cpu")},
                   "memory_bound_seconds": {c: sum(step_bytes) / bandwidth[c] for c in ("wall", "cpu")},
                   "fraction_of_roofline": {c: bound[c] / decode_seconds[c] for c in ("wall", "cpu")}},
    }


def _self_cpu_by_op(fn: Callable[[], Any]) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def decode_profile(policy, prompts, shape, top: int = 10) -> dict[str, Any]:
    """torch.profiler's self CPU time per op of the decoding steps, today's path and the static cache: a whole
    generation minus a prefill alone (the same call), the static cache's largest ops first."""
    import torch

    from dapo_ops.rollout import generate as rollout

    functions = generation_functions(policy, prompts, generations=shape.num_generations,
                                     completion_length=shape.completion_length)
    with torch.no_grad():
        prefill = _self_cpu_by_op(lambda: rollout._prefill(policy.model, prompts.trim_padding(), shape.num_generations,
                                                           static_tokens=shape.completion_length))
    decode = {}
    for case in ("today", "static"):
        whole = _self_cpu_by_op(functions[case])
        decode[case] = {op: max(0.0, seconds - prefill.get(op, 0.0)) for op, seconds in whole.items()}
    totals = {case: sum(ops.values()) for case, ops in decode.items()}
    rows = sorted(((s, op) for op, s in decode["static"].items() if s > 0), reverse=True)[:top]
    return {"ops": [{"op": op, "self_cpu_seconds": s, "share": s / totals["static"],
                     "today_self_cpu_seconds": decode["today"].get(op, 0.0)} for s, op in rows],
            "ops_seconds": totals["static"], "today_ops_seconds": totals["today"],
            "today_cat_share": decode["today"].get("aten::cat", 0.0) / totals["today"],
            "matmul_share": sum(decode["static"].get(op, 0.0) for op in MATMUL_OPS) / totals["static"],
            "attention_share": sum(s for op, s in decode["static"].items() if "scaled_dot_product" in op)
            / totals["static"]}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


# ----------------------------------------------------------------------------------------------- driver


def embedded_inputs(prompts: int, quick: bool):
    """The embedded model (make run's size) and `prompts` small-image prompts."""
    from dapo_ops.models import loading as models
    from dapo_ops.run import phases as training

    shape = shared_prefix.Shape(image_side=56, question_words=6, prompts=prompts)
    policy = models.build_embedded_policy([" ".join(shared_prefix._WORDS)], 0)
    return policy, training.encode_rows(policy, shared_prefix.prompt_rows(shape, prompts))


def run(*, quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from dapo_ops.run import phases as training

    common.set_threads(THREADS)
    hf_logging.set_verbosity_error()
    repeats = repeats or (1 if quick else 3)
    shape = shared_prefix.QUICK if quick else shared_prefix.REALISTIC
    started = time.perf_counter()
    undo = round_vs_trl.suppress_eos()  # every rollout decodes the full length: the same work on every side
    try:
        machine = machine_peak(3 if quick else 5, quick)
        peak = machine["matmul_peak_flops_per_second"]
        log(f"  peak: matmul {peak['cpu'] / 1e9:.0f} GFLOP/s (CPU time), copy "
            f"{machine['copy']['bytes_per_second']['cpu'] / 1e9:.1f} GB/s")
        policy = shared_prefix.build_policy(shape, "cpu")
        prompts = training.encode_rows(policy, shared_prefix.prompt_rows(shape, shape.prompts))
        realistic = compare_generation(policy, prompts, generations=shape.num_generations,
                                       completion_length=shape.completion_length, repeats=repeats)
        log(f"  generation, realistic: static / today {realistic['speedup']:.2f}x (CPU {realistic['speedup_cpu']:.2f}x)"
            f", identical tokens {realistic['token_identical']}")
        small, small_prompts = embedded_inputs(4 if quick else 64, quick)
        embedded = compare_generation(small, small_prompts, generations=2 if quick else 8,
                                      completion_length=4 if quick else 24, repeats=repeats)
        log(f"  generation, embedded: static / today {embedded['speedup']:.2f}x (CPU {embedded['speedup_cpu']:.2f}x)")
        phases = {**trained_phases(policy, shape, repeats, quick),
                  **generation_phases(policy, prompts, shape, repeats, quick)}
        profile = decode_profile(policy, prompts, shape)
    finally:
        undo()
    for name in ("update", "teacher_forced", "prefill"):
        log(f"  {name}: {phases[name]['flops'] / 1e9:.1f} GFLOP, {phases[name]['fraction_of_peak']['cpu']:.2f} of peak")
    log(f"  decode: {phases['decode']['fraction_of_roofline']['cpu']:.2f} of its roofline bound")
    summary = {
        "static_cache_generation_speedup": realistic["speedup"],
        "update_fraction_of_peak": phases["update"]["fraction_of_peak"]["cpu"],
        "teacher_forced_fraction_of_peak": phases["teacher_forced"]["fraction_of_peak"]["cpu"],
        "decode_fraction_of_bandwidth": phases["decode"]["fraction_of_roofline"]["cpu"],
        "static_cache_generation_speedup_cpu": realistic["speedup_cpu"],
        "static_cache_generation_speedup_embedded": embedded["speedup"],
        "prefill_fraction_of_peak": phases["prefill"]["fraction_of_peak"]["cpu"],
        "matmul_peak_gflops": peak["cpu"] / 1e9,
        "copy_bandwidth_gbs": machine["copy"]["bytes_per_second"]["cpu"] / 1e9,
    }
    return {"name": "roofline", "device": "cpu", "threads": THREADS, "model": shape.describe(), "shape": asdict(shape),
            "repeats": repeats, "machine_peak": machine, "generation": {"realistic": realistic, "embedded": embedded},
            "phases": phases, "decode_profile": profile, "summary": summary, "seconds": time.perf_counter() - started}


def _gen_rows(result: dict[str, Any]) -> list[list[Any]]:
    wall, cpu = result["wall_seconds"], result["cpu_seconds"]
    return [[case, common.median(wall[case]), common.median(cpu[case]), result["tokens_per_second"][case]]
            for case in GENERATION_CASES]


def markdown(result: dict[str, Any]) -> str:
    machine, phases, summary = result["machine_peak"], result["phases"], result["summary"]
    peak = machine["matmul_peak_flops_per_second"]
    gen = result["generation"]
    head = (f"Model: {result['model']}; {result['threads']} thread, fp32, EOS suppressed (every rollout decodes "
            f"the full length). Machine peak (medians, process CPU time / wall): fp32 matmul "
            f"{machine['matmul_square']['shape']} {machine['matmul_square']['flops_per_second']['cpu'] / 1e9:.0f} / "
            f"{machine['matmul_square']['flops_per_second']['wall'] / 1e9:.0f} GFLOP/s, realistic MLP "
            f"{machine['matmul_mlp']['shape']} {machine['matmul_mlp']['flops_per_second']['cpu'] / 1e9:.0f} / "
            f"{machine['matmul_mlp']['flops_per_second']['wall'] / 1e9:.0f} GFLOP/s (peak: the larger); 256 MiB "
            f"copy {machine['copy']['bytes_per_second']['cpu'] / 1e9:.1f} / "
            f"{machine['copy']['bytes_per_second']['wall'] / 1e9:.1f} GB/s ((read + written) / time).")
    tables = []
    for key, title in (("realistic", "realistic shape"), ("embedded", "embedded size (make run's round)")):
        g = gen[key]
        tables.append(f"Generation at the {title}, {result['repeats']} interleaved repeats after a warm-up, "
                      f"{g['completion_tokens']} completion tokens; today = growing cache + one multinomial per "
                      f"group. static / today: {g['speedup']:.2f}x wall, {g['speedup_cpu']:.2f}x CPU time "
                      f"(static / dynamic {g['speedup_vs_dynamic']:.2f}x); identical tokens on all three: "
                      f"{g['token_identical']}.\n\n"
                      + common.markdown_table(["cache", "median wall s", "median CPU s", "tokens/s (wall)"],
                                              _gen_rows(g)))
    rows = []
    for name, title in (("update", "update (fwd + bwd + AdamW, shared prefix)"),
                        ("teacher_forced", "teacher-forced pass + attention metrics"), ("prefill", "prefill")):
        p = phases[name]
        rows.append([title, p["flops"] / 1e9, p["seconds"]["cpu"], p["flops_per_second"]["cpu"] / 1e9,
                     p["fraction_of_peak"]["cpu"], p["fraction_of_peak"]["wall"]])
    d = phases["decode"]
    rows.append([f"decode ({d['steps']} steps x {d['rows']} rows; bound {d['roofline_seconds']['cpu']:.2f} s: compute "
                 f"{d['compute_bound_seconds']['cpu']:.2f} s, memory {d['memory_bound_seconds']['cpu']:.2f} s)",
                 d["flops"] / 1e9, d["seconds"]["cpu"], d["flops"] / d["seconds"]["cpu"] / 1e9,
                 d["fraction_of_roofline"]["cpu"], d["fraction_of_roofline"]["wall"]])
    phase_table = common.markdown_table(
        ["phase (realistic shape)", "GFLOP executed", "CPU s", "GFLOP/s", "fraction of peak (CPU)",
         "fraction of peak (wall)"], rows)
    prof = result["decode_profile"]
    decode = phases["decode"]
    profile_table = (
        "Where the decoding steps' time goes (torch.profiler, self CPU time per op of a generation minus its "
        "prefill; the profiler slows small ops, so shares are indicative). Today's path spends "
        f"{prof['today_cat_share']:.0%} of its decoding ops' time in `aten::cat` (the growing cache), which the "
        f"static cache removes. Decoding reaches {decode['fraction_of_roofline']['cpu']:.2f} of its roofline "
        f"bound: of the static cache's decoding ops, {prof['matmul_share']:.0%} are matmuls ({decode['rows']}-row GEMMs, "
        f"below the large-GEMM peak on one core) and {prof['attention_share']:.0%} the CPU SDPA kernel for one "
        "query per row (it reads every row's copy of the prompt's keys and values); the rest are element-wise "
        "and framework ops.\n\n"
        + common.markdown_table(["op", "static: self CPU s", "share", "today: self CPU s"],
                                [[f"`{r['op']}`", r["self_cpu_seconds"], f"{r['share']:.0%}",
                                  r.get("today_self_cpu_seconds", float("nan"))] for r in prof["ops"]]))
    note = (f"Fractions divide by the peak measured right before each timed repeat (a short matmul and copy burst). "
            f"Matmul peak {peak['cpu'] / 1e9:.0f} GFLOP/s; decoding reads {d['weight_bytes_per_step'] / 2**20:.0f} MiB "
            f"of weights per step plus the KV cache ({d['bytes'] / 2**30:.2f} GiB over the decode); its row is "
            f"against the roofline bound sum over steps of max(FLOPs / peak, bytes / bandwidth). Summary: "
            + ", ".join(f"`{k}` {v:.3g}" for k, v in summary.items()))
    return "\n\n".join([head, *tables, phase_table, note, profile_table])


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.cli("benchmarks.roofline", __doc__, device="cpu",
                        device_help="cpu only: the peak and the counts are one CPU thread's")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    result = run(quick=args.quick, repeats=args.repeats, log=common.log)
    common.emit(result, markdown(result), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
