"""The Dagster pipeline end to end: 2 small rounds into a temporary data root (real instance, real MLflow), and 3
tiny ones for the model URI of ckpt-0003."""

from __future__ import annotations

import datetime
import hashlib
import math
from pathlib import Path

import dagster as dg
import pytest

from dapo_ops.reporting.reports import ROUND_METRIC_NAMES
from tests.conftest import run_make

pytestmark = pytest.mark.slow

REPORTS = ("rollout_results.md", "attention_diagnostics.md", "run_terminal.md")


def _mlflow_run(trained_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained_run.tracking_uri)
    experiment = client.get_experiment_by_name("dapo-vlm")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`dapo.run_name` = '{trained_run.run_name}'")
    training = [r for r in runs if "dapo.reanalysis_of" not in r.data.tags]
    assert len(training) == 1
    return client, training[0]


def test_definitions_load_with_the_eight_assets_in_one_group():
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {"dataset", "base_checkpoint", "rollouts", "attention_metrics", "rewards", "policy_update",
                    "attention_report", "training_report"}
    assert {graph.get(dg.AssetKey(k)).group_name for k in keys} == {"dapo"}


def test_checkpoints_and_partitions_exist_for_every_round(trained_run):
    from dapo_ops.store.layout import RunStore

    store = RunStore(trained_run.root, trained_run.run_name)
    assert store.complete_checkpoints() == ["ckpt-0000", "ckpt-0001", "ckpt-0002"]
    instance = dg.DagsterInstance.from_config(str(trained_run.root / "dagster"))
    assert instance.get_dynamic_partitions("checkpoints") == ["ckpt-0000", "ckpt-0001", "ckpt-0002"]
    assert not list(store.run_dir.rglob(".tmp-*"))


def test_every_round_materialized_every_asset(trained_run):
    instance = dg.DagsterInstance.from_config(str(trained_run.root / "dagster"))
    for key in ("rollouts", "attention_metrics", "rewards", "policy_update", "attention_report", "training_report"):
        partitions = instance.get_materialized_partitions(dg.AssetKey(key))
        assert partitions == {"ckpt-0000", "ckpt-0001"}, key


def test_reports_are_written_for_every_round(trained_run):
    reports = trained_run.root / "runs" / trained_run.run_name / "reports"
    for key in ("ckpt-0000", "ckpt-0001"):
        for name in REPORTS:
            assert (reports / key / name).stat().st_size > 0
        terminal = (reports / key / "run_terminal.md").read_text()
        assert "📊 Logging 44 metrics for train mode" in terminal
        assert "| Stage | MDI Mean | MDI Std | AEI Text | AEI Vision |" in (reports / key / "rollout_results.md").read_text()


def test_mlflow_has_each_of_the_44_metrics_once_per_round_at_its_global_step(trained_run):
    client, run = _mlflow_run(trained_run)
    steps_per_round = 2  # steps_per_generation x num_iterations of the small run
    for name in ROUND_METRIC_NAMES:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [steps_per_round, 2 * steps_per_round], name
        assert all(math.isfinite(m.value) for m in history), name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [0, 2, 4]


def test_mlflow_run_has_config_params_tags_and_report_artifacts(trained_run):
    client, run = _mlflow_run(trained_run)
    assert run.data.params["num_generations"] == "4"
    assert run.data.params["loss_type"] == "dapo"
    assert run.data.tags["dapo.checkpoint"] == "ckpt-0001"
    assert "dagster.run_id" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports/ckpt-0001")}
    assert {f"reports/ckpt-0001/{name}" for name in REPORTS} <= artifacts


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_make_reanalyze_touches_only_the_attention_analysis(trained_run):
    client, run = _mlflow_run(trained_run)
    run_dir = trained_run.root / "runs" / trained_run.run_name
    protected = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and (
        "checkpoints" in p.parts or p.name in ("rollouts.parquet", "rollouts.pt", "rewards.parquet", "old_logps.pt",
                                               "update.json", "metrics.json", "rollout_results.md"))]
    before = _digest(protected)
    metrics_before = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
                      for name in ("attention/all/mdi", "reward", "visual/kl_mean")}
    report = run_dir / "reports" / "ckpt-0001" / "attention_diagnostics.md"
    done = run_make("reanalyze", trained_run.root, CHECKPOINT="ckpt-0001", RUN_NAME=trained_run.run_name,
                    MDI_TOLERANCE="4.0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"re-analysed ckpt-0001 of {trained_run.run_name}: {report}" in done.stdout
    assert _digest(protected) == before
    assert {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            for name in metrics_before} == metrics_before
    assert "4.0" in report.read_text() or "4" in report.read_text()
    experiment = client.get_experiment_by_name("dapo-vlm")
    reanalysis = client.search_runs([experiment.experiment_id], filter_string="tags.`dapo.checkpoint` = 'ckpt-0001'")
    tagged = [r for r in reanalysis if r.data.tags.get("dapo.reanalysis_of")]
    assert tagged and tagged[0].info.run_id != run.info.run_id
    # The masked pass and the blind eval run in every re-analysis, into its own MLflow run: the training run's
    # visual/* history (one value per round) is untouched (metrics_before above).
    assert "## Visual dependency" in report.read_text()
    assert {"visual/kl_mean", "visual/kl_answer", "eval/blind_accuracy", "eval/visual_gain"} <= set(tagged[0].data.metrics)
    assert len(metrics_before["visual/kl_mean"]) == trained_run.rounds


def test_make_reanalyze_and_make_export_without_a_checkpoint_print_their_usage(trained_run):
    for target in ("reanalyze", "export"):
        done = run_make(target, trained_run.root)
        assert done.returncode == 2 and f"usage: make {target} CHECKPOINT=ckpt-NNNN" in done.stdout


def test_make_export_writes_a_model_directory_transformers_loads(trained_run, tmp_path):
    import json

    out = tmp_path / "ckpt-0002"
    done = run_make("export", trained_run.root, CHECKPOINT="ckpt-0002", RUN_NAME=trained_run.run_name, OUT=out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"exported ckpt-0002 of {trained_run.run_name}: {out}")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert {"model.safetensors", "tokenizer.json", "chat_template.json"} <= {p.name for p in out.iterdir()}


def test_make_sync_mlflow_finds_nothing_left_to_send_after_make_run(trained_run):
    done = run_make("sync-mlflow", trained_run.root, RUN_NAME=trained_run.run_name)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{trained_run.run_name}: sent 0 journaled round(s) to sqlite:///" in done.stdout


def test_sensor_requests_the_next_round_until_max_rounds(trained_run):
    from pipelines.resources import RunStoreResource
    from pipelines.sensors import next_round_request

    store = RunStoreResource(data_root=str(trained_run.root))
    # make run wrote max_rounds=2 into the run's config: ckpt-0002 is the last checkpoint.
    assert isinstance(next_round_request(trained_run.run_name, "ckpt-0002", store), dg.SkipReason)
    request = next_round_request(trained_run.run_name, "ckpt-0001", store)
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "ckpt-0001"
    # One run config for every asset of the round: the training_config resource (pipelines.config).
    assert request.run_config["resources"]["training_config"]["config"]["run_name"] == trained_run.run_name


def test_retrain_schedule_continues_the_latest_run_from_its_newest_checkpoint(trained_run, monkeypatch):
    from pipelines.definitions import defs

    monkeypatch.setenv("DAPO_VLM_HOME", str(trained_run.root))
    monkeypatch.setenv("DAPO_RETRAIN_ROUNDS", "3")
    schedule = defs.get_schedule_def("retrain")
    tick = datetime.datetime(2026, 11, 26, 3, 0, tzinfo=datetime.UTC)
    with dg.build_schedule_context(resources={"run_store": defs.resources["run_store"]},
                                   scheduled_execution_time=tick) as context:
        result = schedule(context)
    assert isinstance(result, dg.RunRequest)
    assert result.partition_key == "ckpt-0002"
    assert result.run_config["resources"]["training_config"]["config"]["max_rounds"] == 5
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_definitions_validate_from_the_workspace():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                             "workspace.yaml"], cwd=root, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_run_lists_its_runs_under_the_setup_run_and_training_round_jobs(trained_run):
    instance = dg.DagsterInstance.from_config(str(trained_run.root / "dagster"))
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dapo/run_name": trained_run.run_name}))
    training = [r for r in runs if r.job_name != "reanalysis"]
    assert sorted(r.job_name for r in training) == ["setup_run", "training_round", "training_round"]
    assert {r.tags["dapo/kind"] for r in training} == {"setup", "round"}
    assert sorted(r.tags["dagster/partition"] for r in training if r.job_name == "training_round") == [
        "ckpt-0000", "ckpt-0001"]


def _logged_models(client, run) -> list:
    return client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'",
                                       order_by=[{"field_name": "metrics.eval/accuracy", "ascending": False}])


def test_each_checkpoint_is_a_logged_model_of_the_run_at_its_step_with_its_eval_metrics(trained_run):
    from dapo_ops.store.layout import RunStore, read_json

    client, run = _mlflow_run(trained_run)
    models = _logged_models(client, run)
    assert sorted(m.name for m in models) == ["ckpt-0000", "ckpt-0001", "ckpt-0002"]
    assert all(m.status.value == "READY" for m in models)
    store = RunStore(trained_run.root, trained_run.run_name)
    for model in models:
        recorded = read_json(store.checkpoint_dir(model.name) / "state.json")["eval"]["eval/accuracy"]
        assert {m.key: m.value for m in model.metrics}["eval/accuracy"] == pytest.approx(recorded)
    accuracies = [{m.key: m.value for m in model.metrics}["eval/accuracy"] for model in models]
    assert accuracies == sorted(accuracies, reverse=True)  # the UI's sort by eval/accuracy
    steps = {o.model_id: o.step for o in client.get_run(run.info.run_id).outputs.model_outputs}
    assert sorted(steps[m.model_id] for m in models) == [0, 2, 4]


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory: pytest.TempPathFactory):
    """`make run ROUNDS=3` of conftest's TINY_RUN (a few seconds a round), for ckpt-0003."""
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.tracking.facade import default_tracking_uri
    from pipelines.cli import run_training
    from tests.conftest import TINY_RUN, TrainedRun, _restore_env, _set_env

    root = tmp_path_factory.mktemp("three_rounds")
    uri = default_tracking_uri(root)
    previous = _set_env({"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
                         "MLFLOW_TRACKING_URI": uri})
    try:
        config = DapoConfig(run_name="three", **TINY_RUN)
        run_training(config, rounds=3, root=root, echo=lambda _: None)
    finally:
        _restore_env(previous)
    return TrainedRun(root=root, run_name=config.run_name, rounds=3, tracking_uri=uri)


def test_ckpt_0003_loaded_by_its_model_uri_gives_the_greedy_answers_of_its_directory(three_rounds, monkeypatch):
    import mlflow
    import polars as pl

    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.models import loading as policies
    from dapo_ops.rollout.engines import make_engine
    from dapo_ops.run.phases import encode_rows
    from dapo_ops.store.layout import RunStore
    from tests.conftest import TINY_RUN, use_global_mlflow_uri

    client, run = _mlflow_run(three_rounds)
    model = next(m for m in _logged_models(client, run) if m.name == "ckpt-0003")
    store = RunStore(three_rounds.root, three_rounds.run_name)
    rows = pl.read_parquet(store.data_dir / "eval.parquet").head(6)
    policy = policies.load_policy(store.checkpoint_dir("ckpt-0003"))
    direct = make_engine(DapoConfig(**TINY_RUN), policy).generate(
        encode_rows(policy, rows), num_generations=1, max_completion_length=TINY_RUN["max_completion_length"],
        temperature=0.0, top_p=1.0, seed=0).completions
    use_global_mlflow_uri(monkeypatch, three_rounds.tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    assert loaded.predict(rows.to_pandas()) == list(direct)
    # No second copy of the weights: the MLflow model is the wrapper, the checkpoint folder holds them.
    artifacts = Path(model.artifact_location.removeprefix("file://"))
    assert not list(artifacts.rglob("*.safetensors"))


def test_the_dataset_splits_are_the_run_s_dataset_inputs_with_source_and_digest(trained_run):
    client, run = _mlflow_run(trained_run)
    inputs = {i.dataset.name: i for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {f"{trained_run.run_name}-train", f"{trained_run.run_name}-eval"}
    train = inputs[f"{trained_run.run_name}-train"]
    assert train.dataset.digest and "train.parquet" in train.dataset.source
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train"


def test_every_materialization_links_its_mlflow_run_and_the_run_links_back(trained_run):
    client, run = _mlflow_run(trained_run)
    instance = dg.DagsterInstance.from_config(str(trained_run.root / "dagster"))
    for key in ("dataset", "base_checkpoint", "rollouts", "attention_metrics", "rewards", "policy_update",
                "attention_report", "training_report"):
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        url = event.asset_materialization.metadata["mlflow_run"].value
        assert url.endswith(f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"), key
    dagster_run = instance.get_run_by_id(run.data.tags["dagster.run_id"])
    assert dagster_run is not None and dagster_run.job_name == "training_round"
    assert run.data.tags["dagster.run_url"].endswith(f"/runs/{dagster_run.run_id}")


def test_mlflow_has_system_metrics_of_the_rounds(trained_run):
    client, run = _mlflow_run(trained_run)
    system = {name for name in client.get_run(run.info.run_id).data.metrics if name.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
