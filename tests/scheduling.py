"""How `make test` spreads the suite over pytest-xdist workers.

A work unit is a test module, or every test marked `xdist_group(name)` (the modules that share a costly session
fixture): its module- and session-scoped fixtures are then built once, not once per worker. Modules with heavy
end-to-end cases (`slow`, `browser`) are collected first, the most heavy cases first, so the light modules fill
in at the end and the two workers finish close together.
"""

from __future__ import annotations

from collections import Counter

import pytest
from xdist.scheduler import LoadScopeScheduling

HEAVY_MARKS = ("slow", "browser")


class ModuleScheduling(LoadScopeScheduling):
    """LoadScope scheduling by module (classes do not split a module) or by `xdist_group`, in collection order."""

    def __init__(self, config: pytest.Config, log=None) -> None:  # noqa: ANN001 - xdist's Producer
        config.option.loadscopereorder = False  # keep `heavy_first`'s order
        super().__init__(config, log)

    def _split_scope(self, nodeid: str) -> str:
        # --dist loadgroup appends "@<group>" to the ids of tests marked xdist_group (after any parameters).
        if nodeid.rfind("@") > nodeid.rfind("]"):
            return nodeid.rsplit("@", 1)[-1]
        return nodeid.split("::", 1)[0]


def _unit(item: pytest.Item) -> str:
    group = item.get_closest_marker("xdist_group")
    if group is not None:
        return group.args[0] if group.args else group.kwargs.get("name", "")
    return item.nodeid.split("::", 1)[0]


def heavy_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """`items` with the work units that hold the most heavy cases first; the order inside a unit, and of
    units with equally many, is kept."""
    heavy = Counter(_unit(item) for item in items if any(item.get_closest_marker(m) for m in HEAVY_MARKS))
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(_unit(item), index)
    return sorted(items, key=lambda item: (-heavy[_unit(item)], first_seen[_unit(item)]))
