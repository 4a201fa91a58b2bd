"""LoRA through peft on the embedded model: the adapter's layers, the adapter-disabled reference, and the
adapter files a checkpoint holds."""

import pytest
import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models import loading as models
from dapo_ops.models import lora
from dapo_ops.models.inputs import encode_prompts

CONFIG = DapoConfig(use_peft=True, lora_r=4, lora_dropout=0.0)


@pytest.fixture(scope="module")
def base(embedded_policy_for) -> models.Policy:
    return embedded_policy_for(["a red square", "a blue circle"], seed=0)


def _fresh(base: models.Policy, config: DapoConfig = CONFIG) -> models.Policy:
    import copy

    policy = copy.deepcopy(base)
    lora.add_adapter(policy.model, config)
    for name, param in policy.model.named_parameters():  # a trained adapter: B is no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
    return policy


def _logits(policy: models.Policy) -> torch.Tensor:
    from PIL import Image

    batch = encode_prompts(policy, ["What color?"], [["red", "blue"]], [Image.new("RGB", (56, 56), "red")])
    with torch.no_grad():
        return policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw).logits  # [1, T, V]


def test_only_the_adapter_of_the_language_model_is_trainable(base):
    policy = _fresh(base)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert not any(".visual." in n for n, _ in policy.model.named_modules() if "lora_A" in n)


def test_a_fresh_adapter_leaves_the_outputs_unchanged(base, embedded_policy_for):
    policy = embedded_policy_for(["a red square", "a blue circle"], seed=0)
    before = _logits(policy)
    lora.add_adapter(policy.model, CONFIG)
    assert torch.allclose(_logits(policy), before, atol=1e-6)


def test_the_adapter_disabled_model_is_the_base_model_and_the_adapter_comes_back(base):
    policy = _fresh(base)
    adapted = _logits(policy)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    with lora.adapter_disabled(policy.model):
        assert torch.allclose(_logits(policy), _logits(base), atol=1e-5)
    assert not torch.allclose(adapted, _logits(base), atol=1e-3)
    assert torch.equal(_logits(policy), adapted)
    assert {n for n, p in policy.model.named_parameters() if p.requires_grad} == trainable


def test_adapter_files_round_trip_into_a_fresh_base(base, tmp_path):
    policy = _fresh(base)
    lora.write_adapter(policy.model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS}
    import copy

    loaded = copy.deepcopy(base)
    lora.load_adapter(loaded.model, tmp_path)
    assert torch.allclose(_logits(loaded), _logits(policy), atol=1e-6)
    assert all(p.requires_grad == ("lora_" in n) for n, p in loaded.model.named_parameters())


def test_merging_the_adapter_gives_a_plain_model_with_the_same_outputs(base, tmp_path):
    import copy

    policy = _fresh(base)
    lora.write_adapter(policy.model, tmp_path)
    merged = lora.merge_adapter_dir(copy.deepcopy(base).model, tmp_path)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged_policy = models.Policy(model=merged.eval(), processor=base.processor)
    assert torch.allclose(_logits(merged_policy), _logits(policy), atol=1e-4, rtol=1e-3)


def test_lora_target_modules_names_the_adapted_layers(base):
    policy = _fresh(base, CONFIG.replace(lora_target_modules=["q_proj", "v_proj"]))
    adapted = {n.split(".")[-1] for n, m in policy.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_freeze_vision_tower_freezes_it_in_a_full_fine_tune(base):
    import copy

    from dapo_ops.run.checkpoint_policy import prepare_for_training

    policy = copy.deepcopy(base)
    prepare_for_training(policy.model, DapoConfig(freeze_vision_tower=True))
    frozen = {n for n, p in policy.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".visual." in f".{n}" for n in frozen)
    assert any(p.requires_grad for n, p in policy.model.named_parameters() if "language_model" in n)


def test_bf16_keeps_trained_parameters_in_fp32_and_autocasts_the_forward(base):
    import copy

    from dapo_ops.models import precision
    from dapo_ops.run.checkpoint_policy import prepare_for_training

    policy = copy.deepcopy(base)
    policy.model.to(torch.bfloat16)
    lora.add_adapter(policy.model, CONFIG)
    prepare_for_training(policy.model, CONFIG.replace(bf16=True, torch_dtype="bfloat16"))
    dtypes = {p.dtype for p in policy.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert {p.dtype for p in policy.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with precision.autocast(CONFIG.replace(bf16=True), policy.model):
        assert _logits(policy).dtype == torch.bfloat16
