"""Contract names shared across layers: metric keys and table column names that files, MLflow and reports use.

Each is spelled once here; code builds keys with these helpers instead of writing the strings.
"""

from __future__ import annotations

EVAL_ACCURACY = "eval/accuracy"
EVAL_FORMAT = "eval/format"
EVAL_BLIND_ACCURACY = "eval/blind_accuracy"  # greedy accuracy with every image blanked
EVAL_VISUAL_GAIN = "eval/visual_gain"  # eval/accuracy - eval/blind_accuracy


def attn_column(stage: str, name: str) -> str:
    """The per-rollout attention column of `attention.parquet` / `rewards.parquet`: `attn/<stage>/<name>`."""
    return f"attn/{stage}/{name}"


def attention_metric(stage: str, name: str) -> str:
    """The per-round attention metric logged to MLflow and `metrics.json`: `attention/<stage>/<name>`."""
    return f"attention/{stage}/{name}"


def reward_metric(reward: str, stat: str) -> str:
    """The per-round metric of one reward function: `rewards/<reward>/<mean|std>` (TRL's key)."""
    return f"rewards/{reward}/{stat}"
