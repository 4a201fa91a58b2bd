"""The memory plan counts parameters from config.json alone, as the built model has them."""

import pytest

from dapo_ops import lora, memory_plan, models
from dapo_ops.config import DapoConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy = models.build_embedded_policy(["a red square"], seed=0)
    return models.save_policy(policy, tmp_path_factory.mktemp("m") / "model"), policy


def test_parameter_counts_from_config_json_match_the_built_model(saved):
    path, policy = saved
    counts = memory_plan.parameter_counts(path, DapoConfig())
    assert counts.total == sum(p.numel() for p in policy.model.parameters())
    assert counts.weight_bytes == 4 * counts.total


def test_lora_count_matches_the_injected_adapter(saved):
    path, _ = saved
    config = DapoConfig(use_peft=True, lora_r=4)
    policy = models.load_policy(path)
    lora.add_adapter(policy.model, config)
    assert memory_plan.parameter_counts(path, config).trainable == lora.trainable_parameters(policy.model)[0]


def test_bf16_lora_with_checkpointing_needs_less_than_the_fp32_full_fine_tune(saved):
    path, _ = saved
    full = memory_plan.estimate(path, DapoConfig())
    small = memory_plan.estimate(path, DapoConfig(use_peft=True, bf16=True, torch_dtype="bfloat16",
                                                  gradient_checkpointing=True))
    assert small.optimizer < full.optimizer and small.update_activations < full.update_activations
    assert small.peak < full.peak
    assert "does NOT fit in --gpu-memory 0.0001 GiB" in memory_plan.render(full, DapoConfig(), 0.0001)
