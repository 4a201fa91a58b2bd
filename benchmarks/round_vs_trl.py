"""A full GRPO/DAPO round: dapo-vlm (library, and materialized through Dagster) vs TRL's `GRPOTrainer`.

All three sides run in ONE process on the same checkpoint (the pipeline's ckpt-0000: the embedded
Qwen2.5-VL after its supervised warm start), the same prompts (round r of every side uses the pipeline's
`select_prompts(train, config, r)`, images included), the same sampling (temperature, top-p, the same
suppressed tokens), the same reward functions, `num_generations`, `max_completion_length`,
`num_iterations` and `steps_per_generation`. EOS is suppressed on every side, so each rollout has exactly
`max_completion_length` tokens and the three sides do the same amount of work whatever the weights.

- TRL: `GRPOTrainer` on the VLM with images (Qwen2.5-VL's processor minus its video processor, which
  needs torchvision) and the rewards `mc_idx_reward`, `think_format_reward`. One round = the
  `steps_per_generation × num_iterations` optimizer steps that consume one generation batch of P×G
  rollouts; timed from the end of the previous round to the end of its last step (construction excluded).
- dapo-vlm library: `generate_rollouts` → `teacher_forced_pass` (old log-probs + attention metrics) →
  the three rewards (incl. `mdi_reward`, which TRL cannot compute) → `group_advantages` → `policy_update`.
- dapo-vlm pipeline: `pipelines.cli.run_training` materializing round r through Dagster in process
  (rollouts … training_report: files, checkpoint, eval, reports, MLflow). Round 0 (instance setup, first
  materialization) is a warm-up; later rounds get the policy from the in-process cache, no reload.
The sides alternate (TRL r, library r, pipeline r, TRL r+1, …); round 0 is a warm-up everywhere; medians.

    python -m benchmarks.round_vs_trl [--device auto] [--rounds 3] [--quick] [--json-out F]
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from dapo_ops.tracking.facade import default_tracking_uri


@dataclass(frozen=True)
class RoundShape:
    """The round every side runs."""

    prompts_per_round: int
    num_generations: int
    max_completion_length: int
    num_iterations: int
    steps_per_generation: int
    measured_rounds: int = 5
    # The pipeline evaluates each new checkpoint (TRL's step does not): kept small, reported as its own phase.
    eval_subset_size: int = 16
    warmup_steps: int = 20

    @property
    def rollouts(self) -> int:
        return self.prompts_per_round * self.num_generations


def default_shape() -> RoundShape:
    """The round `make run` trains: `DapoConfig`'s defaults."""
    from dapo_ops.config.dapo import DapoConfig

    defaults = DapoConfig()
    return RoundShape(
        prompts_per_round=defaults.prompts_per_round, num_generations=defaults.num_generations,
        max_completion_length=defaults.max_completion_length, num_iterations=defaults.num_iterations,
        steps_per_generation=defaults.steps_per_generation,
    )


QUICK_SHAPE = RoundShape(prompts_per_round=2, num_generations=2, max_completion_length=4, num_iterations=1,
                         steps_per_generation=1, measured_rounds=1, eval_subset_size=2, warmup_steps=1)


# ----------------------------------------------------------------------------------------------- setup


def suppress_eos() -> Callable[[], None]:
    """Make EOS unsampleable for dapo-vlm (`Policy.suppressed_token_ids`); returns the undo."""
    from dapo_ops.models import loading as models

    original = models.Policy.suppressed_token_ids

    def with_eos(self) -> list[int]:
        return sorted({*original.fget(self), self.eos_token_id})

    models.Policy.suppressed_token_ids = property(with_eos)

    def undo() -> None:
        models.Policy.suppressed_token_ids = original

    return undo


def trl_processor(policy) -> tuple[Any, str]:
    """The processor TRL needs for a VLM, and how it was built.

    `Qwen2_5_VLProcessor` insists on a video processor, whose class needs torchvision; without torchvision we
    pass none (images only), which is all GRPO on image prompts uses.
    """
    from transformers import Qwen2_5_VLProcessor

    kwargs = {"image_processor": policy.image_processor, "tokenizer": policy.tokenizer,
              "chat_template": policy.tokenizer.chat_template}
    try:
        if policy.path is None:  # an in-memory policy: the family's default video processor, no hub look-up
            from transformers import Qwen2VLVideoProcessor

            return Qwen2_5_VLProcessor(video_processor=Qwen2VLVideoProcessor(), **kwargs), \
                "Qwen2_5_VLProcessor (default video processor)"
        from transformers import AutoVideoProcessor

        return Qwen2_5_VLProcessor(video_processor=AutoVideoProcessor.from_pretrained(policy.path), **kwargs), \
            "Qwen2_5_VLProcessor"
    except Exception as error:  # noqa: BLE001 - any failure: fall back to the image-only processor
        reason = f"{type(error).__name__}: {' '.join(str(error).split()).split(' but ')[0]}"[:160]

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return (ImageOnlyQwen2_5_VLProcessor(video_processor=None, **kwargs),
            f"Qwen2_5_VLProcessor without a video processor (the video processor failed: {reason})")


def trl_dataset(rows_per_round: Sequence[Any]):
    """TRL's train dataset: the rounds' prompt rows in order (conversational prompt, image, reward columns)."""
    from datasets import Dataset

    from dapo_ops.data import loading as data
    from dapo_ops.models import inputs

    records: dict[str, list[Any]] = defaultdict(list)
    for rows in rows_per_round:
        for row in rows.iter_rows(named=True):
            records["prompt"].append([
                {"role": "system", "content": inputs.SYSTEM_PROMPT},
                {"role": "user", "content": f"{row['question']}\n{inputs.format_choices(row['choices'])}"},
            ])
            records["image"].append(data.decode_image(row["image"]))
            records["correct_choice_idx"].append(int(row["correct_choice_idx"]))
            records["choices"].append(list(row["choices"]))
    return Dataset.from_dict(dict(records))


def same_prompt_tokens(policy, processor, dataset) -> bool:
    """Does TRL's processor tokenize the first prompt (image expanded) exactly as dapo-vlm does?"""
    from trl.data_utils import prepare_multimodal_messages

    from dapo_ops.models import inputs

    example = dataset[0]
    messages = prepare_multimodal_messages(example["prompt"], images=[example["image"]])
    theirs = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"][0]
    question, _, choices = example["prompt"][1]["content"].partition("\n")
    ours = inputs.encode_prompts(policy, [question], [example["choices"]], [example["image"]]).input_ids[0]
    return list(map(int, theirs)) == ours.tolist()


# ---------------------------------------------------------------------------------------------- sides


# Process CPU time per round, next to wall time: about wall x threads when the machine was idle, less when
# other work took the cores.
CPU_SECONDS = "process CPU seconds (all threads)"


class Clock:
    def __init__(self, device: str) -> None:
        self.device = device

    def now(self) -> float:
        common.synchronize(self.device)
        return time.perf_counter()


def library_round(policy, optimizer, rows, config, round_index: int, global_step: int, clock: Clock
                  ) -> tuple[dict[str, float], int]:
    """One in-memory dapo-vlm round; returns per-phase seconds (and the new global step)."""
    import torch

    from dapo_ops.attention.teacher_forced import teacher_forced_pass
    from dapo_ops.rl import advantages, rewards
    from dapo_ops.rollout import dynamic_sampling as sampling
    from dapo_ops.rollout.engines import make_engine
    from dapo_ops.run import phases as training
    from dapo_ops.train.update import policy_update

    phases: dict[str, float] = {}
    cpu_start = time.process_time()
    start = clock.now()
    prompts = training.encode_rows(policy, rows)
    t = clock.now()
    phases["encode prompts"] = t - start
    batch = make_engine(config, policy).generate(
        prompts, num_generations=config.num_generations, max_completion_length=config.max_completion_length,
        temperature=config.temperature, top_p=config.top_p,
        seed=training.derived_seed(config.seed, "rollouts", round_index),
    )
    t, last = clock.now(), t
    phases["generation"] = t - last
    # The attention phase's pure core (training.compute_attention without the files).
    outputs = teacher_forced_pass(policy, batch, temperature=config.temperature,
                                  shared_prefix=config.shared_prefix)
    attention = training.attention_table(outputs, batch, tolerance=config.mdi_tolerance)
    t, last = clock.now(), t
    phases["teacher-forced pass + attention"] = t - last
    per_func = rewards.score_rollouts(config, sampling.rollout_columns(batch, rows), attention)
    total = torch.tensor(rewards.total_rewards(per_func, config.weights), dtype=torch.float64)
    advantage = advantages.group_advantages(total, config.num_generations, scale_rewards=config.scale_rewards)
    keep = torch.ones(len(total), dtype=torch.bool)
    t, last = clock.now(), t
    phases["rewards + advantages"] = t - last
    result = policy_update(policy.model, optimizer, batch, outputs.per_token_logps, advantage.float(), keep, config,
                           global_step=global_step, seed=training.derived_seed(config.seed, "update", round_index))
    t, last = clock.now(), t
    phases["update"] = t - last
    phases["total"] = t - start
    phases[CPU_SECONDS] = time.process_time() - cpu_start
    phases["generated tokens"] = float(batch.completion_mask.sum())
    return phases, result.global_step


class RoundInterleaver:
    """TRL's rounds as the clock of an interleaved comparison: at the end of each TRL round (the
    `steps_per_round` optimizer steps of one generation batch) record it from TRL's own profile, wall and
    process CPU time, then run `others(r)` (the other sides' round r), then restart TRL's clock, so that no
    side's time includes another's. `callback()` is the `TrainerCallback` to hand to `GRPOTrainer`."""

    def __init__(self, clock: Clock, profile: TrlProfile, steps_per_round: int, generated_tokens: int,
                 others: Callable[[int], None]) -> None:
        self.clock, self.profile, self.steps_per_round = clock, profile, steps_per_round
        self.generated_tokens, self.others = generated_tokens, others
        self.trl: list[dict[str, float]] = []
        self._wall_start = self._cpu_start = 0.0

    def restart(self) -> None:
        self.profile.take()
        self._cpu_start, self._wall_start = time.process_time(), self.clock.now()

    def round_end(self, global_step: int) -> None:
        if global_step % self.steps_per_round:
            return
        wall, cpu = self.clock.now() - self._wall_start, time.process_time() - self._cpu_start
        self.trl.append(trl_phases(wall, cpu, self.profile.take(), self.generated_tokens))
        self.others(global_step // self.steps_per_round - 1)
        self.restart()

    def callback(self):
        from transformers import TrainerCallback

        interleaver = self

        class Interleave(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                interleaver.restart()

            def on_step_end(self, args, state, control, **kwargs):
                interleaver.round_end(state.global_step)

        return Interleave()


class PipelineTimer:
    """Times each Dagster materialization `run_training` makes and reads its per-step stats."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.last: dict[str, Any] = {}

    def install(self) -> Callable[[], None]:
        import pipelines.cli as cli

        original = cli.materialize

        def timed(job_name, config, **kwargs):
            start = self.clock.now()
            result = original(job_name, config, **kwargs)
            seconds = self.clock.now() - start
            instance = kwargs.get("instance")
            if instance is None:  # run_training passes its instance; else the one DAGSTER_HOME names
                import dagster as dg

                instance = dg.DagsterInstance.get()
            self.last = {"seconds": seconds, "run_id": result.run_id, "instance": instance}
            return result

        cli.materialize = timed

        def undo() -> None:
            cli.materialize = original

        return undo

    def step_seconds(self) -> dict[str, float]:
        instance, run_id = self.last.get("instance"), self.last.get("run_id")
        if instance is None or run_id is None:
            return {}
        return {s.step_key: float(s.end_time - s.start_time) for s in instance.get_run_step_stats(run_id)
                if s.end_time is not None and s.start_time is not None}


def pipeline_phases(store, key: str, wall: float, steps: dict[str, float]) -> dict[str, float]:
    """Where the pipeline round's time went, from the round's files and Dagster's step stats."""
    from dapo_ops.run.round_files import read_update_record
    from dapo_ops.store import layout as store_io

    files = store.round(key)
    generation = float(store_io.read_json(files.rollouts_json)["seconds"])
    attention = float(store_io.read_json(files.attention_json)["seconds"])
    seconds = read_update_record(store, key).seconds or {}
    update, evaluation, save = float(seconds["update"]), float(seconds["eval"]), float(seconds["save"])
    training_steps = sum(steps.get(name, 0.0) for name in ("rollouts", "attention_metrics", "policy_update"))
    phases = {
        "generation": generation,
        "teacher-forced pass + attention": attention,
        "rewards + advantages": steps.get("rewards", float("nan")),
        "update": update,
        "eval (greedy, eval_subset_size prompts)": evaluation,
        "I/O: checkpoint save": save,
        "I/O: round files, policy cache, MLflow journal": training_steps - generation - attention - update
        - evaluation - save,
        "reports + MLflow": steps.get("attention_report", 0.0) + steps.get("training_report", 0.0),
        "Dagster overhead": wall - sum(steps.values()) if steps else float("nan"),
        "total": wall,
    }
    phases["generated tokens"] = float(store_io.read_json(files.rollouts_json)["completion_tokens"])
    return phases


def make_trl_trainer(model, processor, dataset, shape: RoundShape, config, device: str, output_dir: str,
                     callback, suppressed: list[int]):
    from trl import GRPOConfig, GRPOTrainer

    from dapo_ops.rl import rewards

    args = GRPOConfig(
        output_dir=output_dir,
        num_generations=shape.num_generations,
        max_completion_length=shape.max_completion_length,
        num_iterations=shape.num_iterations,
        steps_per_generation=shape.steps_per_generation,
        per_device_train_batch_size=shape.rollouts // shape.steps_per_generation,
        gradient_accumulation_steps=1,
        max_steps=(shape.measured_rounds + 1) * shape.steps_per_generation * shape.num_iterations,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        loss_type=config.loss_type,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        beta=config.beta,
        scale_rewards=config.scale_rewards,
        temperature=config.temperature,
        top_p=config.top_p,
        reward_weights=list(config.reward_weights[:2]),
        # The same sampling constraints as dapo-vlm (vision specials, padding, and EOS for equal lengths).
        generation_kwargs={"suppress_tokens": suppressed},
        # dapo-vlm does not checkpoint activations; TRL's default (on) would recompute the forward.
        gradient_checkpointing=False,
        shuffle_dataset=False,
        seed=config.seed,
        use_cpu=not device.startswith("cuda"),
        bf16=False,
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return GRPOTrainer(model=model, reward_funcs=[rewards.mc_idx_reward, rewards.think_format_reward], args=args,
                       train_dataset=dataset, processing_class=processor, callbacks=[callback])


class TrlProfile:
    """Collects TRL's own profiling durations (`profiling_context`) per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def install(self) -> Callable[[], None]:
        from trl.extras import profiling

        original = profiling.ProfilingContext._log_metrics
        collector = self

        def log_metrics(self, duration: float) -> None:
            collector.seconds[self.name.split(".", 1)[-1]] += duration
            original(self, duration)

        profiling.ProfilingContext._log_metrics = log_metrics

        def undo() -> None:
            profiling.ProfilingContext._log_metrics = original

        return undo

    def take(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


def trl_phases(wall: float, cpu: float, profile: dict[str, float], tokens: int) -> dict[str, float]:
    generation = profile.get("transformers.generate", float("nan"))
    rewards = profile.get("_calculate_rewards", float("nan"))
    prepare = profile.get("_prepare_inputs", float("nan"))
    return {
        "generation": generation,
        "prompt processing + old log-probs + advantages": prepare - generation - rewards,
        "rewards + advantages": rewards,
        "update": wall - prepare,
        "total": wall,
        CPU_SECONDS: cpu,
        "generated tokens": float(tokens),
    }


# ---------------------------------------------------------------------------------------------- driver


def run(*, device: str = "auto", quick: bool = False, rounds: int | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.models import loading as models
    from dapo_ops.run import phases as training
    from dapo_ops.store.layout import RunStore, checkpoint_key
    from dapo_ops.train.update import make_optimizer
    from pipelines.cli import run_training

    device = common.resolve_device(device)
    common.set_threads()
    hf_logging.set_verbosity_error()
    shape = QUICK_SHAPE if quick else default_shape()
    if rounds:
        shape = RoundShape(**{**asdict(shape), "measured_rounds": rounds})
    started = time.perf_counter()
    clock = Clock(device)
    undo: list[Callable[[], None]] = [suppress_eos()]
    workdir = tempfile.TemporaryDirectory(prefix="dapo-bench-round-")
    root = Path(workdir.name)
    environment = {"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
                   "MLFLOW_TRACKING_URI": default_tracking_uri(root), "TOKENIZERS_PARALLELISM": "false",
                   "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    previous_env = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    try:
        config = DapoConfig(
            run_name="bench", prompts_per_round=shape.prompts_per_round, num_generations=shape.num_generations,
            max_completion_length=shape.max_completion_length, num_iterations=shape.num_iterations,
            steps_per_generation=shape.steps_per_generation, eval_subset_size=shape.eval_subset_size,
            # One micro-batch per optimizer step on both sides (TRL counts steps_per_generation in micro-batches).
            gradient_accumulation_steps=1,
            num_train_examples=max(8, shape.prompts_per_round * (shape.measured_rounds + 1)),
            num_eval_examples=max(4, shape.eval_subset_size), warmup_steps=shape.warmup_steps, device=device,
            # With EOS unsampleable the greedy answer repeats to the length limit, and whether the last
            # `</think> Answer: X` is cut off decides its eval accuracy (0.31 -> 0.06 with the same letter in
            # every completion): no learning signal, so the eval-drop gate must not stop a timing run.
            max_eval_drop=1.0,
        )
        timer = PipelineTimer(clock)
        undo.append(timer.install())
        log("  round: pipeline setup (dataset, ckpt-0000 with warm start) and warm-up round 0 through Dagster")
        run_training(config, rounds=1, root=root, echo=lambda _: None)
        store = RunStore(root, config.run_name)
        base = models.load_policy(store.checkpoint_dir(checkpoint_key(0)), device=device)
        train = training.load_split(store, "train")
        rows_per_round = [training.select_prompts(train, config, r) for r in range(shape.measured_rounds + 1)]

        library_policy = models.Policy(copy.deepcopy(base.model), base.processor, base.path)
        library_optimizer = make_optimizer(library_policy.model, config)
        processor, processor_note = trl_processor(base)
        dataset = trl_dataset(rows_per_round)
        prompts_match = same_prompt_tokens(base, processor, dataset)
        encoded = training.encode_rows(base, rows_per_round[0])
        prompt_tokens = float(encoded.attention_mask.sum(1).float().mean())
        image_tokens = float(encoded.vision_mask.sum(1).float().mean())
        profile = TrlProfile()
        undo.append(profile.install())

        results: dict[str, list[dict[str, float]]] = {"library": [], "pipeline": []}
        state = {"global_step": 0}

        def other_sides(r: int) -> None:
            """After TRL's round r: the library round r, then the pipeline round r."""
            phases, state["global_step"] = library_round(
                library_policy, library_optimizer, rows_per_round[r], config, r, state["global_step"], clock)
            results["library"].append(phases)
            if r >= 1:  # pipeline round 0 ran during setup
                cpu_start, wall_start = time.process_time(), clock.now()
                run_training(config, rounds=r + 1, root=root, echo=lambda _: None)
                total = clock.now() - wall_start
                phases = pipeline_phases(store, checkpoint_key(r), timer.last["seconds"], timer.step_seconds())
                phases["run_training call (incl. lock, instance, partitions)"] = total
                phases[CPU_SECONDS] = time.process_time() - cpu_start
                results["pipeline"].append(phases)
            log(f"  round {r}: TRL {interleaver.trl[-1]['total']:.2f}s, library "
                f"{results['library'][-1]['total']:.2f}s"
                + (f", pipeline {results['pipeline'][-1]['total']:.2f}s" if r >= 1 else " (warm-up)"))

        interleaver = RoundInterleaver(clock, profile, shape.steps_per_generation * shape.num_iterations,
                                       shape.rollouts * shape.max_completion_length, other_sides)
        trl_model = copy.deepcopy(base.model)
        trainer = make_trl_trainer(trl_model, processor, dataset, shape, config, device, str(root / "trl"),
                                   interleaver.callback(), base.suppressed_token_ids)
        log(f"  round: {shape.measured_rounds} measured rounds (+1 warm-up) of {shape.prompts_per_round} prompts x "
            f"{shape.num_generations} completions of {shape.max_completion_length} tokens, "
            f"mu={shape.num_iterations}, {shape.steps_per_generation} steps per generation")
        trainer.train()
    finally:
        for fn in reversed(undo):
            fn()
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        workdir.cleanup()

    # Round 0 is the warm-up for TRL and the library; the pipeline list starts at round 1.
    measured = {"trl": interleaver.trl[1:], "library": results["library"][1:], "pipeline": results["pipeline"]}
    medians = {side: _median_phases(rows) for side, rows in measured.items()}
    pairs_library = [lib["total"] / trl["total"] for lib, trl in zip(measured["library"], measured["trl"], strict=True)]
    pairs_pipeline = [p["total"] / trl["total"] for p, trl in zip(measured["pipeline"], measured["trl"], strict=True)]
    best = {side: min((row["total"] for row in rows), default=float("nan")) for side, rows in measured.items()}
    summary = {
        "round_time_ratio_vs_trl": common.median(pairs_library),
        "pipeline_round_time_ratio_vs_trl": common.median(pairs_pipeline),
        # Ratios of each side's fastest round: the least disturbed by other work on a shared machine.
        "round_time_ratio_vs_trl_best": best["library"] / best["trl"],
        "pipeline_round_time_ratio_vs_trl_best": best["pipeline"] / best["trl"],
        "round_seconds": {side: medians[side]["total"] for side in medians},
        "generated_tokens_per_second": {
            side: medians[side]["generated tokens"] / medians[side]["generation"] for side in medians
        },
    }
    return {
        "name": "round_vs_trl",
        "device": device,
        "shape": asdict(shape),
        "model": "the embedded Qwen2.5-VL (ckpt-0000 of the pipeline run, warm-started), images on every side",
        "trl_input": f"VLM with images; processor: {processor_note}",
        "prompt_tokens_identical": prompts_match,
        "prompt_tokens_mean": prompt_tokens,
        "image_tokens_mean": image_tokens,
        "rounds": measured,
        "medians": medians,
        "summary": summary,
        "seconds": time.perf_counter() - started,
    }


def _median_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    names = list(rows[0]) if rows else []
    return {name: common.median(row.get(name, float("nan")) for row in rows) for name in names}


def markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    summary = result["summary"]
    medians = result["medians"]
    head = (f"Same model ({result['model']}), prompts, rewards and sampling on every side; "
            f"{shape['prompts_per_round']} prompts (about {result['prompt_tokens_mean']:.0f} tokens, "
            f"{result['image_tokens_mean']:.0f} of them image tokens) x {shape['num_generations']} completions of exactly "
            f"{shape['max_completion_length']} tokens (EOS suppressed everywhere), num_iterations="
            f"{shape['num_iterations']}, steps_per_generation={shape['steps_per_generation']}; device "
            f"{result['device']}; TRL input: {result['trl_input']}; identical prompt tokens: "
            f"{result['prompt_tokens_identical']}. Medians of {shape['measured_rounds']} interleaved rounds after "
            f"a warm-up round; ratios are medians of per-round ratios, and (next column) the ratio of each side's "
            f"fastest round, the one least disturbed by other work on the machine.")
    overview = common.markdown_table(
        ["side", "work per round", "round s (median)", "vs TRL (median of rounds)", "vs TRL (fastest rounds)",
         "generated tokens/s"],
        [
            ["TRL GRPOTrainer", "generate, old log-probs, 2 rewards, update", summary["round_seconds"]["trl"], "1.00",
             "1.00", summary["generated_tokens_per_second"]["trl"]],
            ["dapo-vlm library", "generate, old log-probs + attention metrics, 3 rewards, update",
             summary["round_seconds"]["library"], f"{summary['round_time_ratio_vs_trl']:.2f}",
             f"{summary['round_time_ratio_vs_trl_best']:.2f}", summary["generated_tokens_per_second"]["library"]],
            ["dapo-vlm through Dagster", "the library round + files, checkpoint, eval on "
             f"{shape['eval_subset_size']} prompts, reports, MLflow",
             summary["round_seconds"]["pipeline"], f"{summary['pipeline_round_time_ratio_vs_trl']:.2f}",
             f"{summary['pipeline_round_time_ratio_vs_trl_best']:.2f}",
             summary["generated_tokens_per_second"]["pipeline"]],
        ],
    )
    names: list[str] = []
    for side in ("trl", "library", "pipeline"):
        names += [n for n in medians[side] if n not in names and n not in ("total", "generated tokens", CPU_SECONDS)]
    sides = ("trl", "library", "pipeline")
    phases = common.markdown_table(
        ["phase (median seconds per round)", "TRL", "dapo-vlm library", "dapo-vlm pipeline"],
        [[name, *(medians[side].get(name, float("nan")) for side in sides)] for name in [*names, "total"]]
        + [[CPU_SECONDS, *(medians[side].get(CPU_SECONDS, float("nan")) for side in sides)]],
    )
    return f"{head}\n\n{overview}\n\nWhere the time goes:\n\n{phases}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.cli("benchmarks.round_vs_trl", __doc__, quick_help="a tiny round (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (after one warm-up round)")
    args = parser.parse_args(argv)
    result = run(device=args.device, quick=args.quick, rounds=args.rounds,
                 log=common.log)
    common.emit(result, markdown(result), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
