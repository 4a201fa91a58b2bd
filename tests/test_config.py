"""Bad configuration fails at once and says what to change; the Dagster config mirrors the library's."""

import dataclasses

import pytest

from dapo_ops.config.dapo import DapoConfig


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss_type": "ppo"}, "loss_type='ppo' is unknown; use one of grpo, bnpo, dr_grpo, dapo"),
        ({"num_generations": 1}, "num_generations=1 gives no group statistics"),
        ({"prompts_per_round": 6, "steps_per_generation": 5}, "batch of 48 rollouts (prompts_per_round x num_generations) is not divisible by steps_per_generation=5"),
        ({"model_name_or_path": "/no/such/model"}, "'/no/such/model' does not exist"),
        ({"dataset": "/no/such/data.parquet"}, "dataset='/no/such/data.parquet' does not exist"),
        ({"scale_rewards": "max"}, "scale_rewards='max' is unknown"),
        ({"reward_weights": [1.0]}, "needs 3 weights"),
        ({"run_name": "a/b"}, "must be a plain name"),
    ],
)
def test_invalid_config_names_the_field_and_the_fix(changes, message):
    with pytest.raises(ValueError, match="Invalid dapo-vlm configuration") as info:
        DapoConfig(**changes)
    assert message in str(info.value)


def test_all_problems_are_reported_together():
    with pytest.raises(ValueError) as info:
        DapoConfig(loss_type="x", num_generations=1)
    assert "loss_type" in str(info.value) and "num_generations" in str(info.value)


def test_defaults_are_valid_and_batch_is_prompts_times_generations():
    config = DapoConfig()
    assert config.batch_size == config.prompts_per_round * config.num_generations
    assert config.weights == {"mc_idx_reward": 3.0, "think_format_reward": 1.0, "mdi_reward": 1.0}


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="Unknown dapo-vlm configuration fields: lr"):
        DapoConfig.from_dict({"lr": 1.0})


def test_dagster_config_mirrors_every_library_field_with_the_same_default():
    from pipelines.config import TrainingConfig

    config = TrainingConfig()
    for field in dataclasses.fields(DapoConfig):
        assert getattr(config, field.name) == getattr(DapoConfig(), field.name), field.name
    assert config.to_dapo() == DapoConfig()
    assert TrainingConfig.from_dapo(DapoConfig(learning_rate=1e-3)).learning_rate == 1e-3


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("length_penalty", "reward 'length_penalty' is not a built-in reward"),
        ("tests.no_such_module:length_penalty", "reward 'tests.no_such_module:length_penalty': cannot import"),
        ("tests.custom_rewards:no_such_reward", "has no attribute 'no_such_reward'"),
        ("tests.custom_rewards:NOT_A_FUNCTION", "reward 'tests.custom_rewards:NOT_A_FUNCTION' is a float, not a callable"),
    ],
)
def test_a_bad_reward_entry_fails_at_config_time_naming_it(entry, message):
    with pytest.raises(ValueError, match="Invalid dapo-vlm configuration") as info:
        DapoConfig(reward_funcs=["mc_idx_reward", entry], reward_weights=[1.0, 1.0])
    assert message in str(info.value)


def test_reward_weights_follow_the_configured_reward_funcs():
    config = DapoConfig(reward_funcs=["mc_idx_reward", "tests.custom_rewards:length_penalty"], reward_weights=[2.0, 0.5])
    assert config.weights == {"mc_idx_reward": 2.0, "length_penalty": 0.5}
    with pytest.raises(ValueError, match=r"needs 2 weights, one per reward_funcs entry \(mc_idx_reward, length_penalty\)"):
        DapoConfig(reward_funcs=["mc_idx_reward", "tests.custom_rewards:length_penalty"])
    with pytest.raises(ValueError, match="logs mc_idx_reward twice"):
        DapoConfig(reward_funcs=["mc_idx_reward", "mc_idx_reward"], reward_weights=[1.0, 1.0])


def test_dagster_config_has_exactly_the_library_fields_and_reanalysis():
    from pipelines.config import TrainingConfig

    fields = set(TrainingConfig().get_resource_definition().config_schema.config_type.fields)
    assert fields == {f.name for f in dataclasses.fields(DapoConfig)} | {"reanalysis"}


def test_a_field_added_to_the_library_config_appears_in_the_dagster_config_with_its_choices():
    from typing import Literal

    from pipelines.config import dagster_config_class

    @dataclasses.dataclass
    class Extended(DapoConfig):
        importance_sampling_level: Literal["token", "sequence"] = "token"

    field = dagster_config_class(Extended)().get_resource_definition().config_schema.config_type.fields[
        "importance_sampling_level"]
    assert field.default_value == "token"
    assert [value.config_value for value in field.config_type.enum_values] == ["token", "sequence"]


def test_literal_fields_are_enums_with_the_library_choices_in_the_launchpad():
    from dapo_ops.config.dapo import LOSS_TYPES, VLLM_MODES
    from pipelines.config import TrainingConfig

    fields = TrainingConfig().get_resource_definition().config_schema.config_type.fields
    assert tuple(v.config_value for v in fields["loss_type"].config_type.enum_values) == LOSS_TYPES
    assert tuple(v.config_value for v in fields["vllm_mode"].config_type.enum_values) == VLLM_MODES


def test_dagster_rejects_an_unknown_literal_choice_before_the_run_starts():
    import dagster as dg

    from pipelines.config import RESOURCE_KEY
    from pipelines.definitions import defs

    job = defs.resolve_job_def("training_round")
    good = {"resources": {RESOURCE_KEY: {"config": {"loss_type": "grpo"}}}}
    assert dg.validate_run_config(job, good)["resources"][RESOURCE_KEY]["config"]["loss_type"] == "grpo"
    with pytest.raises(dg.DagsterInvalidConfigError, match="loss_type not in enum type"):
        dg.validate_run_config(job, {"resources": {RESOURCE_KEY: {"config": {"loss_type": "ppo"}}}})


def test_the_reanalysis_job_launches_with_its_defaults():
    """Choosing a partition in the launchpad scaffolds this config; launched unedited it re-analyses."""
    import dagster as dg

    from pipelines.config import RESOURCE_KEY
    from pipelines.definitions import defs

    job = defs.resolve_job_def("reanalysis")
    scaffold = job.partitioned_config.get_run_config_for_partition_key("ckpt-0001")
    resolved = dg.validate_run_config(job, scaffold)["resources"][RESOURCE_KEY]["config"]
    assert resolved["reanalysis"] is True
    assert resolved["run_name"] == DapoConfig().run_name
    assert resolved["mdi_tolerance"] == DapoConfig().mdi_tolerance


def test_use_vllm_fails_at_validation_naming_the_engine_registry():
    with pytest.raises(ValueError, match=r"'vllm' rollout engine, which is not implemented .*@register_engine\('vllm'\)"):
        DapoConfig(use_vllm=True)
    with pytest.raises(ValueError, match="vllm_mode='remote' is unknown; use one of server, colocate"):
        DapoConfig(vllm_mode="remote")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss_type": "vespo"}, "use one of grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level='batch' is unknown"),
        ({"delta": 0.9}, "delta=0.9 caps the importance ratio and must be greater than 1"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile=1.5 must be in [0, 1]"),
        ({"sapo_temperature_neg": 0.0}, "must be positive"),
        ({"entropy_coef": -0.1}, "entropy_coef=-0.1 must be >= 0"),
        ({"multi_objective_aggregation": "sum"}, "multi_objective_aggregation='sum' is unknown"),
    ],
)
def test_invalid_objective_options_name_the_field(changes, message):
    with pytest.raises(ValueError, match="Invalid dapo-vlm configuration") as info:
        DapoConfig(**changes)
    assert message in str(info.value)


def test_objective_options_default_to_trls_plain_loss():
    config = DapoConfig()
    assert (config.importance_sampling_level, config.delta, config.top_entropy_quantile) == ("token", None, 1.0)
    assert (config.sapo_temperature_pos, config.sapo_temperature_neg) == (1.0, 1.05)
    assert not config.mask_truncated_completions and config.entropy_coef == 0.0
    assert config.multi_objective_aggregation == "sum_then_normalize"


def test_a_refused_config_fails_before_importing_torch_or_the_plug_ins():
    """Finding the rollout engine and the rewards imports their modules (torch, transformers): a config with
    another problem is refused without them, in a fraction of a second."""
    import subprocess
    import sys

    code = ("import sys\nfrom dapo_ops.config.dapo import DapoConfig\n"
            "try:\n    DapoConfig(loss_type='ppo', use_vllm=True)\nexcept ValueError as error:\n    print(error)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'dapo_ops.rl.rewards') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "loss_type='ppo' is unknown" in done.stdout
    assert done.stdout.strip().endswith("[]")
    # Once the rest is valid, the engine is looked up (and refused here).
    with pytest.raises(ValueError, match="selects the 'vllm' rollout engine"):
        DapoConfig(use_vllm=True)
