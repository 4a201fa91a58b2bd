"""The GRPO/DAPO update: `num_iterations` epochs of clipped policy-gradient steps over one rollout batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dapo_ops.attention import completion_forward
from dapo_ops.config import DapoConfig
from dapo_ops.loss import policy_loss


class NonFiniteUpdateError(RuntimeError):
    """A loss or gradient was NaN/Inf; the optimizer step was skipped and no checkpoint may be written."""


@dataclass
class UpdateResult:
    steps: list[dict[str, float]] = field(default_factory=list)
    global_step: int = 0
    num_rollouts_used: int = 0

    def summary(self) -> dict[str, float]:
        """Round-level metrics in TRL's names (mean/min/max over the round's optimizer steps)."""
        if not self.steps:
            return {
                "loss": 0.0, "grad_norm": 0.0, "entropy": float("nan"),
                "clip_ratio/low_mean": 0.0, "clip_ratio/low_min": 0.0, "clip_ratio/high_mean": 0.0,
                "clip_ratio/high_max": 0.0, "clip_ratio/region_mean": 0.0,
            }

        def mean(name: str) -> float:
            return sum(s[name] for s in self.steps) / len(self.steps)

        out = {
            "loss": mean("loss"),
            "grad_norm": mean("grad_norm"),
            "entropy": mean("entropy"),
            "learning_rate": self.steps[-1]["learning_rate"],
            "clip_ratio/low_mean": mean("clip_ratio/low_mean"),
            "clip_ratio/low_min": min(s["clip_ratio/low_mean"] for s in self.steps),
            "clip_ratio/high_mean": mean("clip_ratio/high_mean"),
            "clip_ratio/high_max": max(s["clip_ratio/high_mean"] for s in self.steps),
            "clip_ratio/region_mean": mean("clip_ratio/region_mean"),
        }
        if "kl" in self.steps[0]:
            out["kl"] = mean("kl")
        return out


def make_optimizer(model: torch.nn.Module, config: DapoConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def step_batches(
    indices: torch.Tensor, config: DapoConfig, *, generator: torch.Generator
) -> list[list[torch.Tensor]]:
    """Shuffle the kept rollouts and split them into optimizer steps of micro-batches (TRL's
    `steps_per_generation` x `gradient_accumulation_steps`)."""
    order = indices[torch.randperm(len(indices), generator=generator)]
    steps = min(config.steps_per_generation, max(1, len(order)))
    batches: list[list[torch.Tensor]] = []
    for chunk in torch.tensor_split(order, steps):
        if len(chunk) == 0:
            continue
        micro = min(config.gradient_accumulation_steps, len(chunk))
        batches.append([m for m in torch.tensor_split(chunk, micro) if len(m)])
    return batches


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rollouts,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    keep: torch.Tensor,
    config: DapoConfig,
    *,
    global_step: int,
    seed: int,
    ref_per_token_logps: torch.Tensor | None = None,
    log: Callable[[str], None] = lambda _: None,
    num_items_scale: int = 1,
) -> UpdateResult:
    """Run μ epochs over the kept rollouts. Raises `NonFiniteUpdateError` before the optimizer step
    when a loss or gradient is not finite (the caller must then discard the in-memory policy)."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    kept = torch.nonzero(keep, as_tuple=False).flatten()
    result = UpdateResult(global_step=global_step, num_rollouts_used=len(kept))
    if len(kept) == 0:
        log("no rollout entered the update (every group had zero reward variance); weights unchanged")
        return result
    completion_mask = rollouts.completion_mask
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(config.num_iterations):
        for micro_batches in step_batches(kept, config, generator=generator):
            optimizer.zero_grad(set_to_none=True)
            # DAPO's token-level normalization over the whole accumulated batch (TRL: num_items_in_batch).
            num_items = int(sum(completion_mask[idx].sum().item() for idx in micro_batches)) * num_items_scale
            step_stats: dict[str, float] = {}
            total_loss = 0.0
            entropy_sum = 0.0
            token_count = 0
            for idx in micro_batches:
                batch = rollouts.select(idx)
                logps, entropy = completion_forward(model, batch, temperature=config.temperature)
                mask = batch.completion_mask.to(logps.dtype)
                loss, stats = policy_loss(
                    logps,
                    old_per_token_logps[idx],
                    advantages[idx],
                    batch.completion_mask,
                    loss_type=config.loss_type,
                    epsilon=config.epsilon,
                    epsilon_high=config.epsilon_high,
                    beta=config.beta,
                    ref_per_token_logps=None if ref_per_token_logps is None else ref_per_token_logps[idx],
                    max_completion_length=config.max_completion_length,
                    num_items_in_batch=num_items,
                )
                if config.loss_type != "dapo":
                    # TRL scales per-micro-batch normalized losses by the accumulation steps.
                    loss = loss / len(micro_batches)
                if not torch.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteUpdateError(
                        f"non-finite loss ({loss.item()}) at global step {result.global_step + 1}, epoch {epoch}; "
                        f"the optimizer step was skipped and no checkpoint will be written. Lower learning_rate "
                        f"(now {config.learning_rate}) or check the rewards/advantages for NaN."
                    )
                loss.backward()
                total_loss += loss.item()
                # Clip ratios are token shares: weight each micro-batch by its completion tokens, as TRL does.
                weight = float(mask.sum()) / max(num_items // num_items_scale, 1)
                for name, value in stats.items():
                    step_stats[name] = step_stats.get(name, 0.0) + weight * float(value)
                entropy_sum += float((entropy.detach() * mask).sum())
                token_count += int(mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteUpdateError(
                    f"non-finite gradient norm ({grad_norm.item()}) at global step {result.global_step + 1}; "
                    f"the optimizer step was skipped and no checkpoint will be written. Lower learning_rate "
                    f"(now {config.learning_rate}) or max_grad_norm."
                )
            optimizer.step()
            result.global_step += 1
            record = {
                "loss": total_loss,
                "grad_norm": float(grad_norm),
                "entropy": entropy_sum / max(token_count, 1),
                "learning_rate": float(optimizer.param_groups[0]["lr"]),
                "epoch": float(epoch),
                "clip_ratio/low_mean": step_stats.get("clip_ratio/low_mean", 0.0),
                "clip_ratio/high_mean": step_stats.get("clip_ratio/high_mean", 0.0),
                "clip_ratio/region_mean": step_stats.get("clip_ratio/region_mean", 0.0),
            }
            if "kl" in step_stats:
                record["kl"] = step_stats["kl"]
            result.steps.append(record)
            log(
                f"step {result.global_step}: epoch {epoch} loss {record['loss']:.4f} grad_norm {record['grad_norm']:.4f} "
                f"entropy {record['entropy']:.4f} clip_region {record['clip_ratio/region_mean']:.4f}"
            )
    model.eval()
    return result


def is_finite_number(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
