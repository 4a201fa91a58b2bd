"""A LoRA run end to end (adapter-only checkpoints, re-analysis, merged export), checkpoint retention
(`save_total_limit`, optimizer state only in the newest) and the disk-space check before a round."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, _restore_env, _set_env, run_make

pytestmark = pytest.mark.slow  # a 3-round LoRA `make run`

RUN = {
    **TINY_RUN,
    "run_name": "lora-small",
    "eval_subset_size": 8,  # the greedy answers of the merged export are compared on every eval example
    "warmup_steps": 4,
    "use_peft": True,
    "lora_r": 8,
    "beta": 0.04,  # the reference pass runs through the adapter-disabled model
    "save_total_limit": 2,
    "max_rounds": 3,
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.store.layout import RunStore
    from pipelines.cli import run_training

    root = tmp_path_factory.mktemp("lora_root")
    previous = _set_env({"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
                         "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"})
    try:
        config = DapoConfig(**RUN)
        run_training(config, rounds=3, root=root, echo=lambda _: None)
        yield RunStore(root, config.run_name), config
    finally:
        _restore_env(previous)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_lora_checkpoints_hold_the_adapter_only_at_under_a_tenth_of_a_full_checkpoint(lora_run, trained_run):
    from dapo_ops.store.layout import RunStore

    store, _ = lora_run
    newest = store.checkpoint_dir("ckpt-0003")
    names = {p.name for p in newest.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)
    full = RunStore(trained_run.root, trained_run.run_name).checkpoint_dir("ckpt-0002")  # weights + AdamW
    assert _bytes(newest) <= 0.10 * _bytes(full), (_bytes(newest), _bytes(full))


def test_save_total_limit_2_leaves_two_trained_checkpoints_with_weights_after_3_rounds(lora_run):
    from dapo_ops.run import retention

    store, _ = lora_run
    assert store.complete_checkpoints() == [f"ckpt-000{i}" for i in range(4)]
    assert retention.checkpoints_with_weights(store) == ["ckpt-0000", "ckpt-0002", "ckpt-0003"]
    for key in ("ckpt-0001",):
        assert {p.name for p in store.checkpoint_dir(key).iterdir()} == {"state.json", "COMPLETE", "PRUNED",
                                                                       "PRUNED.observed"}
        assert store.round(key).done.exists() and (store.reports_dir(key) / "rollout_results.md").exists()


def test_only_the_newest_checkpoint_keeps_optimizer_state(lora_run, trained_run):
    from dapo_ops.store.layout import RunStore

    for store in (lora_run[0], RunStore(trained_run.root, trained_run.run_name)):  # LoRA and the defaults
        newest = store.latest_checkpoint()
        assert [k for k in store.complete_checkpoints()
                if (store.checkpoint_dir(k) / "optimizer.pt").exists()] == [newest]


def test_reanalysis_of_a_lora_checkpoint_works_and_of_a_pruned_one_says_why_not(lora_run, capsys):
    from pipelines import cli

    store, _ = lora_run
    report = store.reports_dir("ckpt-0002") / "attention_diagnostics.md"
    report.unlink()
    assert cli.main(["reanalyze", "--checkpoint", "ckpt-0002", "--run-name", store.run_name]) == 0
    assert report.exists()
    assert cli.main(["reanalyze", "--checkpoint", "ckpt-0001", "--run-name", store.run_name]) == 2
    err = capsys.readouterr().err
    assert "checkpoint ckpt-0001 of run 'lora-small' cannot be re-analysed" in err
    assert "pruned by save_total_limit=2" in err and "Checkpoints with weights: ckpt-0000, ckpt-0002, ckpt-0003" in err


def test_pruned_partitions_show_in_dagster_as_not_reanalysable(lora_run):
    import dagster as dg

    store, _ = lora_run
    instance = dg.DagsterInstance.from_config(str(store.root / "dagster"))
    records = instance.fetch_observations(dg.AssetKey("attention_metrics"), limit=20).records
    observed = {r.partition_key: r.asset_observation.metadata["reanalysable"].value for r in records}
    assert observed == {"ckpt-0001": False}


def test_make_export_merge_writes_a_model_transformers_loads_with_the_same_greedy_answers(lora_run, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from dapo_ops.models import loading as models
    from dapo_ops.rollout.engines import make_engine
    from dapo_ops.run import phases as training
    from dapo_ops.run.checkpoint_policy import load_checkpoint_policy

    store, config = lora_run
    out = tmp_path / "merged"
    done = run_make("export", store.root, CHECKPOINT="ckpt-0003", RUN_NAME=store.run_name, MERGE=1, OUT=out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"exported ckpt-0003 of {store.run_name} (LoRA merged): {out}")
    assert not any("lora_" in k for k in AutoModelForImageTextToText.from_pretrained(out).state_dict())
    assert {"chat_template.json", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}

    def answers(policy):
        rows = training.load_split(store, "eval").head(config.eval_subset_size)
        batch = make_engine(config, policy).generate(training.encode_rows(policy, rows), num_generations=1,
                                                     max_completion_length=config.max_completion_length,
                                                     temperature=0.0, top_p=1.0, seed=0)
        return batch.completions

    with torch.no_grad():
        assert answers(models.load_policy(out)) == answers(load_checkpoint_policy(store, "ckpt-0003", config))


def test_a_full_disk_stops_the_run_before_the_round_and_loses_nothing(lora_run, monkeypatch):
    import shutil

    from dapo_ops.run import retention
    from pipelines.cli import run_training

    store, config = lora_run

    def digest() -> dict[str, str]:
        return {str(p.relative_to(store.run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(store.run_dir.rglob("*")) if p.is_file() and p.name != ".lock"
                and not {"rounds", "mlflow"} & set(p.relative_to(store.run_dir).parts)}  # MLflow: the run FAILED

    before = digest()
    usage = shutil.disk_usage(store.root)
    monkeypatch.setattr(retention.shutil, "disk_usage", lambda _: usage._replace(free=1_000_000))
    with pytest.raises(retention.DiskSpaceError, match=r"round ckpt-0003 .* needs about .* MB .* has 976.6 KB free"):
        run_training(config.replace(max_rounds=4), rounds=4, root=store.root, echo=lambda _: None)
    assert digest() == before
    assert store.latest_checkpoint() == "ckpt-0003" and not store.round_dir("ckpt-0003").exists()
