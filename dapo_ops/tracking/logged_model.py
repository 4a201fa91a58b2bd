"""A checkpoint as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/<model_id>")` loads the policy
from the checkpoint directory itself (the MLflow model holds only MLmodel and this wrapper, no second copy of
the weights), and `predict` gives the greedy completions that the eval split's evaluation uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

CHECKPOINT_DIR_KEY = "checkpoint_dir"
MAX_COMPLETION_LENGTH_KEY = "max_completion_length"


def checkpoint_model_dir(checkpoint_dir: Path) -> Path:
    """The weights' directory of a checkpoint (ckpt-0000 of a real model points at its source in state.json)."""
    from dapo_ops.store.layout import STATE_FILE, read_json

    state_path = checkpoint_dir / STATE_FILE
    state = read_json(state_path) if state_path.exists() else {}
    return Path(state["model_dir"]) if state.get("model_dir") else checkpoint_dir


class CheckpointModel(mlflow.pyfunc.PythonModel):
    """Input: rows in the dataset's layout (`image` bytes, `question`, `choices`), a pandas DataFrame (a polars
    one works too). Output: one greedy completion per row (params: `max_completion_length`).

    `predict`'s input hint is `pd.DataFrame`, one of the hints MLflow accepts without inferring a schema from it:
    an unsupported hint (`Any`) makes MLflow warn, in ANSI red on stderr, when the class is defined and at every
    save (a missing column fails in `encode_rows` with polars' error naming it)."""

    def load_context(self, context: Any) -> None:
        from dapo_ops.models import loading as models

        config = context.model_config or {}
        directory = Path(config[CHECKPOINT_DIR_KEY])
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} of this MLflow model is missing")
        self.policy = models.load_policy(checkpoint_model_dir(directory))
        self.max_completion_length = int(config.get(MAX_COMPLETION_LENGTH_KEY, 24))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        import polars as pl

        from dapo_ops.config.dapo import DapoConfig
        from dapo_ops.rollout.engines import make_engine
        from dapo_ops.run.phases import encode_rows

        rows = model_input if isinstance(model_input, pl.DataFrame) else pl.from_pandas(model_input)
        length = int((params or {}).get(MAX_COMPLETION_LENGTH_KEY, self.max_completion_length))
        batch = make_engine(DapoConfig(), self.policy).generate(
            encode_rows(self.policy, rows), num_generations=1, max_completion_length=length,
            temperature=0.0, top_p=1.0, seed=0)
        return list(batch.completions)


def save_checkpoint_model(path: Path, checkpoint_dir: Path, max_completion_length: int) -> None:
    """Write the MLflow model (MLmodel + wrapper) of `checkpoint_dir` into the new folder `path`."""
    import logging

    import torch
    import transformers

    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_logger.level
    # A PythonModel instance is cloudpickled (MLflow logs a caution about it): not a concern for a model of this
    # project's own package.
    pyfunc_logger.setLevel(logging.ERROR)
    try:
        _save(path, checkpoint_dir, max_completion_length, torch.__version__, transformers.__version__)
    finally:
        pyfunc_logger.setLevel(level)


def _save(path: Path, checkpoint_dir: Path, max_completion_length: int, torch_version: str,
          transformers_version: str) -> None:
    mlflow.pyfunc.save_model(
        str(path), python_model=CheckpointModel(),
        model_config={CHECKPOINT_DIR_KEY: str(Path(checkpoint_dir).resolve()),
                      MAX_COMPLETION_LENGTH_KEY: int(max_completion_length)},
        # Explicit: inferring them imports every package of the environment (seconds per checkpoint).
        pip_requirements=[f"torch=={torch_version.split('+')[0]}", f"transformers=={transformers_version}",
                          f"mlflow=={mlflow.__version__}"],
    )
