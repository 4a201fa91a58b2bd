"""The memory plan counts parameters from config.json alone, as the built model has them."""

import pytest

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models import loading as models
from dapo_ops.models import lora
from dapo_ops.train import memory_plan


@pytest.fixture(scope="module")
def saved(tmp_path_factory, embedded_policy_for):
    policy = embedded_policy_for(["a red square"], seed=0)
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


def test_the_teacher_forced_pass_in_micro_batches_needs_less_and_its_numbers_are_the_chunk_s(saved):
    path, _ = saved
    whole = memory_plan.estimate(path, DapoConfig())
    chunked = memory_plan.estimate(path, DapoConfig(local_rollout_forward_batch_size=128))
    assert chunked.attention_lean < whole.attention_lean
    assert chunked.update_activations == whole.update_activations
    assert memory_plan.estimate(path, DapoConfig(local_rollout_forward_batch_size=10_000)) == whole


def test_the_meta_model_is_built_once_per_model_directory(saved, monkeypatch):
    path, _ = saved
    memory_plan.parameter_counts(path, DapoConfig())
    built = []
    monkeypatch.setattr(memory_plan, "meta_model", lambda d: built.append(d))
    for _ in range(3):  # the disk check before every round
        memory_plan.parameter_counts(path, DapoConfig(use_peft=True))
    assert built == []


def test_the_shipped_3b_and_7b_configs_fit_an_80_gib_gpu(tmp_path):
    from pathlib import Path

    from dapo_ops.config.runconfig import coerce, read_yaml

    for name, shape in (("qwen2_5_vl_3b_aokvqa", "qwen2_5_vl_3b"), ("qwen2_5_vl_7b_multi_gpu", "qwen2_5_vl_7b")):
        values = coerce(read_yaml(Path("configs/runs") / f"{name}.yaml"), name)
        config = DapoConfig(**{**values, "model_name_or_path": "embedded", "dataset": "embedded"})
        plan = memory_plan.estimate(Path("configs/model_shapes") / shape, config)
        assert plan.peak <= 80 * memory_plan.GIB, (name, memory_plan.render(plan, config))
