"""One training round as plain functions over the run store, phase by phase.

Each phase reads what the previous one wrote under ``rounds/ckpt-NNNN/`` and writes its own files
atomically, so any phase can be re-run on its own (a crashed round, or a re-analysis) and the Dagster
assets in ``pipelines`` stay thin wrappers around these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

from dapo_ops.attention import visual
from dapo_ops.attention.forward import TeacherForcedOutputs
from dapo_ops.attention.metrics import LOGGED_METRIC_NAMES, METRIC_NAMES
from dapo_ops.attention.teacher_forced import VisualMasking, rollout_attention_metrics, teacher_forced_pass
from dapo_ops.common import faults
from dapo_ops.common.names import (
    EVAL_ACCURACY,
    EVAL_BLIND_ACCURACY,
    EVAL_FORMAT,
    EVAL_VISUAL_GAIN,
    attention_metric,
    attn_column,
)
from dapo_ops.config.dapo import EMBEDDED, STAGES, DapoConfig
from dapo_ops.data import loading as data
from dapo_ops.data import rl_loading as rldata
from dapo_ops.data import synthetic
from dapo_ops.models import inputs
from dapo_ops.models import loading as models
from dapo_ops.reporting.reports import reward_label
from dapo_ops.rl import advantages as adv
from dapo_ops.rl import rewards
from dapo_ops.rollout import dynamic_sampling as sampling
from dapo_ops.rollout import generate as rollout
from dapo_ops.rollout.engines import RolloutEngine, make_engine
from dapo_ops.run.round_files import (
    UpdateRecord,
    load_old_logps,
    load_rollout_batch,
    read_update_record,
    save_old_logps,
    save_rollout_batch,
)
from dapo_ops.run.shards import SINGLE, DataParallel, gather_attention, generate_shared
from dapo_ops.store import layout as store
from dapo_ops.store.layout import (
    OPTIMIZER_FILE,
    STATE_FILE,
    RunStore,
    checkpoint_index,
    checkpoint_key,
    checkpoint_state,
    resolve_model_dir,
)
from dapo_ops.train import warmstart
from dapo_ops.train.update import LOCAL, LocalCollective, make_optimizer, policy_update

logger = logging.getLogger("dapo_vlm")



def derived_seed(*parts: Any) -> int:
    """A stable 31-bit seed from the run seed and a phase/round label (same on every machine)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class RoundLog:
    """The round's real log: appended to ``terminal.log`` (rendered into run_terminal.md) and echoed to
    Python logging, which Dagster captures."""

    def __init__(self, path: Path, *, echo: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def __call__(self, message: str, level: int = logging.INFO) -> None:
        stamp = time.strftime("%H:%M:%S")
        prefix = {logging.WARNING: "WARNING ", logging.ERROR: "ERROR "}.get(level, "")
        line = f"[{stamp}] {prefix}{message}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        logger.log(level, message)
        if self.echo is not None:
            self.echo(line)

    def warning(self, message: str) -> None:
        self(message, logging.WARNING)

    def error(self, message: str) -> None:
        self(message, logging.ERROR)

    def lines(self) -> list[str]:
        return self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []


_console_echo: Callable[[str], None] | None = None
# "0": the processes of a multi-process phase print no round-log lines (`make run` without --verbose).
CONSOLE_ECHO_ENV = "DAPO_VLM_CONSOLE_ECHO"


def set_console_echo(echo: Callable[[str], None] | None) -> None:
    """Also print every round-log line (live status on the terminal of `make run`)."""
    global _console_echo
    _console_echo = echo


def round_log(run_store: RunStore, key: str, echo: Callable[[str], None] | None = None) -> RoundLog:
    return RoundLog(run_store.round(key).log, echo=echo or _console_echo)


# --------------------------------------------------------------------------------------------- dataset


@dataclass
class DatasetSummary:
    source: str
    num_train: int
    num_eval: int
    num_quarantined: int
    quarantine_reasons: dict[str, int]
    layout: str = "aokvqa"
    answer_kinds: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prepare_dataset(config: DapoConfig, run_store: RunStore) -> DatasetSummary:
    """Validate the dataset (or generate the embedded one) into ``data/{train,eval,quarantine}.parquet``."""
    if config.dataset == EMBEDDED:
        source = run_store.data_dir / "source"
        synthetic.write_dataset(
            source, num_train=config.num_train_examples, num_eval=config.num_eval_examples, seed=config.seed,
            tasks=tuple(config.synthetic_tasks),
        )
    else:
        source = Path(config.dataset)
    keys = {"layout": config.dataset_layout, "prompt_key": config.prompt_key, "answer_key": config.answer_key,
            "image_key": config.image_key}
    layout = rldata.source_layout(source, **keys)
    splits = rldata.load_rl_splits(source, **keys)
    train, train_q = splits["train"]
    evaluation, eval_q = splits["eval"]
    kinds = train["answer_kind"].value_counts(sort=True).rows()
    rldata.check_rewards_fit(config.reward_names, {kind for kind, _ in kinds}, str(source))
    quarantine = pl.concat(
        [train_q.with_columns(pl.lit("train").alias("split")), eval_q.with_columns(pl.lit("eval").alias("split"))],
        how="diagonal_relaxed",
    )
    store.write_parquet_atomic(run_store.data_dir / "train.parquet", train)
    store.write_parquet_atomic(run_store.data_dir / "eval.parquet", evaluation)
    store.write_parquet_atomic(run_store.data_dir / "quarantine.parquet", quarantine)
    reasons: dict[str, int] = {}
    for kind in quarantine.get_column("kind").to_list() if quarantine.height else []:
        reasons[kind] = reasons.get(kind, 0) + 1
    return DatasetSummary(str(source), train.height, evaluation.height, quarantine.height, reasons, layout,
                          {kind: int(count) for kind, count in kinds})


def corpus_texts(rows: pl.DataFrame) -> list[str]:
    """Texts of data rows a tokenizer trained for them should cover: questions (without image marks),
    choices, solutions, rationales, system prompts and the free-form instruction."""
    texts = [q.replace(inputs.IMAGE_MARK, " ") for q in rows["question"].to_list()]
    texts += [" ".join(c) for c in rows["choices"].to_list() if c is not None]
    texts += [r for rs in rows["rationales"].to_list() for r in rs]
    if "solution" in rows.columns:
        solutions = [s for s in rows["solution"].to_list() if s is not None]
        texts += solutions + [f"Answer: {s}" for s in solutions]
        texts += [s for s in rows["system_prompt"].to_list() if s]
        if solutions:
            texts.append(inputs.FREE_FORM_SYSTEM_PROMPT)
    return texts


def load_split(run_store: RunStore, split: str) -> pl.DataFrame:
    path = run_store.data_dir / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize the `dataset` asset first")
    return pl.read_parquet(path)


# ----------------------------------------------------------------------------------------- checkpoints


def build_base_checkpoint(config: DapoConfig, run_store: RunStore, log: RoundLog) -> dict[str, Any]:
    """ckpt-0000: the embedded tiny model (tokenizer trained locally, warm-started) or a real model dir."""
    key = checkpoint_key(0)
    final = run_store.checkpoint_dir(key)
    train = load_split(run_store, "train")
    state: dict[str, Any] = {"checkpoint": key, "round": 0, "global_step": 0, "num_tokens": 0,
                             "source_model": config.model_name_or_path}
    if config.model_name_or_path == EMBEDDED:
        corpus = list(synthetic.corpus()) + synthetic.opt_in_corpus(config.synthetic_tasks)
        if config.dataset != EMBEDDED:  # a real dataset with the embedded model: its words join the vocabulary
            corpus += corpus_texts(train)
        torch.manual_seed(config.seed)
        policy = models.build_embedded_policy(corpus, seed=config.seed)
        log(f"built the embedded tiny Qwen2.5-VL: {sum(p.numel() for p in policy.model.parameters()):,} parameters, "
            f"{len(policy.tokenizer)} tokens")
        start = time.perf_counter()
        losses = warmstart.supervised_warm_start(
            policy, train, steps=config.warmup_steps, learning_rate=config.warmup_learning_rate,
            batch_size=16, seed=config.seed, teach=config.warmup_target, answer=config.warmup_answer,
        )
        log(f"supervised warm start: {len(losses)} steps in {time.perf_counter() - start:.1f}s, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "supervised warm start skipped")
        state["warmup_losses"] = losses
        with store.atomic_directory(final) as tmp:
            models.write_policy(policy, tmp)
            (tmp / STATE_FILE).write_text(store.json_text(state), encoding="utf-8")
        return {"policy": policy, "state": state}
    source = Path(config.model_name_or_path).resolve()
    policy = models.load_policy(source)
    log(f"loaded {source} ({policy.model.config.model_type}, {policy.num_layers} decoder layers); "
        f"ckpt-0000 refers to it without a copy")
    state["model_dir"] = str(source)
    with store.atomic_directory(final) as tmp:
        (tmp / STATE_FILE).write_text(store.json_text(state), encoding="utf-8")
    return {"policy": policy, "state": state}


def save_checkpoint(run_store: RunStore, key: str, policy: models.Policy, optimizer: Any,
                    state: dict[str, Any]) -> Path:
    """Weights, AdamW state (tensors and plain values: loadable with weights_only) and state.json, as one
    atomic directory: written plainly inside it, fsynced once by `atomic_directory`."""
    from dapo_ops.models import lora

    final = run_store.checkpoint_dir(key)
    if lora.has_adapter(policy.model) and state.get("parent"):
        # save_pretrained writes the adapter only; the base weights are those the parent loaded.
        state = {**state, "model_dir": str(resolve_model_dir(run_store, state["parent"])), "adapter": True}
    with store.atomic_directory(final) as tmp:
        adapter = lora.has_adapter(policy.model)
        models.write_policy(policy, tmp, weights=not adapter)
        if adapter:
            lora.write_adapter(policy.model, tmp)
        if isinstance(optimizer, torch.optim.Optimizer):
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        elif optimizer is not None:  # sharded (FSDP2): the ranks' DCP folder (`fsdp.ShardedOptimizerState`)
            optimizer.write_into(tmp)
        (tmp / STATE_FILE).write_text(store.json_text(state), encoding="utf-8")
    faults.point("after_checkpoint")
    return final


def load_optimizer(run_store: RunStore, key: str, policy: models.Policy, config: DapoConfig) -> torch.optim.Optimizer:
    """AdamW for `policy`, with checkpoint `key`'s state when it has one (a fresh one otherwise).

    The state is read with `weights_only=True`: an optimizer.pt that holds anything but tensors and plain
    values is refused (`store.UnsafeFileError` naming it) before the optimizer or any file is touched.
    """
    path = run_store.checkpoint_dir(key) / OPTIMIZER_FILE
    saved = store.read_torch(path, remedy="use a checkpoint written by this project, or delete the file to go on "
                                          "from the weights with a fresh AdamW") if path.exists() else None
    optimizer = make_optimizer(policy.model, config)
    if saved is not None:
        optimizer.load_state_dict(saved)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate
    return optimizer


# -------------------------------------------------------------------------------------------- rollouts


def select_prompts(train: pl.DataFrame, config: DapoConfig, round_index: int) -> pl.DataFrame:
    """The round's prompts: consecutive slices of a per-epoch seeded permutation (resumable, no repeats
    within an epoch)."""
    n = train.height
    picked: list[int] = []
    position = round_index * config.prompts_per_round
    while len(picked) < config.prompts_per_round:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(config.seed, "epoch", epoch)))
        take = min(config.prompts_per_round - len(picked), n - offset)
        picked.extend(order[offset:offset + take].tolist())
        position += take
    return train[picked]


def encode_rows(policy: models.Policy, rows: pl.DataFrame) -> inputs.PromptBatch:
    """The prompts of data rows: every image of a row (`images`, else `image`), free-form rows (no `choices`)
    with the free-form instruction, and a row's own system prompt where it has one."""
    if "images" in rows.columns:
        images = [[data.decode_image(b) for b in row] for row in rows.get_column("images").to_list()]
    else:
        images = [data.decode_image(b) for b in rows.get_column("image").to_list()]
    system = rows.get_column("system_prompt").to_list() if "system_prompt" in rows.columns else None
    choices = rows.get_column("choices").to_list() if "choices" in rows.columns else [None] * rows.height
    return inputs.encode_prompts(policy, rows.get_column("question").to_list(), choices, images,
                                 system_prompts=system)


def prompt_token_counts(policy: models.Policy, rows: pl.DataFrame, *, batch_size: int = 32) -> list[int]:
    """Each row's prompt length in `policy`'s tokens, image tokens included, as the rollouts encode it."""
    counts: list[int] = []
    for start in range(0, rows.height, batch_size):
        counts += encode_rows(policy, rows.slice(start, batch_size)).attention_mask.sum(1).tolist()
    return counts


def rollout_table(rows: pl.DataFrame, batch: rollout.RolloutBatch) -> pl.DataFrame:
    g = batch.num_generations
    n = len(batch.completions)
    prompt_index = batch.prompt_index.tolist()
    lengths = batch.completion_lengths.tolist()
    ids = [batch.completion_ids[i, : lengths[i]].tolist() for i in range(n)]
    columns: dict[str, list[Any]] = {
        "rollout_index": list(range(n)),
        "prompt_index": prompt_index,
        "generation_index": [i % g for i in range(n)],
        "question_id": [rows["question_id"][p] for p in prompt_index],
        "question": [rows["question"][p] for p in prompt_index],
        "choices": [None if rows["choices"][p] is None else rows["choices"][p].to_list() for p in prompt_index],
        "correct_choice_idx": [rows["correct_choice_idx"][p] for p in prompt_index],
        **({"solution": [rows["solution"][p] for p in prompt_index],
            "num_images": [int(rows["num_images"][p]) for p in prompt_index]} if "solution" in rows.columns else {}),
        "completion": batch.completions,
        "completion_ids": ids,
        "completion_length": lengths,
        "is_eos": batch.is_eos.tolist(),
        "prompt_tokens": batch.prompt_mask.sum(dim=1).tolist(),
    }
    types = {"completion_ids": pl.List(pl.Int64), "choices": pl.List(pl.String), "correct_choice_idx": pl.Int64,
             "solution": pl.String, "num_images": pl.Int64}
    return pl.DataFrame(columns, schema_overrides={k: v for k, v in types.items() if k in columns})


def generate_round_rollouts(config: DapoConfig, run_store: RunStore, key: str, policy: models.Policy,
                            log: RoundLog, *, engine: RolloutEngine | None = None,
                            dp: DataParallel = SINGLE) -> pl.DataFrame:
    """The round's G completions per prompt from `engine` (default: the one `config` selects, on `policy`).
    Under `dp` each rank samples its share of every generation call and all ranks gather the whole batch
    (dynamic sampling then decides alike everywhere); only the main process writes the files."""
    faults.point("before_rollouts")
    engine = make_engine(config, policy) if engine is None else engine
    round_index = checkpoint_index(key)
    train = load_split(run_store, "train")
    rows = select_prompts(train, config, round_index)

    def generate(prompt_rows: pl.DataFrame, attempt: int) -> rollout.RolloutBatch:
        return generate_shared(
            engine, encode_rows(policy, prompt_rows), dp, pad_token_id=policy.pad_token_id,
            num_generations=config.num_generations,
            max_completion_length=config.max_completion_length, temperature=config.temperature,
            top_p=config.top_p, seed=derived_seed(config.seed, "rollouts", round_index, *([attempt] if attempt else [])),
        )

    start = time.perf_counter()
    if config.dynamic_sampling:
        def draw(attempt: int) -> pl.DataFrame:
            order = torch.randperm(train.height, generator=torch.Generator().manual_seed(
                derived_seed(config.seed, "refill", round_index, attempt)))
            return train[order[: config.prompts_per_round].tolist()]

        batch, rows = sampling.sample_with_refill(
            generate, rows, draw, num_prompts=config.prompts_per_round, config=config,
            max_tries=config.dynamic_sampling_max_tries, pad_token_id=policy.pad_token_id, log=log,
        )
    else:
        batch = generate(rows, 0)
    seconds = time.perf_counter() - start
    table = rollout_table(rows, batch)
    tokens = int(batch.completion_lengths.sum())
    log(f"generated {len(batch.completions)} rollouts ({len(batch) // config.num_generations} prompts x {config.num_generations}) "
        f"in {seconds:.2f}s, {tokens / max(seconds, 1e-9):.0f} tokens/s; "
        f"mean length {table['completion_length'].mean():.1f}, EOS {table['is_eos'].mean():.2f}")
    if not dp.is_main:
        return table
    files = run_store.round(key)
    save_rollout_batch(files.rollouts_pt, batch)
    store.write_parquet_atomic(files.rollouts_parquet, table)
    store.write_json_atomic(files.rollouts_json, {"seconds": seconds, "completion_tokens": tokens,
                                                  "num_processes": dp.world_size})
    faults.point("after_rollouts")
    return table


# ------------------------------------------------------------------------------------------- attention


def attention_columns() -> list[str]:
    return [attn_column(s, n) for s in STAGES for n in METRIC_NAMES]


def attention_table(outputs: TeacherForcedOutputs, batch: rollout.RolloutBatch, *, tolerance: float,
                    visual_columns: dict[str, list[float]] | None = None) -> pl.DataFrame:
    """The round's attention table (one row per rollout: per-stage MDI/AEI, token counts, mean entropy, and
    the masked pass's `visual/*` values when given) from a teacher-forced pass over `batch`. Pure."""
    per_rollout = rollout_attention_metrics(outputs, batch, tolerance=tolerance)
    columns: dict[str, list[float]] = {c: [] for c in attention_columns()}
    for metrics in per_rollout:
        for stage in STAGES:
            for name in METRIC_NAMES:
                columns[attn_column(stage, name)].append(float(metrics[stage][name]))
    mask = batch.completion_mask.float()  # (N, C)
    entropy = ((outputs.entropy * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()  # (N,)
    return pl.DataFrame({
        "rollout_index": list(range(len(per_rollout))),
        "prompt_index": batch.prompt_index.tolist(),
        **columns,
        "vision_tokens": batch.vision_mask.sum(1).tolist(),
        "text_tokens": batch.text_mask.sum(1).tolist(),
        "completion_tokens": batch.completion_mask.sum(1).tolist(),
        "total_tokens": (batch.prompt_mask.sum(1) + batch.completion_mask.sum(1)).tolist(),
        "entropy": entropy,
        **(visual_columns or {}),
    }).with_columns(pl.lit(tolerance).alias("mdi_tolerance"))


def _with_image_shares(config: DapoConfig, run_store: RunStore, key: str, policy: models.Policy,
                       batch: rollout.RolloutBatch, table: pl.DataFrame) -> pl.DataFrame:
    """`table` plus `image_share/<stage>` (each image's share of the vision attention, per rollout) when some
    prompt of the round has several images; unchanged otherwise (no extra pass)."""
    rollouts = pl.read_parquet(run_store.round(key).rollouts_parquet, columns=None)
    if "num_images" not in rollouts.columns or int(rollouts["num_images"].max() or 1) < 2:
        return table
    from dapo_ops.attention.image_shares import rollout_image_shares

    shares = rollout_image_shares(policy, batch, rollouts["num_images"].to_list(), temperature=config.temperature,
                                  batch_size=config.local_rollout_forward_batch_size,
                                  shared_prefix=config.shared_prefix)
    return table.with_columns(pl.Series(f"image_share/{stage}", shares[stage], dtype=pl.List(pl.Float64))
                              for stage in STAGES)


def visual_masking(config: DapoConfig, key: str) -> VisualMasking | None:
    """The round's masked pass (None with `visual_dependency` off): its masks are seeded by the run seed and
    the round, so a re-analysis of the round draws the same ones."""
    if not config.visual_dependency:
        return None
    return VisualMasking(config.visual_mask, config.visual_mask_ratio,
                         derived_seed(config.seed, "visual_mask", checkpoint_index(key)))


def visual_columns(config: DapoConfig, policy: models.Policy, outputs: TeacherForcedOutputs,
                   batch: rollout.RolloutBatch) -> dict[str, list[float]] | None:
    """The per-rollout `visual/*` columns of a teacher-forced pass that ran the masked pass (else None)."""
    if outputs.visual_kl is None:
        return None
    answer = visual.answer_token_mask(policy.tokenizer, batch.completion_ids, batch.completion_lengths.tolist())
    return visual.rollout_visual_metrics(outputs.visual_kl, batch.completion_mask, answer,
                                         threshold=config.visual_dependency_threshold)


def compute_attention(config: DapoConfig, run_store: RunStore, key: str, policy: models.Policy, log: RoundLog, *,
                      mdi_tolerance: float | None = None, write_old_logps: bool = True,
                      dp: DataParallel = SINGLE) -> pl.DataFrame:
    """The attention phase: one teacher-forced pass over the stored rollouts, then `attention_table`;
    writes old per-token log-probs (unless re-analysing), attention.parquet and attention.json. Under `dp`
    each rank passes its share of whole groups and the main process writes the gathered result."""
    tolerance = config.mdi_tolerance if mdi_tolerance is None else mdi_tolerance
    batch = load_rollout_batch(run_store, key)
    if dp.world_size > 1:
        batch = batch.select(dp.rows(len(batch) // batch.num_generations, batch.num_generations))
    start = time.perf_counter()
    from dapo_ops.models import precision

    with precision.autocast(config, policy.model):  # the same precision as the update's forward
        outputs = teacher_forced_pass(policy, batch, temperature=config.temperature,
                                      batch_size=config.local_rollout_forward_batch_size,
                                      shared_prefix=config.shared_prefix, visual_masking=visual_masking(config, key))
    seconds = time.perf_counter() - start
    table = attention_table(outputs, batch, tolerance=tolerance,
                            visual_columns=visual_columns(config, policy, outputs, batch))
    if dp.world_size == 1:
        with precision.autocast(config, policy.model):
            table = _with_image_shares(config, run_store, key, policy, batch, table)
    per_token_logps, entropy, visual_kl = outputs.per_token_logps, outputs.entropy, outputs.visual_kl
    if dp.world_size > 1:
        table, per_token_logps, entropy, visual_kl = gather_attention(dp, table, per_token_logps, entropy, visual_kl)
    mdi_all = table[attn_column(config.mdi_reward_stage, "mdi")]
    log(f"teacher-forced pass over {table.height} rollouts in {seconds:.2f}s: "
        + ", ".join(f"{s} MDI {nanmean(table[attn_column(s, 'mdi')]):.3f}" for s in STAGES)
        + f" (tolerance {tolerance}); NaN rollouts {int(mdi_all.is_nan().sum())}"
        + (f"; visual KL {nanmean(table['visual/kl_mean']):.4f} (answer {nanmean(table['visual/kl_answer']):.4f}, "
           f"{config.visual_mask} images)" if visual_kl is not None else ""))
    # A re-analysis evaluates the checkpoint with blank images too (its state.json may predate the masked pass);
    # the values go to attention.json, never into the checkpoint.
    evaluation = evaluate(config, run_store, policy, dp=dp) if visual_kl is not None and not write_old_logps else None
    if not dp.is_main:
        return table
    files = run_store.round(key)
    if write_old_logps:
        save_old_logps(files.old_logps, per_token_logps, entropy, visual_kl)
    store.write_parquet_atomic(files.attention_parquet, table)
    store.write_json_atomic(files.attention_json, {"seconds": seconds, "mdi_tolerance": tolerance,
                                                   "num_processes": dp.world_size,
                                                   **({"eval": evaluation} if evaluation else {})})
    faults.point("after_attention")
    return table


def nanmean(series: pl.Series) -> float:
    values = [v for v in series.to_list() if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------------------------- rewards


def reward_table(config: DapoConfig, table: pl.DataFrame, attention: pl.DataFrame) -> pl.DataFrame:
    """The round's rewards (pure): one column per configured reward, the overlong penalty, the weighted
    total, group advantages, the keep-mask, the predicted choice, and the attention values scored on.

    `table` is the rollouts table, `attention` the attention table of the same rollouts.
    """
    per_func = rewards.score_rollouts(config, table, attention)
    total = torch.tensor(rewards.total_rewards(per_func, config.weights), dtype=torch.float64)  # [N]
    lengths = torch.tensor(table["completion_length"].to_list())  # [N]
    penalty = torch.zeros_like(total)  # [N]
    if config.overlong_buffer > 0:
        penalty = adv.overlong_penalty(lengths, config.max_completion_length, config.overlong_buffer,
                                       config.overlong_penalty_factor).to(total.dtype)
    total = total + penalty
    advantages = adv.group_advantages(total, config.num_generations, scale_rewards=config.scale_rewards)  # [N]
    if config.multi_objective_aggregation == "normalize_then_sum":  # the penalty as one more reward, as in TRL
        columns = torch.tensor([per_func[n] for n in config.reward_names], dtype=torch.float64).T  # [N, K]
        advantages = adv.normalize_then_sum(torch.cat([columns, penalty[:, None]], 1),
                                            [*config.reward_weights, 1.0], config.num_generations)  # [N]
    if config.dynamic_sampling:
        keep = adv.dynamic_sampling_keep_mask(total, config.num_generations)  # [N]
    else:
        keep = torch.ones_like(total, dtype=torch.bool)  # [N]
    predicted = [
        None if ch is None else rewards.extract_choice(rewards.completion_text(c), len(ch), list(ch))
        for c, ch in zip(table["completion"].to_list(), table["choices"].to_list(), strict=True)
    ]
    result = pl.DataFrame({
        "rollout_index": table["rollout_index"],
        **{name: per_func[name] for name in config.reward_names},
        "overlong_penalty": penalty.tolist(),
        "total_reward": total.tolist(),
        "advantage": advantages.tolist(),
        "kept": keep.tolist(),
        "predicted_choice_idx": predicted,
    }, schema_overrides={"predicted_choice_idx": pl.Int64})
    # The attention values this round trained on; re-analysis later never rewrites them.
    return result.hstack(attention.select([c for c in attention.columns if c not in ("rollout_index", "prompt_index")]))


def compute_rewards(config: DapoConfig, run_store: RunStore, key: str, log: RoundLog) -> pl.DataFrame:
    """The rewards phase: rollouts.parquet + attention.parquet -> `reward_table` -> rewards.parquet."""
    files = run_store.round(key)
    result = reward_table(config, pl.read_parquet(files.rollouts_parquet), pl.read_parquet(files.attention_parquet))
    total = torch.tensor(result["total_reward"].to_list(), dtype=torch.float64)  # [N]
    zero_std = adv.zero_std_groups(total, config.num_generations)  # [P]
    kept = int(result["kept"].sum())
    means = ", ".join(f"{reward_label(name)} {nanmean(result[name]):.3f}" for name in config.reward_names)
    log(f"rewards: {means}, total {nanmean(result['total_reward']):.3f}; "
        f"zero-std groups {int(zero_std.sum())}/{len(zero_std)}; kept {kept}/{result.height} rollouts")
    store.write_parquet_atomic(files.rewards, result)
    faults.point("after_rewards")
    return result


# ---------------------------------------------------------------------------------------------- update


def run_update(config: DapoConfig, run_store: RunStore, key: str, policy: models.Policy,
               optimizer: torch.optim.Optimizer, log: RoundLog, *, ref_policy: models.Policy | None = None,
               collective: LocalCollective = LOCAL, model: torch.nn.Module | None = None) -> UpdateRecord:
    """μ epochs of clipped policy-gradient steps; writes ckpt-(k+1) atomically (never after a NaN).

    In process by default. Under `accelerate` (`dapo_ops.distributed.launch`) every rank calls it with the same
    round files, its `collective` and `model` = the prepared (DDP/FSDP) wrapper of `policy.model`; only the
    main process evaluates and writes ckpt-(k+1) and update.json, the others return the record without eval.
    """
    round_index = checkpoint_index(key)
    files = run_store.round(key)
    batch = load_rollout_batch(run_store, key)
    old = load_old_logps(run_store, key)
    reward_table = pl.read_parquet(files.rewards)
    advantages = faults.poison("advantages", torch.tensor(reward_table["advantage"].to_list(), dtype=torch.float32))
    keep = torch.tensor(reward_table["kept"].to_list(), dtype=torch.bool)
    state = checkpoint_state(run_store, key)
    from dapo_ops.models import lora, precision
    from dapo_ops.run import retention

    ref_logps = None
    if config.beta > 0 and (ref_policy is not None or lora.has_adapter(policy.model)):
        # LoRA: the reference is the base model itself, the adapter bypassed (no second copy in memory).
        disabled = lora.adapter_disabled(policy.model) if ref_policy is None else contextlib.nullcontext()
        with disabled, precision.autocast(config, policy.model):
            ref_logps = teacher_forced_pass(ref_policy or policy, batch, temperature=config.temperature,
                                            batch_size=config.local_rollout_forward_batch_size,
                                            with_attention=False, shared_prefix=config.shared_prefix).per_token_logps
    start = time.perf_counter()
    with precision.gradient_checkpointing(policy.model, enabled=config.gradient_checkpointing):
        result = policy_update(
            policy.model if model is None else model, optimizer, batch, old["per_token_logps"], advantages, keep,
            config, global_step=int(state["global_step"]), seed=derived_seed(config.seed, "update", round_index),
            ref_per_token_logps=ref_logps, log=log, collective=collective,
            visual_kl=old.get("visual_kl"), visual_seed=derived_seed(config.seed, "visual_mask", round_index),
        )
    seconds = time.perf_counter() - start
    summary = result.summary()
    round_tokens = int(batch.prompt_mask.sum() + batch.completion_mask.sum())
    next_key = checkpoint_key(round_index + 1)
    train_size = load_split(run_store, "train").height
    new_state = {
        "checkpoint": next_key,
        "round": round_index + 1,
        "global_step": result.global_step,
        "num_tokens": int(state.get("num_tokens", 0)) + round_tokens,
        "source_model": state.get("source_model"),
        "parent": key,
        "epoch": (round_index + 1) * config.prompts_per_round / max(train_size, 1),
    }
    record = UpdateRecord(steps=result.steps, summary=summary, state=new_state, round_tokens=round_tokens,
                          num_processes=collective.world_size, num_rollouts_used=result.num_rollouts_used)
    # Sharded weights (FSDP, ZeRO-3) are gathered by every rank; the main process gets the whole policy.
    trained = collective.full_policy(policy, policy.model if model is None else model)
    # Ranks that hold the whole trained policy (DDP) evaluate it together; sharded ones leave it to the main.
    eval_dp = getattr(collective, "eval_data_parallel", SINGLE)
    if not collective.is_main and eval_dp.world_size == 1:
        return record
    start_eval = time.perf_counter()
    evaluation = evaluate(config, run_store, trained if collective.is_main else policy, dp=eval_dp)
    if not collective.is_main:
        return record
    eval_seconds = time.perf_counter() - start_eval
    save_start = time.perf_counter()
    save_checkpoint(run_store, next_key, trained,
                    None if config.save_only_model else collective.optimizer_to_save(optimizer),
                    {**new_state, "eval": evaluation})
    save_seconds = time.perf_counter() - save_start
    log(f"update: {len(result.steps)} optimizer steps in {seconds:.2f}s (global step {result.global_step}); "
        f"eval accuracy of {next_key}: {evaluation['eval/accuracy']:.3f}; wrote {next_key} in {save_seconds:.2f}s")
    record.eval = evaluation
    record.seconds = {"update": seconds, "eval": eval_seconds, "save": save_seconds}
    record.write(files.update)
    # Only now may older checkpoints lose optimizer state or weights: a crash before update.json re-runs
    # this round from checkpoint k, which must still be whole.
    kept = retention.apply(run_store, config, next_key)
    if kept["pruned"]:
        log(f"save_total_limit={config.save_total_limit}: deleted the weights of {', '.join(kept['pruned'])} "
            f"(state.json, rollouts and reports stay; they can no longer be re-analysed)")
    return record


def evaluate(config: DapoConfig, run_store: RunStore, policy: models.Policy, *,
             engine: RolloutEngine | None = None, dp: DataParallel = SINGLE) -> dict[str, float]:
    """Greedy accuracy and format of `policy` on a fixed subset of the eval split (sampled by `engine`,
    default: the one `config` selects, on `policy`), and the same accuracy with every image blanked
    (`eval/blind_accuracy`, `eval/visual_gain`; always, unlike the rollouts' masked pass, which
    `visual_dependency` switches); under `dp` each rank decodes its share of the rows."""
    engine = make_engine(config, policy) if engine is None else engine
    rows = load_split(run_store, "eval").head(config.eval_subset_size)
    prompts = encode_rows(policy, rows)
    completions = greedy_completions(config, policy, engine, prompts, dp)
    correct = rewards.answer_correct(completions, rows)
    fmt = rewards.think_format_reward(completions)
    result = {EVAL_ACCURACY: sum(correct) / len(correct), EVAL_FORMAT: sum(fmt) / len(fmt)}
    result[EVAL_BLIND_ACCURACY] = blind_accuracy(config, policy, engine, prompts, rows, dp)
    result[EVAL_VISUAL_GAIN] = result[EVAL_ACCURACY] - result[EVAL_BLIND_ACCURACY]
    return result


def blind_accuracy(config: DapoConfig, policy: models.Policy, engine: RolloutEngine, prompts: inputs.PromptBatch,
                   rows: pl.DataFrame, dp: DataParallel = SINGLE) -> float:
    """Greedy accuracy on the same eval rows with every image blanked (the processor's mean pixel): what the
    policy answers without seeing the image. `eval/accuracy` minus it is `eval/visual_gain`."""
    blind = visual.degraded_batch(prompts, mode="blank", ratio=1.0, seed=0)
    correct = rewards.answer_correct(greedy_completions(config, policy, engine, blind, dp), rows)  # as eval/accuracy
    return sum(correct) / len(correct)


def greedy_completions(config: DapoConfig, policy: models.Policy, engine: RolloutEngine,
                       prompts: inputs.PromptBatch, dp: DataParallel = SINGLE) -> list[Any]:
    """One greedy completion per prompt, as the eval decodes (under `dp` each rank decodes its share)."""
    batch = generate_shared(engine, prompts, dp, pad_token_id=policy.pad_token_id, num_generations=1,
                            max_completion_length=config.max_completion_length, temperature=0.0, top_p=1.0, seed=0)
    return batch.completions


# --------------------------------------------------------------------------------------------- metrics


def round_table(run_store: RunStore, key: str) -> pl.DataFrame:
    """One row per rollout: the rollout, the attention values and the rewards the round trained on."""
    files = run_store.round(key)
    table = pl.read_parquet(files.rollouts_parquet)
    reward_table = pl.read_parquet(files.rewards)
    return table.join(reward_table, on="rollout_index", how="left")


def _std(values: list[float]) -> float:
    """Sample std (ddof=1, as torch.std / TRL); 0 for fewer than two values."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def batch_metrics(config: DapoConfig, table: pl.DataFrame) -> dict[str, float]:
    """The metrics a round's rollouts, attention and rewards determine (all but the update's)."""
    metrics: dict[str, float] = {}
    lengths = [float(v) for v in table["completion_length"].to_list()]
    eos = table["is_eos"].to_list()
    terminated = [length for length, e in zip(lengths, eos, strict=True) if e]
    metrics["completions/mean_length"] = sum(lengths) / len(lengths)
    metrics["completions/min_length"] = min(lengths)
    metrics["completions/max_length"] = max(lengths)
    metrics["completions/clipped_ratio"] = 1.0 - sum(eos) / len(eos)
    metrics["completions/mean_terminated_length"] = sum(terminated) / len(terminated) if terminated else 0.0
    metrics["completions/min_terminated_length"] = min(terminated) if terminated else 0.0
    metrics["completions/max_terminated_length"] = max(terminated) if terminated else 0.0
    for stage in STAGES:
        for name in LOGGED_METRIC_NAMES:
            metrics[attention_metric(stage, name)] = nanmean(table[attn_column(stage, name)])
    for name in config.reward_names:
        values = [float(v) for v in table[name].to_list()]
        metrics[f"rewards/{name}/mean"] = nanmean(table[name])
        metrics[f"rewards/{name}/std"] = _std(values)
    total = torch.tensor(table["total_reward"].to_list(), dtype=torch.float64)
    kept = table["kept"].to_list()
    kept_totals = [float(t) for t, k in zip(total.tolist(), kept, strict=True) if k]
    metrics["reward"] = sum(kept_totals) / len(kept_totals) if kept_totals else float("nan")
    metrics["reward_std"] = float(adv.group_reward_std(total, config.num_generations).mean())
    metrics["frac_reward_zero_std"] = float(adv.zero_std_groups(total, config.num_generations).float().mean())
    metrics["rewards/total_reward"] = float(total.mean())
    metrics["sampling_entropy"] = nanmean(table["entropy"])
    for name in visual.ROLLOUT_COLUMNS:  # beside the 44, only when the round ran the masked pass
        if name in table.columns:
            metrics[name] = nanmean(table[name])
    return metrics


def round_metrics(config: DapoConfig, table: pl.DataFrame, update: UpdateRecord) -> dict[str, float]:
    """The round metrics (`reports.round_metric_names(config.reward_names)`: the 44 of the default rewards) plus
    loss, grad_norm, learning_rate, epoch, eval/* and kl, for one round."""
    metrics = batch_metrics(config, table)
    sampling_entropy = metrics.pop("sampling_entropy")
    metrics["num_tokens"] = float(update.num_tokens)
    summary = update.summary
    for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean",
                 "clip_ratio/high_max", "clip_ratio/region_mean"):
        metrics[name] = float(summary[name])
    if math.isnan(metrics["entropy"]):
        # No optimizer step ran (every group was filtered): report the sampling policy's entropy instead.
        metrics["entropy"] = sampling_entropy
    if update.steps:  # without an optimizer step nothing was measured: no loss/grad_norm, never a fake 0
        metrics["loss"] = float(summary["loss"])
        metrics["grad_norm"] = float(summary["grad_norm"])
    metrics["learning_rate"] = float(summary.get("learning_rate", config.learning_rate))
    metrics["epoch"] = update.epoch
    if "kl" in summary:
        metrics["kl"] = float(summary["kl"])
    if "cispo_clip_ratio" in summary:  # TRL logs it for loss_type="cispo" only, beside the 44
        metrics["cispo_clip_ratio"] = float(summary["cispo_clip_ratio"])
    metrics.update({k: float(v) for k, v in update.eval.items()})
    return metrics


def metrics_history(run_store: RunStore) -> pl.DataFrame:
    """One row per finished round k: the metrics it logged (its `eval/accuracy` is that of ckpt-(k+1))."""
    rows: list[dict[str, Any]] = []
    rounds_dir = run_store.rounds_dir
    keys = sorted((p.name for p in rounds_dir.iterdir()
                   if store.CHECKPOINT_RE.match(p.name) and run_store.round(p.name).metrics.exists()),
                  key=checkpoint_index) if rounds_dir.exists() else []
    for key in keys:
        metrics = store.read_json(run_store.round(key).metrics)
        row: dict[str, Any] = {"round": checkpoint_index(key), **metrics}
        row["step"] = read_update_record(run_store, key).global_step
        rows.append(row)
    return pl.DataFrame(rows) if rows else pl.DataFrame({"round": [], "step": []})
