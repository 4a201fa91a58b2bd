"""What a process costs: the launch overhead of a 2-process `accelerate` phase vs the phase's work.

At the embedded default size (64 prompts x 8 completions of up to 24 tokens, the tiny Qwen2.5-VL; warm start
skipped, so completions run long), for the `rollouts` and `attention` phases:

- one process, in this process: the phase's work (`seconds` of rollouts.json / attention.json), and the
  time to load checkpoint k;
- two processes, `accelerate launch -m pipelines.pipes_update --phase ...` as the assets run it (without
  the Dagster Pipes session): the wall time of the launch and the phase's work as rank 0 measured it.
  `launch_overhead_s` = wall - work: interpreter start, imports, process group, model load, gather;
- the start of a bare interpreter importing what a rank imports (`imports_s`).

Distributed execution pays off when one process's work W exceeds the 2-process work r·W plus the overhead
O: W > O / (1 - r) (`crossover_work_s`). Work grows with the model while O is mostly fixed (interpreter,
imports, process group; only the model load grows), so `crossover_model_scale` = crossover_work_s / W says
how many times larger than the embedded model a model must be for 2 CPU processes to win.

    python -m benchmarks.launch_overhead [--device cpu] [--quick] [--json-out F]
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

PHASES = ("rollouts", "attention")
QUICK_SIZE = {"prompts_per_round": 4, "num_generations": 2, "max_completion_length": 4,
              "num_train_examples": 16, "num_eval_examples": 8, "eval_subset_size": 4}
RANK_IMPORTS = "import accelerate, dapo_ops.distributed.launch, dapo_ops.run.phases, dagster_pipes"


def crossover(one_process_s: float, two_process_s: float, overhead_s: float) -> dict[str, float]:
    """Where 2 processes start to win: the one-process work above which r·W + O < W (r: the measured
    2-process / 1-process work ratio), and that work as a multiple of the measured one (model scale)."""
    ratio = two_process_s / one_process_s
    work = overhead_s / (1.0 - ratio) if ratio < 1.0 else math.inf
    return {"work_ratio": ratio, "crossover_work_s": work, "crossover_model_scale": work / one_process_s}


def _record(store: Any, key: str, phase: str) -> dict[str, Any]:
    from dapo_ops.store.layout import read_json

    files = store.round(key)
    return read_json(files.rollouts_json if phase == "rollouts" else files.attention_json)


def _imports_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", RANK_IMPORTS], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return time.perf_counter() - start


def run(*, device: str = "cpu", quick: bool = False, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.distributed import launch as distributed
    from dapo_ops.run import phases as training
    from dapo_ops.run.checkpoint_policy import load_checkpoint_policy
    from dapo_ops.store.layout import RunStore, checkpoint_key

    del device  # the question is 2 CPU processes (gloo), whatever accelerator the machine has
    key = checkpoint_key(0)
    config = DapoConfig(run_name="launch-overhead", warmup_steps=0, device="cpu", num_processes=2,
                        **(QUICK_SIZE if quick else {}))
    one_config = config.replace(num_processes=1)
    with tempfile.TemporaryDirectory(prefix="launch-overhead-") as tmp:
        store = RunStore(Path(tmp), config.run_name)
        round_log = training.round_log(store, key)
        training.prepare_dataset(config, store)
        training.build_base_checkpoint(config, store, round_log)
        start = time.perf_counter()
        policy = load_checkpoint_policy(store, key, one_config)
        model_load = time.perf_counter() - start
        phases: dict[str, dict[str, float]] = {}
        for phase in PHASES:
            log(f"{phase}: one process")
            if phase == "rollouts":
                training.generate_round_rollouts(one_config, store, key, policy, round_log)
            else:
                training.compute_attention(one_config, store, key, policy, round_log)
            one = float(_record(store, key, phase)["seconds"])
            log(f"{phase}: two processes (accelerate launch)")
            launch = distributed.prepare_launch(config, store, key, phase=phase)
            env = {**os.environ, **launch.env, "OMP_NUM_THREADS": "1"}
            start = time.perf_counter()
            done = subprocess.run(launch.command, cwd=launch.cwd, env=env, capture_output=True, text=True,
                                  timeout=1800)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"the 2-process {phase} launch failed:\n{done.stderr[-3000:]}")
            record = _record(store, key, phase)
            assert record["num_processes"] == 2
            two = float(record["seconds"])
            phases[phase] = {"one_process_work_s": one, "two_process_work_s": two, "launch_wall_s": wall,
                             "launch_overhead_s": wall - two, **crossover(one, two, wall - two)}
            log(f"{phase}: work {one:.2f}s on 1, {two:.2f}s on 2 processes; launch {wall:.1f}s")
        imports = _imports_seconds()
    size = {name: getattr(config, name) for name in ("prompts_per_round", "num_generations", "max_completion_length")}
    headline = phases["rollouts"]
    return {
        "size": size, "quick": quick, "model_load_s": model_load, "imports_s": imports, "phases": phases,
        "summary": {
            "launch_overhead_s": headline["launch_overhead_s"],
            "phase_work_s": headline["one_process_work_s"],
            "launch_crossover_work_s": headline["crossover_work_s"],
            "launch_crossover_model_scale": headline["crossover_model_scale"],
        },
    }


def markdown(result: dict[str, Any]) -> str:
    size = result["size"]
    rows = [[phase, p["one_process_work_s"], p["two_process_work_s"], p["launch_wall_s"], p["launch_overhead_s"],
             p["work_ratio"], p["crossover_work_s"], p["crossover_model_scale"]]
            for phase, p in result["phases"].items()]
    table = common.markdown_table(
        ["phase", "work, 1 process (s)", "work, 2 processes (s)", "2-process launch wall (s)", "launch overhead (s)",
         "work ratio 2/1", "crossover work (s)", "crossover model scale"], rows)
    return (f"{size['prompts_per_round']} prompts x {size['num_generations']} completions of up to "
            f"{size['max_completion_length']} tokens, the embedded tiny model on 2 CPU processes (gloo). "
            f"A rank's interpreter start + imports: {result['imports_s']:.1f} s; loading the checkpoint in process: "
            f"{result['model_load_s']:.2f} s.\n\n{table}\n\nThe overhead is the launch wall time minus the "
            "phase's work on rank 0; 2 processes pay off once a phase's one-process work exceeds the crossover "
            "(overhead / (1 - work ratio)), i.e. for a model about `crossover model scale` times the embedded one.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.cli("benchmarks.launch_overhead", __doc__, device="cpu",
                        device_help="ignored: the ranks always run on the CPU", quick_help="a tiny round (smoke test)")
    args = parser.parse_args(argv)
    result = run(device=args.device, quick=args.quick, log=common.log)
    common.emit(result, markdown(result), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
