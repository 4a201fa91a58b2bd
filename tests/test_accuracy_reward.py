"""accuracy_reward: free-form completions with known right and wrong answers (numbers, formulas, words)."""

from __future__ import annotations

import pytest

from dapo_ops import accuracy_reward as exported
from dapo_ops.data.answers import answer_kind, final_answer
from dapo_ops.rl.rewards import REWARD_FUNCTIONS, accuracy_reward, resolve_reward


def _score(completion: str, solution: str) -> float | None:
    return accuracy_reward([completion], solution=[solution])[0]


@pytest.mark.parametrize(("completion", "solution"), [
    ("<think>count them</think> Answer: 3", "3"),
    ("<think>count them</think> Answer: 3.0", "3"),
    ("<think>count them</think> Answer: 3", "3.00"),
    ("<think>half</think> Answer: 1/2", "\\frac{1}{2}"),
    ("<think>half</think> The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("<think>half</think> Answer: 0.5", "1/2"),
    ("<think>algebra</think> Answer: $1 + x^2$", "x^2+1"),
    ("<think>geometry</think> Answer: \\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
    ("<think>look</think> Answer: The Cat.", "cat"),
    ("<think>look</think> Answer: a red circle!", "Red circle"),
    ("<think>look</think>\nThere are 4 shapes.", "4"),
])
def test_right_answers_score_one(completion: str, solution: str) -> None:
    assert _score(completion, solution) == 1.0


@pytest.mark.parametrize(("completion", "solution"), [
    ("<think>the answer is 3</think> Answer: 4", "3"),
    ("<think>half</think> Answer: 1/3", "\\frac{1}{2}"),
    ("<think>algebra</think> Answer: x^2-1", "x^2+1"),
    ("<think>look</think> Answer: dog", "cat"),
    ("<think>Answer: 3</think>", "3"),
    ("", "3"),
])
def test_wrong_or_missing_answers_score_zero(completion: str, solution: str) -> None:
    assert _score(completion, solution) == 0.0


def test_only_the_text_after_the_last_think_counts() -> None:
    assert final_answer("<think>Answer: 1</think><think>x</think> Answer: 2") == "2"
    assert final_answer("<think>x</think> so \\boxed{7}") == "7"


def test_rows_without_a_solution_are_not_applicable_and_conversational_completions_work() -> None:
    completions = [[{"role": "assistant", "content": "Answer: 5"}], "Answer: B"]
    assert accuracy_reward(completions, solution=["5", None]) == [1.0, None]


def test_it_is_registered_under_its_name_and_exported_from_the_package() -> None:
    assert REWARD_FUNCTIONS["accuracy_reward"] is accuracy_reward
    assert resolve_reward("accuracy_reward") is accuracy_reward
    assert exported is accuracy_reward


def test_answer_kinds() -> None:
    assert [answer_kind(s) for s in ("3", "1/2", "0.25", "x^2+1", "\\frac{\\pi}{3}", "red", "New York")] == [
        "number", "number", "number", "formula", "formula", "word", "word"]


def test_the_warm_start_teaches_a_free_form_row_its_solution_after_answer() -> None:
    from dapo_ops.train.warmstart import target_completion

    target = target_completion({"choices": None, "solution": "3", "rationales": ["There are 3 shapes."]})
    assert target == "<think>There are 3 shapes.</think> Answer: 3"
    assert accuracy_reward([target], solution=["3"]) == [1.0]
