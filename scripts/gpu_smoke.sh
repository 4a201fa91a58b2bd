#!/usr/bin/env bash
# GPU smoke test: the script to run whenever a GPU is available.
#
#   scripts/gpu_smoke.sh [gpu_smoke.py options]      e.g. --rounds 2 --prompts 64 --out var/gpu_smoke
#
# 1. Decoding with the dynamic KV cache, the preallocated (static) one and the static one with the decoding step
#    compiled (CUDA graphs): tokens/s and the fraction of the GPU's bandwidth each reaches.
# 2. Two DAPO rounds (rollouts, teacher-forced pass with the lean attention metrics, rewards, update, eval,
#    checkpoint) in bf16 with SDPA on a scaled-up embedded Qwen2.5-VL (~150M parameters): prints rounds/s,
#    tokens/s and peak GPU memory. They need polars: on an image without it, carry the wheels that
#    `make gpu-wheels` puts in var/gpu_wheels (GPU_WHEELS); this script installs them into var/gpu_site
#    (nothing is fetched), else the rounds print SKIPPED.
# 3. The attention-metric benchmark at long context (python -m benchmarks.attention --device cuda ...;
#    lengths from ATTENTION_LENGTHS, default 1024,4096,8192).
# 4. With two or more GPUs (or NUM_PROCESSES=n): one CI-sized pipeline round whose update runs on n
#    processes through accelerate (DDP) and Dagster Pipes (SKIPPED where dagster is not installed).
#
# Figures go to OUT (default var/gpu_smoke) as gpu_smoke.json and attention.json.
# Exit codes: 0 measured, or skipped because no GPU is present (a line starting with "SKIPPED" says so);
# 3 no GPU while REQUIRE_GPU=1; 1 any failure. PYTHON overrides the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=python3
OUT=${OUT:-var/gpu_smoke}
WHEELS=${GPU_WHEELS:-var/gpu_wheels}

# The image may lack polars (the rounds need it): install carried wheels offline, into a folder of our own.
if ! "$PYTHON" -c "import polars" >/dev/null 2>&1 && compgen -G "$WHEELS/polars-*.whl" >/dev/null; then
    echo "installing polars from $WHEELS into var/gpu_site (offline)"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --target var/gpu_site polars
    export PYTHONPATH="$PWD/var/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ $gpus -eq 0 ]]; then
    exec "$PYTHON" scripts/gpu_smoke.py "$@"  # prints SKIPPED (exit 0), or exit 3 with REQUIRE_GPU=1
fi
"$PYTHON" scripts/gpu_smoke.py --out "$OUT" "$@"

processes=${NUM_PROCESSES:-$gpus}
if [[ $gpus -ge 2 && $processes -ge 2 ]] && ! "$PYTHON" -c "import dagster" >/dev/null 2>&1; then
    echo "SKIPPED: multi-GPU update: dagster is not installed (the pipeline round runs through Dagster Pipes)"
elif [[ $gpus -ge 2 && $processes -ge 2 ]]; then
    echo "multi-GPU update: one pipeline round with --num-processes $processes (accelerate DDP via Dagster Pipes)"
    home="$OUT/pipeline"
    rm -rf "$home"  # a fresh run each time (make run would resume a finished one)
    DAPO_VLM_HOME="$home" DAGSTER_HOME="$home/dagster" MLFLOW_TRACKING_URI="sqlite:///$home/mlflow.db" \
        "$PYTHON" -m pipelines.cli run --rounds 1 --num-processes "$processes" --run-name gpu-ddp --quiet \
        --set prompts_per_round=16 --set num_generations=8 --set steps_per_generation=4 \
        --set num_train_examples=256 --set num_eval_examples=32 --set eval_subset_size=32 --set warmup_steps=20
fi
echo "gpu smoke done: $OUT"
