"""A reward defined outside the project, as a user would add one: configured by its import path
`tests.custom_rewards:length_penalty`."""

from __future__ import annotations

from typing import Any

NOT_A_FUNCTION = 1.0  # for the config test: an import path must name a callable


def length_penalty(completions: list[Any], completion_length: list[int], max_completion_length: int,
                   **kwargs: Any) -> list[float]:
    """-length / max_completion_length: reads a round column and a config value, as TRL rewards read kwargs."""
    return [-float(n) / max_completion_length for n in completion_length]
