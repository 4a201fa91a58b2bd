"""How `make test` spreads the suite over pytest-xdist workers.

A work unit is a test module, or the modules of one entry in `UNITS` (they share a costly session fixture), so
that module- and session-scoped fixtures are built once, not once per worker. Units with the most heavy
end-to-end cases (`slow`, `browser`) are collected first, so that the light ones fill in at the end and the
workers finish close together.

(pytest-xdist's own `xdist_group` mark does not group under pytest 9, whose node ids no longer come from the
`_nodeid` attribute xdist rewrites; hence a table here.)
"""

from __future__ import annotations

from collections import Counter

import pytest
from xdist.scheduler import LoadScopeScheduling

HEAVY_MARKS = ("slow", "browser")

# Modules that share a session fixture (tests/conftest.py) -> the unit they run in together.
UNITS: dict[str, str] = {
    "tests/test_pipeline.py": "trained_run",
    "tests/test_ui.py": "trained_run",
    "tests/test_lora_run.py": "trained_run",
}


def unit_of(nodeid: str) -> str:
    """The work unit of a test: its module, or the shared-fixture unit `UNITS` puts the module in."""
    module = nodeid.split("::", 1)[0]
    return UNITS.get(module, module)


class ModuleScheduling(LoadScopeScheduling):
    """LoadScope scheduling by `unit_of` (classes do not split a module), in collection order."""

    def __init__(self, config: pytest.Config, log=None) -> None:  # noqa: ANN001 - xdist's Producer
        config.option.loadscopereorder = False  # keep `heavy_first`'s order
        super().__init__(config, log)

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)


def heavy_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """`items` with the units that hold the most heavy cases first; the order inside a unit, and of units with
    equally many, is kept."""
    heavy = Counter(unit_of(item.nodeid) for item in items if any(item.get_closest_marker(m) for m in HEAVY_MARKS))
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(unit_of(item.nodeid), index)
    return sorted(items, key=lambda item: (-heavy[unit_of(item.nodeid)], first_seen[unit_of(item.nodeid)]))
