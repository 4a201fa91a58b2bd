"""Each image's share of the vision attention, for prompts with several images (a diagnostic).

The vision keys of the attention metrics are all images' tokens together. Here the same lean pass measures,
per image k, the attention mass on image k's tokens against the mass on the other images' tokens:
share_k = m_k / (m_k + m_rest), per stage (the stage's layer-mean masses), so the shares of a rollout's images
sum to 1. An image's tokens are found as runs of vision tokens: each image is one run (Qwen, Gemma 3,
Idefics3 without splitting) or the same number of consecutive runs (tiles); otherwise the row gets NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from dapo_ops.attention.metrics import stage_layers
from dapo_ops.attention.teacher_forced import teacher_forced_pass
from dapo_ops.config.dapo import STAGES


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) of each maximal run of True in a 1-D bool tensor."""
    padded = torch.cat([row.new_zeros(1), row.to(torch.int8), row.new_zeros(1)])
    edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
    return list(zip(edges[::2], edges[1::2], strict=True))


def image_token_ids(vision_mask: torch.Tensor, num_images: Sequence[int]) -> torch.Tensor:
    """[N, T] long: k (1-based) at the tokens of image k, 0 elsewhere; a row whose vision-token runs do not
    split evenly into its `num_images` images is all -1."""
    ids = torch.zeros(vision_mask.shape, dtype=torch.long)
    for i, count in enumerate(num_images):
        runs = _runs(vision_mask[i].bool().cpu())
        if count < 1 or not runs or len(runs) % count:
            ids[i] = -1
            continue
        per_image = len(runs) // count
        for r, (start, stop) in enumerate(runs):
            ids[i, start:stop] = r // per_image + 1
    return ids


def rollout_image_shares(model: Any, batch: Any, num_images: Sequence[int], *, temperature: float = 1.0,
                         batch_size: int | None = None, shared_prefix: bool = True) -> dict[str, list[list[float]]]:
    """{stage: per rollout, the share of each of its images} from one lean pass per image position.

    `batch` is a `RolloutBatch` (prompt vision masks over the prompt tokens), `num_images` its images per
    rollout. Rollouts with one image get [1.0]; unresolvable rows NaNs.
    """
    ids = image_token_ids(batch.prompt_vision_mask, num_images)
    most = max(num_images, default=1)
    masses: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k in range(1, most + 1):
        image_k = ids == k
        rest = (ids > 0) & ~image_k
        masked = dataclasses.replace(batch, prompt_vision_mask=image_k, prompt_text_mask=rest)
        out = teacher_forced_pass(model, masked, temperature=temperature, batch_size=batch_size,
                                  shared_prefix=shared_prefix)
        masses.append((out.vision_mass, out.text_mass))
    num_layers = int(masses[0][0].shape[1])
    shares: dict[str, list[list[float]]] = {}
    for stage in STAGES:
        layers = list(stage_layers(num_layers)[stage])
        rows: list[list[float]] = []
        for i, count in enumerate(num_images):
            row: list[float] = []
            for k in range(count):
                if not layers or int(ids[i].min()) < 0:
                    row.append(math.nan)
                    continue
                m_k = float(masses[k][0][i, layers].mean())
                m_rest = float(masses[k][1][i, layers].mean())
                total = m_k + m_rest
                row.append(m_k / total if total > 0 and math.isfinite(total) else math.nan)
            rows.append(row)
        shares[stage] = rows
    return shares


def mean_image_shares(shares: Sequence[Sequence[float] | None]) -> dict[int, list[float]]:
    """{N: the mean share of image 1..N over the rollouts with N >= 2 images} (NaNs left out), so each N's
    shares sum to about 1."""
    by_count: dict[int, list[Sequence[float]]] = {}
    for row in shares:
        if row is not None and len(row) >= 2:
            by_count.setdefault(len(row), []).append(row)
    means: dict[int, list[float]] = {}
    for count, rows in sorted(by_count.items()):
        means[count] = []
        for k in range(count):
            values = [float(r[k]) for r in rows if not math.isnan(float(r[k]))]
            means[count].append(sum(values) / len(values) if values else math.nan)
    return means
