"""The tracking journal on its own: local files only, no MLflow involved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_ops.tracking.journal import Journal, encode_metrics


def test_the_journal_works_without_importing_mlflow(tmp_path: Path) -> None:
    code = ("import sys; from dapo_ops.tracking.journal import Journal; j = Journal(sys.argv[1]); "
            "j.append_round('ckpt-0000', 1, {1: {'reward': 1.0}}, [], {}); j.set_status('FINISHED'); "
            "assert len(j.pending(None)) == 1; assert 'mlflow' not in sys.modules, 'mlflow was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mlflow")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr


def test_a_round_is_pending_until_marked_sent_to_that_run(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "mlflow")
    with journal.locked():
        entry = journal.append_round("ckpt-0000", 8, {8: encode_metrics({"reward": 0.5})}, [], {"a": "b"})
    assert [e["key"] for e in journal.pending(None)] == ["ckpt-0000"]
    journal.mark_sent(entry, "run-1")
    assert journal.pending("run-1") == []
    assert [e["key"] for e in journal.pending("run-2")] == ["ckpt-0000"]  # another store's run lacks it
    [line] = journal.journal_path.read_text().splitlines()
    assert json.loads(line)["metrics"] == {"8": {"reward": 0.5}} and json.loads(line)["tags"] == {"a": "b"}


def test_a_relogged_key_keeps_its_first_timestamp_and_only_its_latest_entry_is_pending(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "mlflow")
    first = journal.append_round("ckpt-0000", 1, {1: {"reward": 0.1}}, [], {})
    second = journal.append_round("ckpt-0001", 2, {2: {"reward": 0.2}}, [], {})
    again = journal.append_round("ckpt-0000", 1, {1: {"reward": 0.9}}, [], {})
    assert again["timestamp_ms"] == first["timestamp_ms"] < second["timestamp_ms"]
    assert [e["entry_id"] for e in journal.pending(None)] == [second["entry_id"], again["entry_id"]]


def test_a_torn_line_is_skipped_and_the_next_append_still_parses(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "mlflow")
    journal.append_round("ckpt-0000", 1, {1: {"reward": 1.0}}, [], {})
    with open(journal.journal_path, "a") as f:
        f.write('{"key": "ckpt-0001", "st')
    journal.append_round("ckpt-0001", 2, {2: {"reward": 2.0}}, [], {})
    assert [e["key"] for e in journal.pending(None)] == ["ckpt-0000", "ckpt-0001"]


def test_non_finite_values_are_strict_json_and_bad_values_name_the_metric() -> None:
    assert encode_metrics({"x": float("nan"), "y": float("-inf")}) == {"x": "NaN", "y": "-Infinity"}
    with pytest.raises(ValueError, match="'reward' has the non-numeric value"):
        encode_metrics({"reward": "high"})


def test_a_recorded_status_is_pending_per_tracking_uri_until_that_run_shows_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "mlflow")
    assert journal.pending_status("sqlite:///a.db", "run-1") is None  # nothing recorded
    journal.set_status("FINISHED")
    assert journal.pending_status("sqlite:///a.db", None) == "FINISHED"  # no run yet: still to send
    journal.mark_status_sent("sqlite:///a.db", "run-1", "FINISHED")
    assert journal.pending_status("sqlite:///a.db", "run-1") is None
    assert journal.pending_status("http://elsewhere", "run-9") == "FINISHED"
    journal.set_status("RUNNING")  # a resumed run: the new status is pending again
    assert journal.pending_status("sqlite:///a.db", "run-1") == "RUNNING"
    journal.mark_status_sent("sqlite:///a.db", "run-1", "FINISHED")  # a stale confirmation changes nothing
    assert journal.pending_status("sqlite:///a.db", "run-1") == "RUNNING"
    with pytest.raises(ValueError, match="'DONE' is not one of RUNNING, FINISHED, FAILED, KILLED"):
        journal.set_status("DONE")
