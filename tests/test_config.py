"""Bad configuration fails at once and says what to change; the Dagster config mirrors the library's."""

import dataclasses

import pytest

from dapo_ops.config import DapoConfig


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
