"""dapo-vlm's library: GRPO/DAPO reinforcement learning for vision-language models with attention diagnostics.

Subpackages by layer, each importing only from the layers before it (docs/architecture.md):
common, config, store, data, models, rl, rollout, attention, train, reporting, run, tracking, distributed.
The stable public functions are importable from here (`from dapo_ops import policy_loss`); each is loaded
on first use, so `import dapo_ops` costs nothing.
"""

from __future__ import annotations

from dapo_ops import _lazy

_EXPORTS = {
    "DapoConfig": "dapo_ops.config.dapo",
    "load_mc_dataset": "dapo_ops.data.loading",
    "load_rl_dataset": "dapo_ops.data.rl_loading",
    "accuracy_reward": "dapo_ops.rl.rewards",
    "mc_idx_reward": "dapo_ops.rl.rewards",
    "think_format_reward": "dapo_ops.rl.rewards",
    "mdi_reward": "dapo_ops.rl.rewards",
    "group_advantages": "dapo_ops.rl.advantages",
    "policy_loss": "dapo_ops.rl.loss",
    "build_embedded_policy": "dapo_ops.models.loading",
    "load_policy": "dapo_ops.models.loading",
    "encode_prompts": "dapo_ops.models.inputs",
    "generate_rollouts": "dapo_ops.rollout.generate",
    "metrics_from_attention_weights": "dapo_ops.attention.metrics",
    "teacher_forced_pass": "dapo_ops.attention.teacher_forced",
    "policy_update": "dapo_ops.train.update",
    "make_optimizer": "dapo_ops.train.update",
    "RunStore": "dapo_ops.store.layout",
    "run_round": "dapo_ops.run.round",
}

__all__ = sorted(_EXPORTS)
__getattr__ = _lazy.explicit(__name__, _EXPORTS)
