"""Typed training configuration with TRL's names; the one place defaults live."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from dapo_ops.config import registry
from dapo_ops.config.registry import engine_problem

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
MultiObjectiveAggregation = Literal["sum_then_normalize", "normalize_then_sum"]
ScaleRewards = Literal["group", "batch", "none"]
Stage = Literal["early", "middle", "late", "all"]
MdiShaping = Literal["clip", "log_distance", "group_log_distance", "group_zscore"]
VllmMode = Literal["server", "colocate"]
DatasetLayout = Literal["auto", "aokvqa", "trl", "verl", "easyr1"]
DATASET_LAYOUTS: tuple[str, ...] = get_args(DatasetLayout)
RolloutCache = Literal["dynamic", "static"]
WarmupTarget = Literal["task", "format"]
WarmupAnswer = Literal["letter", "choice"]
VisualMask = Literal["blank", "patch", "noise"]
WARMUP_TARGETS: tuple[str, ...] = get_args(WarmupTarget)
WARMUP_ANSWERS: tuple[str, ...] = get_args(WarmupAnswer)
VLLM_MODES: tuple[str, ...] = get_args(VllmMode)
VISUAL_MASKS: tuple[str, ...] = get_args(VisualMask)
ROLLOUT_CACHES: tuple[str, ...] = get_args(RolloutCache)

# The value lists are read off the Literal types, so each list is written once (here, where this dependency-free
# module can hand it to `loss`, `attention` and the Dagster config without importing torch).
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = get_args(ImportanceSamplingLevel)
MULTI_OBJECTIVE_AGGREGATIONS: tuple[str, ...] = get_args(MultiObjectiveAggregation)
SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewards)
STAGES: tuple[str, ...] = get_args(Stage)
MDI_SHAPINGS: tuple[str, ...] = get_args(MdiShaping)

EMBEDDED = "embedded"
TORCH_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def data_root() -> Path:
    """The data root: `DAPO_VLM_HOME`, default `./var`."""
    return Path(os.environ.get("DAPO_VLM_HOME", "var")).resolve()


@dataclass
class DapoConfig:
    """Everything a training run needs. Field names follow TRL's `GRPOConfig` where TRL has one."""

    run_name: str = "embedded-demo"
    model_name_or_path: str = EMBEDDED
    dataset: str = EMBEDDED
    # The dataset's layout (dapo_ops.data.layouts, docs/data.md): "auto" tells it from the columns. EasyR1's keys name
    # the columns holding the prompt, the answer and the images (None: the layout's own names).
    dataset_layout: DatasetLayout = "auto"
    prompt_key: str | None = None
    answer_key: str | None = None
    image_key: str | None = None
    # Images per prompt for `make plan` when no dataset says it (None: the dataset's largest, else 1).
    images_per_prompt: int | None = None
    seed: int = 0
    max_rounds: int = 8

    # Rollouts: P prompts x G completions per round.
    prompts_per_round: int = 64
    num_generations: int = 8
    max_completion_length: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    # Rollout engine, TRL's switch: False is in-process HF `generate` (see dapo_ops.rollout.engines).
    use_vllm: bool = False
    vllm_mode: VllmMode = "colocate"
    # The HF engine's KV cache: "static" preallocates it and writes each decoding step in place
    # (dapo_ops.kv_cache); "dynamic" grows it by concatenation. Both sample the same tokens for a seed.
    rollout_cache: RolloutCache = "static"

    # Update: mu epochs over the round's batch, split into steps_per_generation optimizer steps each.
    num_iterations: int = 2
    steps_per_generation: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss_type: LossType = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0
    scale_rewards: ScaleRewards = "group"
    # Objective variants (TRL's GRPOConfig names and semantics; the defaults leave the loss above unchanged).
    importance_sampling_level: ImportanceSamplingLevel = "token"  # "sequence": GSPO's one ratio per sequence
    delta: float | None = None  # two-sided clipping: caps the ratio of negative-advantage tokens (INTELLECT-2)
    top_entropy_quantile: float = 1.0  # rho < 1: the loss on the top-rho highest-entropy tokens only
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    mask_truncated_completions: bool = False  # completions without EOS leave the loss (DAPO)
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * mean entropy of the loss tokens
    use_bias_correction_kl: bool = False  # TRL's default is True: k3 times the importance weight
    multi_objective_aggregation: MultiObjectiveAggregation = "sum_then_normalize"
    # Compute each prompt once for all its rollouts in the teacher-forced pass and the update (a shared KV
    # cache); False runs one full forward per rollout (the same numbers up to float rounding).
    shared_prefix: bool = True
    # Rollouts per forward of the no-grad teacher-forced (attention, old log-prob) and reference passes, TRL's
    # name (its GRPOTrainer scores in chunks of per_device_train_batch_size). None: the whole round at once.
    local_rollout_forward_batch_size: int | None = None
    # DAPO extras.
    dynamic_sampling: bool = False
    dynamic_sampling_max_tries: int = 3
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0

    # Rewards (TRL's `reward_funcs`/`reward_weights`): built-in names registered in `dapo_ops.config.registry`, or import
    # paths `my_pkg.rewards:length_penalty`; one weight per entry.
    reward_funcs: list[str] = field(default_factory=lambda: list(registry.DEFAULT_REWARD_FUNCS))
    reward_weights: list[float] = field(default_factory=lambda: [3.0, 1.0, 1.0])
    mdi_tolerance: float = 2.0
    mdi_reward_stage: Stage = "all"
    mdi_shaping: MdiShaping = "log_distance"
    # The attention reward reads the policy's own attention, so its exact gradient has a pathwise term beside
    # the policy-gradient one (dapo_ops.attention.pathwise): the update adds -coef * w * mean r(theta). 0: off; 1: the
    # exact gradient. Per-rollout shapings only (clip, log_distance). 0.01: the ablation's choice (docs/results.md):
    # |ln MDI| 0.02x that of weight 0 at the same eval accuracy; 0.03 and more cost accuracy on some seeds. It
    # leans on the loss's trust region: with loss_type cispo or sapo (no clip that stops a token's gradient) it
    # sped up their collapse in the ablation, so set it to 0 there.
    mdi_pathwise_coef: float = 0.01

    # Visual dependency (dapo_ops.attention.visual, docs/metrics.md): the teacher-forced pass scores every rollout again
    # with its images degraded (`visual_mask`: blank = the processor's mean pixel, patch = a random
    # `visual_mask_ratio` of the patches, noise). False: no masked pass and no visual/* metric (the eval's blind
    # accuracy stays). On by default: its cost is within the goal (make bench, `visual_dependency_round_overhead`
    # <= 0.25 at the realistic shape; docs/results.md); a re-analysis always runs it. VPPO
    # needs it; PAPO reuses its masks.
    visual_dependency: bool = True
    visual_mask: VisualMask = "blank"
    visual_mask_ratio: float = 0.6  # PAPO's share of masked patches
    visual_dependency_threshold: float = 0.01  # nats: a token above it is visually dependent (VPPO's pivotal)
    # VPPO (arXiv 2510.09285): the loss on each rollout's top-rho tokens by visual dependency (1: all), and each
    # rollout's advantage scaled by its normalised mean dependency into [vppo_advantage_min, ...] (mean ~1).
    vppo_token_ratio: float = 1.0
    vppo_advantage_weighting: bool = False
    vppo_advantage_min: float = 0.8
    # PAPO (arXiv 2507.06448): loss -= papo_coef * KL_prcp (the KL to the masked input, maximised) and
    # += papo_entropy_coef * (H[pi] + H[pi_masked]) (the double-entropy regulariser). PAPO-D: 0.01 and 0.03.
    papo_coef: float = 0.0
    papo_entropy_coef: float = 0.0

    # Embedded default: synthetic data size and the supervised warm start of ckpt-0000.
    # Four question types (dapo_ops.data.synthetic): the color task alone is learned by round 6, this mix (yes/no with
    # negations, the color of one of two shapes, 2-4 choices) is still rising at round 8 (docs/results.md; numbers in
    # benchmarks/learning_findings.md).
    synthetic_tasks: list[str] = field(default_factory=lambda: ["color", "yes_no", "color_of_shape", "color_count"])
    num_train_examples: int = 2048
    num_eval_examples: int = 256
    eval_subset_size: int = 128
    warmup_steps: int = 45
    warmup_learning_rate: float = 3e-3
    # What the warm start teaches: "task" = the right answers, "format" = a uniformly drawn choice (the format
    # and no task, no letter prior); and how its targets answer: "letter" (`Answer: B`) or "choice" (`Answer: green`).
    warmup_target: WarmupTarget = "task"
    warmup_answer: WarmupAnswer = "letter"

    # Scale-out.
    num_processes: int = 1
    device: str = "auto"
    torch_dtype: str = "float32"  # the dtype the weights are loaded in (TRL's ModelConfig.dtype)
    bf16: bool = False  # TRL/HF: bf16 autocast of the forwards; the optimizer keeps torch_dtype master weights
    gradient_checkpointing: bool = False  # recompute activations in the backward (use_reentrant=False)

    # LoRA via peft, TRL's ModelConfig names (dapo_ops.models.lora); a LoRA checkpoint holds the adapter only.
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None: every linear layer of the language model
    freeze_vision_tower: bool = False  # EasyR1's freeze_vision_tower: the vision encoder is not trained

    # Checkpoint retention (HF Trainer's names, per checkpoint partition; dapo_ops.run.retention).
    save_total_limit: int | None = None  # keep the weights of the newest N trained checkpoints (None: all)
    save_only_model: bool = False  # never store optimizer state (resume restarts AdamW)

    # Monitoring: the blocking check on policy_update, and the rollout sample the reports and MLflow show.
    max_eval_drop: float = 0.2  # a checkpoint whose eval accuracy fell by more than this stops the run
    report_samples: int = 4  # prompts shown with all G completions (best, then worst mean reward); -1: every rollout

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail at once, saying what to change."""
        problems: list[str] = []
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type={self.loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            problems.append(
                f"scale_rewards={self.scale_rewards!r} is unknown; use one of {', '.join(SCALE_REWARDS)}"
            )
        if self.mdi_reward_stage not in STAGES:
            problems.append(f"mdi_reward_stage={self.mdi_reward_stage!r} is unknown; use one of {', '.join(STAGES)}")
        if self.mdi_shaping not in MDI_SHAPINGS:
            problems.append(f"mdi_shaping={self.mdi_shaping!r} is unknown; use one of {', '.join(MDI_SHAPINGS)}")
        if not (math.isfinite(self.mdi_pathwise_coef) and self.mdi_pathwise_coef >= 0):
            problems.append(f"mdi_pathwise_coef={self.mdi_pathwise_coef} must be a finite number >= 0 (0: off)")
        elif self.mdi_pathwise_coef > 0 and self.mdi_shaping.startswith("group_"):
            problems.append(
                f"mdi_pathwise_coef={self.mdi_pathwise_coef} has nothing to differentiate with mdi_shaping="
                f"{self.mdi_shaping!r}: a group-relative reward sums to zero over each group; use 'log_distance' "
                "or 'clip', or set mdi_pathwise_coef to 0"
            )
        if self.warmup_target not in WARMUP_TARGETS:
            problems.append(f"warmup_target={self.warmup_target!r} is unknown; use one of {', '.join(WARMUP_TARGETS)}")
        if self.warmup_answer not in WARMUP_ANSWERS:
            problems.append(f"warmup_answer={self.warmup_answer!r} is unknown; use one of {', '.join(WARMUP_ANSWERS)}")
        if self.vllm_mode not in VLLM_MODES:
            problems.append(f"vllm_mode={self.vllm_mode!r} is unknown; use one of {', '.join(VLLM_MODES)}")
        if self.rollout_cache not in ROLLOUT_CACHES:
            problems.append(f"rollout_cache={self.rollout_cache!r} is unknown; use one of {', '.join(ROLLOUT_CACHES)}")
        if self.num_generations < 2:
            problems.append(
                f"num_generations={self.num_generations} gives no group statistics; set it to 2 or more"
            )
        if self.prompts_per_round < 1:
            problems.append(f"prompts_per_round={self.prompts_per_round} must be at least 1")
        batch = self.prompts_per_round * self.num_generations
        if self.steps_per_generation < 1 or batch % self.steps_per_generation:
            problems.append(
                f"the round's batch of {batch} rollouts (prompts_per_round x num_generations) is not divisible "
                f"by steps_per_generation={self.steps_per_generation}; choose a divisor of {batch}"
            )
        if self.num_iterations < 1:
            problems.append(f"num_iterations={self.num_iterations} must be at least 1")
        if self.local_rollout_forward_batch_size is not None and self.local_rollout_forward_batch_size < 1:
            problems.append(f"local_rollout_forward_batch_size={self.local_rollout_forward_batch_size} must be at "
                            "least 1, or null to score the whole round in one pass")
        if self.max_completion_length < 1:
            problems.append(f"max_completion_length={self.max_completion_length} must be at least 1")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be positive")
        problems += self._reward_problems() + self._visual_problems()
        if self.mdi_tolerance <= 1:
            problems.append(f"mdi_tolerance={self.mdi_tolerance} must be greater than 1")
        if self.epsilon <= 0 or self.epsilon_high <= 0:
            problems.append("epsilon and epsilon_high must be positive")
        if self.beta < 0:
            problems.append(f"beta={self.beta} must be >= 0")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            problems.append(f"importance_sampling_level={self.importance_sampling_level!r} is unknown; "
                            f"use one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
        if self.delta is not None and (not isinstance(self.delta, int | float) or not self.delta > 1):
            problems.append(f"delta={self.delta} caps the importance ratio and must be greater than 1 "
                            f"(recommended: above 1 + epsilon_high = {1 + self.epsilon_high}), or None")
        if not 0 <= self.top_entropy_quantile <= 1:
            problems.append(f"top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1] (1 keeps every token)")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            problems.append(f"sapo_temperature_pos={self.sapo_temperature_pos} and sapo_temperature_neg="
                            f"{self.sapo_temperature_neg} must be positive")
        if self.entropy_coef < 0:
            problems.append(f"entropy_coef={self.entropy_coef} must be >= 0 (0 turns the entropy bonus off)")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            problems.append(f"multi_objective_aggregation={self.multi_objective_aggregation!r} is unknown; "
                            f"use one of {', '.join(MULTI_OBJECTIVE_AGGREGATIONS)}")
        if not 0 <= self.max_eval_drop <= 1:
            problems.append(f"max_eval_drop={self.max_eval_drop} must be in [0, 1] (1 never stops the run)")
        if self.report_samples < -1:
            problems.append(f"report_samples={self.report_samples} must be -1 (every rollout), 0 (none) or a number "
                            "of prompts")
        if self.num_processes < 1:
            problems.append(f"num_processes={self.num_processes} must be at least 1")
        problems += self._scale_problems()
        if self.model_name_or_path != EMBEDDED and not Path(self.model_name_or_path).exists():
            problems.append(
                f"model_name_or_path={self.model_name_or_path!r} does not exist; give a local model directory "
                f"(nothing is downloaded) or {EMBEDDED!r} for the embedded tiny model"
            )
        if self.dataset != EMBEDDED and not Path(self.dataset).exists():
            problems.append(
                f"dataset={self.dataset!r} does not exist; give a parquet file, a folder of parquet files, a "
                f"datasets.save_to_disk folder or a JSONL file, or {EMBEDDED!r} for the synthetic data"
            )
        if not self.run_name or any(c in self.run_name for c in "/\\ ") or self.run_name.startswith("."):
            problems.append(f"run_name={self.run_name!r} must be a plain name (no slashes or spaces)")
        if not problems:  # plug-ins are found by importing their modules (torch, transformers): a refusal is quick
            problems = self._plugin_problems()
        if problems:
            raise ValueError("Invalid dapo-vlm configuration:\n  - " + "\n  - ".join(problems))

    def _scale_problems(self) -> list[str]:
        """dtype, LoRA, retention and data-layout settings."""
        problems: list[str] = []
        if self.dataset_layout not in DATASET_LAYOUTS:
            problems.append(f"dataset_layout={self.dataset_layout!r} is unknown; use one of {', '.join(DATASET_LAYOUTS)}")
        if self.images_per_prompt is not None and self.images_per_prompt < 1:
            problems.append(f"images_per_prompt={self.images_per_prompt} must be at least 1 (or null)")
        if self.torch_dtype not in TORCH_DTYPES:
            problems.append(f"torch_dtype={self.torch_dtype!r} is unknown; use one of {', '.join(TORCH_DTYPES)}")
        if self.use_peft:
            if self.lora_r < 1:
                problems.append(f"lora_r={self.lora_r} must be at least 1")
            if self.lora_alpha <= 0:
                problems.append(f"lora_alpha={self.lora_alpha} must be positive")
            if not 0 <= self.lora_dropout < 1:
                problems.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
            if self.lora_target_modules is not None and not self.lora_target_modules:
                problems.append("lora_target_modules is empty; name modules (e.g. [q_proj, v_proj]) or leave it "
                                "null for every linear layer of the language model")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(f"save_total_limit={self.save_total_limit} must be at least 1 (resuming needs the "
                            f"newest checkpoint) or null to keep every checkpoint's weights")
        return problems

    def _visual_problems(self) -> list[str]:
        """The masked pass and the VPPO / PAPO terms."""
        problems: list[str] = []
        if self.visual_mask not in VISUAL_MASKS:
            problems.append(f"visual_mask={self.visual_mask!r} is unknown; use one of {', '.join(VISUAL_MASKS)}")
        if not 0 < self.visual_mask_ratio <= 1:
            problems.append(f"visual_mask_ratio={self.visual_mask_ratio} must be in (0, 1]")
        if not (math.isfinite(self.visual_dependency_threshold) and self.visual_dependency_threshold >= 0):
            problems.append(f"visual_dependency_threshold={self.visual_dependency_threshold} must be >= 0 (nats)")
        if not 0 < self.vppo_token_ratio <= 1:
            problems.append(f"vppo_token_ratio={self.vppo_token_ratio} must be in (0, 1] (1 keeps every token)")
        if not 0 <= self.vppo_advantage_min <= 1:
            problems.append(f"vppo_advantage_min={self.vppo_advantage_min} must be in [0, 1]")
        if self.papo_coef < 0 or self.papo_entropy_coef < 0:
            problems.append(f"papo_coef={self.papo_coef} and papo_entropy_coef={self.papo_entropy_coef} must be >= 0 "
                            "(0 turns the term off)")
        vppo = self.vppo_token_ratio < 1 or self.vppo_advantage_weighting
        if vppo and not self.visual_dependency:
            problems.append("vppo_token_ratio < 1 and vppo_advantage_weighting read the masked pass's per-token "
                            "dependency; set visual_dependency to true")
        return problems

    def _plugin_problems(self) -> list[str]:
        """The rollout engine exists and every `reward_funcs` entry resolves to a callable."""
        engine = engine_problem(self)
        problems = [engine] if engine else []
        for entry in self.reward_funcs:
            try:
                registry.resolve_reward(entry)
            except ValueError as error:
                problems.append(f"reward_funcs: {error}")
        return problems

    def _reward_problems(self) -> list[str]:
        """Names are unique, one weight per entry (`_plugin_problems` resolves them)."""
        problems: list[str] = []
        if not self.reward_funcs:
            problems.append("reward_funcs is empty; name at least one reward")
        names = self.reward_names
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"reward_funcs logs {', '.join(duplicates)} twice; each reward name must be unique")
        if len(self.reward_weights) != len(self.reward_funcs):
            problems.append(
                f"reward_weights={self.reward_weights} needs {len(self.reward_funcs)} weights, one per reward_funcs "
                f"entry ({', '.join(names)})"
            )
        return problems

    def for_answer_kinds(self, kinds: set[str]) -> DapoConfig:
        """This config with the default `reward_funcs` following the data's answers (`kinds`: "choice" and/or
        "free"): `accuracy_reward` in place of `mc_idx_reward` for free-form data, both (weight 3 each) for a
        mix. Configured rewards other than the default stay as they are."""
        defaults = list(registry.DEFAULT_REWARD_FUNCS)
        if list(self.reward_funcs) != defaults or "free" not in kinds:
            return self
        accuracy = ["accuracy_reward"] if "choice" not in kinds else ["mc_idx_reward", "accuracy_reward"]
        weight = self.reward_weights[0]
        return self.replace(reward_funcs=[*accuracy, *defaults[1:]],
                            reward_weights=[weight] * len(accuracy) + list(self.reward_weights[1:]))

    @property
    def reward_names(self) -> list[str]:
        """The configured rewards' names, as columns of rewards.parquet and in `rewards/<name>/mean|std`."""
        return [registry.reward_name(entry) for entry in self.reward_funcs]

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.reward_names, self.reward_weights, strict=True))

    @property
    def batch_size(self) -> int:
        """Rollouts per round (N = P x G)."""
        return self.prompts_per_round * self.num_generations

    @property
    def per_device_train_batch_size(self) -> int:
        """Rollouts per update micro-batch and process (TRL's name): N over the optimizer steps, the gradient
        accumulation steps and the processes, rounded up."""
        return -(-self.batch_size // (self.steps_per_generation * self.gradient_accumulation_steps
                                      * self.num_processes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> DapoConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_default(cls, name: str) -> Any:
        """A field's default, without building a config: a valid config looks up its rollout engine and rewards,
        which imports torch and transformers (seconds that `--help` or loading the Dagster definitions never
        need)."""
        spec = {f.name: f for f in dataclasses.fields(cls)}[name]
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DapoConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown dapo-vlm configuration fields: {', '.join(unknown)}")
        return cls(**values)
