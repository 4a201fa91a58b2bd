"""Rollout engines: what samples a round's completions. The seam for vLLM/SGLang next to HF `generate`.

An engine turns encoded prompts into a `RolloutBatch` (group-major, G rows per prompt). `training`
builds one per round from the config (`make_engine`); TRL's names select it: `use_vllm=False` is the
in-process HF engine below. Adding an engine is one new module with a class taking `(config, policy)`
plus its entry in `ENGINES` (and, for vLLM, `VLLM_ENGINE` below).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch stays out of `dapo_ops.config`'s imports (the Dagster code location loads it)
    from dapo_ops.config import DapoConfig
    from dapo_ops.inputs import PromptBatch
    from dapo_ops.models import Policy
    from dapo_ops.rollout import RolloutBatch

HF_ENGINE = "hf"
VLLM_ENGINE = "vllm"
# Engine name -> "module:Class"; imported on first use, so an engine's heavy dependency loads only if chosen.
ENGINES: dict[str, str] = {HF_ENGINE: "dapo_ops.engines:HFEngine"}


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples `num_generations` completions per prompt; deterministic for a seed.

    Under several processes (`dapo_ops.shards`) each rank passes its share of the round's prompts and
    `prompt_offset`, the round index of its first prompt: an engine seeds each prompt's group from
    (seed, prompt_offset + i), so the round's rollouts do not depend on the number of processes. With
    one process the keyword is not passed (an engine without it still serves that case)."""

    def generate(self, prompts: PromptBatch, *, num_generations: int, max_completion_length: int,
                 temperature: float, top_p: float, seed: int, prompt_offset: int = 0) -> RolloutBatch: ...


class HFEngine:
    """`transformers` forward passes with the KV cache, in this process, on the policy being trained
    (`dapo_ops.rollout.generate_rollouts`): nothing to synchronise after an update. `config.rollout_cache`
    picks the preallocated ("static", `dapo_ops.kv_cache`) or the growing ("dynamic") KV cache."""

    def __init__(self, config: DapoConfig | None, policy: Policy) -> None:
        self.policy = policy
        self.rollout_cache = "static" if config is None else config.rollout_cache

    def generate(self, prompts: PromptBatch, *, num_generations: int, max_completion_length: int,
                 temperature: float, top_p: float, seed: int, prompt_offset: int = 0) -> RolloutBatch:
        from dapo_ops.rollout import generate_rollouts

        return generate_rollouts(self.policy, prompts, num_generations=num_generations,
                                 max_completion_length=max_completion_length, temperature=temperature,
                                 top_p=top_p, seed=seed, prompt_offset=prompt_offset,
                                 rollout_cache=self.rollout_cache)


def engine_name(config: DapoConfig) -> str:
    """The engine a config selects, by TRL's switch (`use_vllm`; `vllm_mode` is the vLLM engine's own)."""
    return VLLM_ENGINE if config.use_vllm else HF_ENGINE


def engine_problem(config: DapoConfig) -> str | None:
    """Why the config's engine cannot be built, for `DapoConfig.validate`; None when it can."""
    name = engine_name(config)
    if name in ENGINES:
        return None
    return (f"use_vllm={config.use_vllm} selects the {name!r} rollout engine, which is not implemented in this "
            f"install (dapo_ops.engines.ENGINES has: {', '.join(sorted(ENGINES))}); set use_vllm=false, or add "
            f"an engine module and register it in dapo_ops.engines.ENGINES")


def make_engine(config: DapoConfig, policy: Policy) -> RolloutEngine:
    """The rollout engine `config` selects, sampling from `policy`."""
    name = engine_name(config)
    if name not in ENGINES:
        raise ValueError(engine_problem(config))
    module, _, attribute = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)(config, policy)
