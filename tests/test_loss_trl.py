"""`policy_loss` equals the installed TRL's own `GRPOTrainer._compute_loss` on the same tensors.

No transcription: TRL's method runs on a stand-in trainer (attributes set by hand, one process) whose model is
a fused-LM-head stub returning the log-probs and entropies of fixed leaf logits. A TRL release that changes
its loss shows up here. Loss, metrics and the gradient w.r.t. the logits (through log-probs and entropies)
must agree for every loss type x importance sampling level x delta x top_entropy_quantile x beta.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from dapo_ops.rl.loss import LOSS_TYPES, entropy_from_logits, policy_loss, selective_log_softmax  # noqa: E402

PROMPT, WIDTH, VOCAB, BATCH = 3, 6, 7, 4
EPSILON, EPSILON_HIGH, MAX_COMPLETION_LENGTH = 0.2, 0.28, 8
DELTA = 1.3  # above 1 + epsilon_high, as TRL recommends; the spread below gives ratios up to ~e^0.9
BETA = 0.04


class FusedHeadStub:
    """What TRL's forward returns with `fused_lm_head=True`: next-token log-probs and entropies [B, L − 1]."""

    training = True

    def __init__(self, logits: torch.Tensor, completion_ids: torch.Tensor) -> None:
        self.logits, self.completion_ids = logits, completion_ids  # [B, T, V], [B, T]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 fused_lm_head: bool) -> SimpleNamespace:
        assert fused_lm_head and torch.equal(input_ids[:, -WIDTH:], self.completion_ids)
        logps = torch.log_softmax(self.logits, dim=-1)  # [B, T, V]
        token_logps = logps.gather(-1, self.completion_ids[..., None]).squeeze(-1)  # [B, T]
        entropy = -(logps.exp() * logps).sum(-1)  # [B, T]
        prompt_rows = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1 - WIDTH, dtype=logps.dtype)
        return SimpleNamespace(log_probs=torch.cat([prompt_rows, token_logps], 1),  # [B, L − 1]
                               entropy=torch.cat([prompt_rows, entropy], 1))


class OneProcess:
    """The accelerator calls `_compute_loss` makes, for a world of one."""

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0, pad_index: float = 0) -> torch.Tensor:
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def stand_in_trainer(model: FusedHeadStub, *, loss_type: str, importance_sampling_level: str,
                     delta: float | None, top_entropy_quantile: float, beta: float, entropy_coef: float = 0.0,
                     use_bias_correction_kl: bool = False, gradient_accumulation_steps: int = 1) -> GRPOTrainer:
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=OneProcess(), state=SimpleNamespace(global_step=0),
        args=SimpleNamespace(delta=delta, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                             use_bias_correction_kl=use_bias_correction_kl, report_to=[],
                             # one generation batch per optimizer step: TRL's num_items_in_batch is then the
                             # step's token count, as ours
                             steps_per_generation=gradient_accumulation_steps),
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, beta=beta,
        epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH, max_completion_length=MAX_COMPLETION_LENGTH,
        top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef,
        _entropy_bonus_enabled=entropy_coef != 0.0, use_adaptive_entropy=False,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, current_gradient_accumulation_steps=gradient_accumulation_steps,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    return trainer


def fixed_tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH, WIDTH, VOCAB, generator=generator, dtype=torch.float64) * 2
    completion_ids = torch.randint(0, VOCAB, (BATCH, WIDTH), generator=generator)
    current = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    lengths = torch.tensor([WIDTH, 1, 4, 5])
    return {
        "logits": logits,
        "prompt_ids": torch.randint(0, VOCAB, (BATCH, PROMPT), generator=generator),
        "prompt_mask": torch.ones(BATCH, PROMPT, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": (torch.arange(WIDTH)[None, :] < lengths[:, None]).long(),
        "advantages": torch.randn(BATCH, generator=generator, dtype=torch.float64),
        # |log ratio| up to 0.9: some tokens, and whole sequences, leave the trust region
        "old_per_token_logps": current + (torch.rand(BATCH, WIDTH, generator=generator, dtype=torch.float64) - 0.5) * 1.8,
        "ref_per_token_logps": current + (torch.rand(BATCH, WIDTH, generator=generator, dtype=torch.float64) - 0.5),
        "num_items_in_batch": torch.tensor(21.0, dtype=torch.float64),
    }


def trl_loss(tensors: dict[str, torch.Tensor], **options: object) -> tuple[torch.Tensor, torch.Tensor, dict]:
    logits = tensors["logits"].clone().requires_grad_(True)
    model = FusedHeadStub(logits, tensors["completion_ids"])
    trainer = stand_in_trainer(model, **options)
    inputs = {k: v for k, v in tensors.items() if k != "logits"}
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), logits.grad, metrics


def our_loss(tensors: dict[str, torch.Tensor], *, loss_type: str, importance_sampling_level: str,
             delta: float | None, top_entropy_quantile: float, beta: float, entropy_coef: float = 0.0,
             use_bias_correction_kl: bool = False,
             gradient_accumulation_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    logits = tensors["logits"].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        selective_log_softmax(logits, tensors["completion_ids"]),
        tensors["old_per_token_logps"],
        tensors["advantages"],
        tensors["completion_mask"],
        loss_type=loss_type, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, beta=beta,
        ref_per_token_logps=tensors["ref_per_token_logps"], max_completion_length=MAX_COMPLETION_LENGTH,
        num_items_in_batch=tensors["num_items_in_batch"], importance_sampling_level=importance_sampling_level,
        delta=delta, entropies=entropy_from_logits(logits), top_entropy_quantile=top_entropy_quantile,
        entropy_coef=entropy_coef, use_bias_correction_kl=use_bias_correction_kl,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    loss.backward()
    return loss.detach(), logits.grad, metrics


def assert_same(options: dict[str, object], seeds: range = range(2)) -> None:
    for seed in seeds:
        tensors = fixed_tensors(seed)
        ours, ours_grad, ours_metrics = our_loss(tensors, **options)
        trl, trl_grad, trl_metrics = trl_loss(tensors, **options)
        torch.testing.assert_close(ours, trl)
        torch.testing.assert_close(ours_grad, trl_grad)
        shared = set(ours_metrics) & set(trl_metrics)
        expected = {"kl"} if options["beta"] else set()
        expected |= {"cispo_clip_ratio"} if options["loss_type"] == "cispo" else set()
        if options["loss_type"] not in ("cispo", "sapo"):
            expected |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
        assert shared == expected
        assert {k: ours_metrics[k] for k in shared} == pytest.approx({k: trl_metrics[k] for k in shared})


@pytest.mark.parametrize(
    ("loss_type", "importance_sampling_level", "delta", "top_entropy_quantile", "beta"),
    list(itertools.product(LOSS_TYPES, ("token", "sequence"), (None, DELTA), (1.0, 0.4), (0.0, BETA))),
)
def test_loss_metrics_and_gradient_equal_trls_compute_loss(
    loss_type: str, importance_sampling_level: str, delta: float | None, top_entropy_quantile: float, beta: float
) -> None:
    assert_same({"loss_type": loss_type, "importance_sampling_level": importance_sampling_level, "delta": delta,
                 "top_entropy_quantile": top_entropy_quantile, "beta": beta})


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.4])
@pytest.mark.parametrize("gradient_accumulation_steps", [1, 3])
def test_entropy_bonus_and_accumulation_equal_trls(loss_type: str, top_entropy_quantile: float,
                                                    gradient_accumulation_steps: int) -> None:
    assert_same({"loss_type": loss_type, "importance_sampling_level": "token", "delta": None,
                 "top_entropy_quantile": top_entropy_quantile, "beta": 0.0, "entropy_coef": 0.05,
                 "gradient_accumulation_steps": gradient_accumulation_steps})


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
def test_bias_corrected_kl_equals_trls(loss_type: str, importance_sampling_level: str) -> None:
    assert_same({"loss_type": loss_type, "importance_sampling_level": importance_sampling_level, "delta": None,
                 "top_entropy_quantile": 1.0, "beta": BETA, "use_bias_correction_kl": True})


def test_the_options_change_the_loss_on_these_tensors() -> None:
    """The comparison above would be empty if delta, the entropy quantile or the sequence level did nothing."""
    tensors = fixed_tensors(0)
    base = {"loss_type": "dapo", "importance_sampling_level": "token", "delta": None, "top_entropy_quantile": 1.0,
            "beta": 0.0}
    loss = our_loss(tensors, **base)[0]
    for change in ({"delta": DELTA}, {"top_entropy_quantile": 0.4}, {"importance_sampling_level": "sequence"}):
        assert not torch.allclose(our_loss(tensors, **{**base, **change})[0], loss), change
