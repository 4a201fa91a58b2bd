"""Run config files: YAML of DapoConfig fields, `--set` overrides, errors naming the key and the file,
and the same keys as a Dagster run config."""

import os
from pathlib import Path

import dagster as dg
import pytest

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.config.runconfig import RunConfigError, dagster_run_config, load_run_config, read_yaml

RUNS = Path(__file__).resolve().parents[1] / "configs" / "runs"
SHIPPED = sorted(RUNS.glob("*.yaml"))
PATH_KEYS = ("model_name_or_path", "dataset")


def test_the_shipped_examples_include_the_embedded_default_3b_and_7b():
    assert {p.name for p in SHIPPED} >= {"embedded.yaml", "qwen2_5_vl_3b_aokvqa.yaml", "qwen2_5_vl_7b_multi_gpu.yaml"}


def test_embedded_yaml_is_the_default_config():
    assert load_run_config(RUNS / "embedded.yaml") == DapoConfig()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_except_for_paths_absent_here(path, tmp_path):
    values = read_yaml(path)
    absent = [k for k in PATH_KEYS if values.get(k, "embedded") != "embedded" and not Path(values[k]).exists()]
    if absent:
        # The only problems are the model/dataset paths that do not exist on this machine.
        with pytest.raises(RunConfigError) as info:
            load_run_config(path)
        problems = [line for line in str(info.value).splitlines() if line.strip().startswith("- ")]
        assert len(problems) == len(absent) and all(any(k in p for k in absent) for p in problems), problems
        assert str(path) in str(info.value)
    flags = {k: str(tmp_path) for k in absent}
    config = load_run_config(path, flags=flags)
    assert config.run_name == values["run_name"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_is_a_valid_dagster_run_config_of_training_round(path):
    from pipelines.definitions import defs

    job = defs.resolve_job_def("training_round")
    assert dg.validate_run_config(job, dagster_run_config(read_yaml(path)))
    with pytest.raises(dg.DagsterInvalidConfigError, match="learning_rat"):  # the launchpad refuses a typo too
        dg.validate_run_config(job, dagster_run_config({**read_yaml(path), "learning_rat": 1.0}))


def test_set_overrides_a_single_key_of_the_file():
    config = load_run_config(RUNS / "embedded.yaml", ["learning_rate=1e-3", "use_peft=true",
                                                       "lora_target_modules=[q_proj, v_proj]"])
    assert (config.learning_rate, config.use_peft, config.lora_target_modules) == (1e-3, True, ["q_proj", "v_proj"])
    assert config.num_generations == DapoConfig().num_generations


def test_flags_win_over_the_file_and_set_over_the_flags():
    config = load_run_config(RUNS / "embedded.yaml", ["max_rounds=3"], flags={"max_rounds": 2, "seed": 5})
    assert (config.max_rounds, config.seed) == (3, 5)


def test_an_unknown_key_in_a_file_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 1.0e-4\nnum_generations: 4\n")
    with pytest.raises(RunConfigError) as info:
        load_run_config(path)
    assert str(path) in str(info.value)
    assert "learning_rat: unknown key (did you mean learning_rate?)" in str(info.value)


def test_a_value_of_the_wrong_type_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num_generations: many\n")
    with pytest.raises(RunConfigError, match=r"num_generations='many'.*expected int") as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_a_value_validate_refuses_names_the_field_and_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num_generations: 1\n")
    with pytest.raises(RunConfigError) as info:
        load_run_config(path)
    assert str(info.value).startswith(f"run config {path}: Invalid dapo-vlm configuration")
    assert "num_generations=1 gives no group statistics" in str(info.value)


def test_a_value_outside_a_choice_lists_the_choices(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss_type: ppo\n")
    with pytest.raises(RunConfigError, match="loss_type='ppo' is unknown; use one of grpo, bnpo") as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- learning_rate\n")
    with pytest.raises(RunConfigError, match="must be a mapping of config fields"):
        load_run_config(path)


def test_cli_run_fails_before_anything_starts_on_a_bad_file(tmp_path, capsys, monkeypatch):
    from pipelines import cli

    monkeypatch.setenv("DAPO_VLM_HOME", str(tmp_path / "home"))
    path = tmp_path / "run.yaml"
    path.write_text("epsilon_hi: 0.3\n")
    environment = dict(os.environ)
    assert cli.main(["run", "--config", str(path)]) == 2
    assert f"run config {path}" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()
    assert dict(os.environ) == environment  # e.g. its MLflow log level is for a run's own process only


def test_launchpad_config_prints_the_file_under_the_training_config_resource(capsys):
    from pipelines import cli

    assert cli.main(["launchpad-config", "--config", str(RUNS / "qwen2_5_vl_3b_aokvqa.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resources:\n  training_config:\n    config:\n      run_name: qwen2_5_vl_3b_aokvqa")
