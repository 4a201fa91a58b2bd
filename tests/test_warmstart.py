"""Supervised warm start: target text, completion-only cross-entropy, and learning the format."""

from __future__ import annotations

import io
import re

import polars as pl
import pytest
import torch
from PIL import Image

from dapo_ops.models.loading import Policy, build_embedded_policy
from dapo_ops.rollout.generate import generate_rollouts
from dapo_ops.run.phases import encode_rows
from dapo_ops.train.warmstart import (
    completion_cross_entropy,
    corpus_from_rows,
    supervised_warm_start,
    target_completion,
    teacher_forcing_batch,
)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
NAMES = list(COLORS)


def _png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rows() -> pl.DataFrame:
    """A toy color task in the A-OKVQA layout (fixed choice order, the answer only in the image)."""
    return pl.DataFrame(
        [
            {
                "question_id": f"q{i}",
                "question": "What color is the shape?",
                "choices": NAMES,
                "correct_choice_idx": i % 4,
                "image": _png(COLORS[NAMES[i % 4]]),
                "rationales": [f"The shape is {NAMES[i % 4]}.", "Another reason."],
            }
            for i in range(32)
        ]
    )


@pytest.fixture
def policy(rows: pl.DataFrame, embedded_policy_for) -> Policy:
    return embedded_policy_for(corpus_from_rows(rows), seed=0)


def test_target_is_the_first_rationale_in_think_tags_then_the_letter() -> None:
    row = {"choices": ["cat", "dog", "cow"], "correct_choice_idx": 2, "rationales": ["It moos.", "x"]}
    assert target_completion(row) == "<think>It moos.</think> Answer: C"


def test_target_accepts_label_idx_and_falls_back_to_the_choice_without_rationales() -> None:
    row = {"choices": ["cat", "dog"], "label_idx": 1, "rationales": []}
    assert target_completion(row) == "<think>The answer is dog.</think> Answer: B"


def test_corpus_covers_questions_choices_rationales_and_targets(rows: pl.DataFrame) -> None:
    corpus = corpus_from_rows(rows.head(1))
    assert "What color is the shape?" in corpus
    assert "A. red\nB. green\nC. blue\nD. yellow" in corpus
    assert "The shape is red." in corpus
    assert "<think>The shape is red.</think> Answer: A" in corpus


def test_teacher_forcing_scores_only_the_completion_ending_in_eos(policy: Policy, rows: pl.DataFrame) -> None:
    records = rows.head(2).to_dicts()
    batch = teacher_forcing_batch(
        policy, encode_rows(policy, rows.head(2)), [target_completion(r) for r in records]
    )
    for ids, length in zip(batch.completion_ids, batch.completion_lengths.tolist(), strict=True):
        assert int(ids[length - 1]) == policy.eos_token_id
        assert policy.tokenizer.decode(ids[:length], skip_special_tokens=True).startswith(
            "<think>The shape is"
        )
    # Changing the prompt changes the loss, changing padding after the completion does not.
    loss = completion_cross_entropy(policy.model, batch)
    batch.completion_ids[batch.completion_mask == 0] = policy.eos_token_id
    assert torch.allclose(completion_cross_entropy(policy.model, batch), loss)


def test_warm_start_lowers_the_loss_and_teaches_the_think_format(policy: Policy, rows: pl.DataFrame) -> None:
    losses = supervised_warm_start(policy, rows, steps=40, learning_rate=3e-3, batch_size=8, seed=0)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5
    assert not policy.model.training

    eval_rows = rows.head(8)
    batch = generate_rollouts(
        policy, encode_rows(policy, eval_rows), num_generations=1, max_completion_length=24, temperature=0.0
    )
    assert all(re.match(r"^<think>.*</think>", text, flags=re.DOTALL) for text in batch.completions), (
        batch.completions
    )
    assert bool(batch.is_eos.all())


def test_warm_start_is_deterministic_per_seed(rows: pl.DataFrame) -> None:
    runs = []
    for _ in range(2):
        policy = build_embedded_policy(corpus_from_rows(rows), seed=0)
        runs.append(supervised_warm_start(policy, rows, steps=3, learning_rate=1e-3, batch_size=4, seed=1))
    assert runs[0] == runs[1]


def test_no_steps_means_no_training(policy: Policy, rows: pl.DataFrame) -> None:
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    assert supervised_warm_start(policy, rows, steps=0, learning_rate=1e-3, batch_size=4, seed=0) == []
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_format_target_names_the_given_choice_and_its_letter() -> None:
    from dapo_ops.train.warmstart import format_target

    row = {"choices": ["cat", "dog", "cow"], "correct_choice_idx": 2}
    assert format_target(row, 0) == "<think>The answer is cat.</think> Answer: A"
    with pytest.raises(ValueError, match="out of range"):
        format_target(row, 3)


def test_unknown_teach_mode_is_rejected(policy: Policy, rows: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="teach='answers'"):
        supervised_warm_start(policy, rows, steps=1, learning_rate=1e-3, batch_size=2, seed=0, teach="answers")
