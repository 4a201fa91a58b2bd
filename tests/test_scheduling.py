"""How `make test` splits the suite over pytest-xdist workers (tests/scheduling.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.scheduling import UNITS, heavy_first, unit_of


@dataclass
class Item:
    nodeid: str
    marks: tuple[str, ...] = field(default_factory=tuple)

    def get_closest_marker(self, name: str):  # noqa: ANN201 - pytest.Item's API, a truthy stand-in
        return name if name in self.marks else None


def test_a_unit_is_a_module_or_the_modules_that_share_a_session_fixture():
    assert unit_of("tests/test_loss.py::test_a[x-y]") == "tests/test_loss.py"
    assert unit_of("tests/test_loss.py::TestClass::test_b") == "tests/test_loss.py"  # a class does not split it
    shared = [module for module, unit in UNITS.items() if unit == "trained_run"]
    assert len(shared) >= 2 and {unit_of(f"{m}::test_x") for m in shared} == {"trained_run"}


def test_units_with_more_heavy_cases_come_first_keeping_the_order_within_each():
    items = [Item("tests/test_a.py::t1"), Item("tests/test_b.py::t1", ("slow",)), Item("tests/test_a.py::t2"),
             Item("tests/test_c.py::t1", ("slow",)), Item("tests/test_c.py::t2", ("browser",)),
             Item("tests/test_b.py::t2")]
    assert [i.nodeid for i in heavy_first(items)] == [
        "tests/test_c.py::t1", "tests/test_c.py::t2", "tests/test_b.py::t1", "tests/test_b.py::t2",
        "tests/test_a.py::t1", "tests/test_a.py::t2"]
