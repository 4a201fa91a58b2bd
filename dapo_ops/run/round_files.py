"""Reading and writing a round's files: the rollout batch, the old log-probs and the update record.

Where each file lives is `store.RoundFiles`; this module owns what is inside the ones that are not plain
parquet tables. Every read is code-free: tensors through `store.read_torch` (`weights_only=True`), the
update record as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dapo_ops.common.names import EVAL_ACCURACY
from dapo_ops.rollout import generate as rollout
from dapo_ops.store import layout as store
from dapo_ops.store.layout import RunStore

# ---------------------------------------------------------------------------------------- rollout batch


def save_rollout_batch(path: Path, batch: rollout.RolloutBatch) -> None:
    """Store each prompt's image inputs (any family's keys) once, not once per generation (G x smaller files)."""
    store.write_torch_atomic(path, rollout.per_prompt_state(batch))


def load_rollout_batch(run_store: RunStore, key: str) -> rollout.RolloutBatch:
    """The round's rollout batch; files of the older Qwen-only layout (per-prompt patches + grids) load too."""
    path = run_store.round(key).rollouts_pt
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize `rollouts` for {key} first")
    state = store.read_torch(path, remedy=f"delete it and materialize `rollouts` for {key} again")
    return rollout.from_per_prompt_state(state)


# ------------------------------------------------------------------------------------------ old log-probs


def save_old_logps(path: Path, per_token_logps: torch.Tensor, entropy: torch.Tensor,
                   visual_kl: torch.Tensor | None = None) -> None:
    values = {"per_token_logps": per_token_logps, "entropy": entropy}
    if visual_kl is not None:
        values["visual_kl"] = visual_kl
    store.write_torch_atomic(path, values)


def load_old_logps(run_store: RunStore, key: str) -> dict[str, torch.Tensor]:
    """{"per_token_logps", "entropy"[, "visual_kl"]}: (B, C) each, of the policy that sampled the round
    (`visual_kl`: the masked pass's per-token KL, when it ran)."""
    path = run_store.round(key).old_logps
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize `attention_metrics` for {key} first")
    return store.read_torch(path, remedy=f"delete it and materialize `attention_metrics` for {key} again")


# ----------------------------------------------------------------------------------------- update record


@dataclass
class UpdateRecord:
    """What a round's update did (``update.json``). `state` is ckpt-(k+1)'s state.json without its eval.

    The JSON keys are the attribute names; `seconds` is absent on ranks other than the main process
    (they neither evaluate nor save).
    """

    steps: list[dict[str, float]]
    summary: dict[str, float]
    state: dict[str, Any]
    round_tokens: int
    num_processes: int
    num_rollouts_used: int
    eval: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] | None = None

    @property
    def next_checkpoint(self) -> str:
        return str(self.state["checkpoint"])

    @property
    def global_step(self) -> int:
        return int(self.state["global_step"])

    @property
    def num_tokens(self) -> int:
        return int(self.state["num_tokens"])

    @property
    def epoch(self) -> float:
        return float(self.state["epoch"])

    @property
    def loss(self) -> float:
        return float(self.summary["loss"])

    @property
    def eval_accuracy(self) -> float:
        return float(self.eval[EVAL_ACCURACY])

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "steps": self.steps, "summary": self.summary, "state": self.state, "eval": self.eval,
            "round_tokens": self.round_tokens, "num_processes": self.num_processes,
            "num_rollouts_used": self.num_rollouts_used,
        }
        if self.seconds is not None:
            record["seconds"] = self.seconds
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any], *, source: str = "update record") -> UpdateRecord:
        required = ("steps", "summary", "state", "round_tokens", "num_processes", "num_rollouts_used")
        missing = [name for name in required if name not in record]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)}: it was not written by a policy update")
        for name in ("checkpoint", "global_step", "num_tokens", "epoch"):
            if name not in record["state"]:
                raise ValueError(f"{source}: state lacks {name!r}")
        return cls(
            steps=list(record["steps"]), summary=dict(record["summary"]), state=dict(record["state"]),
            round_tokens=int(record["round_tokens"]), num_processes=int(record["num_processes"]),
            num_rollouts_used=int(record["num_rollouts_used"]), eval=dict(record.get("eval", {})),
            seconds=dict(record["seconds"]) if "seconds" in record else None,
        )

    def write(self, path: Path) -> Path:
        return store.write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> UpdateRecord:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: materialize `policy_update` for {path.parent.name} first")
        return cls.from_dict(store.read_json(path), source=str(path))


def read_update_record(run_store: RunStore, key: str) -> UpdateRecord:
    return UpdateRecord.read(run_store.round(key).update)
