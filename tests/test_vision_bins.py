"""MDI by vision-token count on a real round: the tiny Qwen2.5-VL takes 56x56 and 112x112 images in one batch
(4 and 16 image tokens), and attention_diagnostics.md shows each bin's MDI beside the pooled value."""

from __future__ import annotations

import polars as pl
import pytest
from transformers import Qwen2VLImageProcessorPil

from dapo_ops.attention.teacher_forced import teacher_forced_pass
from dapo_ops.config.dapo import STAGES
from dapo_ops.data import synthetic
from dapo_ops.models import loading as models
from dapo_ops.reporting.reports import render_attention_diagnostics
from dapo_ops.rollout import generate as rollout
from dapo_ops.run import phases as training

SIZES = {56: 4, 112: 16}  # image side (px) -> image tokens: (side / 14)^2 patches, merged 2x2


def _table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under `heading`, by first cell."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in section.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]}


@pytest.fixture(scope="module")
def mixed_round(embedded_policy_for) -> tuple[models.Policy, rollout.RolloutBatch, pl.DataFrame]:
    policy = embedded_policy_for(synthetic.corpus(("color",)), seed=0)
    # The embedded processor resizes every image to 56x56; this one keeps each image's own size.
    policy.processor.image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                                                temporal_patch_size=2, merge_size=2)
    rows = pl.concat([synthetic.generate_rows(2, seed, image_size=size, tasks=("color",))
                      for seed, size in enumerate(SIZES)])
    batch = rollout.generate_rollouts(policy, training.encode_rows(policy, rows), num_generations=2,
                                      max_completion_length=6, seed=0)
    table = training.attention_table(teacher_forced_pass(policy, batch), batch, tolerance=2.0)
    return policy, batch, table


def test_vision_tokens_of_a_mixed_round_come_from_the_image_token_mask(mixed_round):
    _, batch, table = mixed_round
    assert table["vision_tokens"].to_list() == [4, 4, 4, 4, 16, 16, 16, 16]
    assert table["vision_tokens"].to_list() == batch.vision_mask.sum(1).tolist()


def test_bin_table_equals_the_mdi_of_each_image_size_in_its_own_attention_pass(mixed_round):
    policy, batch, table = mixed_round
    md = render_attention_diagnostics(table, run_name="mixed", checkpoint="ckpt-0000", mdi_tolerance=2.0)
    bins = _table_rows(md, "## MDI by vision-token count")
    assert list(bins) == ["pooled", "4–7", "16–31"]
    for label, tokens in (("4–7", 4), ("16–31", 16)):
        # The subset alone, through its own teacher-forced pass (no padding to the other size's length).
        indices = [i for i, n in enumerate(table["vision_tokens"].to_list()) if n == tokens]
        subset = batch.select(indices)
        alone = training.attention_table(teacher_forced_pass(policy, subset), subset, tolerance=2.0)
        rollouts, mean_tokens, *stage_mdi = bins[label][: 2 + len(STAGES)]
        assert (int(rollouts), float(mean_tokens)) == (len(indices), float(tokens))
        for stage, cell in zip(STAGES, stage_mdi, strict=True):
            assert float(cell) == pytest.approx(alone[f"attn/{stage}/mdi"].mean(), abs=6e-4), (label, stage)
    pooled = bins["pooled"]
    assert [float(c) for c in pooled[2: 2 + len(STAGES)]] == pytest.approx(
        [table[f"attn/{s}/mdi"].mean() for s in STAGES], abs=6e-4)
