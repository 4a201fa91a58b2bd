"""Shared fixtures: the embedded policy (built once per corpus and seed), and a small 2-round training run
materialized through Dagster into a temporary data root."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

try:  # Keep the 2-core machines responsive: the cores shared among the test processes (`make test`: 2 workers).
    import torch

    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
except ImportError:  # pragma: no cover
    pass


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201 - pytest-xdist's hook
    """`make test` runs the suite on pytest-xdist workers, a test module (or a unit of modules sharing a session
    fixture) at a time, so their fixtures are built once: see `tests/scheduling.py`."""
    from tests.scheduling import ModuleScheduling

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with heavy end-to-end cases first, so that under xdist the last module to finish is a light one."""
    from tests.scheduling import heavy_first

    items[:] = heavy_first(items)

# A CI-sized round: seconds, not minutes.
# A round of seconds, for tests about the sequence of writes and the run's lifecycle, not learning.
TINY_RUN = {
    "prompts_per_round": 4,
    "num_generations": 2,
    "max_completion_length": 8,
    "steps_per_generation": 2,
    "num_iterations": 1,
    "num_train_examples": 32,
    "num_eval_examples": 8,
    "eval_subset_size": 4,
    "warmup_steps": 2,
}


SMALL_RUN = {
    "run_name": "ci-small",
    "prompts_per_round": 8,
    "num_generations": 4,
    "max_completion_length": 16,
    "steps_per_generation": 2,
    "num_iterations": 1,
    "num_train_examples": 96,
    "num_eval_examples": 24,
    "eval_subset_size": 16,
    "warmup_steps": 20,
}


# The texts the embedded tokenizer of the unit tests is trained on (questions, colors, a rationale).
UNIT_CORPUS = ("What color is the shape?", "Which shape is it?", "red green blue yellow",
               "The shape is red.")


@pytest.fixture(scope="session")
def embedded_policy_for() -> Callable[..., object]:
    """`embedded_policy_for(corpus=UNIT_CORPUS, seed=0)`: the embedded tiny Qwen2.5-VL, built once per session
    for each corpus and seed; every call returns its own deep copy, so a test may train or wrap it."""
    from dapo_ops.models.loading import build_embedded_policy

    built: dict[tuple[tuple[str, ...], int], object] = {}

    def get(corpus: Sequence[str] = UNIT_CORPUS, seed: int = 0) -> object:
        key = (tuple(corpus), seed)
        if key not in built:
            built[key] = build_embedded_policy(list(corpus), seed=seed)
        return copy.deepcopy(built[key])

    return get


@pytest.fixture(scope="session")
def embedded_policy(embedded_policy_for):
    """The unit tests' embedded policy, shared by the whole session: read it, do not change its weights."""
    return embedded_policy_for()


# The texts the tiny families' tokenizers are trained on (tests/test_families.py).
FAMILY_CORPUS = ["What color is the shape?", "red green blue yellow", "The shape is red.",
                 "<think>blue</think> Answer: C"]


def _family_names() -> list[str]:
    from dapo_ops.models.tiny_families import BUILDERS

    return sorted(BUILDERS)


@pytest.fixture(scope="session", params=_family_names())
def tiny_family(request: pytest.FixtureRequest):  # noqa: ANN201 - (name, dapo_ops.models.loading.Policy)
    """(name, policy) of each family `dapo_ops.models.tiny_families` builds, built once per test session and shared by
    every test that takes it: copy the policy before changing it."""
    from dapo_ops.models.tiny_families import build_tiny_family

    return request.param, build_tiny_family(request.param, FAMILY_CORPUS, seed=0)


@dataclass
class TrainedRun:
    root: Path
    run_name: str
    rounds: int
    tracking_uri: str



def _set_env(values: dict[str, str]) -> dict[str, str | None]:
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return previous


def _restore_env(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedRun]:
    """Two rounds of the embedded default, small, through `pipelines.cli.run_training` (real Dagster
    instance on SQLite, real MLflow SQLite store)."""
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.tracking.facade import default_tracking_uri
    from pipelines.cli import run_training

    root = tmp_path_factory.mktemp("data_root")
    uri = default_tracking_uri(root)
    previous = _set_env({"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
                         "MLFLOW_TRACKING_URI": uri,
                         # MLflow's own knob: sample system metrics every second (default 10 s), so that a
                         # run this small logs some.
                         "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    try:
        config = DapoConfig(**SMALL_RUN)
        run_training(config, rounds=2, root=root, echo=lambda _: None)
        yield TrainedRun(root=root, run_name=config.run_name, rounds=2, tracking_uri=uri)
    finally:
        _restore_env(previous)


def use_global_mlflow_uri(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    """Point MLflow's process-global tracking URI at `uri` for one test. `mlflow.set_tracking_uri(previous)`
    would not undo it: it pins MLflow's default `sqlite:///mlflow.db` (relative to the cwd) in the
    environment, so every later subprocess would create a store in the working directory."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)



REPO = Path(__file__).resolve().parents[1]


def make_args(target: str, **variables: object) -> list[str]:
    """`make <target> NAME=value...` as a user types it, with this interpreter's environment and without `make
    install`, which may reach the package index (the test session's environment is installed already)."""
    stamp = ".venv/.installed"
    return ["make", "--no-print-directory", "-o", stamp, f"STAMP={stamp}", f"BIN={Path(sys.executable).parent}",
            target, *(f"{name}={value}" for name, value in variables.items())]


def run_make(target: str, root: Path, *, timeout: float = 300, **variables: object) -> subprocess.CompletedProcess:
    """`make <target> NAME=value...` with only DAPO_VLM_HOME=`root` set, as after `make run` (the Makefile and
    the CLI find its Dagster instance and MLflow store), stdout and stderr captured as text."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")}
    env.update(DAPO_VLM_HOME=str(root), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(make_args(target, **variables), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
