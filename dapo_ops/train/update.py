"""The GRPO/DAPO update: `num_iterations` epochs of clipped policy-gradient steps over one rollout batch.

One code path serves one process and many: a `Collective` says how to backpropagate, sum statistics and
clip across processes. `LocalCollective` (the default) is the in-process update; `dapo_ops.distributed.launch`
supplies one over `accelerate` (DDP, FSDP, DeepSpeed), where every rank holds the whole round batch and
each optimizer step's rollouts are split across the ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dapo_ops.attention import visual
from dapo_ops.attention.pathwise import pathwise_loss, pathwise_weight
from dapo_ops.attention.teacher_forced import completion_forward
from dapo_ops.common import progress
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models import precision
from dapo_ops.models.inputs import unwrapped
from dapo_ops.rl.advantages import truncated_completions_mask
from dapo_ops.rl.loss import policy_loss, vppo_advantage_scale


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
            # No optimizer step: no loss or gradient norm was measured, so there is none to report (not 0).
            return {
                "entropy": float("nan"),
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
        if "cispo_clip_ratio" in self.steps[0]:
            out["cispo_clip_ratio"] = mean("cispo_clip_ratio")
        return out


class LocalCollective:
    """The update in this process alone: rank 0 of a world of one. Subclasses span processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `values` over all processes (a 1-D CPU tensor in, the same out)."""
        return values

    def sync_context(self, model: torch.nn.Module, *, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Where gradients are accumulated without communication (DDP's `no_sync`) until `sync`."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       max_norm: float) -> torch.Tensor:
        """Clip the (already synchronized) gradients; the total norm before clipping."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def full_policy(self, policy: Any, model: torch.nn.Module) -> Any:
        """The trained policy with whole weights on the main process (None elsewhere): here `policy` itself."""
        return policy

    def optimizer_to_save(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        """The optimizer whose `state_dict()` goes into the checkpoint (None: not saved)."""
        return optimizer


LOCAL = LocalCollective()


def make_optimizer(model: torch.nn.Module, config: DapoConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _groups(rows: torch.Tensor, group_ids: torch.Tensor) -> list[torch.Tensor]:
    """`rows` cut into its groups (rows of one prompt), in order of first appearance, each in row order."""
    owners = group_ids[rows.cpu()].tolist()
    runs: dict[int, list[int]] = {}
    for row, owner in zip(rows.tolist(), owners, strict=True):
        runs.setdefault(int(owner), []).append(row)
    return [torch.tensor(run, dtype=rows.dtype) for run in runs.values()]


def _split_groups(rows: torch.Tensor, pieces: int, group_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """`rows` in `pieces` contiguous parts: whole groups each when there are at least `pieces` groups
    (so that each part's rollouts share prompts), else the plain split of the rows."""
    groups = _groups(rows, group_ids) if group_ids is not None else []
    if len(groups) < pieces:
        return list(torch.tensor_split(rows, pieces))
    bounds = torch.tensor_split(torch.arange(len(groups)), pieces)
    empty = rows[:0]
    return [torch.cat([groups[g] for g in part.tolist()]) if len(part) else empty for part in bounds]


def step_chunks(indices: torch.Tensor, config: DapoConfig, *, generator: torch.Generator,
                group_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Shuffle the kept rollouts and split them into the round's optimizer steps (TRL's
    `steps_per_generation`). Every rank draws the same permutation from the same seeded generator.

    With `group_ids` ([N], the prompt of each rollout: `RolloutBatch.prompt_index`) the shuffle is over
    groups and each step takes whole groups (rollouts of a group stay together, in row order), so that the
    shared-prefix forward computes each prompt once per step; with fewer groups than steps, groups are
    split across steps. Without `group_ids`, rollouts are shuffled one by one.
    """
    steps = min(config.steps_per_generation, max(1, len(indices)))
    if group_ids is None:
        order = indices[torch.randperm(len(indices), generator=generator)]
        return [chunk for chunk in torch.tensor_split(order, steps) if len(chunk)]
    groups = _groups(indices, group_ids)
    permutation = torch.randperm(len(groups), generator=generator).tolist()
    order = torch.cat([groups[g] for g in permutation]) if groups else indices
    return [chunk for chunk in _split_groups(order, steps, group_ids) if len(chunk)]


def rank_micro_batches(chunk: torch.Tensor, gradient_accumulation_steps: int, *, world_size: int = 1,
                       rank: int = 0, group_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """This rank's micro-batches of one optimizer step.

    The step's rollouts are cut into `world_size x M` contiguous pieces, rank r taking pieces r·M … r·M+M−1,
    with M = min(gradient_accumulation_steps, ⌈len/world_size⌉) the same on every rank, so that the ranks'
    forwards and gradient reductions line up. A piece is empty only when the step has fewer rollouts than
    pieces; the update then runs a zero-weight forward for it. With one process this is the plain split
    into min(gradient_accumulation_steps, len) micro-batches. With `group_ids` ([N] prompt of each rollout)
    pieces are whole groups whenever the step has at least as many groups as pieces.
    """
    micro = max(1, min(gradient_accumulation_steps, math.ceil(len(chunk) / world_size)))
    pieces = _split_groups(chunk, micro * world_size, group_ids)
    return list(pieces[rank * micro:(rank + 1) * micro])


# Per-step sums reduced across processes in one call.
_LOSS, _LOW, _HIGH, _REGION, _KL, _ENTROPY, _TOKENS, _NONFINITE, _CISPO, _MDI_REWARD, _MDI_ROWS = range(11)


@dataclass
class _UpdateInputs:
    """What every step of a round's update reads, prepared once by `policy_update`."""

    rollouts: Any
    old_per_token_logps: torch.Tensor  # [N, Tc]
    advantages: torch.Tensor  # [N]
    completion_mask: torch.Tensor  # [N, Tc], without truncated completions under mask_truncated_completions
    ref_per_token_logps: torch.Tensor | None
    visual_kl: torch.Tensor | None  # [N, Tc] the masked pass's per-token dependency (VPPO)
    visual_seed: int  # the round's mask seed (PAPO's masked forward draws the teacher-forced pass's masks)
    attention_weight: float  # the pathwise term's weight (0: off)


def step_advantages(inputs: _UpdateInputs, chunk: torch.Tensor, config: DapoConfig) -> torch.Tensor:
    """The [N] advantages of one optimizer step: VPPO's trajectory shaping scales the step's rollouts by their
    normalised mean visual dependency (`loss.vppo_advantage_scale` over the step), else they are unchanged."""
    if not config.vppo_advantage_weighting:
        return inputs.advantages
    mask = inputs.completion_mask[chunk].to(torch.float64)  # [S, Tc]
    tokens = mask.sum(-1)
    scores = (inputs.visual_kl[chunk].double() * mask).sum(-1) / tokens.clamp(min=1.0)  # [S]
    scale = vppo_advantage_scale(scores, tokens > 0, config.vppo_advantage_min)
    advantages = inputs.advantages.clone()
    advantages[chunk] = (advantages[chunk].double() * scale).to(advantages.dtype)
    return advantages


def _papo_masked(model: torch.nn.Module, batch: Any, inputs: _UpdateInputs, config: DapoConfig) -> dict[str, Any]:
    """PAPO's masked input through the same forward, with gradient: the `policy_loss` keyword arguments."""
    if not (config.papo_coef or config.papo_entropy_coef):
        return {}
    masked = visual.degraded_batch(batch, mode=config.visual_mask, ratio=config.visual_mask_ratio,
                                   seed=inputs.visual_seed, patch_size=visual.vision_patch_size(unwrapped(model)))
    logps, entropy = completion_forward(model, masked, temperature=config.temperature,
                                        entropy_grad=config.papo_entropy_coef != 0.0,
                                        shared_prefix=config.shared_prefix)[:2]
    return {"masked_per_token_logps": logps.float(), "masked_entropies": entropy.float(),
            "papo_coef": config.papo_coef, "papo_entropy_coef": config.papo_entropy_coef}


def _micro_batch_loss(model: torch.nn.Module, batch: Any, rows: torch.Tensor, advantages: torch.Tensor,
                      inputs: _UpdateInputs, config: DapoConfig, *, num_items: int, pathwise_rows: int,
                      micro_batches: int, world: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, tuple]:
    """One micro-batch's forward and loss: (loss, loss metrics, entropy [B, Tc], (mdi values, mdi rows) or ())."""
    weight = inputs.attention_weight
    papo_entropy = config.papo_entropy_coef != 0.0
    needs_entropies = config.top_entropy_quantile < 1.0 or config.entropy_coef != 0.0 or papo_entropy
    with precision.autocast(config, model):  # bf16: autocast forward, fp32 master weights
        logps, entropy, *masses = completion_forward(
            model, batch, temperature=config.temperature, entropy_grad=config.entropy_coef != 0.0 or papo_entropy,
            with_attention=weight != 0.0, attention_grad=weight != 0.0, shared_prefix=config.shared_prefix,
        )
        papo = _papo_masked(model, batch, inputs, config)
    logps = logps.float()  # [B, Tc] the loss in fp32 whatever the forward's precision
    mask = inputs.completion_mask[rows]
    device = logps.device
    vppo = {} if config.vppo_token_ratio >= 1.0 else {
        "visual_dependency": inputs.visual_kl[rows].to(device), "vppo_token_ratio": config.vppo_token_ratio}
    loss, stats = policy_loss(
        logps, inputs.old_per_token_logps[rows].to(device), advantages[rows].to(device), mask.to(device),
        loss_type=config.loss_type, epsilon=config.epsilon, epsilon_high=config.epsilon_high, beta=config.beta,
        ref_per_token_logps=None if inputs.ref_per_token_logps is None else inputs.ref_per_token_logps[rows].to(device),
        max_completion_length=config.max_completion_length, num_items_in_batch=num_items,
        importance_sampling_level=config.importance_sampling_level, delta=config.delta,
        entropies=entropy.float() if papo_entropy else (entropy if needs_entropies else None),
        top_entropy_quantile=config.top_entropy_quantile, sapo_temperature_pos=config.sapo_temperature_pos,
        sapo_temperature_neg=config.sapo_temperature_neg, entropy_coef=config.entropy_coef,
        use_bias_correction_kl=config.use_bias_correction_kl,
        # TRL scales per-micro-batch normalized losses by the accumulation steps.
        gradient_accumulation_steps=micro_batches, num_processes=world, **vppo, **papo,
    )
    mdi: tuple = ()
    if masses:
        # The attention reward's pathwise term, a mean over the step's rollouts; DDP averages the ranks'
        # gradients, so each rank's share is scaled by the world size. Rollouts without a loss token
        # (mask_truncated_completions) leave this term too.
        attention_loss, mdi_values, mdi_rows = pathwise_loss(
            *masses, batch.vision_mask.sum(-1), batch.text_mask.sum(-1), weight=weight,
            shaping=config.mdi_shaping, tolerance=config.mdi_tolerance, stage=config.mdi_reward_stage,
            denominator=pathwise_rows, include=mask.to(masses[0].device).bool().any(-1),
        )
        loss = loss + world * attention_loss.to(loss.dtype)
        mdi = (mdi_values, mdi_rows)
    return loss, stats, entropy, mdi


def _add_to_sums(sums: torch.Tensor, loss: torch.Tensor, stats: dict[str, float], entropy: torch.Tensor,
                 mask: torch.Tensor, mdi: tuple, *, clip_weight: float, weight: float) -> None:
    """A micro-batch's share of the step's logged sums (`weight`: its share of the step's loss tokens)."""
    mask = mask.to(torch.float64)
    value = float(loss.detach())
    sums[_LOSS] += value
    sums[_NONFINITE] += 0.0 if math.isfinite(value) else 1.0
    sums[_LOW] += clip_weight * float(stats["clip_ratio/low_mean"])
    sums[_HIGH] += clip_weight * float(stats["clip_ratio/high_mean"])
    sums[_REGION] += clip_weight * float(stats["clip_ratio/region_mean"])
    sums[_CISPO] += clip_weight * float(stats.get("cispo_clip_ratio", 0.0))
    sums[_KL] += weight * float(stats.get("kl", 0.0))
    sums[_ENTROPY] += float((entropy.detach().double().cpu() * mask).sum())
    sums[_TOKENS] += float(mask.sum())
    if mdi:
        sums[_MDI_REWARD] += float(mdi[0].double().sum())
        sums[_MDI_ROWS] += float(mdi[1].sum())


def _accumulate_step(model: torch.nn.Module, chunk: torch.Tensor, inputs: _UpdateInputs, config: DapoConfig,
                     collective: LocalCollective, group_ids: torch.Tensor | None) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one step; the step's sums over all ranks."""
    world = collective.world_size
    micro_batches = rank_micro_batches(chunk, config.gradient_accumulation_steps, world_size=world,
                                       rank=collective.rank, group_ids=group_ids)
    # DAPO's token-level normalization over the whole step batch, all ranks (TRL: num_items_in_batch).
    num_items = int(inputs.completion_mask[chunk].sum().item())
    # The pathwise term's mean runs over the step's rollouts that keep loss tokens (all ranks), like
    # num_items: a rollout masked out of the policy loss leaves it too.
    pathwise_rows = int(inputs.completion_mask[chunk].any(-1).sum().item())
    advantages = step_advantages(inputs, chunk, config)
    sums = torch.zeros(11, dtype=torch.float64)
    for position, idx in enumerate(micro_batches):
        placeholder = len(idx) == 0  # keeps this rank's collectives in step; contributes nothing
        rows = chunk[:1] if placeholder else idx
        batch = inputs.rollouts.select(rows)
        with collective.sync_context(model, sync=position == len(micro_batches) - 1):
            loss, stats, entropy, mdi = _micro_batch_loss(
                model, batch, rows, advantages, inputs, config, num_items=num_items, pathwise_rows=pathwise_rows,
                micro_batches=len(micro_batches), world=world)
            if placeholder:
                loss = loss * 0.0
            # A non-finite loss is only flagged here: every rank must finish the same backward
            # passes (they synchronize), and all ranks then refuse the step together.
            collective.backward(loss)
        if placeholder:
            continue
        # Clip ratios are token shares: weight each micro-batch by its completion tokens, as TRL does
        # (by its sequences when they are sequence shares).
        weight = float(inputs.completion_mask[rows].sum()) / max(num_items, 1)
        per_sequence = config.importance_sampling_level == "sequence"
        _add_to_sums(sums, loss, stats, entropy, inputs.completion_mask[rows], mdi,
                     clip_weight=len(idx) / len(chunk) if per_sequence else weight, weight=weight)
    return collective.sum(sums)


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sums: torch.Tensor, config: DapoConfig,
                    collective: LocalCollective, result: UpdateResult, epoch: int,
                    attention_weight: float) -> dict[str, float]:
    """Refuse a non-finite step (`NonFiniteUpdateError`), else clip, step and return the step's record."""
    step_loss = float(sums[_LOSS]) / collective.world_size
    if sums[_NONFINITE] > 0:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteUpdateError(
            f"non-finite loss ({step_loss}) at global step {result.global_step + 1}, epoch {epoch}; "
            f"the optimizer step was skipped and no checkpoint will be written. Lower learning_rate "
            f"(now {config.learning_rate}) or check the rewards/advantages for NaN."
        )
    grad_norm = collective.clip_grad_norm(model, optimizer, config.max_grad_norm)
    if not torch.isfinite(torch.as_tensor(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteUpdateError(
            f"non-finite gradient norm ({float(grad_norm)}) at global step {result.global_step + 1}; "
            f"the optimizer step was skipped and no checkpoint will be written. Lower learning_rate "
            f"(now {config.learning_rate}) or max_grad_norm."
        )
    optimizer.step()
    result.global_step += 1
    record = {
        "loss": step_loss,
        "grad_norm": float(grad_norm),
        "entropy": float(sums[_ENTROPY]) / max(float(sums[_TOKENS]), 1.0),
        "learning_rate": float(optimizer.param_groups[0]["lr"]),
        "epoch": float(epoch),
        "clip_ratio/low_mean": float(sums[_LOW]),
        "clip_ratio/high_mean": float(sums[_HIGH]),
        "clip_ratio/region_mean": float(sums[_REGION]),
    }
    if config.beta > 0:
        record["kl"] = float(sums[_KL])
    if config.loss_type == "cispo":
        record["cispo_clip_ratio"] = float(sums[_CISPO])
    if attention_weight:
        # The attention reward of the update's own forward, before this step (the pathwise term's r).
        record["mdi_reward_pathwise"] = float(sums[_MDI_REWARD]) / max(float(sums[_MDI_ROWS]), 1.0)
    return record


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
    collective: LocalCollective = LOCAL,
    visual_kl: torch.Tensor | None = None,
    visual_seed: int = 0,
) -> UpdateResult:
    """Run μ epochs over the kept rollouts. Raises `NonFiniteUpdateError` before the optimizer step
    when a loss or gradient is not finite (the caller must then discard the in-memory policy).

    `model` is what the forward runs through (a DDP/FSDP wrapper under `accelerate`). With several
    processes every rank passes the whole round batch; the `dapo` and `cispo` losses are normalized by
    the completion tokens of the whole step batch (TRL's `num_items_in_batch`, counted over all ranks) and
    multiplied by the world size, because DDP averages gradients: the synchronized gradient is then exactly the
    one-process gradient. The other loss types keep TRL's per-rank normalization (DDP's average of the
    ranks' losses). Logged step values are the same sums over ranks as one process would compute.

    The objective options of `config` (importance sampling level, delta, entropy quantile, SAPO
    temperatures, entropy bonus, VPPO, PAPO) go to `policy_loss`; with `mask_truncated_completions` the
    completions that did not end with EOS leave the loss (and its token count), as TRL zeroes their completion
    mask. VPPO reads `visual_kl` ([N, Tc], the teacher-forced masked pass); PAPO degrades the images with the
    round's `visual_seed`, so its masked input is the one the teacher-forced pass scored.
    """
    model.train()
    generator = torch.Generator().manual_seed(seed)
    kept = torch.nonzero(keep, as_tuple=False).flatten()
    result = UpdateResult(global_step=global_step, num_rollouts_used=len(kept))
    if len(kept) == 0:
        log("no rollout entered the update (every group had zero reward variance); weights unchanged, "
            "no optimizer step: loss and grad_norm are not logged this round")
        return result
    if (config.vppo_token_ratio < 1.0 or config.vppo_advantage_weighting) and visual_kl is None:
        raise ValueError("vppo_token_ratio < 1 / vppo_advantage_weighting need the round's per-token visual "
                         "dependency (old_logps.pt `visual_kl`): re-run attention_metrics with visual_dependency on")
    completion_mask = rollouts.completion_mask
    if config.mask_truncated_completions:
        completion_mask = truncated_completions_mask(completion_mask, rollouts.is_eos)
    inputs = _UpdateInputs(rollouts, old_per_token_logps, advantages, completion_mask, ref_per_token_logps,
                           visual_kl, visual_seed, pathwise_weight(config))
    # Whole groups per step and micro-batch, so that each prompt's forward is shared by its rollouts.
    group_ids = getattr(rollouts, "prompt_index", None)
    group_ids = None if group_ids is None else group_ids.cpu()
    progress.begin("optimizer", config.num_iterations * min(config.steps_per_generation, len(kept)), unit="step")
    for epoch in range(config.num_iterations):
        for chunk in step_chunks(kept, config, generator=generator, group_ids=group_ids):
            optimizer.zero_grad(set_to_none=True)
            sums = _accumulate_step(model, chunk, inputs, config, collective, group_ids)
            record = _optimizer_step(model, optimizer, sums, config, collective, result, epoch,
                                     inputs.attention_weight)
            progress.advance("optimizer")
            result.steps.append(record)
            log(
                f"step {result.global_step}: epoch {epoch} loss {record['loss']:.4f} grad_norm {record['grad_norm']:.4f} "
                f"entropy {record['entropy']:.4f} clip_region {record['clip_ratio/region_mean']:.4f}"
            )
    model.eval()
    return result
