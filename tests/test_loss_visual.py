"""The opt-in visual-dependency terms of the loss against hand computations on small tensors: VPPO's token
filter and trajectory advantage shaping (arXiv 2510.09285), PAPO's implicit perception loss with its
double-entropy regulariser (arXiv 2507.06448); and, with every option off, the loss and the update unchanged to
the last bit."""

from __future__ import annotations

import math

import pytest
import torch
from test_shared_prefix import rollout_batch, tiny_model

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.rl.loss import papo_per_token_loss, policy_loss, vppo_advantage_scale, vppo_token_mask
from dapo_ops.train.update import _UpdateInputs, make_optimizer, policy_update, step_advantages

LOGP = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.5, -0.7, -2.5]])
OLD = torch.tensor([[-1.1, -0.4, -2.0, -0.3], [-0.3, -1.2, -0.9, -2.5]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
ADVANTAGES = torch.tensor([1.0, -0.5])
DEPENDENCY = torch.tensor([[0.2, 0.9, 0.1, 5.0], [0.0, 0.3, 0.4, 0.05]])


def test_vppo_keeps_each_sequences_top_ceil_rho_n_tokens_by_dependency() -> None:
    mask = vppo_token_mask(DEPENDENCY, MASK, 0.5)
    # Row 0: 3 tokens, ⌈1.5⌉ = 2 kept (0.9 and 0.2; the padded 5.0 never counts); row 1: 4 tokens, 2 kept.
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    assert vppo_token_mask(DEPENDENCY, MASK, 1.0).tolist() == MASK.bool().tolist()


def test_vppo_advantage_scale_maps_min_max_normalised_dependency_to_factors_averaging_one() -> None:
    factors = vppo_advantage_scale(torch.tensor([0.0, 1.0, 2.0, 3.0, 9.0]),
                                   torch.tensor([True, True, True, True, False]), 0.8)
    # s̃ = [0, 1/3, 2/3, 1], mean 1/2: max scale 0.8 + 0.2 / 0.5 = 1.2, factors 0.8 + s̃ · 0.4; invalid: 1.
    assert factors.tolist() == pytest.approx([0.8, 0.8 + 0.4 / 3, 0.8 + 0.8 / 3, 1.2, 1.0])
    assert float(factors[:4].mean()) == pytest.approx(1.0)
    flat = vppo_advantage_scale(torch.tensor([0.5, 0.5]), torch.tensor([True, True]))
    assert flat.tolist() == [1.0, 1.0]  # no spread: advantages unchanged


def test_papo_terms_are_minus_gamma_k3_plus_eta_times_both_entropies() -> None:
    logp, masked = torch.tensor([[-1.0, -0.2]]), torch.tensor([[-2.0, -0.2]])
    entropy, masked_entropy = torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0, 0.5]])
    terms = papo_per_token_loss(logp, masked, torch.tensor([[True, True]]), papo_coef=0.1, papo_entropy_coef=0.03,
                                entropies=entropy, masked_entropies=masked_entropy)
    k3 = math.exp(-1.0) + 1.0 - 1.0  # r − log r − 1 with log r = −1
    assert terms[0].tolist() == pytest.approx([-0.1 * k3 + 0.03 * 2.5, 0.03 * 1.5])


def _clipped(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """DAPO's per-token clipped surrogate by hand: −min(w·A, clip(w, 0.8, 1.28)·A)."""
    ratio = (logp - old).exp()
    a = advantages[:, None]
    return -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)


def test_policy_loss_with_vppo_tokens_is_the_clipped_loss_on_the_kept_tokens_over_all_tokens() -> None:
    loss, _ = policy_loss(LOGP, OLD, ADVANTAGES, MASK, epsilon_high=0.28, visual_dependency=DEPENDENCY,
                          vppo_token_ratio=0.5)
    kept = vppo_token_mask(DEPENDENCY, MASK, 0.5).double()
    expected = (_clipped(LOGP, OLD, ADVANTAGES).double() * kept).sum() / MASK.sum()  # DAPO: every token counts
    assert float(loss) == pytest.approx(float(expected))


def test_policy_loss_with_papo_adds_its_terms_normalised_as_the_policy_loss() -> None:
    masked = LOGP - 0.4
    entropy, masked_entropy = torch.full_like(LOGP, 0.7), torch.full_like(LOGP, 1.1)
    loss, _ = policy_loss(LOGP, OLD, ADVANTAGES, MASK, epsilon_high=0.28, entropies=entropy,
                          masked_per_token_logps=masked, masked_entropies=masked_entropy, papo_coef=0.02,
                          papo_entropy_coef=0.03)
    k3 = math.exp(-0.4) + 0.4 - 1.0
    per_token = _clipped(LOGP, OLD, ADVANTAGES).double() - 0.02 * k3 + 0.03 * 1.8
    expected = (per_token * MASK).sum() / MASK.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_papo_without_the_masked_log_probs_is_refused() -> None:
    with pytest.raises(ValueError, match="need masked_per_token_logps"):
        policy_loss(LOGP, OLD, ADVANTAGES, MASK, papo_coef=0.01)
    with pytest.raises(ValueError, match="vppo_token_ratio < 1 needs visual_dependency"):
        policy_loss(LOGP, OLD, ADVANTAGES, MASK, vppo_token_ratio=0.5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "sapo", "cispo"])
def test_with_the_options_off_the_loss_and_its_gradient_are_bit_identical(loss_type: str) -> None:
    def run(**extra):
        logp = LOGP.clone().requires_grad_(True)
        loss, metrics = policy_loss(logp, OLD, ADVANTAGES, MASK, loss_type=loss_type, epsilon_high=0.28, **extra)
        loss.backward()
        return loss.detach(), metrics, logp.grad

    plain = run()
    off = run(visual_dependency=DEPENDENCY, vppo_token_ratio=1.0, masked_per_token_logps=LOGP - 1.0,
              masked_entropies=torch.ones_like(LOGP), papo_coef=0.0, papo_entropy_coef=0.0)
    assert torch.equal(plain[0], off[0]) and plain[1] == off[1] and torch.equal(plain[2], off[2])


CONFIG = DapoConfig(prompts_per_round=3, num_generations=4, steps_per_generation=2, num_iterations=1,
                    max_completion_length=6, mdi_pathwise_coef=0.0)


def _update(config: DapoConfig, **extra) -> list[torch.Tensor]:
    model = tiny_model(seed=3)
    batch = rollout_batch()
    advantages = torch.linspace(-1.0, 1.0, len(batch))
    with torch.no_grad():
        from dapo_ops.attention.teacher_forced import teacher_forced_pass

        old = teacher_forced_pass(model, batch, with_attention=False).per_token_logps
    policy_update(model, make_optimizer(model, config), batch, old, advantages, torch.ones(len(batch), dtype=torch.bool),
                  config, global_step=0, seed=0, **extra)
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def plain() -> list[torch.Tensor]:
    """The weights after the default update (no option on, no masked pass)."""
    return _update(CONFIG)


def test_with_the_options_off_the_update_is_bit_identical_when_the_masked_pass_ran(plain) -> None:
    kl = torch.rand(12, 6, generator=torch.Generator().manual_seed(0))
    with_kl = _update(CONFIG, visual_kl=kl, visual_seed=5)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_kl, strict=True))
    changed = _update(CONFIG.replace(visual_dependency=True, vppo_token_ratio=0.5), visual_kl=kl, visual_seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(plain, changed, strict=True))


def test_vppo_advantage_weighting_scales_the_steps_advantages_by_their_mean_dependency() -> None:
    batch = rollout_batch()
    kl = torch.zeros(12, 6)
    kl[:, 0] = torch.arange(12, dtype=torch.float32)  # one dependent token per rollout
    inputs = _UpdateInputs(batch, torch.zeros(12, 6), torch.ones(12), batch.completion_mask, None, kl, 0, 0.0)
    chunk = torch.tensor([0, 1, 2, 3])
    scaled = step_advantages(inputs, chunk, CONFIG.replace(visual_dependency=True, vppo_advantage_weighting=True))
    scores = kl[chunk, 0] / batch.completion_mask[chunk].sum(-1)
    expected = vppo_advantage_scale(scores, torch.ones(4, dtype=torch.bool), 0.8)
    assert scaled[chunk].tolist() == pytest.approx(expected.tolist())
    assert scaled[4:].tolist() == [1.0] * 8  # rollouts of other steps untouched
    assert step_advantages(inputs, chunk, CONFIG) is inputs.advantages


def test_vppo_needs_the_masked_pass() -> None:
    with pytest.raises(ValueError, match="set visual_dependency to true"):
        DapoConfig(visual_dependency=False, vppo_token_ratio=0.4)
    with pytest.raises(ValueError, match="vppo_advantage_weighting need the round's per-token visual"):
        _update(CONFIG.replace(visual_dependency=True, vppo_advantage_weighting=True))


def test_papo_runs_its_masked_forward_with_gradient(plain) -> None:
    papo = _update(CONFIG.replace(papo_coef=0.5, papo_entropy_coef=0.1, visual_mask="patch"), visual_seed=3)
    assert not all(torch.equal(a, b) for a, b in zip(plain, papo, strict=True))
