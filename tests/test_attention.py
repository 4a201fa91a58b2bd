"""Modality attention metrics: the oracle's arithmetic, and the lean path against the eager oracle."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.masking_utils import sdpa_mask

from dapo_ops.attention.forward import TeacherForcedOutputs
from dapo_ops.attention.metrics import (
    METRIC_NAMES,
    STAGES,
    batch_means,
    masses_from_attention_weights,
    metrics_from_attention_weights,
    metrics_from_masses,
    stage_layers,
)
from dapo_ops.attention.recorder import LEAN_ATTENTION, ModalityMassRecorder, record_modality_mass
from dapo_ops.attention.teacher_forced import (
    completion_forward,
    rollout_attention_metrics,
    teacher_forced_pass,
)

# Token ids of the tiny vocabulary: specials, then ordinary text tokens.
PAD, EOS, IM_START = 0, 1, 2
IMAGE, VIDEO, VISION_START, VISION_END = 90, 91, 92, 93
TEXT_TOKENS = (5, 80)
IMAGE_TOKENS = 4  # a 56x56 image: 4x4 patches of 14 px, merged 2x2
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch
NUM_LAYERS = 4


# ------------------------------------------------------------------------------------------ fixtures


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa") -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 96,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,  # GQA
            "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": PAD,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        attn_implementation=attn_implementation,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model() -> Qwen2_5_VLForConditionalGeneration:
    return tiny_model()


@pytest.fixture(scope="module")
def eager_model(model: Qwen2_5_VLForConditionalGeneration) -> Qwen2_5_VLForConditionalGeneration:
    """The same weights with eager attention, which returns attention weights."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


@dataclass
class Rollouts:
    """Stand-in for `dapo_ops.rollout.generate.RolloutBatch` with the attributes the teacher-forced pass reads."""

    prompt_ids: torch.Tensor  # [N, Tp] left padded
    prompt_mask: torch.Tensor
    prompt_vision_mask: torch.Tensor
    prompt_text_mask: torch.Tensor
    pixel_values: torch.Tensor  # [16 * N, PATCH_DIM]
    image_grid_thw: torch.Tensor  # [N, 3]
    completion_ids: torch.Tensor  # [N, Tc] right padded
    completion_mask: torch.Tensor

    def _with_completion(self, prompt_part: torch.Tensor, completion_part: torch.Tensor) -> torch.Tensor:
        return torch.cat([prompt_part, completion_part.to(prompt_part.dtype)], dim=1)

    @property
    def input_ids(self) -> torch.Tensor:
        return self._with_completion(self.prompt_ids, self.completion_ids)

    @property
    def attention_mask(self) -> torch.Tensor:
        return self._with_completion(self.prompt_mask, self.completion_mask)

    @property
    def vision_mask(self) -> torch.Tensor:
        return self._with_completion(
            self.prompt_vision_mask, torch.zeros_like(self.completion_mask, dtype=torch.bool)
        )

    @property
    def text_mask(self) -> torch.Tensor:
        return self._with_completion(
            self.prompt_text_mask, torch.zeros_like(self.completion_mask, dtype=torch.bool)
        )

    @property
    def query_mask(self) -> torch.Tensor:
        """docs/metrics.md queries over the full sequence: the completion tokens, padding excluded."""
        return self._with_completion(torch.zeros_like(self.prompt_vision_mask), self.completion_mask.bool())

    def select(self, indices: list[int]) -> Rollouts:
        idx = torch.as_tensor(indices, dtype=torch.long)
        rows = (idx[:, None] * 16 + torch.arange(16)).reshape(-1)  # 16 patch rows per image
        return Rollouts(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.prompt_vision_mask[idx],
            self.prompt_text_mask[idx],
            self.pixel_values[rows],
            self.image_grid_thw[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
        )


def make_rollouts(shapes: list[tuple[int, int, int]], seed: int = 0) -> Rollouts:
    """One rollout per (text before image, text after image, completion length): left-padded prompts
    `<im_start> text <vision_start> <image>x4 <vision_end> text`, right-padded completions ending in EOS."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(*TEXT_TOKENS, (n,), generator=g).tolist()

    prompts = [
        [IM_START, *text(a), VISION_START, *[IMAGE] * IMAGE_TOKENS, VISION_END, *text(b)]
        for a, b, _ in shapes
    ]
    completions = [[*text(c - 1), EOS] for _, _, c in shapes]
    tp, tc, n = max(map(len, prompts)), max(map(len, completions)), len(shapes)
    prompt_ids = torch.full((n, tp), PAD)
    prompt_mask = torch.zeros(n, tp, dtype=torch.long)
    completion_ids = torch.full((n, tc), PAD)
    completion_mask = torch.zeros(n, tc, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        prompt_ids[i, tp - len(p) :], prompt_mask[i, tp - len(p) :] = torch.tensor(p), 1
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1
    vision = prompt_ids == IMAGE
    text_keys = (
        prompt_mask.bool()
        & ~vision
        & ~torch.isin(prompt_ids, torch.tensor([PAD, IM_START, VISION_START, VISION_END]))
    )
    return Rollouts(
        prompt_ids,
        prompt_mask,
        vision,
        text_keys,
        torch.randn(16 * n, PATCH_DIM, generator=g),
        torch.tensor([[1, 4, 4]] * n),
        completion_ids,
        completion_mask,
    )


def model_inputs(r: Rollouts) -> dict[str, torch.Tensor]:
    return {
        "input_ids": r.input_ids,
        "attention_mask": r.attention_mask,
        "pixel_values": r.pixel_values,
        "image_grid_thw": r.image_grid_thw,
        "mm_token_type_ids": (r.input_ids == IMAGE).int(),
    }


# Left padding (different prompt lengths) and right padding (different completion lengths).
PADDED = [(3, 5, 6), (1, 2, 2), (6, 4, 4), (2, 7, 1)]
# Equal lengths: the model hands SDPA no mask at all (is_causal).
UNPADDED = [(3, 4, 5), (3, 4, 5)]


def assert_metrics_close(actual: list[dict], expected: list[dict], rel: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        for stage in STAGES:
            for name in METRIC_NAMES:
                x, y = a[stage][name], e[stage][name]
                assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=rel), (
                    stage,
                    name,
                )


# ------------------------------------------------------------------------------------- stage math


@pytest.mark.parametrize(
    ("layers", "early", "middle", "late"),
    [
        (6, range(0, 2), range(2, 4), range(4, 6)),
        (4, range(0, 1), range(1, 2), range(2, 4)),
        (28, range(0, 9), range(9, 18), range(18, 28)),
        (2, range(0, 0), range(0, 1), range(1, 2)),
    ],
)
def test_stages_split_layers_by_thirds(layers: int, early: range, middle: range, late: range) -> None:
    assert stage_layers(layers) == {"early": early, "middle": middle, "late": late, "all": range(layers)}


def uniform_attention(
    num_layers: int, heads: int, vision: torch.Tensor, text: torch.Tensor
) -> list[torch.Tensor]:
    """Every query spreads its attention equally over the vision and text keys."""
    keys = (vision | text).double()
    weights = keys / keys.sum(-1, keepdim=True)  # [B, K]
    q = vision.shape[1]
    return [weights[:, None, None, :].expand(-1, heads, q, -1).clone() for _ in range(num_layers)]


def test_equal_attention_per_token_gives_mdi_one() -> None:
    vision = torch.tensor([[0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    text = torch.tensor([[1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    query = torch.tensor([[0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    [metrics] = metrics_from_attention_weights(uniform_attention(3, 2, vision, text), query, vision, text)
    for stage in STAGES:
        assert metrics[stage]["mdi"] == pytest.approx(1.0)
        assert metrics[stage]["aei_text"] == pytest.approx(1.0)
        assert metrics[stage]["aei_vision"] == pytest.approx(1.0)
        assert metrics[stage]["mdi_balance"] == pytest.approx(1.0)
        assert metrics[stage]["mdi_penalty"] == pytest.approx(0.0)
        assert metrics[stage]["text_ratio"] == pytest.approx(3 / 5)  # the token share t
        assert metrics[stage]["vision_ratio"] == pytest.approx(2 / 5)


def attention_with_masses(
    masses: list[tuple[float, float]], heads: int = 2, queries: int = 2
) -> list[torch.Tensor]:
    """Per layer (mass on V, mass on T) over keys [v, v, t, t, t, t, special]: |V| = 2, |T| = 4."""
    layers = []
    for m_v, m_t in masses:
        row = torch.tensor([m_v / 2] * 2 + [m_t / 4] * 4 + [1 - m_v - m_t], dtype=torch.float64)
        layers.append(row.expand(1, heads, queries, 7).clone())
    return layers


KEYS_V = torch.tensor([[1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
KEYS_T = torch.tensor([[0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
QUERIES = torch.ones(1, 2, dtype=torch.bool)


def test_known_masses_give_the_metrics_formulas() -> None:
    # M_V = 0.5, M_T = 0.25: text_ratio 1/3 over t = 2/3 -> aei_text 1/2; vision_ratio 2/3 over v = 1/3 -> 2.
    [metrics] = metrics_from_attention_weights(
        attention_with_masses([(0.5, 0.25)] * 3), QUERIES, KEYS_V, KEYS_T
    )
    expected = {
        "text_ratio": 1 / 3,
        "vision_ratio": 2 / 3,
        "aei_text": 0.5,
        "aei_vision": 2.0,
        "mdi": 0.25,
        "mdi_balance": 0.0,
        "mdi_penalty": 1.0,
    }  # |ln 0.25| = 2 ln 2 > ln R: clipped at 0
    assert metrics["all"] == pytest.approx(expected)


def test_tolerance_scales_the_balance() -> None:
    [metrics] = metrics_from_attention_weights(
        attention_with_masses([(0.5, 0.25)] * 3), QUERIES, KEYS_V, KEYS_T, tolerance=8.0
    )
    assert metrics["all"]["mdi_balance"] == pytest.approx(1 - math.log(4) / math.log(8))
    assert metrics["all"]["mdi_penalty"] == pytest.approx(math.log(4) / math.log(8))


def test_stages_average_their_layers_masses() -> None:
    # Three layers, one per stage; text dominates more and more with depth.
    layers = [(0.4, 0.4), (0.2, 0.6), (0.1, 0.8)]
    [metrics] = metrics_from_attention_weights(attention_with_masses(layers), QUERIES, KEYS_V, KEYS_T)
    for stage, (m_v, m_t) in zip(("early", "middle", "late"), layers, strict=True):
        assert metrics[stage]["mdi"] == pytest.approx((m_t / 4) / (m_v / 2))
    m_v, m_t = 0.7 / 3, 1.8 / 3
    assert metrics["all"]["mdi"] == pytest.approx((m_t / 4) / (m_v / 2))
    assert metrics["all"]["text_ratio"] == pytest.approx(m_t / (m_t + m_v))


def test_only_masked_queries_count() -> None:
    # Query 0 attends only to text, query 1 only to vision; masking out query 0 leaves pure vision.
    a = torch.zeros(1, 1, 2, 7, dtype=torch.float64)
    a[0, 0, 0, 2:6], a[0, 0, 1, 0:2] = 0.25, 0.5
    vision_mass, text_mass = masses_from_attention_weights([a], torch.tensor([[False, True]]), KEYS_V, KEYS_T)
    assert vision_mass.tolist() == [[1.0]]
    assert text_mass.tolist() == [[0.0]]


def test_no_image_tokens_gives_nan_not_zero_or_crash() -> None:
    attentions = attention_with_masses([(0.0, 0.9)] * 3)
    no_vision = torch.zeros_like(KEYS_V)
    [metrics] = metrics_from_attention_weights(attentions, QUERIES, no_vision, KEYS_T)
    assert all(math.isnan(metrics[stage][name]) for stage in STAGES for name in METRIC_NAMES)


def test_no_query_rows_gives_nan() -> None:
    [metrics] = metrics_from_attention_weights(
        attention_with_masses([(0.5, 0.25)] * 3), torch.zeros_like(QUERIES), KEYS_V, KEYS_T
    )
    assert all(math.isnan(metrics[stage][name]) for stage in STAGES for name in METRIC_NAMES)


def test_a_rollout_without_image_leaves_the_others_defined() -> None:
    masses = torch.tensor([[0.3, 0.3, 0.3], [0.0, 0.0, 0.0]])
    with_image, without = metrics_from_masses(masses, 1 - masses, [4, 0], [10, 10])
    assert with_image["all"]["mdi"] == pytest.approx((0.7 / 10) / (0.3 / 4))
    assert math.isnan(without["all"]["mdi"])


def test_fewer_than_three_layers_leave_empty_stages_nan() -> None:
    [metrics] = metrics_from_masses(torch.tensor([[0.2, 0.4]]), torch.tensor([[0.6, 0.4]]), [2], [4])
    assert all(math.isnan(v) for v in metrics["early"].values())
    assert metrics["middle"]["text_ratio"] == pytest.approx(0.75)
    assert metrics["late"]["text_ratio"] == pytest.approx(0.5)
    assert metrics["all"]["text_ratio"] == pytest.approx(0.5 / 0.8)


def test_tolerance_must_exceed_one() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        metrics_from_masses(torch.ones(1, 3), torch.ones(1, 3), [1], [1], tolerance=1.0)


mass = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    masses=st.lists(st.tuples(mass, mass), min_size=1, max_size=8),
    num_vision=st.integers(1, 500),
    num_text=st.integers(1, 500),
    tolerance=st.floats(min_value=1.01, max_value=20.0),
)
def test_metric_identities_hold_for_any_masses(masses, num_vision, num_text, tolerance) -> None:
    vision = torch.tensor([[m_v for m_v, _ in masses]], dtype=torch.float64)
    text = torch.tensor([[m_t for _, m_t in masses]], dtype=torch.float64)
    [metrics] = metrics_from_masses(vision, text, [num_vision], [num_text], tolerance=tolerance)
    for stage in STAGES:
        m = metrics[stage]
        if math.isnan(m["mdi"]):  # an empty stage (fewer than three layers)
            assert len(stage_layers(len(masses))[stage]) == 0
            continue
        assert 0.0 <= m["mdi_balance"] <= 1.0
        assert m["mdi_penalty"] == pytest.approx(1.0 - m["mdi_balance"])
        assert m["text_ratio"] + m["vision_ratio"] == pytest.approx(1.0)
        assert m["mdi"] == pytest.approx(m["aei_text"] / m["aei_vision"])
        layers = stage_layers(len(masses))[stage]
        m_v = sum(masses[i][0] for i in layers) / len(layers)
        m_t = sum(masses[i][1] for i in layers) / len(layers)
        assert m["mdi"] == pytest.approx((m_t / num_text) / (m_v / num_vision))


# ------------------------------------------------------------------------------- the lean exact path


@pytest.mark.parametrize("padding", ["no mask", "bool mask", "float mask"])
def test_extra_sdpa_call_is_exact_on_every_mask_format(padding: str) -> None:
    torch.manual_seed(0)
    batch, heads, kv_heads, seq, dim, tc = 2, 6, 2, 12, 8, 4
    query, key = torch.randn(batch, heads, seq, dim), torch.randn(batch, kv_heads, seq, dim)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    if padding != "no mask":
        valid[1, :3] = False  # left padding
        valid[0, -1] = False  # a padded completion position
    bool_mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    mask = {
        "no mask": None,
        "bool mask": bool_mask,
        "float mask": torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min),
    }[padding]
    vision = torch.zeros(batch, seq, dtype=torch.bool)
    vision[:, 4:6] = True
    text = valid & ~vision
    text[:, -tc:] = False
    queries = torch.zeros(batch, seq, dtype=torch.bool)
    queries[:, -tc:] = valid[:, -tc:]
    recorder = ModalityMassRecorder(queries, vision, text, num_layers=1)
    recorder.accumulate(0, query, key, mask, dim**-0.5)

    scores = query @ key.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * dim**-0.5
    weights = scores.masked_fill(~bool_mask, -math.inf).softmax(-1)
    expected_v, expected_t = masses_from_attention_weights([weights], queries, vision, text)
    torch.testing.assert_close(recorder.vision_mass, expected_v.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(recorder.text_mass, expected_t.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shapes", [PADDED, UNPADDED], ids=["left+right padding", "no padding"])
def test_lean_masses_equal_the_eager_oracle(model, eager_model, shapes) -> None:
    rollouts = make_rollouts(shapes)
    with torch.no_grad():
        attentions = eager_model(**model_inputs(rollouts), output_attentions=True).attentions
    assert len(attentions) == NUM_LAYERS
    oracle_v, oracle_t = masses_from_attention_weights(
        attentions, rollouts.query_mask, rollouts.vision_mask, rollouts.text_mask
    )
    outputs = teacher_forced_pass(model, rollouts)
    torch.testing.assert_close(outputs.vision_mass.double(), oracle_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs.text_mass.double(), oracle_t, atol=1e-5, rtol=0)
    oracle = metrics_from_attention_weights(
        attentions, rollouts.query_mask, rollouts.vision_mask, rollouts.text_mask, tolerance=2.0
    )
    assert_metrics_close(rollout_attention_metrics(outputs, rollouts, tolerance=2.0), oracle)


def test_lean_forward_logits_equal_plain_sdpa(model) -> None:
    rollouts = make_rollouts(PADDED)
    inputs = model_inputs(rollouts)
    with torch.no_grad():
        plain = model(**inputs).logits
        with record_modality_mass(model, rollouts.query_mask, rollouts.vision_mask, rollouts.text_mask):
            assert model.config.text_config._attn_implementation == LEAN_ATTENTION
            lean = model(**inputs).logits
    assert torch.equal(lean, plain)
    assert model.config.text_config._attn_implementation == "sdpa"  # restored


def test_vision_tower_is_untouched(model, monkeypatch) -> None:
    rollouts = make_rollouts(PADDED)
    measured: list[int] = []
    accumulate = ModalityMassRecorder.accumulate
    monkeypatch.setattr(
        ModalityMassRecorder,
        "accumulate",
        lambda self, layer, *a, **kw: (measured.append(layer), accumulate(self, layer, *a, **kw)),
    )
    with torch.no_grad():
        plain_image = model.get_image_features(rollouts.pixel_values, rollouts.image_grid_thw).pooler_output
        with record_modality_mass(model, rollouts.query_mask, rollouts.vision_mask, rollouts.text_mask):
            assert model.config.vision_config._attn_implementation == "sdpa"
            lean_image = model.get_image_features(
                rollouts.pixel_values, rollouts.image_grid_thw
            ).pooler_output
            model(**model_inputs(rollouts))
    assert measured == list(range(NUM_LAYERS))  # decoder layers only, once each
    for a, b in zip(lean_image, plain_image, strict=True):
        assert torch.equal(a, b)


def test_one_extra_sdpa_call_per_layer_over_the_completion_rows_only(model, monkeypatch) -> None:
    rollouts = make_rollouts(PADDED)
    seq, completion = rollouts.input_ids.shape[1], rollouts.completion_ids.shape[1]
    calls: list[tuple[int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        calls.append((query.shape[-2], key.shape[-2]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(**model_inputs(rollouts))
        plain = list(calls)
        calls.clear()
        with record_modality_mass(model, rollouts.query_mask, rollouts.vision_mask, rollouts.text_mask):
            model(**model_inputs(rollouts))
    extra = [c for c in calls if c not in plain]
    # 2 query heads share each kv head: their completion rows are stacked, never the full T rows.
    assert extra == [(2 * completion, seq)] * NUM_LAYERS
    assert len(calls) == len(plain) + NUM_LAYERS


def test_recorder_rejects_a_forward_of_another_shape() -> None:
    recorder = ModalityMassRecorder(*(torch.ones(1, 5, dtype=torch.bool),) * 3, num_layers=1)
    with pytest.raises(ValueError, match="full forward"):
        recorder.accumulate(0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4), None, None)


# ---------------------------------------------------------------------------------- teacher forcing


def reference_logps_and_entropy(
    model, rollouts: Rollouts, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward way: full logits, log_softmax, gather the completion tokens."""
    tc = rollouts.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(**model_inputs(rollouts)).logits[:, -tc - 1 : -1] / temperature
    logps = F.log_softmax(logits, dim=-1)
    entropy = -(logps.exp() * logps).sum(-1)
    return logps.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1), entropy


def test_teacher_forced_logps_equal_a_log_softmax_gather_reference(model) -> None:
    rollouts = make_rollouts(PADDED)
    expected_logps, expected_entropy = reference_logps_and_entropy(model, rollouts, temperature=0.7)
    outputs = teacher_forced_pass(model, rollouts, temperature=0.7)
    assert outputs.per_token_logps.shape == rollouts.completion_ids.shape
    torch.testing.assert_close(outputs.per_token_logps, expected_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    assert outputs.vision_mass.shape == (len(PADDED), NUM_LAYERS)


def test_micro_batches_give_the_same_outputs(model) -> None:
    rollouts = make_rollouts(PADDED)
    whole = teacher_forced_pass(model, rollouts)
    pieces = teacher_forced_pass(model, rollouts, batch_size=3)
    # A micro-batch has its own padding width, so values agree up to float rounding.
    for name in ("per_token_logps", "entropy", "vision_mass", "text_mass"):
        torch.testing.assert_close(getattr(pieces, name), getattr(whole, name), atol=1e-5, rtol=1e-5)


def test_a_policy_is_unwrapped_to_its_model(model) -> None:
    rollouts = make_rollouts(UNPADDED)
    policy = SimpleNamespace(model=model, tokenizer=None)
    direct = teacher_forced_pass(model, rollouts)
    wrapped = teacher_forced_pass(policy, rollouts)
    assert torch.equal(wrapped.per_token_logps, direct.per_token_logps)
    assert torch.equal(wrapped.vision_mass, direct.vision_mass)


def test_without_attention_no_masses_are_measured(model) -> None:
    outputs = teacher_forced_pass(model, make_rollouts(UNPADDED), with_attention=False)
    assert outputs.vision_mass is None and outputs.text_mass is None
    with pytest.raises(ValueError, match="no attention masses"):
        rollout_attention_metrics(outputs, make_rollouts(UNPADDED))


def test_completion_forward_is_differentiable_and_matches_the_pass(model) -> None:
    rollouts = make_rollouts(PADDED)
    logps, entropy, vision_mass, text_mass = completion_forward(model, rollouts, with_attention=True)
    assert logps.requires_grad and not entropy.requires_grad
    (logps * rollouts.completion_mask).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    scored = teacher_forced_pass(model, rollouts)
    torch.testing.assert_close(logps.detach(), scored.per_token_logps)
    torch.testing.assert_close(vision_mass, scored.vision_mass)
    torch.testing.assert_close(text_mass, scored.text_mass)


def test_rollout_metrics_are_nan_for_a_rollout_without_vision_keys() -> None:
    rollouts = make_rollouts(UNPADDED)
    rollouts.prompt_vision_mask[1] = False
    outputs = TeacherForcedOutputs(
        per_token_logps=torch.zeros(2, 5),
        entropy=torch.zeros(2, 5),
        vision_mass=torch.full((2, 4), 0.2),
        text_mass=torch.full((2, 4), 0.6),
    )
    first, second = rollout_attention_metrics(outputs, rollouts)
    assert first["all"]["mdi"] == pytest.approx((0.6 / rollouts.prompt_text_mask[0].sum().item()) / (0.2 / 4))
    assert all(math.isnan(second[stage][name]) for stage in STAGES for name in METRIC_NAMES)


def test_the_models_mask_builder_is_sdpas() -> None:
    """Registering the lean implementation also registers SDPA's mask builder under its name: an unknown
    implementation name would otherwise get no causal mask at all."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ALL_MASK_ATTENTION_FUNCTIONS[LEAN_ATTENTION] is sdpa_mask


def test_batch_means_leave_nan_rollouts_out() -> None:
    defined, undefined = metrics_from_masses(
        torch.tensor([[0.2] * 3, [0.0] * 3]), torch.full((2, 3), 0.6), [4, 0], [8, 8]
    )
    means = batch_means([defined, undefined, defined])
    assert means["all"]["mdi"] == pytest.approx(defined["all"]["mdi"])
    assert math.isnan(batch_means([undefined])["late"]["aei_text"])


def test_the_real_rollout_batch_gives_the_same_pass(model) -> None:
    """The stand-in above mirrors `dapo_ops.rollout.generate.RolloutBatch`; the pass reads the real one the same way."""
    from dapo_ops.models.inputs import VisionInputs
    from dapo_ops.rollout.generate import RolloutBatch

    r = make_rollouts(PADDED)
    lengths = r.completion_mask.sum(1)
    real = RolloutBatch(
        prompt_ids=r.prompt_ids,
        prompt_mask=r.prompt_mask,
        vision=VisionInputs.from_patches(r.pixel_values, r.image_grid_thw),
        completion_ids=r.completion_ids,
        completion_mask=r.completion_mask,
        completion_lengths=lengths,
        is_eos=torch.ones(len(PADDED), dtype=torch.bool),
        completions=[""] * len(PADDED),
        prompt_index=torch.arange(len(PADDED)),
        num_generations=1,
        prompt_vision_mask=r.prompt_vision_mask,
        prompt_text_mask=r.prompt_text_mask,
    )
    expected, actual = teacher_forced_pass(model, r), teacher_forced_pass(model, real, batch_size=2)
    for name in ("per_token_logps", "entropy", "vision_mass", "text_mass"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=1e-5)


def test_teacher_forced_outputs_become_the_attention_table_one_row_per_rollout(model) -> None:
    """`training.attention_table`, the attention phase's pure core: per-stage metrics of each rollout,
    its token counts and its mean completion entropy, with the tolerance they were computed at."""
    from dapo_ops.attention.metrics import METRIC_NAMES as ATTENTION_NAMES
    from dapo_ops.run.phases import attention_table

    rollouts = make_rollouts(PADDED)
    rollouts.prompt_index = torch.tensor([0, 0, 1, 1])  # group-major, G = 2
    outputs = teacher_forced_pass(model, rollouts)
    table = attention_table(outputs, rollouts, tolerance=3.0)
    expected = rollout_attention_metrics(outputs, rollouts, tolerance=3.0)
    assert table.height == len(PADDED) and table["prompt_index"].to_list() == [0, 0, 1, 1]
    for stage in STAGES:
        for name in ATTENTION_NAMES:
            assert table[f"attn/{stage}/{name}"].to_list() == pytest.approx(
                [float(m[stage][name]) for m in expected], nan_ok=True), (stage, name)
    mask = rollouts.completion_mask.float()
    entropy = (outputs.entropy * mask).sum(1) / mask.sum(1)
    assert table["entropy"].to_list() == pytest.approx(entropy.tolist())
    assert table["completion_tokens"].to_list() == [c for _, _, c in PADDED]
    assert table["vision_tokens"].to_list() == rollouts.vision_mask.sum(1).tolist()
    assert table["total_tokens"].to_list() == (rollouts.prompt_mask.sum(1) + rollouts.completion_mask.sum(1)).tolist()
    assert set(table["mdi_tolerance"].to_list()) == {3.0}
