"""The GPU smoke path runs on the GPU machine's image as it is: without polars, dagster, mlflow, trl or datasets.

`tests/gpu_image/sitecustomize.py` hides those packages from every process started with it on PYTHONPATH (the
smoke script's subprocesses included); `make gpu-smoke-dry` runs the same path in a virtualenv of only the
image's packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests" / "gpu_image"
ABSENT = ("polars", "dagster", "mlflow", "trl", "datasets")


def _image_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(IMAGE), str(ROOT)]), "OMP_NUM_THREADS": "1"}


def test_the_emulated_image_cannot_import_the_packages_it_lacks():
    probe = ("import importlib.util, sys\n"
             f"for name in {ABSENT!r}:\n"
             "    assert importlib.util.find_spec(name) is None, name\n"
             "    try:\n        __import__(name)\n    except ModuleNotFoundError:\n        continue\n"
             "    sys.exit(f'{name} imported')\n"
             "import torch, transformers, PIL, numpy, pyarrow  # the image has these\n")
    result = subprocess.run([sys.executable, "-c", probe], env=_image_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_smoke_path_decodes_with_both_caches_and_times_attention_without_those_packages(tmp_path):
    command = [sys.executable, "scripts/gpu_smoke.py", "--allow-cpu", "--shape", "tiny", "--prompts", "2",
               "--generations", "2", "--max-completion-length", "4", "--image-size", "56", "--decode-repeats", "1",
               "--compile-backend", "eager", "--attention-lengths", "32", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=_image_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SKIPPED: library rounds: polars is not installed" in result.stdout
    figures = json.loads((tmp_path / "gpu_smoke.json").read_text())
    decode = figures["decode_caches"]
    assert decode["token_identical"]
    for case in ("dynamic", "static", "static_compiled"):
        assert decode[case]["tokens_per_second"] > 0 and decode[case]["fraction_of_bandwidth"] > 0
    assert figures["attention"]["rows"][0]["prompt_length"] == 32
