"""Run configuration as a typed `dg.Config`; its defaults come from `dapo_ops.config.DapoConfig`."""

from __future__ import annotations

import dataclasses

import dagster as dg

from dapo_ops.config import DapoConfig

_DEFAULTS = DapoConfig()


class TrainingConfig(dg.Config):
    """The knobs of a training run, with TRL's names. Every asset of a round takes the same config."""

    run_name: str = _DEFAULTS.run_name
    model_name_or_path: str = _DEFAULTS.model_name_or_path
    dataset: str = _DEFAULTS.dataset
    seed: int = _DEFAULTS.seed
    max_rounds: int = _DEFAULTS.max_rounds
    prompts_per_round: int = _DEFAULTS.prompts_per_round
    num_generations: int = _DEFAULTS.num_generations
    max_completion_length: int = _DEFAULTS.max_completion_length
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    num_iterations: int = _DEFAULTS.num_iterations
    steps_per_generation: int = _DEFAULTS.steps_per_generation
    gradient_accumulation_steps: int = _DEFAULTS.gradient_accumulation_steps
    learning_rate: float = _DEFAULTS.learning_rate
    weight_decay: float = _DEFAULTS.weight_decay
    max_grad_norm: float = _DEFAULTS.max_grad_norm
    loss_type: str = _DEFAULTS.loss_type
    epsilon: float = _DEFAULTS.epsilon
    epsilon_high: float = _DEFAULTS.epsilon_high
    beta: float = _DEFAULTS.beta
    scale_rewards: str = _DEFAULTS.scale_rewards
    shared_prefix: bool = _DEFAULTS.shared_prefix
    dynamic_sampling: bool = _DEFAULTS.dynamic_sampling
    dynamic_sampling_max_tries: int = _DEFAULTS.dynamic_sampling_max_tries
    overlong_buffer: int = _DEFAULTS.overlong_buffer
    overlong_penalty_factor: float = _DEFAULTS.overlong_penalty_factor
    reward_funcs: list[str] = _DEFAULTS.reward_funcs
    reward_weights: list[float] = _DEFAULTS.reward_weights
    mdi_tolerance: float = _DEFAULTS.mdi_tolerance
    mdi_reward_stage: str = _DEFAULTS.mdi_reward_stage
    mdi_shaping: str = _DEFAULTS.mdi_shaping
    synthetic_tasks: list[str] = _DEFAULTS.synthetic_tasks
    num_train_examples: int = _DEFAULTS.num_train_examples
    num_eval_examples: int = _DEFAULTS.num_eval_examples
    eval_subset_size: int = _DEFAULTS.eval_subset_size
    warmup_steps: int = _DEFAULTS.warmup_steps
    warmup_learning_rate: float = _DEFAULTS.warmup_learning_rate
    num_processes: int = _DEFAULTS.num_processes
    device: str = _DEFAULTS.device
    torch_dtype: str = _DEFAULTS.torch_dtype
    reanalysis: bool = False

    def to_dapo(self) -> DapoConfig:
        """Validated library config (raises ValueError saying what to change)."""
        names = [f.name for f in dataclasses.fields(DapoConfig)]
        return DapoConfig.from_dict({name: getattr(self, name) for name in names})

    @classmethod
    def from_dapo(cls, config: DapoConfig, **extra: object) -> TrainingConfig:
        return cls(**config.to_dict(), **extra)


ROUND_ASSETS = ("rollouts", "attention_metrics", "rewards", "policy_update", "attention_report", "training_report")
SETUP_ASSETS = ("dataset", "base_checkpoint")
REANALYSIS_ASSETS = ("attention_metrics", "attention_report")


def run_config_for(assets: tuple[str, ...] | list[str], config: TrainingConfig) -> dg.RunConfig:
    """The same config for every asset of a run (what the launchpad's scaffold gives per asset)."""
    return dg.RunConfig(ops={name: config for name in assets})
