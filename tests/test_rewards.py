"""Reward functions: answer extraction, TRL's format reward, the MDI reward shapings and the weighted total."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_ops.rl.rewards import (
    REWARD_FUNCTIONS,
    extract_choice,
    mc_idx_reward,
    mdi_balance,
    mdi_reward,
    think_format_reward,
    total_rewards,
)

CHOICES = ["red", "green", "blue", "yellow"]


def conversational(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# --- extraction -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: B", 1),
        ("answer is (B)", 1),
        ("The answer is B.", 1),
        ("The final answer is: (c)", 2),
        ("Answer:b", 1),
        ("the answer is a", 0),
        ("[B]", 1),
        ("B. green", 1),
        ("some words\nC) blue", 2),
    ],
)
def test_english_answer_statements_are_read(text: str, expected: int) -> None:
    assert extract_choice(text, 4) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("答案：B", 1),
        ("答案是B", 1),
        ("答案为：（C）", 2),
        ("答案是Ｄ", 3),
        ("Ａｎｓｗｅｒ：Ａ", 0),
        ("【C】", 2),
    ],
)
def test_chinese_and_full_width_answers_are_read(text: str, expected: int) -> None:
    assert extract_choice(text, 4) == expected


def test_only_the_text_after_think_is_read() -> None:
    assert extract_choice("<think>Maybe the answer is A.</think> Answer: C", 4) == 2
    assert extract_choice("<think>Answer: B</think>", 4) is None


def test_first_explicit_statement_wins_over_later_letters() -> None:
    assert extract_choice("The answer is B, not A or D.", 4) == 1


@pytest.mark.parametrize(
    "text",
    [
        "A cat sits on the mat.",
        "I think so.",
        "I'm not sure, a dog maybe.",
        "the answer is a cat",
        "e.g. it is",
    ],
)
def test_english_words_are_not_choice_letters(text: str) -> None:
    assert extract_choice(text, 4) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I think it is C", 2),
        ("So A is correct", 0),
        ("it is C. not D?", 3),
        ("(a)", 0),
        ("b)", 1),
        ("a", 0),
        ("I would pick option c", 2),
        ("X-ray shows C", 2),
    ],
)
def test_last_standalone_choice_letter_is_the_fallback(text: str, expected: int) -> None:
    assert extract_choice(text, 4) == expected


def test_letters_beyond_the_choices_are_wrong() -> None:
    assert extract_choice("Answer: E", 4) is None
    # an explicit wrong answer is not second-guessed
    assert extract_choice("Answer: E, or maybe B", 4) is None
    assert extract_choice("Answer: C", 2) is None
    assert mc_idx_reward(["Answer: E"], correct_choice_idx=[4], choices=[CHOICES]) == [0.0]


def test_a_unique_verbatim_choice_is_the_last_resort() -> None:
    assert extract_choice("The shape is Green.", 4, CHOICES) == 1
    assert extract_choice("It is red or blue.", 4, CHOICES) is None  # two choices: no answer
    assert extract_choice("It is reddish.", 4, CHOICES) is None  # whole words only
    assert extract_choice("dark red", 4, ["red", "dark red"]) == 1  # the longer match contains the shorter
    assert extract_choice("The shape is green.", 4) is None  # no choices given


PIECES = [*"ABCDEabcde IiXx.:()[]\n答案是：Ｂ", "</think>", "answer", "red", "green"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12))
def test_extraction_never_fails_and_stays_in_range(pieces: list[str]) -> None:
    answer = extract_choice("".join(pieces), 4, CHOICES)
    assert answer is None or 0 <= answer < 4


def test_mc_idx_reward_scores_strings_and_conversational_completions() -> None:
    completions = ["<think>it is green</think> Answer: B", conversational("Answer: C"), "no idea", "答案：B"]
    assert mc_idx_reward(completions, correct_choice_idx=[1, 1, 1, 1], choices=[CHOICES] * 4) == [
        1.0,
        0.0,
        0.0,
        1.0,
    ]


def test_label_idx_is_a_synonym_of_correct_choice_idx() -> None:
    kwargs = {"prompts": ["q", "q"], "completion_ids": [[1], [2]], "choices": [CHOICES] * 2}
    assert mc_idx_reward(["Answer: A", "Answer: D"], label_idx=[0, 0], **kwargs) == [1.0, 0.0]


def test_mc_idx_reward_needs_a_label_column() -> None:
    with pytest.raises(ValueError, match="correct_choice_idx"):
        mc_idx_reward(["Answer: A"])


def test_number_of_choices_defaults_to_the_choices_column_then_four() -> None:
    assert mc_idx_reward(["Answer: E"], correct_choice_idx=[4], choices=[list("abcde")]) == [1.0]
    assert mc_idx_reward(["Answer: D"], correct_choice_idx=[3]) == [1.0]
    assert mc_idx_reward(["Answer: E"], correct_choice_idx=[4]) == [0.0]


def test_columns_may_arrive_as_tensors_or_tuples() -> None:
    import torch

    labels = torch.tensor([1, 2])
    choices = (tuple(CHOICES), tuple(CHOICES))
    assert mc_idx_reward(["Answer: B", "green"], correct_choice_idx=labels, choices=choices) == [1.0, 0.0]
    assert mdi_reward(["x", "x"], mdi=torch.tensor([1.0, float("nan")]), mdi_tolerance=[2.0, 2.0]) == [
        1.0,
        None,
    ]


# --- format -----------------------------------------------------------------------------------------------------

FORMAT_CASES = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>\nThis is my reasoning.\nThis is my answer.",
    "<think>red</think> Answer: A",
    " <think>red</think> Answer: A",
    "<think>a<think>b</think>",
    "<think></think>",
    "Answer: A",
    "<think>x</think><think>y</think>",
    "",
]


@pytest.mark.parametrize("text", FORMAT_CASES)
def test_think_format_reward_equals_trl(text: str) -> None:
    from trl.rewards import think_format_reward as trl_think_format_reward

    assert think_format_reward([conversational(text)]) == trl_think_format_reward([conversational(text)])
    assert think_format_reward([text]) == trl_think_format_reward([conversational(text)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "\n", "a", " ", "Answer: B"]), max_size=8))
def test_think_format_reward_equals_trl_on_generated_text(pieces: list[str]) -> None:
    from trl.rewards import think_format_reward as trl_think_format_reward

    text = "".join(pieces)
    assert think_format_reward([text]) == trl_think_format_reward([conversational(text)])


# --- MDI reward -------------------------------------------------------------------------------------------------


def test_mdi_balance_hand_values() -> None:
    assert mdi_balance(1.0) == 1.0
    assert mdi_balance(math.sqrt(2.0)) == pytest.approx(0.5)
    assert mdi_balance(1 / math.sqrt(2.0)) == pytest.approx(0.5)
    assert mdi_balance(2.0) == 0.0
    assert mdi_balance(8.0) == 0.0
    assert mdi_balance(4.0, tolerance=16.0) == pytest.approx(0.5)
    assert math.isnan(mdi_balance(math.nan))


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    st.floats(min_value=1.01, max_value=100.0),
)
def test_mdi_balance_is_within_0_and_1(mdi: float, tolerance: float) -> None:
    assert 0.0 <= mdi_balance(mdi, tolerance) <= 1.0


@given(st.floats(min_value=1.01, max_value=100.0))
def test_clip_shaping_gives_1_at_balance(tolerance: float) -> None:
    assert mdi_reward(["x"], mdi=[1.0], mdi_tolerance=tolerance) == [1.0]


def test_clip_shaping_is_two_balance_minus_one() -> None:
    rewards = mdi_reward(["x"] * 4, mdi=[1.0, math.sqrt(2.0), 4.0, 0.25])
    assert rewards == pytest.approx([1.0, 0.0, -1.0, -1.0])


def test_undefined_mdi_gives_none_and_contributes_zero_to_the_total() -> None:
    rewards = mdi_reward(["x"] * 3, mdi=[math.nan, None, 1.0])
    assert rewards == [None, None, 1.0]
    totals = total_rewards(
        {"mc_idx_reward": [1.0, 0.0, 1.0], "mdi_reward": rewards}, {"mc_idx_reward": 3.0, "mdi_reward": 1.0}
    )
    assert totals == [3.0, 0.0, 4.0]


def test_group_log_distance_hand_values() -> None:
    # d = |ln mdi| = [3 ln2, ln2] in units of ln R = ln 2; group mean 2 ln2 → 2·(2 − 3) = −2 → clipped to −1.
    assert mdi_reward(["x"] * 2, mdi=[8.0, 2.0], mdi_shaping="group_log_distance", num_generations=2) == (
        pytest.approx([-1.0, 1.0])
    )
    # d = [3, 2.5] ln2: mean 2.75 → 2·(2.75 − 3) = −0.5 and +0.5, though both are far beyond the clip band.
    rewards = mdi_reward(["x"] * 2, mdi=[8.0, 2.0**2.5], mdi_shaping="group_log_distance", num_generations=2)
    assert rewards == pytest.approx([-0.5, 0.5])
    assert mdi_reward(["x"] * 2, mdi=[8.0, 2.0**2.5]) == [-1.0, -1.0]  # the clip shaping has no signal there


def test_group_log_distance_is_per_group_and_skips_undefined() -> None:
    rewards = mdi_reward(
        ["x"] * 4,
        mdi=[4.0, 4.0, 0.5, math.nan],
        mdi_shaping="group_log_distance",
        num_generations=2,
    )
    assert rewards == [0.0, 0.0, 0.0, None]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=4, max_size=4))
def test_group_log_distance_is_bounded_and_prefers_balance(mdis: list[float]) -> None:
    rewards = mdi_reward(["x"] * 4, mdi=mdis, mdi_shaping="group_log_distance", num_generations=4)
    assert all(-1.0 <= r <= 1.0 for r in rewards)
    distances = [abs(math.log(m)) for m in mdis]
    for i in range(4):
        for j in range(4):
            if distances[i] < distances[j]:
                assert rewards[i] >= rewards[j]


def test_group_log_distance_needs_num_generations() -> None:
    with pytest.raises(ValueError, match="num_generations"):
        mdi_reward(["x"] * 3, mdi=[1.0] * 3, mdi_shaping="group_log_distance")
    with pytest.raises(ValueError, match="num_generations"):
        mdi_reward(["x"] * 3, mdi=[1.0] * 3, mdi_shaping="group_log_distance", num_generations=2)


def test_unknown_shaping_is_refused() -> None:
    with pytest.raises(ValueError, match="mdi_shaping"):
        mdi_reward(["x"], mdi=[1.0], mdi_shaping="square")


# --- total and registry -----------------------------------------------------------------------------------------


def test_total_reward_is_the_weighted_sum() -> None:
    per_func = {"mc_idx_reward": [1.0, 0.0], "think_format_reward": [1.0, 1.0], "mdi_reward": [0.5, -1.0]}
    weights = {"mc_idx_reward": 3.0, "think_format_reward": 1.0, "mdi_reward": 1.0}
    assert total_rewards(per_func, weights) == [4.5, 0.0]


def test_total_reward_of_an_unscorable_rollout_is_nan() -> None:
    totals = total_rewards({"mdi_reward": [None, 1.0]}, {"mdi_reward": 1.0})
    assert math.isnan(totals[0]) and totals[1] == 1.0


def test_total_reward_refuses_missing_weights_and_ragged_lists() -> None:
    with pytest.raises(ValueError, match="weight"):
        total_rewards({"mdi_reward": [1.0]}, {})
    with pytest.raises(ValueError, match="length"):
        total_rewards({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})


def test_registry_holds_the_config_defaults_and_the_free_form_accuracy_reward() -> None:
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.rl.rewards import DEFAULT_REWARD_FUNCS as REWARD_NAMES

    assert tuple(n for n in REWARD_FUNCTIONS if n in REWARD_NAMES) == REWARD_NAMES
    assert set(REWARD_FUNCTIONS) - set(REWARD_NAMES) == {"accuracy_reward"}
    assert tuple(DapoConfig().reward_funcs) == REWARD_NAMES


def test_score_rollouts_passes_round_columns_and_config_values_as_keyword_lists_trl_style() -> None:
    import polars as pl

    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.rl.rewards import score_rollouts

    table = pl.DataFrame({
        "question": ["q?", "q?"], "choices": [CHOICES, CHOICES], "correct_choice_idx": [1, 1],
        "completion": ["<think>a</think> Answer: B", "Answer: A"], "completion_ids": [[5, 6], [7]],
        "completion_length": [2, 1], "is_eos": [True, False],
    })
    attention = pl.DataFrame({"attn/all/mdi": [1.0, math.nan], "attn/late/mdi": [math.sqrt(2.0)] * 2})
    config = DapoConfig(num_generations=2, max_completion_length=4,
                        reward_funcs=["mc_idx_reward", "think_format_reward", "mdi_reward",
                                      "tests.custom_rewards:length_penalty"], reward_weights=[1.0] * 4)
    scored = score_rollouts(config, table, attention)
    assert list(scored) == ["mc_idx_reward", "think_format_reward", "mdi_reward", "length_penalty"]
    assert scored["mc_idx_reward"] == [1.0, 0.0] and scored["think_format_reward"] == [1.0, 0.0]
    assert scored["mdi_reward"][0] == 1.0 and math.isnan(scored["mdi_reward"][1])  # None (no MDI) -> NaN
    assert scored["length_penalty"] == [-0.5, -0.25]
    late = score_rollouts(config.replace(mdi_reward_stage="late"), table, attention)
    assert late["mdi_reward"] == pytest.approx([0.0, 0.0])  # MDI √2 with tolerance 2: balance 0.5
    # Before the teacher-forced pass (dynamic-sampling refill) the attention reward is left out.
    assert list(score_rollouts(config, table)) == ["mc_idx_reward", "think_format_reward", "length_penalty"]


def test_a_reward_returning_the_wrong_number_of_values_is_named() -> None:
    from dapo_ops.rl.rewards import score_completions

    with pytest.raises(ValueError, match="reward 'short' returned 1 values for 2 completions"):
        score_completions({"short": lambda completions, **kw: [1.0]}, prompts=["a", "b"], completions=["x", "y"],
                          completion_ids=[[], []])
