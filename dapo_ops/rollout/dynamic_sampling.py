"""DAPO dynamic sampling with refill: keep only groups whose answer rewards differ, and oversample prompts
until the round's batch is full again (TRL filters nothing; DAPO's paper keeps sampling)."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl
import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models.inputs import VisionInputs
from dapo_ops.rl import advantages, rewards
from dapo_ops.rollout.generate import RolloutBatch


def _pad(tensor: torch.Tensor, width: int, value: int | bool, *, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    fill = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([fill, tensor] if left else [tensor, fill], dim=1)


def concat_rollouts(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """One batch from several (prompts left padded, completions right padded to the widest);
    `prompt_index` is renumbered so that groups stay distinct."""
    if len(batches) == 1:
        return batches[0]
    tp = max(b.prompt_length for b in batches)
    tc = max(b.completion_ids.shape[1] for b in batches)
    offset = 0
    prompt_index = []
    for b in batches:
        prompt_index.append(b.prompt_index + offset)
        offset += int(b.prompt_index.max()) + 1 if len(b) else 0
    return RolloutBatch(
        prompt_ids=torch.cat([_pad(b.prompt_ids, tp, pad_token_id, left=True) for b in batches]),
        prompt_mask=torch.cat([_pad(b.prompt_mask, tp, 0, left=True) for b in batches]),
        vision=VisionInputs.cat([b.vision for b in batches]),
        completion_ids=torch.cat([_pad(b.completion_ids, tc, pad_token_id, left=False) for b in batches]),
        completion_mask=torch.cat([_pad(b.completion_mask, tc, 0, left=False) for b in batches]),
        completion_lengths=torch.cat([b.completion_lengths for b in batches]),
        is_eos=torch.cat([b.is_eos for b in batches]),
        completions=[c for b in batches for c in b.completions],
        prompt_index=torch.cat(prompt_index),
        num_generations=batches[0].num_generations,
        prompt_vision_mask=torch.cat([_pad(b.prompt_vision_mask, tp, False, left=True) for b in batches]),
        prompt_text_mask=torch.cat([_pad(b.prompt_text_mask, tp, False, left=True) for b in batches]),
        prompt_token_inputs={k: torch.cat([_pad(b.prompt_token_inputs[k], tp, 0, left=True) for b in batches])
                             for k in batches[0].prompt_token_inputs},
        completion_values=dict(batches[0].completion_values),
    )


def rollout_columns(batch: RolloutBatch, rows: pl.DataFrame) -> pl.DataFrame:
    """One row per rollout: its prompt's dataset columns (images left out) and its completion, as the rewards
    see them before the teacher-forced pass."""
    lengths = batch.completion_lengths.tolist()
    table = rows.drop("image", "images", strict=False)[batch.prompt_index.tolist()]
    return table.with_columns(
        pl.Series("completion", batch.completions, dtype=pl.String),
        pl.Series("completion_ids", [batch.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)],
                  dtype=pl.List(pl.Int64)),
        pl.Series("completion_length", lengths),
        pl.Series("is_eos", batch.is_eos.tolist()),
    )


def informative_groups(batch: RolloutBatch, rows: pl.DataFrame, config: DapoConfig) -> torch.Tensor:
    """BoolTensor[P]: groups whose weighted rewards are not all equal. Scored by `rewards.score_rollouts`
    without attention: rewards that need the teacher-forced pass (`mdi_reward`) are only known after it; the
    final keep-mask in `training.reward_table` uses the full total."""
    per_func = rewards.score_rollouts(config, rollout_columns(batch, rows))
    if not per_func:  # every configured reward needs attention: nothing to tell groups apart by yet
        return torch.ones(len(batch) // batch.num_generations, dtype=torch.bool)
    total = torch.tensor(rewards.total_rewards(per_func, config.weights), dtype=torch.float64)  # [N]
    return ~advantages.zero_std_groups(total, batch.num_generations)


def sample_with_refill(
    generate: Callable[[pl.DataFrame, int], RolloutBatch],
    first_rows: pl.DataFrame,
    draw_rows: Callable[[int], pl.DataFrame],
    *,
    num_prompts: int,
    config: DapoConfig,
    max_tries: int,
    pad_token_id: int,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[RolloutBatch, pl.DataFrame]:
    """Generate, drop zero-variance groups, draw fresh prompts and generate again until `num_prompts`
    informative groups are collected or `max_tries` generations were made. Returns the batch (group-major,
    at most `num_prompts` groups) and its prompt rows. If no group is informative, the first batch is kept
    whole so the round still has data."""
    kept_batches: list[RolloutBatch] = []
    kept_rows: list[pl.DataFrame] = []
    collected = 0
    first_batch = None
    rows = first_rows
    for attempt in range(max(1, max_tries)):
        batch = generate(rows, attempt)
        if first_batch is None:
            first_batch = batch
        informative = informative_groups(batch, rows, config)
        groups = torch.nonzero(informative).flatten()[: num_prompts - collected]
        log(f"dynamic sampling try {attempt + 1}: {int(informative.sum())}/{len(informative)} groups informative; "
            f"{collected + len(groups)}/{num_prompts} collected")
        if len(groups):
            g = batch.num_generations
            select = (groups[:, None] * g + torch.arange(g)[None, :]).flatten()
            picked = batch.select(select)
            picked.prompt_index = torch.arange(len(groups)).repeat_interleave(g)
            kept_batches.append(picked)
            kept_rows.append(rows[groups.tolist()])
            collected += len(groups)
        if collected >= num_prompts:
            break
        rows = draw_rows(attempt + 1)
    if not kept_batches:
        assert first_batch is not None
        return first_batch, first_rows
    return concat_rollouts(kept_batches, pad_token_id), pl.concat(kept_rows)
