"""bf16 autocast and gradient checkpointing inside a real training round (`dapo_ops.run.round.run_round` on the
embedded model at conftest's TINY_RUN size): it trains, keeps fp32 weights and logs its metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.run import phases as training
from dapo_ops.run import round as dapo_round
from dapo_ops.store.layout import RunStore, checkpoint_key
from tests.conftest import TINY_RUN


def _cpu_bf16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_bf16_autocast(), reason="this CPU has no bf16 autocast")
def test_a_bf16_round_with_gradient_checkpointing_trains_and_saves_fp32_weights(tmp_path):
    from safetensors import safe_open

    config = DapoConfig(**{**TINY_RUN, "run_name": "bf16-gc", "bf16": True, "gradient_checkpointing": True})
    store = RunStore(tmp_path, config.run_name)
    key = checkpoint_key(0)
    log = training.round_log(store, key)
    training.prepare_dataset(config, store)
    policy = training.build_base_checkpoint(config, store, log)["policy"]
    optimizer = training.load_optimizer(store, key, policy, config)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    train_dtypes: list[torch.dtype] = []
    checkpointing: list[bool] = []

    def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # the update's forwards (the other passes run without grad)
            train_dtypes.append(out.dtype)
            checkpointing.append(policy.model.is_gradient_checkpointing)

    hook = policy.model.lm_head.register_forward_hook(record)

    result = dapo_round.run_round(config, store, key, policy, optimizer, log)
    hook.remove()

    assert len(result.record.steps) > 0 and math.isfinite(result.metrics["loss"])
    assert math.isfinite(result.metrics["grad_norm"]) and result.metrics["grad_norm"] > 0
    assert train_dtypes and set(train_dtypes) == {torch.bfloat16}  # the update's forwards ran under autocast
    assert all(checkpointing) and not policy.model.is_gradient_checkpointing  # on in the update only
    changed = [n for n, p in policy.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all(p.dtype == torch.float32 for p in policy.model.parameters())
    with safe_open(str(store.checkpoint_dir(checkpoint_key(1)) / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}  # noqa: SIM118 - not iterable
    assert json.loads(store.round(key).metrics.read_text()) == result.metrics
