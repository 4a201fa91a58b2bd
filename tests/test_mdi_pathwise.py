"""The attention reward's pathwise gradient: differentiable masses, their gradient, and what a step does."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_attention import make_rollouts, model_inputs
from test_attention import tiny_model as attention_model
from test_shared_prefix import PROMPTS, G, rollout_batch

from dapo_ops.attention.metrics import stage_layers
from dapo_ops.attention.pathwise import pathwise_loss, shaped_reward, stage_log_mdi
from dapo_ops.attention.teacher_forced import completion_forward, teacher_forced_pass
from dapo_ops.config.dapo import DapoConfig
from dapo_ops.rl import rewards
from dapo_ops.train.update import make_optimizer, policy_update

PADDED = [(3, 5, 6), (1, 2, 2), (6, 4, 4), (2, 7, 1)]


@pytest.fixture(scope="module")
def model():
    return attention_model(seed=5)


def _eager_log_mdi(model, rollouts, stage: str) -> torch.Tensor:
    """ln MDI [B] from full eager attention weights, with their graph: the readable oracle."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attentions = eager(**model_inputs(rollouts), output_attentions=True).attentions
    query = rollouts.query_mask.bool()
    vision, text = rollouts.vision_mask.float(), rollouts.text_mask.float()
    masses = []
    for weights in attentions:  # [B, H, T, T]
        on_v = (weights * vision[:, None, None, :]).sum(-1).mean(1)  # [B, T]
        on_t = (weights * text[:, None, None, :]).sum(-1).mean(1)  # [B, T]
        rows = query.sum(-1)
        masses.append((torch.where(query, on_v, 0.0).sum(-1) / rows, torch.where(query, on_t, 0.0).sum(-1) / rows))
    layers = stage_layers(len(masses))[stage]
    m_v = torch.stack([masses[i][0] for i in layers], 1).mean(1)
    m_t = torch.stack([masses[i][1] for i in layers], 1).mean(1)
    return torch.log((m_t / text.sum(-1)) / (m_v / vision.sum(-1))), eager


def test_differentiable_masses_equal_the_no_grad_ones(model) -> None:
    rollouts = make_rollouts(PADDED)
    _, _, vision, text = completion_forward(model, rollouts, with_attention=True, attention_grad=True)
    assert vision.requires_grad and text.requires_grad
    scored = teacher_forced_pass(model, rollouts)
    torch.testing.assert_close(vision.detach().cpu(), scored.vision_mass, atol=1e-6, rtol=0)
    torch.testing.assert_close(text.detach().cpu(), scored.text_mass, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", ["all", "late"])
def test_the_gradient_of_ln_mdi_equals_the_eager_oracles(model, stage: str) -> None:
    rollouts = make_rollouts(PADDED)
    lean = copy.deepcopy(model)
    _, _, vision, text = completion_forward(lean, rollouts, with_attention=True, attention_grad=True)
    log_mdi, defined = stage_log_mdi(vision, text, rollouts.vision_mask.sum(-1), rollouts.text_mask.sum(-1), stage)
    assert bool(defined.all())
    oracle, eager = _eager_log_mdi(model, rollouts, stage)
    torch.testing.assert_close(log_mdi, oracle, atol=1e-5, rtol=0)
    log_mdi.abs().sum().backward()
    oracle.abs().sum().backward()
    eager_grads = dict(eager.named_parameters())
    compared = 0
    for name, param in lean.named_parameters():
        if param.grad is None:
            assert eager_grads[name].grad is None or float(eager_grads[name].grad.abs().max()) == 0.0, name
            continue
        expected = eager_grads[name].grad
        scale = float(expected.abs().max()) + 1e-12
        assert float((param.grad - expected).abs().max()) <= 1e-4 * scale + 1e-7, name
        compared += int(float(expected.abs().max()) > 0)
    assert compared > 10  # query/key projections of every layer, embeddings, the vision tower


def test_shared_and_unshared_forwards_give_the_same_attention_gradient() -> None:
    model, batch = attention_model(seed=3), rollout_batch()
    grads = []
    for shared in (True, False):
        trained = copy.deepcopy(model)
        _, _, vision, text = completion_forward(trained, batch, with_attention=True, attention_grad=True,
                                                shared_prefix=shared)
        log_mdi, _ = stage_log_mdi(vision, text, batch.vision_mask.sum(-1), batch.text_mask.sum(-1), "all")
        log_mdi.square().sum().backward()
        grads.append({n: p.grad for n, p in trained.named_parameters() if p.grad is not None})
    for name, grad in grads[1].items():
        scale = float(grad.abs().max()) + 1e-12
        assert float((grads[0][name] - grad).abs().max()) <= 1e-4 * scale + 1e-7, name


@pytest.mark.parametrize("shaping", ["clip", "log_distance"])
def test_the_differentiable_reward_equals_mdi_reward(shaping: str) -> None:
    mdis = [0.3, 0.7, 1.0, 1.6, 5.0]
    expected = rewards.mdi_reward(["x"] * len(mdis), mdi=mdis, mdi_shaping=shaping, mdi_tolerance=2.0)
    actual = shaped_reward(torch.log(torch.tensor(mdis)), shaping, 2.0)
    assert actual.tolist() == pytest.approx(expected, abs=1e-6)


def test_log_distance_keeps_its_slope_where_clip_is_flat() -> None:
    far = torch.log(torch.tensor([4.0, 0.2])).requires_grad_()
    shaped_reward(far, "clip", 2.0).sum().backward()
    assert far.grad.abs().max() == 0  # saturated at -1: nothing to follow
    far.grad = None
    shaped_reward(far, "log_distance", 2.0).sum().backward()
    assert far.grad.tolist() == pytest.approx([-2 / math.log(2), 2 / math.log(2)])


def test_rows_without_image_add_nothing_and_no_nan() -> None:
    vision = torch.tensor([[0.2, 0.3], [0.0, 0.0]], requires_grad=True)
    text = torch.tensor([[0.5, 0.4], [0.9, 0.8]], requires_grad=True)
    loss, reward, entered = pathwise_loss(vision, text, torch.tensor([4, 0]), torch.tensor([10, 10]), weight=1.0,
                                          shaping="log_distance", tolerance=2.0, stage="all", denominator=2)
    loss.backward()
    assert entered.tolist() == [True, False]
    assert reward[1] == 0 and torch.isfinite(vision.grad).all() and vision.grad[1].abs().sum() == 0
    assert vision.grad[0].abs().sum() > 0


def test_a_group_shaping_with_the_pathwise_term_is_refused() -> None:
    with pytest.raises(ValueError, match="mdi_pathwise_coef=0.5 has nothing to differentiate.*group_zscore"):
        DapoConfig(mdi_shaping="group_zscore", mdi_pathwise_coef=0.5)
    with pytest.raises(ValueError, match="mdi_pathwise_coef=-1"):
        DapoConfig(mdi_shaping="log_distance", mdi_pathwise_coef=-1.0)


def sharp_model():
    """The tiny decoder with sharpened queries and keys: its random init attends almost uniformly (MDI ≈ 1),
    this one is off balance (|ln MDI| up to 1 per rollout, 0.3 on average)."""
    model = attention_model(seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(30.0)
    return model


def _steps(batch, *, pathwise: bool, steps: int = 12) -> float:
    """Mean |ln MDI| after `steps` updates with zero advantages: only the pathwise term has a gradient."""
    model = sharp_model()
    config = DapoConfig(prompts_per_round=len(PROMPTS), num_generations=G, steps_per_generation=1,
                        num_iterations=steps, learning_rate=1e-3, mdi_shaping="log_distance",
                        mdi_pathwise_coef=1.0 if pathwise else 0.0)
    with torch.no_grad():
        old = completion_forward(model, batch)[0]
    zeros = torch.zeros(len(batch))
    result = policy_update(model, make_optimizer(model, config), batch, old, zeros, torch.ones(len(batch), dtype=bool),
                           config, global_step=0, seed=0)
    assert ("mdi_reward_pathwise" in result.steps[0]) is pathwise
    scored = teacher_forced_pass(model, batch)
    log_mdi, _ = stage_log_mdi(scored.vision_mass, scored.text_mass, batch.vision_mask.sum(-1),
                               batch.text_mask.sum(-1), "all")
    return float(log_mdi.abs().mean())


def test_the_pathwise_term_alone_moves_attention_towards_balance() -> None:
    batch = rollout_batch()
    scored = teacher_forced_pass(sharp_model(), batch)
    before, _ = stage_log_mdi(scored.vision_mass, scored.text_mass, batch.vision_mask.sum(-1),
                              batch.text_mask.sum(-1), "all")
    unchanged, moved = _steps(batch, pathwise=False), _steps(batch, pathwise=True)
    assert unchanged == pytest.approx(float(before.abs().mean()), abs=1e-5)  # zero advantages: no step moves it
    assert moved < 0.6 * unchanged  # 0.32 -> 0.14 in 12 steps


def test_gradient_checkpointing_gives_the_same_attention_gradient() -> None:
    """The differentiable masses are computed after the forward: a checkpointed layer recomputes plain SDPA."""
    model, batch = attention_model(seed=3), rollout_batch()
    grads = []
    for checkpointing in (False, True):
        trained = copy.deepcopy(model).train()
        if checkpointing:
            trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _, _, vision, text = completion_forward(trained, batch, with_attention=True, attention_grad=True)
        log_mdi, _ = stage_log_mdi(vision, text, batch.vision_mask.sum(-1), batch.text_mask.sum(-1), "all")
        log_mdi.square().sum().backward()
        grads.append({n: p.grad for n, p in trained.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        scale = float(grad.abs().max()) + 1e-12
        assert float((grads[1][name] - grad).abs().max()) <= 1e-5 * scale + 1e-7, name


def test_the_pathwise_term_is_the_mean_over_the_rollouts_that_keep_loss_tokens() -> None:
    """With zero advantages a step's loss is the term alone, −c·w·mean r over the rollouts it enters: truncated
    completions under mask_truncated_completions leave the numerator and the count, as in the policy loss."""
    batch, model = rollout_batch(), sharp_model()
    assert 0 < int(batch.is_eos.sum()) < len(batch)
    config = DapoConfig(prompts_per_round=len(PROMPTS), num_generations=G, steps_per_generation=1,
                        num_iterations=1, mdi_shaping="log_distance", mdi_pathwise_coef=0.5,
                        mask_truncated_completions=True)
    with torch.no_grad():
        old = completion_forward(model, batch)[0]
    result = policy_update(model, make_optimizer(model, config), batch, old, torch.zeros(len(batch)),
                           torch.ones(len(batch), dtype=bool), config, global_step=0, seed=0)
    step = result.steps[0]
    assert step["loss"] == pytest.approx(-0.5 * step["mdi_reward_pathwise"], rel=1e-5)
