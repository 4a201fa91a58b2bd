"""The embedded tiny Qwen2.5-VL policy: tokenizer, config, save/load (also of a real checkpoint layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

from dapo_ops.models.inputs import build_messages, encode_prompts
from dapo_ops.models.loading import (
    IM_END,
    IMAGE_PAD,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Policy,
    build_embedded_policy,
    build_tokenizer,
    load_policy,
    save_policy,
    tiny_config,
)

CORPUS = [
    "What color is the shape?",
    "Which shape is shown?",
    "red green blue yellow",
    "The shape is red.",
    "The shape is a circle.",
    "<think>The shape is blue.</think> Answer: C",
]
COLORS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def policy(embedded_policy_for) -> Policy:
    return embedded_policy_for(CORPUS, seed=0)


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (56, 56), (0, 0, 255))]


def _encode(policy: Policy):
    return encode_prompts(
        policy,
        ["What color is the shape?", "Which shape is shown? Look closely."],
        [COLORS, COLORS],
        _images(),
    )


def _logits(policy: Policy) -> torch.Tensor:
    batch = _encode(policy)
    with torch.no_grad():
        return policy.model(**batch.model_inputs()).logits


def test_tokenizer_has_the_qwen_special_tokens_with_pad_and_eos() -> None:
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token == IM_END
    assert set(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))) <= set(tokenizer.all_special_ids)
    assert len(tokenizer) <= 400


def test_think_tags_are_single_ordinary_tokens_that_survive_decoding() -> None:
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    ids = tokenizer("<think>The shape is red.</think> Answer: A<|im_end|>")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<think>" and "</think>" in tokens
    think_ids = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert not set(think_ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>The shape is red.</think> Answer: A"


def test_chat_template_renders_the_qwen2_5_vl_layout(policy: Policy) -> None:
    messages = build_messages("What color is the shape?", ["red", "blue"], system_prompt="Be brief.")
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "What color is the shape?\nA. red\nB. blue"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_adds_the_default_system_turn_when_none_is_given(policy: Policy) -> None:
    text = policy.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert (
        text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )


def test_tiny_config_has_the_documented_shape() -> None:
    config = tiny_config(500)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        128,
        4,
        4,
        2,
    )
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (2, 64, 128)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    # mRoPE sections must cover the rotary half of a head (32 / 2 = 16 frequencies).
    assert sum(text.rope_parameters["mrope_section"]) == 16


def test_model_config_token_ids_match_the_tokenizer(policy: Policy) -> None:
    config, tokenizer = policy.model.config, policy.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PAD) == policy.image_pad_id
    assert config.video_token_id == tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids(VISION_START)
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids(VISION_END)
    assert config.text_config.vocab_size == len(tokenizer)
    assert policy.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert policy.pad_token_id == tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    assert policy.num_layers == 4


def test_embedded_model_is_about_a_million_parameters_with_sdpa(policy: Policy) -> None:
    assert isinstance(policy.model, Qwen2_5_VLForConditionalGeneration)
    assert 0.5e6 < sum(p.numel() for p in policy.model.parameters()) < 2e6
    assert policy.model.config._attn_implementation == "sdpa"


def test_suppressed_ids_are_the_vision_specials_and_padding_but_not_eos(policy: Policy) -> None:
    tokenizer = policy.tokenizer
    expected = tokenizer.convert_tokens_to_ids([PAD_TOKEN, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD])
    assert policy.suppressed_token_ids == sorted(expected)
    assert policy.eos_token_id not in policy.suppressed_token_ids


def test_embedded_policy_is_deterministic_per_seed(policy: Policy) -> None:
    same = build_embedded_policy(CORPUS, seed=0)
    other = build_embedded_policy(CORPUS, seed=1)
    assert same.tokenizer.get_vocab() == policy.tokenizer.get_vocab()
    weights = policy.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in same.model.state_dict().items())
    assert not all(torch.equal(weights[k], v) for k, v in other.model.state_dict().items())


def test_building_a_policy_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_embedded_policy(CORPUS, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_save_and_load_reproduce_logits_and_encodings(policy: Policy, tmp_path: Path) -> None:
    saved = save_policy(policy, tmp_path / "ckpt-0000")
    loaded = load_policy(saved, device="auto", torch_dtype="float32")  # DapoConfig's spelling
    assert loaded.path == saved
    original, reloaded = _encode(policy), _encode(loaded)
    for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "vision_mask", "text_mask"):
        assert torch.equal(getattr(original, name), getattr(reloaded, name)), name
    assert torch.equal(_logits(policy), _logits(loaded))
    assert loaded.tokenizer.chat_template == policy.tokenizer.chat_template
    assert type(AutoTokenizer.from_pretrained(saved)) is type(policy.tokenizer)


def test_save_replaces_an_existing_checkpoint_and_leaves_no_temporary_files(
    policy: Policy, tmp_path: Path
) -> None:
    target = tmp_path / "ckpt"
    save_policy(policy, target)
    (target / "stale.txt").write_text("old")
    save_policy(policy, target)
    assert not (target / "stale.txt").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in target.iterdir()
    }
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_load_policy_reads_a_real_qwen2_5_vl_directory_layout(policy: Policy, tmp_path: Path) -> None:
    """config.json + safetensors, a Qwen2Tokenizer config, preprocessor_config.json with min/max_pixels
    and the chat template only in chat_template.json: the layout of the released checkpoints."""
    real = tmp_path / "Qwen2.5-VL-tiny"
    policy.model.save_pretrained(real)
    policy.tokenizer.save_pretrained(real)
    (real / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((real / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    (real / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (real / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 3136,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )
    (real / "chat_template.json").write_text(json.dumps({"chat_template": policy.tokenizer.chat_template}))

    loaded = load_policy(real)
    assert type(loaded.tokenizer).__name__ == "Qwen2Tokenizer"
    original, reloaded = _encode(policy), _encode(loaded)
    for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "vision_mask", "text_mask"):
        assert torch.equal(getattr(original, name), getattr(reloaded, name)), name
    assert torch.equal(_logits(policy), _logits(loaded))
    assert loaded.eos_token_id == policy.eos_token_id and loaded.pad_token_id == policy.pad_token_id


def test_load_policy_names_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(tmp_path)
