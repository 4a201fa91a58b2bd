"""Data-parallel phases: each rank's share of a round's prompt groups, and the gather that puts the
shares back together in round order.

`rollouts`, `attention_metrics` and eval run on `num_processes` ranks (`dapo_ops.distributed.launch`): rank r takes
a contiguous block of whole groups, computes it, and every rank gathers all blocks (rank order is round
order), so the gathered result, and the files rank 0 writes from it, are those of one process. With one
process (`SINGLE`) nothing is split and nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """Rank `rank` of `world_size` processes (an initialized torch.distributed group when more than one)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size}: need 0 <= rank < world_size")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, num_groups: int) -> range:
        """This rank's groups: a contiguous block; the first `num_groups % world_size` ranks get one more."""
        base, extra = divmod(num_groups, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def rows(self, num_groups: int, group_size: int) -> range:
        """The rows of this rank's groups in a group-major table of `group_size` rows per group."""
        groups = self.share(num_groups)
        return range(groups.start * group_size, groups.stop * group_size)

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank (a collective: all ranks call it)."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values


SINGLE = DataParallel()


def from_process_group() -> DataParallel:
    """This process's place in the initialized torch.distributed group (`SINGLE` without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return SINGLE
    return DataParallel(torch.distributed.get_rank(), torch.distributed.get_world_size())


def generate_shared(engine: Any, prompts: Any, dp: DataParallel, *, pad_token_id: int, **sampling: Any) -> Any:
    """`engine.generate(prompts, **sampling)` with each rank sampling its share of the prompts (whole
    groups, seeded by their round index through `prompt_offset`) and every rank gathering the whole
    `RolloutBatch`, group-major in prompt order, as one process would have sampled it."""
    if dp.world_size == 1:
        return engine.generate(prompts, **sampling)
    from dapo_ops.rollout.dynamic_sampling import concat_rollouts

    mine = dp.share(len(prompts))
    # The shard keeps the batch's prompt width (no re-padding), so the gathered prompt tensors are those
    # of one process; completions are right padded to the widest shard by `concat_rollouts`.
    piece = engine.generate(prompts.select(mine), prompt_offset=mine.start, **sampling) if len(mine) else None
    pieces = [p for p in dp.gather(None if piece is None else piece.to("cpu")) if p is not None]
    return concat_rollouts(pieces, pad_token_id)


def gather_attention(dp: DataParallel, table: Any, per_token_logps: torch.Tensor, entropy: torch.Tensor,
                     visual_kl: torch.Tensor | None = None) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The attention table and the [N, C] old log-probs / entropy (and the masked pass's per-token KL, when
    given) of the whole round from every rank's share (contiguous rows, rank order); `rollout_index`
    renumbered to the round's rows."""
    import polars as pl

    parts = dp.gather((table, per_token_logps.cpu(), entropy.cpu(), None if visual_kl is None else visual_kl.cpu()))
    whole = pl.concat([part[0] for part in parts])
    whole = whole.with_columns(pl.Series("rollout_index", range(whole.height), dtype=whole["rollout_index"].dtype))
    kl = None if visual_kl is None else torch.cat([part[3] for part in parts])  # [N, C]
    return (whole, torch.cat([part[1] for part in parts]),  # [N, C]
            torch.cat([part[2] for part in parts]), kl)  # [N, C]
