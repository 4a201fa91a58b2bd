"""Shared helpers of the benchmarks: threads, timers, peak memory, machine info, markdown tables.

Timing rules (why the numbers can be trusted on a busy machine): the compared cases run interleaved
(A B A B …) in one process after a warm-up, and every headline is a median; ratios come from runs that
saw the same machine load. On CUDA the timers are CUDA events and memory is `max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# Every benchmark process (and each memory subprocess) uses the same number of intra-op threads.
DEFAULT_THREADS = 2


def set_threads(threads: int = DEFAULT_THREADS) -> None:
    import torch

    torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call of `fn` takes: CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far.

    `ru_maxrss` of a process started by fork/vfork + exec begins at the PARENT's peak (Linux keeps the larger
    of the old and new address space's high-water mark at exec), so a child of a big benchmark process would
    read the parent's peak. Where /proc exists we read the same high-water mark of this address space alone
    (`VmHWM`); elsewhere `ru_maxrss` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Extra peak memory of a block over a baseline taken just before it.

    CPU: peak RSS (`peak_rss_bytes`) after − before (the process must be fresh and warmed up, so that the
    baseline is the process's resident size after model load; a block that stays under an earlier peak
    reads 0).
    CUDA: `max_memory_allocated` during the block − allocated before it.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.extra_bytes = 0
        self.baseline_bytes = 0

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_allocated()
        else:
            self.baseline_bytes = peak_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.extra_bytes = torch.cuda.max_memory_allocated() - self.baseline_bytes
        else:
            self.extra_bytes = peak_rss_bytes() - self.baseline_bytes


def run_json_subprocess(module: str, args: Sequence[str], *, timeout: float, threads: int = DEFAULT_THREADS,
                        stream_stderr: bool = False) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process; its last stdout line is a JSON object.

    With `stream_stderr` the child's progress lines go straight to this process's stderr.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE, stderr=None if stream_stderr else subprocess.PIPE, text=True, timeout=timeout,
        env=env, cwd=Path(__file__).resolve().parent.parent,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout or "(see the output above)")[-3000:]
        raise RuntimeError(f"`python -m {module} {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def cli(module: str, doc: str | None, *, device: str = "auto", device_help: str | None = None,
        quick_help: str = "a tiny model and batch (smoke test)") -> argparse.ArgumentParser:
    """The argument parser every benchmark module starts from: `--device`, `--quick` and `--json-out`; a module
    adds its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=device, help=device_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json-out", default=None, help="also write the result's JSON to this file")
    return parser


def log(line: str) -> None:
    """A benchmark's progress line: on stderr, so that stdout holds only the result's JSON."""
    print(line, file=sys.stderr, flush=True)


def emit(result: dict[str, Any], markdown_text: str, json_out: str | None) -> None:
    """A benchmark module's CLI output: the markdown on stderr, the result as strict JSON on stdout and in
    `json_out` (what `run_all` reads)."""
    print(markdown_text, file=sys.stderr)
    text = json.dumps(json_safe(result))
    if json_out:
        Path(json_out).write_text(text)
    print(text, flush=True)


def json_safe(value: Any) -> Any:
    """NaN and infinities as null, so results.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on (the load average shows how busy the machine was)."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for name in ("trl", "dagster"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional in a minimal environment
            info[name] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:
                return "n/a"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20
