"""Every supported VLM family, built tiny and offline: its processor's inputs, token sets, lean attention vs the
eager oracle, generation vs the teacher-forced pass, save/load, and the errors for directories we cannot train."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_CORPUS
from PIL import Image

from dapo_ops.attention import shared_prefix
from dapo_ops.attention.forward import model_inputs as _model_inputs
from dapo_ops.attention.teacher_forced import eager_attention_masses, teacher_forced_pass
from dapo_ops.models.inputs import PromptBatch, encode_prompts, is_target, split_processor_outputs
from dapo_ops.models.loading import Policy, load_policy, save_policy
from dapo_ops.models.tiny_families import BUILDERS, build_tiny_family
from dapo_ops.rollout.generate import RolloutBatch, generate_rollouts
from dapo_ops.train.warmstart import teacher_forcing_batch

CORPUS = FAMILY_CORPUS
COLORS = ["red", "green", "blue", "yellow"]
QUESTIONS = ["What color is the shape?", "Which shape is it? Look very closely at the picture."]
FAMILIES = sorted(BUILDERS)
# Image tokens of the square and the wide image per tiny family (its processor's expansion of one
# placeholder): Qwen's grid follows the aspect ratio, the others resize to a fixed square.
IMAGE_TOKENS = {"qwen2_vl": [4, 2], "qwen2_5_vl": [4, 2], "qwen3_vl": [4, 2], "idefics3": [4, 4], "gemma3": [4, 4],
                "llava": [16, 16], "paligemma": [16, 16], "internvl": [4, 4]}
# Tokens around the image that are neither vision nor text keys.
BOUNDARIES = {
    "qwen2_vl": {"<|vision_start|>", "<|vision_end|>"},
    "qwen2_5_vl": {"<|vision_start|>", "<|vision_end|>"},
    "qwen3_vl": {"<|vision_start|>", "<|vision_end|>"},
    "idefics3": {"<fake_token_around_image>", "<global-img>"},
    "gemma3": {"<start_of_image>", "<end_of_image>"},
    "llava": set(),
    "paligemma": {"<bos>"},
    "internvl": {"<img>", "</img>"},
}


@pytest.fixture
def family(tiny_family: tuple[str, Policy]) -> tuple[str, Policy]:
    """Each family, built once per session (conftest's `tiny_family`)."""
    return tiny_family


def _prompts(policy: Policy) -> PromptBatch:
    images = [Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (120, 60), (0, 255, 0))]
    return encode_prompts(policy, QUESTIONS, [COLORS, COLORS[:2]], images)


def test_vision_keys_are_the_processors_image_tokens(family: tuple[str, Policy]) -> None:
    name, policy = family
    batch = _prompts(policy)
    assert batch.vision_mask.sum(1).tolist() == IMAGE_TOKENS[name]
    assert torch.equal(batch.vision_mask, batch.input_ids == policy.image_token_id)


def test_text_keys_leave_out_specials_boundaries_and_padding(family: tuple[str, Policy]) -> None:
    name, policy = family
    batch = _prompts(policy)
    neither = batch.attention_mask.bool() & ~batch.text_mask & ~batch.vision_mask
    tokens = set(policy.tokenizer.convert_ids_to_tokens(batch.input_ids[neither].tolist()))
    assert BOUNDARIES[name] <= tokens
    assert not bool((batch.text_mask & (batch.attention_mask == 0)).any())
    text = policy.tokenizer.decode(batch.input_ids[1][batch.text_mask[1]])
    assert "Look very closely at the picture." in text and "Think inside" in text


# The tokens sampling never draws: padding and every token the family's processor inserts around or for an image
# (derived from the processor, `Policy.image_token_ids`; InternVL's <img>/</img> and PaliGemma's <bos> included).
SUPPRESSED = {
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
                    {"<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"}),
    "idefics3": {"<|endoftext|>", "<fake_token_around_image>", "<image>", "<global-img>"},
    "gemma3": {"<pad>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"},
    "llava": {"<pad>", "<image>"},
    "paligemma": {"<pad>", "<bos>", "<image>"},
    "internvl": {"<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"},
}


def test_sampling_blocks_every_token_the_processor_inserts_around_images(family: tuple[str, Policy]) -> None:
    name, policy = family
    suppressed = policy.suppressed_token_ids
    tokens = set(policy.tokenizer.convert_ids_to_tokens([i for i in suppressed if i < len(policy.tokenizer)]))
    assert tokens == SUPPRESSED[name]
    assert BOUNDARIES[name] <= tokens and policy.eos_token_id not in suppressed


def test_lean_attention_masses_equal_the_eager_oracle(family: tuple[str, Policy]) -> None:
    _, policy = family
    rollouts = generate_rollouts(policy, _prompts(policy), num_generations=2, max_completion_length=6, seed=0)
    lean = teacher_forced_pass(policy, rollouts)
    vision, text = eager_attention_masses(policy, rollouts)  # one column per layer the eager model returned
    assert vision.shape[1] == policy.num_layers == lean.vision_mass.shape[1]
    torch.testing.assert_close(lean.vision_mass.double(), vision, atol=1e-5, rtol=0)
    torch.testing.assert_close(lean.text_mass.double(), text, atol=1e-5, rtol=0)
    assert not bool(lean.vision_mass.isnan().any())


# What marks a generated token in each family's per-token inputs (derived by `inputs.completion_values`): Qwen's
# text type, Gemma 3's non-image type, PaliGemma's causal suffix.
COMPLETION_VALUES = {"qwen2_vl": {"mm_token_type_ids": 0}, "qwen2_5_vl": {"mm_token_type_ids": 0},
                     "qwen3_vl": {"mm_token_type_ids": 0}, "gemma3": {"token_type_ids": 0},
                     "paligemma": {"token_type_ids": 1}, "idefics3": {}, "llava": {}, "internvl": {}}


def test_processor_targets_never_reach_a_forward(family: tuple[str, Policy]) -> None:
    """PaliGemma's processor returns `labels` with every text; a forward given them computes a loss."""
    name, policy = family
    outputs = policy.processor(images=[[Image.new("RGB", (56, 56))]], text=_prompts(policy).texts[:1],
                               return_tensors="pt")
    inputs, rest = split_processor_outputs(policy, outputs)
    assert set(inputs) | set(rest) == set(outputs) and not any(is_target(k) for k in inputs)
    assert ("labels" in rest) == (name == "paligemma")
    assert set(_prompts(policy).model_inputs()) <= set(inputs)


def test_per_token_inputs_mark_the_completion_as_generated_text(family: tuple[str, Policy]) -> None:
    name, policy = family
    prompts = _prompts(policy)
    assert prompts.completion_values == COMPLETION_VALUES[name]
    rollouts = teacher_forcing_batch(policy, prompts, ["Answer: A", "blue"])
    width = rollouts.completion_ids.shape[1]
    for key, value in COMPLETION_VALUES[name].items():
        assert bool((rollouts.model_inputs()[key][:, -width:] == value).all()), key


def _fixed_completions(policy: Policy) -> RolloutBatch:
    """Two fixed completions of different lengths per prompt (prompts of different lengths: left padding)."""
    batch = teacher_forcing_batch(policy, _prompts(policy).select([0, 0, 1, 1]),
                                  ["Answer: A", "<think>red</think> Answer: B", "blue green", "The shape is red."])
    return dataclasses.replace(batch, prompt_index=torch.tensor([0, 0, 1, 1]), num_generations=2)


def test_a_batch_built_without_completion_values_is_scored_the_same(family: tuple[str, Policy]) -> None:
    """A RolloutBatch assembled by hand from a PromptBatch's fields: the teacher-forced pass derives the values
    from the family's own mask."""
    _, policy = family
    rollouts = _fixed_completions(policy)
    bare = dataclasses.replace(rollouts, completion_values={})
    scored = teacher_forced_pass(policy, rollouts, with_attention=False, shared_prefix=False).per_token_logps
    assert torch.equal(teacher_forced_pass(policy, bare, with_attention=False, shared_prefix=False).per_token_logps,
                       scored)


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared-prefix"])
def test_changing_the_last_completion_token_leaves_every_earlier_log_prob_unchanged(
    family: tuple[str, Policy], shared: bool
) -> None:
    """The teacher-forced pass (old log-probs, ratio, update) is causal over the completion, as sampling is: a
    prefix-LM family's completion is its causal suffix, not part of the bidirectional prefix."""
    _, policy = family
    rollouts = _fixed_completions(policy)
    last = rollouts.completion_lengths - 1  # [N]
    edited_ids = rollouts.completion_ids.clone()
    replacement = policy.tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    edited_ids[torch.arange(len(rollouts)), last] = replacement
    edited = dataclasses.replace(rollouts, completion_ids=edited_ids)
    original = teacher_forced_pass(policy, rollouts, with_attention=False, shared_prefix=shared).per_token_logps
    changed = teacher_forced_pass(policy, edited, with_attention=False, shared_prefix=shared).per_token_logps
    earlier = torch.arange(rollouts.completion_ids.shape[1])[None, :] < last[:, None]
    assert bool((last >= 1).all())
    torch.testing.assert_close(changed[earlier], original[earlier], atol=1e-6, rtol=0)
    rows = torch.arange(len(rollouts))
    assert bool((changed[rows, last] != original[rows, last]).all())  # the edit itself is scored


def test_greedy_rollouts_are_the_teacher_forced_argmax(family: tuple[str, Policy]) -> None:
    """Generation (prefill + KV cache, positions of the family) and the full forward see the same sequence."""
    _, policy = family
    rollouts = generate_rollouts(policy, _prompts(policy), num_generations=1, max_completion_length=8, temperature=0)
    with torch.no_grad():
        logits = policy.model(**_model_inputs(policy.model, rollouts, torch.device("cpu"))).logits
    width = rollouts.completion_ids.shape[1]
    scores = logits[:, -width - 1 : -1].clone()  # position p predicts token p + 1
    scores[..., policy.suppressed_token_ids] = -math.inf
    mask = rollouts.completion_mask.bool()
    assert torch.equal(scores.argmax(-1)[mask], rollouts.completion_ids[mask])


# Whether the family's prompt cache can serve all G completions of a prompt: Gemma 3's sliding-window layers
# keep only a window of keys, so it takes the unshared forward.
SHARES_PROMPTS = {name: name != "gemma3" for name in FAMILIES}


def test_the_shared_prefix_forward_equals_the_unshared_one(
    family: tuple[str, Policy], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each prompt computed once for its rollouts (left-padded prompts of different lengths), or the logged
    fallback where the family cannot share."""
    name, policy = family
    monkeypatch.setattr(shared_prefix, "_UNSUPPORTED", {})  # decided once per process: decide it here
    rollouts = generate_rollouts(policy, _prompts(policy), num_generations=3, max_completion_length=6, seed=0)
    assert bool((rollouts.prompt_mask == 0).any())
    forwards: list[int] = []
    hook = policy.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        with caplog.at_level(logging.WARNING, logger="dapo_ops.attention.shared_prefix"):
            shared = teacher_forced_pass(policy, rollouts, shared_prefix=True)
    finally:
        hook.remove()
    unshared = teacher_forced_pass(policy, rollouts, shared_prefix=False)
    if SHARES_PROMPTS[name]:
        assert len(forwards) == 2 and "cannot share prompts" not in caplog.text  # the prompts, then the completions
    else:
        assert len(forwards) == 1 and "cannot share prompts" in caplog.text and "sliding-window" in caplog.text
    torch.testing.assert_close(shared.per_token_logps, unshared.per_token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.entropy, unshared.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.vision_mass, unshared.vision_mass, atol=1e-6, rtol=0)
    torch.testing.assert_close(shared.text_mass, unshared.text_mass, atol=1e-6, rtol=0)


def test_the_masked_pass_degrades_every_familys_images_and_shares_prompts(
    family: tuple[str, Policy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images degraded in the family's processed space (blank and patch masks): the forward runs, the KL is
    finite and >= 0, and the shared-prefix masked pass equals the unshared one."""
    from dapo_ops.attention.teacher_forced import VisualMasking

    _, policy = family
    monkeypatch.setattr(shared_prefix, "_UNSUPPORTED", {})
    rollouts = generate_rollouts(policy, _prompts(policy), num_generations=2, max_completion_length=5, seed=0)
    mask = rollouts.completion_mask.bool()
    blank = VisualMasking("blank", 1.0, seed=1)
    shared = teacher_forced_pass(policy, rollouts, visual_masking=blank, with_attention=False).visual_kl[mask]
    unshared = teacher_forced_pass(policy, rollouts, visual_masking=blank, with_attention=False,
                                   shared_prefix=False).visual_kl[mask]
    torch.testing.assert_close(shared, unshared, atol=1e-5, rtol=1e-4)
    patch = teacher_forced_pass(policy, rollouts, visual_masking=VisualMasking("patch", 0.6, seed=1),
                                with_attention=False).visual_kl[mask]
    for kl in (shared, patch):
        assert bool(torch.isfinite(kl).all()) and bool((kl >= 0).all())


class _Wrapper(torch.nn.Module):
    """What DDP and accelerate put around the model: the HF model lives in `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_a_wrapped_model_gets_the_same_forward_inputs(family: tuple[str, Policy]) -> None:
    """Under DDP the update's forward must see the positions the single-process update sees."""
    _, policy = family
    rollouts = generate_rollouts(policy, _prompts(policy), num_generations=1, max_completion_length=3, seed=0)
    plain = _model_inputs(policy.model, rollouts, torch.device("cpu"))
    wrapped = _model_inputs(_Wrapper(policy.model), rollouts, torch.device("cpu"))
    assert plain.keys() == wrapped.keys()
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_a_saved_family_loads_through_the_auto_classes(family: tuple[str, Policy], tmp_path: Path) -> None:
    name, policy = family
    loaded = load_policy(save_policy(policy, tmp_path / name))
    assert type(loaded.model) is type(policy.model) and type(loaded.processor) is type(policy.processor)
    original, reloaded = _prompts(policy), _prompts(loaded)
    assert torch.equal(original.input_ids, reloaded.input_ids)
    assert original.vision.tensors.keys() == reloaded.vision.tensors.keys()
    for key, value in original.vision.tensors.items():
        assert torch.equal(value, reloaded.vision[key]), key
    with torch.no_grad():
        assert torch.equal(policy.model(**original.model_inputs()).logits, loaded.model(**reloaded.model_inputs()).logits)
    assert loaded.eos_token_id == policy.eos_token_id


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_policy(build_tiny_family("llava", CORPUS), tmp_path_factory.mktemp("llava") / "tiny-llava")


def _edit_config(path: Path, edit) -> None:  # noqa: ANN001
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_a_directory_without_an_image_token_id_is_refused_by_name(llava_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no-image-token"
    broken.mkdir()
    for file in llava_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    _edit_config(broken, lambda c: c.pop("image_token_index", None) or c.pop("image_token_id", None))
    with pytest.raises(ValueError, match="no image token id in config.json"):
        load_policy(broken)


def test_a_text_only_model_is_refused_by_name(llava_dir: Path, tmp_path: Path) -> None:
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text(
        json.dumps(json.loads((llava_dir / "config.json").read_text())["text_config"] | {"model_type": "llama"})
    )
    with pytest.raises(ValueError, match="not an image-text-to-text model"):
        load_policy(text_only)


def test_a_directory_without_a_processor_is_refused_by_name(llava_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((llava_dir / name).read_bytes())
    with pytest.raises(ValueError, match="no processor"):
        load_policy(bare)


# ---------------------------------------------------------------------------------- a round per family

# The family whose full round runs in the default suite; the others are `slow` (CI still runs them once).
# LLaVA, because the pipeline has no line naming it: it trains with no code change.
DEFAULT_ROUND_FAMILY = "llava"


def _mlflow_training_run(uri: str, run_name: str):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dapo-vlm")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dapo.run_name` = '{run_name}'")
    return client, [r for r in runs if "dapo.reanalysis_of" not in r.data.tags]


@pytest.mark.parametrize(
    "name", [pytest.param(f, marks=() if f == DEFAULT_ROUND_FAMILY else pytest.mark.slow) for f in FAMILIES]
)
def test_two_rounds_through_the_pipeline_then_reanalysis(name: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run MODEL=<tiny dir> ROUNDS=2` for the family: the 44 metrics finite in MLflow, attention metrics
    defined, and ckpt-0001 re-analysed into a run of its own."""
    from conftest import SMALL_RUN

    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.models.tiny_families import save_tiny_family
    from dapo_ops.reporting.reports import ROUND_METRIC_NAMES
    from pipelines.cli import reanalyze, run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for key, value in {"DAPO_VLM_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path / "dagster"),
                       "MLFLOW_TRACKING_URI": uri}.items():
        monkeypatch.setenv(key, value)
    model_dir = save_tiny_family(name, tmp_path / f"tiny-{name}")
    config = DapoConfig(**{**SMALL_RUN, "run_name": f"family-{name}", "model_name_or_path": str(model_dir),
                           "visual_dependency": True})
    run_training(config, rounds=2, root=tmp_path, echo=lambda _: None)

    client, training = _mlflow_training_run(uri, config.run_name)
    assert len(training) == 1
    run_id = training[0].info.run_id
    for metric in ROUND_METRIC_NAMES:
        history = client.get_metric_history(run_id, metric)
        assert len(history) == 2 and all(math.isfinite(m.value) for m in history), metric
    for stage in ("early", "middle", "late", "all"):
        assert all(m.value > 0 for m in client.get_metric_history(run_id, f"attention/{stage}/mdi")), stage
    # The masked pass, beside the 44: once per round; the blind eval also of ckpt-0000.
    for metric, count in (("visual/kl_mean", 2), ("visual/kl_answer", 2), ("visual/dependent_token_ratio", 2),
                          ("eval/blind_accuracy", 3), ("eval/visual_gain", 3)):
        history = client.get_metric_history(run_id, metric)
        assert len(history) == count and all(math.isfinite(m.value) for m in history), metric

    reanalyze(config.run_name, "ckpt-0001", mdi_tolerance=4.0, root=tmp_path)
    experiment = client.get_experiment_by_name("dapo-vlm")
    checkpoint_runs = client.search_runs([experiment.experiment_id], filter_string="tags.`dapo.checkpoint` = 'ckpt-0001'")
    assert [r for r in checkpoint_runs if r.data.tags.get("dapo.reanalysis_of") == config.run_name]
    report = tmp_path / "runs" / config.run_name / "reports" / "ckpt-0001" / "attention_diagnostics.md"
    assert "## Visual dependency" in report.read_text()
    reanalysis = next(r for r in checkpoint_runs if r.data.tags.get("dapo.reanalysis_of") == config.run_name)
    assert {"visual/kl_mean", "eval/blind_accuracy"} <= set(reanalysis.data.metrics)
    stages = [line for line in report.read_text().splitlines() if line.startswith(("| MDI", "| AEI"))]
    assert stages and not any(cell.strip() in ("nan", "inf") for line in stages for cell in line.split("|")), stages


def test_lora_adapts_the_language_model_and_freeze_vision_tower_freezes_the_tower(family: tuple[str, Policy]) -> None:
    """The default LoRA targets and `freeze_vision_tower` find each family's modules by its own names."""
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.models.lora import in_vision_tower
    from dapo_ops.run.checkpoint_policy import configure

    _, policy = family
    full = configure(copy.deepcopy(policy), DapoConfig(freeze_vision_tower=True))
    frozen = {n for n, p in full.model.named_parameters() if not p.requires_grad}
    assert frozen and all(in_vision_tower(n) for n in frozen)
    assert all(n in frozen for n, _ in full.model.named_parameters() if in_vision_tower(n))

    adapted = configure(copy.deepcopy(policy), DapoConfig(use_peft=True, lora_r=2, freeze_vision_tower=True))
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * policy.num_layers  # A and B of the 7 linears of every decoder layer
    assert all("lora_" in n and not in_vision_tower(n) for n in trainable)


def test_the_memory_plan_counts_the_familys_parameters(family: tuple[str, Policy], tmp_path: Path) -> None:
    """From config.json alone (the disk check before each round sizes the next checkpoint with it)."""
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.train.memory_plan import parameter_counts

    name, policy = family
    counts = parameter_counts(save_policy(policy, tmp_path / name), DapoConfig())
    assert counts.total == sum(p.numel() for p in policy.model.parameters())
