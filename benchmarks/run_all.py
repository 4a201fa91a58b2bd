"""`make bench`: run every benchmark, print the markdown tables, write results.md and results.json.

Each benchmark runs in its own process (its monkeypatches and memory stay there) and hands back JSON;
`results.json` holds them all plus a top-level `summary` with the headline ratios and their goals.
Both files are written atomically (temporary file + rename).

    python -m benchmarks.run_all [--device auto] [--quick] [--out-dir benchmarks]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import (
    attention,
    common,
    launch_overhead,
    memory_plan,
    roofline,
    round_vs_trl,
    shared_prefix,
    visual_dependency,
)
from dapo_ops.store.layout import write_text_atomic

HERE = Path(__file__).resolve().parent

# name -> (module, markdown renderer, section title)
BENCHMARKS: dict[str, tuple[str, Callable[[dict[str, Any]], str], str]] = {
    "attention": ("benchmarks.attention", attention.markdown,
                  "Attention metrics: plain forward vs lean O(T) metrics vs eager output_attentions + oracle"),
    "round_vs_trl": ("benchmarks.round_vs_trl", round_vs_trl.markdown,
                     "A full round: dapo-vlm vs TRL's GRPOTrainer"),
    "shared_prefix": ("benchmarks.shared_prefix", shared_prefix.markdown,
                      "Realistic VLM shapes: each prompt computed once (shared prefix) vs once per rollout, "
                      "and a round vs TRL"),
    "roofline": ("benchmarks.roofline", roofline.markdown,
                 "Rollouts with the preallocated KV cache, and each phase against the machine's peak"),
    "launch_overhead": ("benchmarks.launch_overhead", launch_overhead.markdown,
                        "What a process costs: 2-process accelerate launch overhead vs the phase's work"),
    "memory_plan": ("benchmarks.memory_plan", memory_plan.markdown,
                    "The memory plan (`make plan`) against measured peak memory"),
    "visual_dependency": ("benchmarks.visual_dependency", visual_dependency.markdown,
                          "Visual dependency: a round with the masked pass vs without"),
}

# summary key -> (goal, comparison, what it means)
GOALS: dict[str, tuple[float, str]] = {
    "attention_time_overhead": (0.10, "(lean − plain) / plain at the longest prompt"),
    "attention_memory_ratio_vs_eager": (0.05, "extra peak memory lean / eager at the longest prompt"),
    "round_time_ratio_vs_trl": (1.0, "dapo-vlm library round / TRL round (same work + attention metrics)"),
    "pipeline_round_time_ratio_vs_trl": (1.5, "the round materialized through Dagster / TRL round"),
    "shared_prefix_update_speedup": (3.0, "unshared / shared update step time at the realistic VLM shape"),
    "shared_prefix_update_memory_ratio": (0.5, "extra peak memory of the shared update / unshared, realistic shape"),
    "round_time_ratio_vs_trl_realistic": (0.5, "dapo-vlm round (with attention metrics) / TRL round, realistic shape"),
    "shared_prefix_max_logp_diff": (1e-5, "max |log-prob| difference shared vs unshared, realistic shape"),
    "static_cache_generation_speedup": (2.0, "today's / the static cache's generation time, realistic shape (wall)"),
    "update_fraction_of_peak": (0.7, "update's executed matmul FLOP/s / the fp32 matmul peak, realistic shape"),
    "teacher_forced_fraction_of_peak": (0.7, "teacher-forced pass's matmul FLOP/s / the matmul peak, realistic shape"),
    "decode_fraction_of_bandwidth": (0.5, "decoding's roofline bound max(FLOPs/peak, bytes/bandwidth) / its time"),
    "memory_plan_error_embedded": (memory_plan.GOAL, "worst |plan − measured| / measured peak of a phase, embedded"),
    "memory_plan_error_realistic": (memory_plan.GOAL, "the same, a Qwen2.5-VL-shaped model with 256 image tokens"),
    "visual_dependency_round_overhead": (visual_dependency.GOAL, "(round with the masked pass − without) / "
                                                                 "without, realistic shape"),
}
# Goals met from above (value >= goal); every other goal is met from below (value <= goal).
AT_LEAST: frozenset[str] = frozenset({"shared_prefix_update_speedup", "static_cache_generation_speedup",
                                      "update_fraction_of_peak", "teacher_forced_fraction_of_peak",
                                      "decode_fraction_of_bandwidth"})


# Secondary summary values: the same questions asked in ways less sensitive to a busy machine.
SECONDARY: dict[str, str] = {
    "attention_extra_sdpa_share": "time in the metric's own per-layer SDPA / plain, longest prompt",
    "attention_metric_memory_ratio_vs_eager": "(lean − plain) / (eager − plain) extra peak memory, longest prompt",
    "round_time_ratio_vs_trl_best": "fastest library round / fastest TRL round",
    "pipeline_round_time_ratio_vs_trl_best": "fastest pipeline round / fastest TRL round",
    "shared_prefix_teacher_forced_speedup": "unshared / shared teacher-forced pass time, realistic shape",
    "shared_prefix_teacher_forced_memory_ratio": "extra peak memory of the shared / unshared teacher-forced pass",
    "shared_prefix_update_speedup_cpu": "unshared / shared update step process CPU time, realistic shape",
    "shared_prefix_teacher_forced_speedup_cpu": "unshared / shared teacher-forced pass process CPU time",
    "round_cpu_time_ratio_vs_trl_realistic": "dapo-vlm / TRL round process CPU time, realistic shape",
    "static_cache_generation_speedup_cpu": "today's / the static cache's generation process CPU time, realistic",
    "static_cache_generation_speedup_embedded": "today's / the static cache's generation time, embedded size",
    "prefill_fraction_of_peak": "prefill's matmul FLOP/s / the fp32 matmul peak, realistic shape",
    "matmul_peak_gflops": "fp32 matmul peak of one thread (process CPU time), GFLOP/s",
    "copy_bandwidth_gbs": "256 MiB copy, (bytes read + written) / CPU time, GB/s",
    "launch_overhead_s": "2-process rollouts launch: wall minus the phase's work (start, imports, model load), s",
    "phase_work_s": "the rollouts phase's work in one process at the embedded size, s",
    "launch_crossover_model_scale": "model size (x embedded) above which 2 CPU processes beat one for rollouts",
    "visual_dependency_round_cpu_overhead": "the same overhead in process CPU time, realistic shape",
}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline ratios, each with its goal and whether it is met."""
    summary: dict[str, Any] = {}
    for result in results.values():
        for key, value in result.get("summary", {}).items():
            summary[key] = value
    goals = {}
    for key, (goal, meaning) in GOALS.items():
        value = summary.setdefault(key, math.nan)  # a goal whose benchmark did not run: "not measured"
        met = value >= goal if key in AT_LEAST else value <= goal
        goals[key] = {"value": value, "goal": goal, "met": bool(value == value and met), "meaning": meaning,
                      "direction": "at least" if key in AT_LEAST else "at most"}
    summary["goals"] = goals
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = []
    for key, goal in summary["goals"].items():
        value = goal["value"]
        rows.append([f"`{key}`", goal["meaning"], value, f"{'≥' if key in AT_LEAST else '≤'} {goal['goal']}",
                     "met" if goal["met"] else ("not measured" if value != value else "MISSED")])
    goals = common.markdown_table(["summary", "what", "value", "goal", ""], rows)
    views = [[f"`{key}`", meaning, summary[key]] for key, meaning in SECONDARY.items() if key in summary]
    if not views:
        return goals
    return goals + "\n\nRobustness views (not goals):\n\n" + common.markdown_table(["summary", "what", "value"], views)


def render(results: dict[str, dict[str, Any]], summary: dict[str, Any], machine: dict[str, Any],
           wall: float, failed: Sequence[str] = (), quick: bool = False, only: Sequence[str] = ()) -> str:
    parts = [
        "# dapo-vlm benchmarks" + (" (quick smoke configuration: the numbers mean nothing)" if quick else ""),
        "",
        (f"Sections {', '.join(only)} re-measured by `python -m benchmarks.run_all "
         f"{' '.join('--only ' + name for name in only)}` (the others are from the last full `make bench`) in "
         if only else "Generated by `make bench` (`python -m benchmarks.run_all`) in ")
        + f"{wall / 60:.1f} min on "
        f"{machine['cpu_count']} CPU cores ({machine['cpu']}), device {machine['device']}, torch "
        f"{machine['torch']}, transformers {machine['transformers']}, TRL {machine['trl']}, Dagster "
        f"{machine['dagster']}, {machine['torch_threads']} torch threads; load average at start "
        f"{_load(machine.get('load_average'))}, at end {_load(machine.get('load_average_end'))}. "
        "Compared cases run interleaved in one process and every number is a median, so the ratios hold "
        "even when other work slows the machine down; absolute seconds do not.",
        "",
        "## Summary",
        "",
        summary_markdown(summary),
    ]
    for name, result in results.items():
        parts += ["", f"## {BENCHMARKS[name][2]}", "", BENCHMARKS[name][1](result)]
    for name in failed:
        parts += ["", f"## {BENCHMARKS[name][2]}", "", "FAILED: see the output of `make bench`."]
    return "\n".join(parts) + "\n"


def _load(values: Sequence[float] | None) -> str:
    return "n/a" if not values else " / ".join(f"{v:.1f}" for v in values)


def write_results(results: dict[str, dict[str, Any]], machine: dict[str, Any], out_dir: Path, *, wall: float,
                  failed: Sequence[str] = (), quick: bool = False, only: Sequence[str] = ()) -> str:
    """Write results.json (summary first) and results.md atomically; returns the markdown."""
    summary = summarize(results)
    document = {"summary": summary, "machine": machine, "quick": quick, "seconds": wall, "failed": list(failed),
                **results}
    text = render(results, summary, machine, wall, failed, quick, only)
    write_text_atomic(out_dir / "results.json", json.dumps(common.json_safe(document), indent=2, default=str) + "\n")
    write_text_atomic(out_dir / "results.md", text)
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'results.json'}", file=sys.stderr)
    return text


def _previous_results(out_dir: Path, *, exclude: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The results of the benchmarks not in `exclude` from an earlier results.json (none if it is absent)."""
    path = out_dir / "results.json"
    if not path.exists():
        return {}
    document = json.loads(path.read_text(encoding="utf-8"))
    return {name: document[name] for name in BENCHMARKS if name in document and name not in exclude}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny configurations (smoke test)")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--out-dir", default=str(HERE))
    args = parser.parse_args(argv)

    common.set_threads()
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    if args.only:  # the other benchmarks keep their last results
        results.update(_previous_results(Path(args.out_dir), exclude=args.only))
    for name in args.only or list(BENCHMARKS):
        module = BENCHMARKS[name][0]
        print(f"== {name} ({module})", file=sys.stderr, flush=True)
        extra = ["--quick"] if args.quick else []
        begin = time.perf_counter()
        try:
            results[name] = common.run_json_subprocess(module, ["--device", device, *extra], timeout=3600,
                                                       stream_stderr=True)
        except Exception as error:  # noqa: BLE001 - report it, keep the other benchmarks' results
            print(f"== {name} FAILED: {error}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        print(f"== {name}: {time.perf_counter() - begin:.0f}s", file=sys.stderr, flush=True)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    text = write_results(results, machine, Path(args.out_dir), wall=time.perf_counter() - started,
                         failed=failed, quick=args.quick, only=args.only or ())
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
