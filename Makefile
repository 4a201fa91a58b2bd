# dapo-vlm: `make run` trains on the embedded default, `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DAPO_VLM_HOME ?= $(CURDIR)/var
export DAGSTER_HOME ?= $(DAPO_VLM_HOME)/dagster

ROUNDS ?=
DATASET ?=
# VERBOSE=1: `make run` also prints every round-log line (each optimizer step) and each phase's timing.
VERBOSE ?=
RUN_NAME ?=
MODEL ?=
CHECKPOINT ?=
PORT ?=
NUM_PROCESSES ?=
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` / `make test-fast` (0: one process); tests/scheduling.py says how they split.
PYTEST_WORKERS ?= 2
PYTEST_XDIST := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadscope)
CONFIG ?=
SET ?=

RUN_ARGS := $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s)) $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(DATASET),--dataset $(DATASET)) \
	$(if $(RUN_NAME),--run-name $(RUN_NAME)) $(if $(MODEL),--model $(MODEL)) \
	$(if $(NUM_PROCESSES),--num-processes $(NUM_PROCESSES)) $(if $(filter-out 0,$(VERBOSE)),--verbose)

.PHONY: install run test test-faults test-fast lint ui mlflow-ui reanalyze export plan check-data sync-mlflow bench \
	ablation gpu-smoke-dry gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/python -m pipelines.cli run $(RUN_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-faults: install
	DAPO_VLM_FULL_FAULTS=1 $(BIN)/python -m pytest tests/test_reliability.py -k many_kills -s $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest $(PYTEST_XDIST) -m "not slow and not browser" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check dapo_ops pipelines tests benchmarks

# Dagster needs an absolute DAGSTER_HOME; `make run` records its runs there (<data root>/dagster).
ui: install
	DAGSTER_HOME=$(abspath $(DAGSTER_HOME)) $(BIN)/python -m pipelines.cli prepare-instance
	DAGSTER_HOME=$(abspath $(DAGSTER_HOME)) $(BIN)/dagster dev -w workspace.yaml -p $(or $(PORT),3000)

mlflow-ui: install
	$(BIN)/python -m pipelines.cli mlflow-ui --port $(or $(PORT),5000)

reanalyze: install
	@test -n "$(CHECKPOINT)" || { echo "usage: make reanalyze CHECKPOINT=ckpt-NNNN [RUN_NAME=...] [MDI_TOLERANCE=...]"; exit 2; }
	$(BIN)/python -m pipelines.cli reanalyze --checkpoint $(CHECKPOINT) $(if $(RUN_NAME),--run-name $(RUN_NAME)) $(if $(MDI_TOLERANCE),--mdi-tolerance $(MDI_TOLERANCE)) $(if $(NUM_PROCESSES),--num-processes $(NUM_PROCESSES))

# A checkpoint as a standalone model directory (MERGE=1: a LoRA adapter merged into the base weights).
export: install
	@test -n "$(CHECKPOINT)" || { echo "usage: make export CHECKPOINT=ckpt-NNNN [RUN_NAME=...] [MERGE=1] [OUT=dir]"; exit 2; }
	$(BIN)/python -m pipelines.cli export --checkpoint $(CHECKPOINT) $(if $(RUN_NAME),--run-name $(RUN_NAME)) $(if $(MERGE),--merge) $(if $(OUT),--out $(OUT))

# Peak accelerator memory per process of a config (MODEL=dir with a config.json; GPU_MEMORY=GiB to check fit).
plan: install
	$(BIN)/python -m pipelines.cli plan $(if $(CONFIG),--config $(CONFIG)) $(if $(MODEL),--model $(MODEL)) $(if $(GPU_MEMORY),--gpu-memory $(GPU_MEMORY))

# Load and validate a dataset without training: layout, splits, quarantine reasons, images per prompt, answer
# kinds; MODEL=dir adds the prompt lengths in that model's tokens. Exits non-zero when no row is usable.
check-data: install
	@test -n "$(DATASET)" || { echo "usage: make check-data DATASET=path [MODEL=dir] [SET=prompt_key=...]"; exit 2; }
	$(BIN)/python -m pipelines.cli check-data --dataset $(DATASET) $(if $(MODEL),--model $(MODEL)) $(foreach s,$(SET),--set $(s))

sync-mlflow: install
	$(BIN)/python -m pipelines.cli sync-mlflow $(if $(RUN_NAME),--run-name $(RUN_NAME))

bench: install
	$(BIN)/python -m benchmarks.run_all

# The GPU smoke path (scripts/gpu_smoke.sh) as the GPU machine's image runs it: a virtualenv of only torch,
# transformers, peft, accelerate, pandas, pyarrow, safetensors, pillow, numpy and their requirements, linked
# offline from .venv (no polars, dagster, mlflow, trl, datasets), a CPU dry run of the tiny shape. docs/gpu.md.
GPU_IMAGE_VENV ?= var/gpu-image-venv
gpu-smoke-dry: install
	$(BIN)/python scripts/gpu_image_venv.py $(GPU_IMAGE_VENV)
	PYTHON=$(GPU_IMAGE_VENV)/bin/python PYTHONPATH=$(CURDIR) OMP_NUM_THREADS=1 scripts/gpu_smoke.sh --allow-cpu \
		--shape tiny --prompts 2 --generations 2 --max-completion-length 4 --image-size 56 --decode-repeats 1 \
		--compile-backend eager --attention-lengths 32 --out var/gpu_smoke_dry

# polars' wheels for the GPU image (python 3.12, x86_64; ~52 MiB), to carry to the GPU machine in var/gpu_wheels:
# scripts/gpu_smoke.sh installs them offline when the image lacks polars (the library rounds need it).
gpu-wheels: install
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d var/gpu_wheels \
		polars==$$($(BIN)/python -c "import polars; print(polars.__version__)") \
		polars-runtime-32==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('polars-runtime-32'))")

# Attention reward off / each MDI shaping on the embedded default, and one row per RL objective on the embedded
# default and an unseen dataset, 3 seeds each, two runs at a time (~45 min on 2 cores); finished runs are
# cached in benchmarks/.ablation-cache (a re-run resumes). Writes benchmarks/ablation.{md,json,png}.
# `make ablation ROWS="dapo sapo" SEEDS="0 1" OBJECTIVE_ROUNDS=3 JOBS=2 ROUNDS=8` (all optional).
ablation: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m benchmarks.ablation $(if $(ROUNDS),--rounds $(ROUNDS)) \
		$(if $(OBJECTIVE_ROUNDS),--objective-rounds $(OBJECTIVE_ROUNDS)) $(if $(ROWS),--rows $(ROWS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS))

clean:
	rm -rf var .pytest_cache
