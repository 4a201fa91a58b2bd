"""DAPO dynamic sampling: zero-variance groups are dropped and fresh prompts refill the batch."""

from __future__ import annotations

import polars as pl
import torch

from dapo_ops.config import DapoConfig
from dapo_ops.inputs import VisionInputs
from dapo_ops.rollout import RolloutBatch
from dapo_ops.sampling import concat_rollouts, informative_groups, sample_with_refill

G = 2
PAD = 0


def _batch(completions: list[str], prompt_len: int, completion_len: int) -> RolloutBatch:
    n = len(completions)
    patches = 4
    return RolloutBatch(
        prompt_ids=torch.arange(1, prompt_len + 1).repeat(n, 1),
        prompt_mask=torch.ones(n, prompt_len, dtype=torch.long),
        vision=VisionInputs.from_patches(
            torch.arange(n * patches, dtype=torch.float32).view(n * patches, 1), torch.tensor([[1, 2, 2]] * n)
        ),
        completion_ids=torch.full((n, completion_len), 7),
        completion_mask=torch.ones(n, completion_len, dtype=torch.long),
        completion_lengths=torch.full((n,), completion_len),
        is_eos=torch.ones(n, dtype=torch.bool),
        completions=completions,
        prompt_index=torch.arange(n // G).repeat_interleave(G),
        num_generations=G,
        prompt_vision_mask=torch.zeros(n, prompt_len, dtype=torch.bool),
        prompt_text_mask=torch.ones(n, prompt_len, dtype=torch.bool),
    )


def _rows(answers: list[int]) -> pl.DataFrame:
    return pl.DataFrame({"question_id": [f"q{i}" for i in range(len(answers))],
                         "choices": [["red", "green"]] * len(answers), "correct_choice_idx": answers})


# Accuracy and format, weighted 3:1 (the attention reward is unknown before the teacher-forced pass anyway).
CONFIG = DapoConfig(reward_funcs=["mc_idx_reward", "think_format_reward"], reward_weights=[3.0, 1.0])

RIGHT = "<think>x</think> Answer: A"
WRONG = "<think>x</think> Answer: B"


def test_concat_pads_prompts_left_and_completions_right_and_keeps_groups_distinct():
    a, b = _batch([RIGHT, WRONG], 3, 2), _batch([RIGHT, RIGHT, WRONG, WRONG], 5, 4)
    merged = concat_rollouts([a, b], PAD)
    assert merged.prompt_ids.shape == (6, 5) and merged.completion_ids.shape == (6, 4)
    assert merged.prompt_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert merged.completion_mask[0].tolist() == [1, 1, 0, 0]
    assert merged.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(merged.pixel_values, torch.cat([a.pixel_values, b.pixel_values]))


def test_only_groups_with_different_answer_rewards_are_informative():
    batch = _batch([RIGHT, WRONG, RIGHT, RIGHT], 3, 2)
    assert informative_groups(batch, _rows([0, 0]), CONFIG).tolist() \
        == [True, False]


def test_refill_draws_new_prompts_until_the_batch_is_full():
    # First try: prompt 0 informative, prompt 1 not. Second try: both informative; only one is needed.
    outputs = [_batch([RIGHT, WRONG, RIGHT, RIGHT], 3, 2), _batch([WRONG, RIGHT, RIGHT, WRONG], 4, 3)]
    calls = []

    def generate(rows, attempt):
        calls.append(rows["question_id"].to_list())
        return outputs[attempt]

    batch, rows = sample_with_refill(
        generate, _rows([0, 0]), lambda attempt: _rows([0, 0]).with_columns(pl.lit(f"r{attempt}").alias("question_id")),
        num_prompts=2, config=CONFIG, max_tries=3, pad_token_id=PAD)
    assert len(calls) == 2
    assert len(batch) == 4 and batch.completions == [RIGHT, WRONG, WRONG, RIGHT]
    assert rows["question_id"].to_list() == ["q0", "r1"]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]


def test_refill_gives_up_after_max_tries_and_keeps_the_first_batch_if_nothing_is_informative():
    flat = _batch([RIGHT, RIGHT, WRONG, WRONG], 3, 2)
    batch, rows = sample_with_refill(lambda rows, attempt: flat, _rows([0, 0]), lambda a: _rows([0, 0]),
                                     num_prompts=2, config=CONFIG,
                                     max_tries=2, pad_token_id=PAD)
    assert batch is flat and rows.height == 2


def test_refill_scores_the_default_rewards_without_the_attention_reward():
    # mdi_reward needs the teacher-forced pass; before it, the default config judges groups by the others.
    batch = _batch([RIGHT, WRONG, RIGHT, RIGHT], 3, 2)
    assert informative_groups(batch, _rows([0, 0]), DapoConfig()).tolist() == [True, False]
