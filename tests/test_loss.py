"""Policy loss (TRL semantics), per-token log-probs and entropy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_ops.rl.loss import LOSS_TYPES, entropy_from_logits, policy_loss, selective_log_softmax


def random_batch(seed: int, batch: int = 4, width: int = 6, spread: float = 0.4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, width, generator=generator, dtype=torch.float64) * 3
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    return {
        "per_token_logps": old
        + (torch.rand(batch, width, generator=generator, dtype=torch.float64) - 0.5) * spread,
        "old_per_token_logps": old,
        "ref_per_token_logps": old
        + (torch.rand(batch, width, generator=generator, dtype=torch.float64) - 0.5),
        "advantages": torch.randn(batch, generator=generator, dtype=torch.float64),
        "completion_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
    }


# --- hand-computed ----------------------------------------------------------------------------------------------


def test_one_token_unclipped_loss_is_minus_ratio_times_advantage() -> None:
    logp = torch.tensor([[math.log(0.55)]], dtype=torch.float64)
    old = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    loss, metrics = policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.1 * 2.0)
    assert metrics == {"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0}


def test_clipping_hand_values() -> None:
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, -1, -1, +1; ε = 0.2, ε_high = 0.28
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=torch.float64))
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    loss, metrics = policy_loss(logp, old, advantages, torch.ones(1, 4), epsilon=0.2, epsilon_high=0.28)
    # per token: -min(1.5, 1.28) = -1.28; -min(-0.5, -0.8) = 0.8; -min(-1.5, -1.28) = 1.5; -min(0.5, 0.8) = -0.5
    assert loss.item() == pytest.approx((-1.28 + 0.8 + 1.5 - 0.5) / 4)
    assert metrics["clip_ratio/high_mean"] == 0.25
    assert metrics["clip_ratio/low_mean"] == 0.25
    assert metrics["clip_ratio/region_mean"] == 0.5


def test_normalizations_hand_values() -> None:
    # on policy, so each token's loss is -A: sequence 1 has 2 tokens with A = 1, sequence 2 has 1 token with A = -2
    logp = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    total = -1.0 - 1.0 + 2.0

    def loss(loss_type: str, **kw: object) -> float:
        return policy_loss(logp, logp, advantages, mask, loss_type=loss_type, **kw)[0].item()

    assert loss("grpo") == pytest.approx((-2.0 / 2 + 2.0 / 1) / 2)
    assert loss("bnpo") == pytest.approx(total / 3)
    assert loss("dr_grpo") == pytest.approx(total / (2 * 3))
    assert loss("dr_grpo", max_completion_length=10) == pytest.approx(total / (2 * 10))
    assert loss("dapo") == pytest.approx(total / 3)
    assert loss("dapo", num_items_in_batch=12) == pytest.approx(total / 12)


def test_kl_term_hand_value() -> None:
    logp = torch.zeros(1, 1, dtype=torch.float64)
    ref = torch.full((1, 1), 0.5, dtype=torch.float64)
    kl = math.exp(0.5) - 0.5 - 1
    loss, metrics = policy_loss(
        logp, logp, torch.zeros(1), torch.ones(1, 1), beta=0.1, ref_per_token_logps=ref
    )
    assert loss.item() == pytest.approx(0.1 * kl)
    assert metrics["kl"] == pytest.approx(kl)


def test_beta_without_reference_is_refused() -> None:
    logp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), beta=0.1)


def test_unknown_loss_type_is_refused() -> None:
    logp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), loss_type="ppo")


def test_some_tokens_are_clipped_on_a_spread_batch() -> None:
    batch = random_batch(0, spread=1.0)
    _, metrics = policy_loss(
        batch["per_token_logps"], batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"]
    )
    assert metrics["clip_ratio/region_mean"] > 0


# --- invariances ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    extra=st.integers(1, 4),
    loss_type=st.sampled_from(LOSS_TYPES),
    beta=st.sampled_from([0.0, 0.1]),
)
def test_padding_columns_do_not_change_the_loss(seed: int, extra: int, loss_type: str, beta: float) -> None:
    batch = random_batch(seed)

    def padded(name: str, fill: float) -> torch.Tensor:
        value = batch[name]
        return torch.cat([value, torch.full((4, extra), fill, dtype=value.dtype)], dim=1)

    kw = {"loss_type": loss_type, "beta": beta, "max_completion_length": 16}
    base, base_metrics = policy_loss(
        batch["per_token_logps"],
        batch["old_per_token_logps"],
        batch["advantages"],
        batch["completion_mask"],
        ref_per_token_logps=batch["ref_per_token_logps"],
        **kw,
    )
    # absurd values on padding (ratios of e^±100) must be ignored, not turned into inf · 0 = NaN
    logp = padded("per_token_logps", 50.0).requires_grad_(True)
    wide, wide_metrics = policy_loss(
        logp,
        padded("old_per_token_logps", -50.0),
        batch["advantages"],
        padded("completion_mask", 0),
        ref_per_token_logps=padded("ref_per_token_logps", 150.0),
        **kw,
    )
    torch.testing.assert_close(wide, base)
    assert wide_metrics == pytest.approx(base_metrics)
    wide.backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[:, -extra:], torch.zeros(4, extra, dtype=torch.float64))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_non_finite_log_probs_on_padding_give_a_finite_loss_and_gradient(loss_type: str) -> None:
    batch = random_batch(7)
    padding = batch["completion_mask"] == 0
    assert padding.any()
    logp = batch["per_token_logps"].masked_fill(padding, float("-inf")).requires_grad_(True)
    old = batch["old_per_token_logps"].masked_fill(padding, float("nan"))
    ref = batch["ref_per_token_logps"].masked_fill(padding, float("inf"))
    loss, metrics = policy_loss(
        logp,
        old,
        batch["advantages"],
        batch["completion_mask"],
        loss_type=loss_type,
        beta=0.1,
        ref_per_token_logps=ref,
    )
    clean, _ = policy_loss(
        batch["per_token_logps"],
        batch["old_per_token_logps"],
        batch["advantages"],
        batch["completion_mask"],
        loss_type=loss_type,
        beta=0.1,
        ref_per_token_logps=batch["ref_per_token_logps"],
    )
    torch.testing.assert_close(loss, clean)
    assert all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), split=st.integers(1, 3), beta=st.sampled_from([0.0, 0.1]))
def test_dapo_micro_batches_accumulate_to_the_big_batch(seed: int, split: int, beta: float) -> None:
    batch = random_batch(seed)
    items = batch["completion_mask"].sum()

    def loss_and_grad(rows: slice, num_items: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logp = batch["per_token_logps"].clone().requires_grad_(True)
        loss, _ = policy_loss(
            logp[rows],
            batch["old_per_token_logps"][rows],
            batch["advantages"][rows],
            batch["completion_mask"][rows],
            beta=beta,
            ref_per_token_logps=batch["ref_per_token_logps"][rows],
            num_items_in_batch=num_items,
        )
        loss.backward()
        return loss.detach(), logp.grad

    big_loss, big_grad = loss_and_grad(slice(None), None)
    first_loss, first_grad = loss_and_grad(slice(0, split), items)
    second_loss, second_grad = loss_and_grad(slice(split, None), items)
    torch.testing.assert_close(first_loss + second_loss, big_loss)
    torch.testing.assert_close(first_grad + second_grad, big_grad)


def test_old_logps_default_to_the_detached_current_ones() -> None:
    batch = random_batch(3)
    args = (batch["advantages"], batch["completion_mask"])
    explicit, _ = policy_loss(batch["per_token_logps"], batch["per_token_logps"], *args)
    implicit, _ = policy_loss(batch["per_token_logps"], None, *args)
    torch.testing.assert_close(implicit, explicit)


# --- log-probs and entropy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_equals_log_softmax_gather(chunk_size: int | None, temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator) * 4
    index = torch.randint(0, 11, (3, 7), generator=generator)
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, index[..., None]).squeeze(-1)
    ours = selective_log_softmax(logits, index, temperature=temperature, chunk_size=chunk_size)
    torch.testing.assert_close(ours, expected)
    recorded = selective_log_softmax(
        logits.clone().requires_grad_(True), index, temperature=temperature, chunk_size=chunk_size
    )
    torch.testing.assert_close(recorded.detach(), expected)


def test_selective_log_softmax_gradient_equals_the_naive_one() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=generator, dtype=torch.float64)
    index = torch.randint(0, 9, (2, 4), generator=generator)
    ours_in = logits.clone().requires_grad_(True)
    naive_in = logits.clone().requires_grad_(True)
    selective_log_softmax(ours_in, index, chunk_size=3).sum().backward()
    torch.log_softmax(naive_in, dim=-1).gather(-1, index[..., None]).sum().backward()
    torch.testing.assert_close(ours_in.grad, naive_in.grad)


def test_selective_log_softmax_upcasts_bfloat16() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 50, generator=generator).to(torch.bfloat16)
    index = torch.randint(0, 50, (2, 3), generator=generator)
    ours = selective_log_softmax(logits, index)
    assert ours.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_entropy_equals_the_definition(chunk_size: int | None) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 13, generator=generator) * 3
    probs = torch.softmax(logits, dim=-1)
    expected = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=chunk_size), expected)


def test_entropy_hand_values_and_masked_vocabulary() -> None:
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8))
    masked = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]], requires_grad=True)
    entropy = entropy_from_logits(masked)
    assert entropy.item() == pytest.approx(math.log(2))
    entropy.sum().backward()
    assert torch.isfinite(masked.grad).all()


def test_entropy_and_logps_of_a_temperature_match_scaled_logits() -> None:
    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        entropy_from_logits(logits, temperature=0.5), entropy_from_logits(logits / 0.5)
    )


# --- objective variants, hand-computed --------------------------------------------------------------------------


def test_sequence_level_weight_is_the_geometric_mean_of_the_token_ratios() -> None:
    # token ratios 1.1 and 1.4 (1.4 alone is outside the trust region); one sequence weight √(1.1·1.4) ≈ 1.241
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.1, 1.4, 9.0]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0]), mask, loss_type="bnpo", epsilon_high=0.28,
                                importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-math.sqrt(1.1 * 1.4))
    assert metrics["clip_ratio/high_mean"] == 0.0  # the sequence is inside [0.8, 1.28]


def test_two_sided_clipping_caps_the_ratio_of_negative_advantages() -> None:
    logp = torch.log(torch.tensor([[3.0]], dtype=torch.float64))
    old = torch.zeros(1, 1, dtype=torch.float64)
    plain, _ = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1))
    capped, _ = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), delta=1.5)
    assert plain.item() == pytest.approx(3.0)  # -min(-3, -1.2)
    assert capped.item() == pytest.approx(1.5)  # -min(-1.5, -1.2)


def test_cispo_gradient_is_the_clipped_weight_times_the_advantage() -> None:
    # ratios 2 and 0.5 with A = 1, weight cap ε_high = 1.5: d loss / d logp = -min(w, 1.5) · A / (Σ m)
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.log(torch.tensor([[2.0, 0.5]], dtype=torch.float64)).requires_grad_(True)
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), loss_type="cispo",
                                epsilon_high=1.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5 / 2, -0.5 / 2]], dtype=torch.float64))
    assert metrics["cispo_clip_ratio"] == 0.5


def test_sapo_on_policy_is_the_soft_gate_at_ratio_one() -> None:
    # sigmoid(0) · 4 / τ = 2 / τ: -2A/τ with τ_pos = 1 for A = 1 and τ_neg = 2 for A = -1
    logp = torch.zeros(2, 1, dtype=torch.float64)
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 1),
                          loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=2.0)
    assert loss.item() == pytest.approx((-2.0 + 1.0) / 2)


def test_luspo_weights_each_sequence_by_its_length() -> None:
    # on policy, A = 1 for a 3-token and a 1-token sequence: mean over sequences of -(length)
    logp = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = policy_loss(logp, logp, torch.ones(2, dtype=torch.float64), mask, loss_type="luspo",
                          importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-(3 + 1) / 2)


def test_top_entropy_quantile_keeps_the_loss_on_high_entropy_tokens() -> None:
    # advantages per token 1, 2, 3, 4 with entropies 0.1, 0.9, 0.5, 0.7: ρ = 0.5 keeps tokens 2 and 4
    logp = torch.zeros(1, 4, dtype=torch.float64)
    entropies = torch.tensor([[0.1, 0.9, 0.5, 0.7]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp, logp, advantages, torch.ones(1, 4), entropies=entropies,
                          top_entropy_quantile=0.5)
    assert loss.item() == pytest.approx(-(2.0 + 4.0) / 4)  # dapo keeps all tokens in the normalizer


def test_entropy_bonus_subtracts_the_mean_entropy_of_the_loss_tokens() -> None:
    logp = torch.zeros(1, 3, dtype=torch.float64)
    entropies = torch.tensor([[1.0, 2.0, 100.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp, logp, torch.zeros(1), torch.tensor([[1, 1, 0]]), entropies=entropies,
                          entropy_coef=0.1)
    assert loss.item() == pytest.approx(-0.1 * 1.5)


def test_options_that_need_entropies_refuse_to_run_without() -> None:
    logp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="entropies"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), importance_sampling_level="seq")
