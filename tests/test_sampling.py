"""DAPO dynamic sampling: zero-variance groups are dropped and fresh prompts refill the batch. Per-prompt
seeding: a round's rollouts are the same whichever ranks sample which prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pytest
import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models.inputs import VisionInputs
from dapo_ops.rollout.dynamic_sampling import concat_rollouts, informative_groups, sample_with_refill
from dapo_ops.rollout.generate import RolloutBatch
from dapo_ops.run.shards import DataParallel

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


# ------------------------------------------------------------------ per-prompt seeding and sharded phases


@dataclass(frozen=True)
class Loopback(DataParallel):
    """Ranks run one after another in this process: each `gather` returns the values of the ranks that
    already ran (and its own for the rest), so the last rank to run sees what the real collective gives."""

    seen: dict = field(default_factory=dict, compare=False)

    def gather(self, value):
        self.seen[self.rank] = value
        return [self.seen.get(r, value) for r in range(self.world_size)]


def _ranks(world: int) -> list[Loopback]:
    seen: dict = {}
    return [Loopback(rank, world, seen) for rank in reversed(range(world))]  # rank 0 runs last


@pytest.fixture(scope="module")
def policy(embedded_policy_for):
    return embedded_policy_for(["What color is the shape?", "Which shape is it?", "red green blue yellow"], seed=0)


@pytest.fixture(scope="module")
def prompts(policy):
    from PIL import Image

    from dapo_ops.models.inputs import encode_prompts

    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]
    questions = ["What color is the shape?", "Which shape is it? Look closely.", "What color?", "Which?", "Shape?"]
    images = [Image.new("RGB", (56 + 8 * i, 56), c) for i, c in enumerate(colors)]
    return encode_prompts(policy, questions, [["red", "green", "blue", "yellow"]] * 5, images)


SAMPLING = {"num_generations": 3, "max_completion_length": 6, "temperature": 1.0, "top_p": 1.0, "seed": 11}


def test_each_rank_takes_a_contiguous_block_of_whole_groups_and_together_they_cover_the_round():
    for groups in range(1, 12):
        for world in (1, 2, 3, 4):
            shares = [DataParallel(rank, world).share(groups) for rank in range(world)]
            assert [g for share in shares for g in share] == list(range(groups))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert list(DataParallel(world - 1, world).rows(groups, 4)) == [
                r for g in shares[-1] for r in range(4 * g, 4 * g + 4)]
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        DataParallel(2, 2)


def test_a_prompts_rollouts_depend_on_its_round_index_not_on_the_prompts_beside_it(policy, prompts):
    from dapo_ops.rollout.generate import generate_rollouts

    whole = generate_rollouts(policy, prompts, **SAMPLING)
    alone = generate_rollouts(policy, prompts.select([2, 3]), prompt_offset=2, **SAMPLING)
    g = SAMPLING["num_generations"]
    width = alone.completion_ids.shape[1]
    assert torch.equal(alone.completion_lengths, whole.completion_lengths[2 * g:4 * g])
    assert torch.equal(alone.completion_ids, whole.completion_ids[2 * g:4 * g, :width])
    unshifted = generate_rollouts(policy, prompts.select([2, 3]), **SAMPLING)
    assert not torch.equal(unshifted.completion_ids, alone.completion_ids)  # the offset is what keeps them


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_generation_gathers_exactly_the_batch_of_one_process(policy, prompts, world: int):
    from dapo_ops.rollout.engines import HFEngine
    from dapo_ops.run.shards import SINGLE, generate_shared

    engine = HFEngine(None, policy)
    one = generate_shared(engine, prompts, SINGLE, pad_token_id=policy.pad_token_id, **SAMPLING)
    gathered = [generate_shared(engine, prompts, dp, pad_token_id=policy.pad_token_id, **SAMPLING)
                for dp in _ranks(world)][-1]
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "completion_lengths", "is_eos",
                 "prompt_index", "prompt_vision_mask", "prompt_text_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(gathered, name), getattr(one, name)), name
    assert gathered.completions == one.completions
