"""The run store: atomic writes, checkpoint completeness, leftovers, the run lock."""

import json
import os

import polars as pl
import pytest

from dapo_ops.store import (
    COMPLETE_MARKER,
    RunLockedError,
    RunStore,
    atomic_directory,
    checkpoint_index,
    checkpoint_key,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)


def test_checkpoint_keys_round_trip():
    assert checkpoint_key(3) == "ckpt-0003"
    assert checkpoint_index("ckpt-0012") == 12
    with pytest.raises(ValueError, match="ckpt-NNNN"):
        checkpoint_index("step-3")


def test_atomic_text_write_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "reports" / "a.md"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["a.md"]


def test_atomic_json_and_parquet_writes(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"b": 1, "a": [1.5]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1.5], "b": 1}
    frame = pl.DataFrame({"x": [1, 2]})
    write_parquet_atomic(tmp_path / "x.parquet", frame)
    assert pl.read_parquet(tmp_path / "x.parquet").equals(frame)


def test_failed_atomic_directory_leaves_nothing_readable(tmp_path):
    final = tmp_path / "checkpoints" / "ckpt-0001"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_only_marked_checkpoints_count_as_complete(tmp_path):
    store = RunStore(tmp_path, "demo")
    with atomic_directory(store.checkpoint_dir("ckpt-0000")) as tmp:
        (tmp / "state.json").write_text("{}")
    # A directory without the marker, as a crash in an older layout would leave.
    store.checkpoint_dir("ckpt-0001").mkdir(parents=True)
    assert (store.checkpoint_dir("ckpt-0000") / COMPLETE_MARKER).exists()
    assert store.complete_checkpoints() == ["ckpt-0000"]
    assert store.latest_checkpoint() == "ckpt-0000"
    with pytest.raises(FileNotFoundError, match="ckpt-0001.*incomplete"):
        store.require_checkpoint("ckpt-0001")


def test_atomic_directory_replaces_an_existing_copy(tmp_path):
    final = tmp_path / "ckpt-0000"
    for content in ("first", "second"):
        with atomic_directory(final) as tmp:
            (tmp / "w").write_text(content)
    assert (final / "w").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000"]


def test_remove_temporaries_cleans_interrupted_writes(tmp_path):
    store = RunStore(tmp_path, "demo")
    leftover_dir = store.checkpoints_dir / ".tmp-ckpt-0002.abc"
    leftover_dir.mkdir(parents=True)
    (leftover_dir / "model.safetensors").write_bytes(b"x")
    leftover_file = store.round_dir("ckpt-0001") / ".tmp-rewards.parquet.xyz"
    leftover_file.parent.mkdir(parents=True)
    leftover_file.write_bytes(b"x")
    keep = store.round_dir("ckpt-0001") / "rollouts.parquet"
    keep.write_bytes(b"data")
    removed = store.remove_temporaries()
    assert set(removed) == {leftover_dir, leftover_file}
    assert keep.exists() and not leftover_dir.exists() and not leftover_file.exists()


def test_second_holder_of_a_run_lock_is_refused_with_a_clear_message(tmp_path):
    store = RunStore(tmp_path, "demo")
    with store.lock(), pytest.raises(RunLockedError, match=f"'demo' is already in use by pid {os.getpid()}"), \
            store.lock():
        pass
    with store.lock():  # released after the first holder finished
        pass


def test_different_run_names_lock_independently(tmp_path):
    with RunStore(tmp_path, "a").lock(), RunStore(tmp_path, "b").lock():
        assert (tmp_path / "runs" / "a" / ".lock").exists()
