"""The run store: atomic writes, checkpoint completeness, leftovers, the run lock."""

import json
import os

import polars as pl
import pytest

from dapo_ops.store.layout import (
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


def test_round_files_keep_the_on_disk_layout(tmp_path):
    files = RunStore(tmp_path, "r").round("ckpt-0002")
    assert files.dir == tmp_path / "runs" / "r" / "rounds" / "ckpt-0002"
    names = {name: getattr(files, name).name for name in (
        "rollouts_pt", "rollouts_parquet", "rollouts_json", "old_logps", "attention_parquet", "attention_json",
        "rewards", "update", "metrics", "health_rewards", "health_update", "done", "log")}
    assert names == {
        "rollouts_pt": "rollouts.pt", "rollouts_parquet": "rollouts.parquet", "rollouts_json": "rollouts.json",
        "old_logps": "old_logps.pt", "attention_parquet": "attention.parquet", "attention_json": "attention.json",
        "rewards": "rewards.parquet", "update": "update.json", "metrics": "metrics.json",
        "health_rewards": "health_rewards.json", "health_update": "health_update.json", "done": "DONE",
        "log": "terminal.log"}
    assert {getattr(files, name).parent for name in names} == {files.dir}


def test_an_update_record_reads_and_writes_the_same_json_bytes(tmp_path):
    from dapo_ops.run.round_files import UpdateRecord

    written = {
        "steps": [{"loss": 0.25, "grad_norm": 1.5}], "summary": {"loss": 0.25, "entropy": 2.0},
        "state": {"checkpoint": "ckpt-0001", "round": 1, "global_step": 2, "num_tokens": 640, "source_model": "x",
                  "parent": "ckpt-0000", "epoch": 0.5},
        "eval": {"eval/accuracy": 0.75, "eval/format": 1.0}, "round_tokens": 640, "num_processes": 1,
        "num_rollouts_used": 32, "seconds": {"update": 1.0, "eval": 0.5, "save": 0.1},
    }
    old = write_json_atomic(tmp_path / "old" / "update.json", written)  # as the dict writer left it
    record = UpdateRecord.read(old)
    assert (record.next_checkpoint, record.global_step, record.num_tokens, record.epoch) == ("ckpt-0001", 2, 640, 0.5)
    assert (record.loss, record.eval_accuracy) == (0.25, 0.75)
    assert record.write(tmp_path / "new" / "update.json").read_bytes() == old.read_bytes()


def test_an_update_record_missing_a_key_names_the_file(tmp_path):
    from dapo_ops.run.round_files import UpdateRecord

    path = write_json_atomic(tmp_path / "update.json", {"steps": [], "summary": {}})
    with pytest.raises(ValueError, match=f"{path} lacks state"):
        UpdateRecord.read(path)


def test_read_torch_loads_tensors_and_refuses_arbitrary_objects(tmp_path):
    import torch

    from dapo_ops.store.layout import UnsafeFileError, read_torch, write_torch_atomic

    path = write_torch_atomic(tmp_path / "ckpt-0003" / "state.pt", {"x": torch.arange(3), "n": [1, 2.5, "a"]})
    loaded = read_torch(path)
    assert torch.equal(loaded["x"], torch.arange(3)) and loaded["n"] == [1, 2.5, "a"]
    write_torch_atomic(path, {"x": os.system})
    with pytest.raises(UnsafeFileError, match="ckpt-0003/state.pt contains pickled code objects"):
        read_torch(path)
