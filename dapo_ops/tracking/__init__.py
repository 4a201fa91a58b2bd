"""Experiment tracking: a local journal of everything sent to MLflow (`journal`), the MLflow client
(`mlflow_sink`), the facade over both that the round uses (`facade`) and checkpoints as MLflow logged models
(`logged_model`).

May import: every layer below it: `common` to `run`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
