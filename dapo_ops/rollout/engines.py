"""Rollout engines: what samples a round's completions. The seam for vLLM/SGLang next to HF `generate`.

An engine turns encoded prompts into a `RolloutBatch` (group-major, G rows per prompt). `training`
builds one per round from the config (`make_engine`); TRL's names select it: `use_vllm=False` is the
in-process HF engine below. Adding an engine is one new module in this package with a class taking
`(config, policy)` decorated `@register_engine(name)` (`dapo_ops.config.registry`; vLLM's name is `VLLM_ENGINE`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dapo_ops.config.registry import (
    HF_ENGINE,
    engine_class,
    engine_name,
    engine_problem,
    register_engine,
)

if TYPE_CHECKING:  # torch stays out of `dapo_ops.config.dapo`'s imports (the Dagster code location loads it)
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.models.inputs import PromptBatch
    from dapo_ops.models.loading import Policy
    from dapo_ops.rollout.generate import RolloutBatch



@runtime_checkable
class RolloutEngine(Protocol):
    """Samples `num_generations` completions per prompt; deterministic for a seed.

    Under several processes (`dapo_ops.run.shards`) each rank passes its share of the round's prompts and
    `prompt_offset`, the round index of its first prompt: an engine seeds each prompt's group from
    (seed, prompt_offset + i), so the round's rollouts do not depend on the number of processes. With
    one process the keyword is not passed (an engine without it still serves that case)."""

    def generate(self, prompts: PromptBatch, *, num_generations: int, max_completion_length: int,
                 temperature: float, top_p: float, seed: int, prompt_offset: int = 0) -> RolloutBatch: ...


@register_engine(HF_ENGINE)
class HFEngine:
    """`transformers` forward passes with the KV cache, in this process, on the policy being trained
    (`dapo_ops.rollout.generate.generate_rollouts`): nothing to synchronise after an update. `config.rollout_cache`
    picks the preallocated ("static", `dapo_ops.rollout.generate.kv_cache`) or the growing ("dynamic") KV cache."""

    def __init__(self, config: DapoConfig | None, policy: Policy) -> None:
        self.policy = policy
        self.rollout_cache = "static" if config is None else config.rollout_cache

    def generate(self, prompts: PromptBatch, *, num_generations: int, max_completion_length: int,
                 temperature: float, top_p: float, seed: int, prompt_offset: int = 0) -> RolloutBatch:
        from dapo_ops.rollout.generate import generate_rollouts

        return generate_rollouts(self.policy, prompts, num_generations=num_generations,
                                 max_completion_length=max_completion_length, temperature=temperature,
                                 top_p=top_p, seed=seed, prompt_offset=prompt_offset,
                                 rollout_cache=self.rollout_cache)


def make_engine(config: DapoConfig, policy: Policy) -> RolloutEngine:
    """The rollout engine `config` selects, sampling from `policy`."""
    cls = engine_class(engine_name(config))
    if cls is None:
        raise ValueError(engine_problem(config))
    return cls(config, policy)
