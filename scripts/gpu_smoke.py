"""GPU smoke: the rollout KV caches side by side, two DAPO rounds in bf16 with SDPA on a scaled-up embedded
Qwen2.5-VL, then the attention-metric benchmark at long context. Prints tokens/s, rounds/s and peak GPU memory;
writes them as JSON.

1. Decoding: the same rollouts with the growing cache (`rollout_cache: dynamic`), the preallocated one
   (`static`) and the preallocated one with the decoding step compiled (`kv_cache.compiled_decoder`,
   CUDA graphs through torch.compile's "reduce-overhead"): tokens/s of each, and the decoding steps' bytes
   read (weights + KV cache) per second as a fraction of the GPU's bandwidth (a device-to-device copy).

    scripts/gpu_smoke.sh                         # what to run whenever a GPU is available
    python scripts/gpu_smoke.py --allow-cpu --shape tiny --prompts 4 --generations 4   # CPU dry run of the code

Each round is `dapo_ops.run.round.run_round`, the round the Dagster assets run, in this process (rollouts with
KV cache → one teacher-forced pass with the lean attention metrics → rewards + health → the update → eval +
atomic checkpoint → reports), without Dagster or MLflow, so the figures are the round's work alone.

The path runs on an image with only torch, transformers, peft, accelerate, pandas, pyarrow, safetensors, pillow
and numpy: steps 1 and 3 need nothing else; the rounds need polars, and say SKIPPED without it (`make gpu-wheels`
carries its wheels; scripts/gpu_smoke.sh installs them). `make gpu-smoke-dry` runs it in such an environment.

Exit codes: 0 measured, or skipped because no GPU is present (the message starts with "SKIPPED");
3 no GPU while --require-gpu (or REQUIRE_GPU=1) was asked for; 1 any failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

NO_GPU_EXIT = 3
GIB = 1024**3

# Text decoder hidden 1024 x 12 layers (16 heads, 4 KV heads), vision tower hidden 256 x 4 blocks: ~150M
# parameters, big enough that the GPU, not Python, sets the pace. "tiny" is the embedded model itself.
SHAPES: dict[str, dict[str, int]] = {
    "smoke": {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4,
              "intermediate_size": 2816, "vision_depth": 4, "vision_hidden_size": 256, "vision_heads": 4,
              "vision_intermediate_size": 1024},
    "tiny": {},
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_smoke.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smoke")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--prompts", type=int, default=64, help="prompts per round")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224, help="synthetic image side (224: 64 image tokens)")
    parser.add_argument("--decode-repeats", type=int, default=3, help="timed generations per cache (after a warm-up)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the decoding step ('eager': dynamo's capture alone)")
    parser.add_argument("--skip-rounds", action="store_true", help="only the decoding and attention steps")
    parser.add_argument("--attention-lengths", default=os.environ.get("ATTENTION_LENGTHS", "1024,4096,8192"),
                        help="prompt lengths of the attention benchmark ('' skips it)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the run and the JSON (default: a temp dir)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU is present (dry run)")
    parser.add_argument("--require-gpu", action="store_true", default=os.environ.get("REQUIRE_GPU") == "1")
    return parser.parse_args(argv)


def _no_gpu_message(torch: Any) -> str:
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (a CPU-only wheel)'}"
    return (f"SKIPPED: no GPU present (torch.cuda.is_available() is False; {build}). Nothing was measured. "
            f"Run scripts/gpu_smoke.sh on a machine with an NVIDIA GPU and a CUDA build of torch, or pass "
            f"--allow-cpu for a CPU dry run of the code path.")


class Clock:
    """Wall time that waits for queued GPU work first."""

    def __init__(self, torch: Any, device: str) -> None:
        self.torch, self.cuda = torch, device.startswith("cuda")

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


def device_bandwidth(torch: Any, device: str) -> float:
    """(bytes read + written) / time of a device-to-device copy of 1 GiB (256 MiB on the CPU), best of 5."""
    elements = (GIB if device.startswith("cuda") else GIB // 4) // 4
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    clock, best = Clock(torch, device), float("inf")
    for _ in range(5):
        start = clock.now()
        dst.copy_(src)
        best = min(best, clock.now() - start)
    return 2 * elements * 4 / best


def decode_prompts(policy: Any, count: int, image_size: int) -> Any:
    """`count` synthetic image questions (no dataset file: nothing but PIL and the processor)."""
    from PIL import Image

    from dapo_ops.models.inputs import encode_prompts

    colors = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 220, 40)]
    images = [Image.new("RGB", (image_size, image_size), colors[i % 4]) for i in range(count)]
    return encode_prompts(policy, ["Which color is the shape?"] * count, [["red", "green", "blue", "yellow"]] * count,
                          images)


def decode_caches(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Step 1: one generation batch with the dynamic cache, the static cache and the static cache with the
    decoding step compiled, interleaved after a warm-up (the compile); EOS suppressed, so all decode fully."""
    import torch

    from dapo_ops.data import synthetic
    from dapo_ops.models import loading as models
    from dapo_ops.rollout import kv_cache
    from dapo_ops.rollout.generate import _prefill, generate_rollouts

    policy = models.build_embedded_policy(synthetic.corpus(), seed=0, **SHAPES[args.shape])
    policy.model.to(device=device, dtype=getattr(torch, args.dtype))
    prompts = decode_prompts(policy, args.prompts, args.image_size).to(device)
    original = models.Policy.suppressed_token_ids
    models.Policy.suppressed_token_ids = property(lambda self: sorted({*original.fget(self), self.eos_token_id}))
    mode = "reduce-overhead" if device.startswith("cuda") else None
    decoder = kv_cache.compiled_decoder(policy.model, backend=args.compile_backend, mode=mode)
    common = {"num_generations": args.generations, "max_completion_length": args.max_completion_length, "seed": 0}
    cases = {"dynamic": {"rollout_cache": "dynamic"}, "static": {"rollout_cache": "static"},
             "static_compiled": {"decoder": decoder}}
    clock = Clock(torch, device)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    try:
        tokens = {name: generate_rollouts(policy, prompts, **common, **kw).completion_ids for name, kw in cases.items()}
        for repeat in range(args.decode_repeats):
            for name in (list(cases) if repeat % 2 == 0 else list(reversed(cases))):
                start = clock.now()
                generate_rollouts(policy, prompts, **common, **cases[name])
                seconds[name].append(clock.now() - start)
        start = clock.now()
        with torch.no_grad():
            state = _prefill(policy.model, prompts.trim_padding(), args.generations, static_tokens=None)
        prefill = clock.now() - start
    finally:
        models.Policy.suppressed_token_ids = original
    rows, steps = int(tokens["static"].shape[0]), int(tokens["static"].shape[1]) - 1
    step_bytes, weights = kv_cache.decode_read_bytes(policy.model, rows, int(state.attention_mask.shape[1]), steps)
    bandwidth = device_bandwidth(torch, device)
    result: dict[str, Any] = {"rows": rows, "decode_steps": steps, "prefill_seconds": prefill,
                              "weight_bytes": weights, "decode_bytes": sum(step_bytes),
                              "device_bandwidth_bytes_per_second": bandwidth,
                              "token_identical": all(torch.equal(tokens["dynamic"], t) for t in tokens.values())}
    for name, values in seconds.items():
        median = statistics.median(values)
        result[name] = {"seconds": values, "tokens_per_second": rows * (steps + 1) / median,
                        "fraction_of_bandwidth": sum(step_bytes) / max(median - prefill, 1e-9) / bandwidth}
    print("decoding: " + ", ".join(f"{name} {result[name]['tokens_per_second']:.0f} tokens/s "
                                   f"({result[name]['fraction_of_bandwidth']:.2f} of the bandwidth)" for name in cases)
          + f"; {rows} rows x {steps + 1} tokens, {bandwidth / 1e9:.0f} GB/s copy; identical tokens "
          f"{result['token_identical']}", flush=True)
    return result


def run_rounds(args: argparse.Namespace, device: str, out: Path) -> dict[str, Any]:
    import torch

    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.data import synthetic
    from dapo_ops.models import loading as models
    from dapo_ops.run import phases as training
    from dapo_ops.run import round as dapo_round
    from dapo_ops.store.layout import RunStore, checkpoint_key, read_json

    clock = Clock(torch, device)
    num_train = max(4 * args.prompts, 64)
    source = out / "source"
    synthetic.write_dataset(source, num_train=num_train, num_eval=64, seed=0, image_size=args.image_size,
                            tasks=("color",))
    policy = models.build_embedded_policy(synthetic.corpus(), seed=0, **SHAPES[args.shape])
    model_dir = out / "model"
    models.save_policy(policy, model_dir)
    parameters = sum(p.numel() for p in policy.model.parameters())
    del policy
    config = DapoConfig(
        run_name="gpu-smoke", model_name_or_path=str(model_dir), dataset=str(source), device=device,
        torch_dtype=args.dtype, prompts_per_round=args.prompts, num_generations=args.generations,
        max_completion_length=args.max_completion_length, steps_per_generation=4, num_iterations=2,
        eval_subset_size=64, warmup_steps=0,
    )
    store = RunStore(out / "home", config.run_name)
    setup_log = training.round_log(store, checkpoint_key(0), echo=lambda line: print(f"    {line}", flush=True))
    training.prepare_dataset(config, store)
    training.build_base_checkpoint(config, store, setup_log)
    policy = models.load_policy(model_dir, device=device, torch_dtype=args.dtype)
    attention = policy.model.config.text_config._attn_implementation
    print(f"model: {args.shape}, {parameters / 1e6:.1f}M parameters, {args.dtype}, decoder attention {attention}, "
          f"device {device}; {args.prompts} prompts x {args.generations} completions of <= "
          f"{args.max_completion_length} tokens per round", flush=True)
    optimizer = None
    rounds: list[dict[str, Any]] = []
    for k in range(args.rounds):
        key = checkpoint_key(k)
        log = training.round_log(store, key, echo=lambda line: print(f"    {line}", flush=True))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = clock.now()
        if optimizer is None:
            optimizer = training.load_optimizer(store, key, policy, config)
        # The round Dagster runs (dapo_ops.run.round), timed per phase with a clock that synchronises CUDA.
        result = dapo_round.run_round(config, store, key, policy, optimizer, log, clock=clock.now)
        end = clock.now()
        record = result.record
        generated = start + result.seconds["rollouts"]
        scored = generated + result.seconds["attention_metrics"]
        updating = scored + result.seconds["rewards"]
        end_update = updating + result.seconds["policy_update"]
        sampled = read_json(store.round(key).rollouts_json)
        round_tokens = record.round_tokens
        row = {
            "round": k,
            "seconds": end - start,
            "generation_seconds": generated - start,
            "teacher_forced_seconds": scored - generated,
            "update_seconds": end_update - updating,
            "completion_tokens": int(sampled["completion_tokens"]),
            "round_tokens": round_tokens,
            "generation_tokens_per_second": int(sampled["completion_tokens"]) / max(generated - start, 1e-9),
            "tokens_per_second": round_tokens / max(end - start, 1e-9),
            "update_tokens_per_second": round_tokens * config.num_iterations / max(end_update - updating, 1e-9),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None,
            "loss": record.loss if record.steps else None,  # None: the round made no optimizer step
            "eval_accuracy": record.eval_accuracy,
        }
        rounds.append(row)
        memory = f"{row['peak_memory_gib']:.2f} GiB" if row["peak_memory_gib"] is not None else "n/a (CPU)"
        print(f"round {k}: {row['seconds']:.2f}s (generate {row['generation_seconds']:.2f}s, teacher-forced "
              f"{row['teacher_forced_seconds']:.2f}s, update+eval+save {row['update_seconds']:.2f}s); "
              f"{row['tokens_per_second']:.0f} tokens/s; peak GPU memory {memory}", flush=True)
    total = sum(r["seconds"] for r in rounds)
    peaks = [r["peak_memory_gib"] for r in rounds if r["peak_memory_gib"] is not None]
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "shape": args.shape,
        "parameters": parameters,
        "dtype": args.dtype,
        "attention_implementation": attention,
        "prompts_per_round": args.prompts,
        "num_generations": args.generations,
        "max_completion_length": args.max_completion_length,
        "rounds": rounds,
        "rounds_per_second": len(rounds) / total,
        "tokens_per_second": sum(r["round_tokens"] for r in rounds) / total,
        "generation_tokens_per_second": statistics.mean(r["generation_tokens_per_second"] for r in rounds),
        "peak_memory_gib": max(peaks) if peaks else None,
    }


def attention_benchmark(args: argparse.Namespace, device: str, out: Path) -> dict[str, Any] | None:
    """`benchmarks.attention` (lean vs plain vs eager at long context) when present, else a small inline
    lean-vs-plain timing through the same library calls."""
    lengths = [int(x) for x in args.attention_lengths.split(",") if x.strip()]
    if not lengths:
        return None
    if importlib.util.find_spec("benchmarks.attention") is not None:
        target = out / "attention.json"
        command = [sys.executable, "-m", "benchmarks.attention", "--device", device,
                   "--lengths", ",".join(map(str, lengths)), "--json-out", str(target)]
        if args.shape == "tiny":  # a dry run of the code path: the embedded model, one repeat, no memory processes
            command += ["--quick", "--repeats", "1", "--no-memory"]
        print(f"attention benchmark: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=REPO_ROOT, check=True)
        return json.loads(target.read_text()) if target.exists() else {"ran": command}
    return inline_attention_timing(args, device, lengths)


def inline_attention_timing(args: argparse.Namespace, device: str, lengths: list[int]) -> dict[str, Any]:
    import torch
    from PIL import Image

    from dapo_ops.attention.teacher_forced import teacher_forced_pass
    from dapo_ops.data import synthetic
    from dapo_ops.models import inputs
    from dapo_ops.models import loading as models
    from dapo_ops.rollout.generate import RolloutBatch

    clock = Clock(torch, device)
    policy = models.build_embedded_policy(synthetic.corpus(), seed=0, **SHAPES[args.shape])
    policy.model.to(device=device, dtype=getattr(torch, args.dtype))
    rows = []
    for length in lengths:
        # A long question beside one 448x448 image (256 image tokens), then 256 completion tokens.
        sentence = "Which color is the shape in the middle of the picture? "
        question = sentence * max(1, (length - 300) // 14)  # ~14 tokens per sentence beside image + template
        prompt = inputs.encode_prompts(policy, [question], [["red", "green", "blue", "yellow"]],
                                       [Image.new("RGB", (448, 448), (200, 40, 40))])
        tc = 256
        ids = torch.randint(len(models.SPECIAL_TOKENS), len(policy.tokenizer), (1, tc))
        batch = RolloutBatch(
            prompt_ids=prompt.input_ids, prompt_mask=prompt.attention_mask, vision=prompt.vision,
            completion_ids=ids, completion_mask=torch.ones(1, tc, dtype=torch.long),
            completion_lengths=torch.tensor([tc]), is_eos=torch.tensor([False]), completions=[""],
            prompt_index=torch.tensor([0]), num_generations=1, prompt_vision_mask=prompt.vision_mask,
            prompt_text_mask=prompt.text_mask, prompt_token_inputs=dict(prompt.token_inputs),
            completion_values=dict(prompt.completion_values),
        ).to(device)
        times: dict[str, list[float]] = {"plain": [], "lean": []}
        peaks: dict[str, float] = {}
        for repeat in range(4):  # the first is a warm-up
            for case in ("plain", "lean"):
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                start = clock.now()
                teacher_forced_pass(policy, batch, with_attention=case == "lean")
                if repeat:
                    times[case].append(clock.now() - start)
                if device.startswith("cuda"):
                    peaks[case] = torch.cuda.max_memory_allocated() / GIB
        plain, lean = statistics.median(times["plain"]), statistics.median(times["lean"])
        row = {"prompt_length": int(prompt.input_ids.shape[1]), "completion_length": tc, "plain_seconds": plain,
               "lean_seconds": lean, "lean_overhead": lean / plain - 1, "peak_memory_gib": peaks or None}
        rows.append(row)
        print(f"  attention T={row['prompt_length']}+{tc}: plain {plain * 1e3:.0f} ms, lean {lean * 1e3:.0f} ms "
              f"({100 * row['lean_overhead']:+.1f}%)", flush=True)
    return {"name": "attention (inline lean vs plain)", "device": device, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(_no_gpu_message(torch), flush=True)
        return NO_GPU_EXIT if args.require_gpu else 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("CPU dry run (--allow-cpu): the figures below are not GPU figures.", flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="dapo-gpu-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"decode_caches": decode_caches(args, device)}
    if args.skip_rounds:
        print("rounds: skipped (--skip-rounds)", flush=True)
    elif importlib.util.find_spec("polars") is None:
        print("SKIPPED: library rounds: polars is not installed (not on the GPU image); `make gpu-wheels` puts its "
              "wheels in var/gpu_wheels, which scripts/gpu_smoke.sh installs when they are carried", flush=True)
        result["rounds"] = "SKIPPED: polars is not installed"
    else:
        result.update(run_rounds(args, device, out))
        print(f"\n{result['rounds_per_second']:.3f} rounds/s, {result['tokens_per_second']:.0f} tokens/s "
              f"(prompt + completion tokens of the rounds' rollouts per second of round time), generation "
              f"{result['generation_tokens_per_second']:.0f} completion tokens/s, peak GPU memory "
              + (f"{result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] is not None else "n/a (CPU)")
              + (f" on {result['gpu']}" if result["gpu"] else ""), flush=True)
    result["attention"] = attention_benchmark(args, device, out)
    result["seconds"] = time.perf_counter() - started
    path = out / "gpu_smoke.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"figures: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
