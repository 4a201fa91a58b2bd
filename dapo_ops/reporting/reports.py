"""The per-round markdown reports: pure functions from the round table and metric dicts to strings.

The round table has one row per rollout (see `ROUND_TABLE_COLUMNS`). Conventions shared by all reports:

- Means and stds leave out undefined values (NaN or null): a rollout without image tokens has NaN attention
  metrics (docs/metrics.md) and does not enter the batch means. With no defined value the mean is NaN.
- Std is the sample std (ddof=1); with fewer than two defined values it is NaN.
- Tables render NaN as ``nan``; JSON blocks render it as ``null`` (JSON has no NaN) and round floats to
  6 decimals.
- The correct answer is shown as ``"<letter>. <choice>"``, e.g. ``"B. red"``.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from dapo_ops.attention.metrics import LOGGED_METRIC_NAMES
from dapo_ops.attention.metrics import METRIC_NAMES as ATTENTION_NAMES
from dapo_ops.attention.visual import ROLLOUT_COLUMNS as VISUAL_COLUMNS
from dapo_ops.common.names import (
    EVAL_ACCURACY,
    EVAL_BLIND_ACCURACY,
    EVAL_VISUAL_GAIN,
    attention_metric,
    attn_column,
    reward_metric,
)
from dapo_ops.config.dapo import STAGES
from dapo_ops.data.answers import final_answer
from dapo_ops.rl.rewards import ACCURACY_REWARDS, DEFAULT_REWARD_FUNCS, accuracy_reward_name

# How the built-in rewards are labelled in the reports (JSON key, overall-table row); any other reward is
# shown under its own name.
REWARD_LABELS: dict[str, tuple[str, str]] = {
    "mc_idx_reward": ("accuracy", "Accuracy Mean"),
    "accuracy_reward": ("accuracy_reward", "Free-form Accuracy Mean"),
    "think_format_reward": ("format", "Format Mean"),
    "mdi_reward": ("mdi_reward", "MDI Reward Mean"),
}


def reward_label(name: str) -> str:
    """The short label of reward `name` in report JSON and asset metadata (`accuracy` for mc_idx_reward)."""
    return REWARD_LABELS.get(name, (name, ""))[0]


def accuracy_metric(reward_names: Sequence[str]) -> str | None:
    """`rewards/<name>/mean` of the run's accuracy reward (mc_idx_reward, else accuracy_reward), if any."""
    name = next((n for n in ACCURACY_REWARDS if n in reward_names), None)
    return None if name is None else f"rewards/{name}/mean"


def _reward_row_title(name: str) -> str:
    return REWARD_LABELS.get(name, ("", f"{name} Mean"))[1]


def round_table_columns(reward_names: Sequence[str] = DEFAULT_REWARD_FUNCS) -> tuple[str, ...]:
    """The round table's columns when the round is scored by `reward_names`."""
    return (
        *_ROUND_TABLE_HEAD,
        *(attn_column(stage, name) for stage in STAGES for name in ATTENTION_NAMES),
        *reward_names,
        "total_reward",
        "advantage",
        "kept",
    )


_ROUND_TABLE_HEAD: tuple[str, ...] = (
    "rollout_index",
    "prompt_index",
    "generation_index",
    "question_id",
    "question",
    "choices",
    "correct_choice_idx",
    "completion",
    "completion_length",
    "is_eos",
    "predicted_choice_idx",
    "vision_tokens",
    "text_tokens",
    "completion_tokens",
    "total_tokens",
)
ROUND_TABLE_COLUMNS: tuple[str, ...] = round_table_columns()

_STAGE_TITLES = {stage: stage.capitalize() for stage in STAGES}


def round_metric_names(reward_names: Sequence[str] = DEFAULT_REWARD_FUNCS) -> tuple[str, ...]:
    """The metrics every round logs when scored by `reward_names`, in the metrics table's order.

    The default rewards give the 44 names; each further reward adds `rewards/<name>/mean` and `/std`.
    """
    return (
        "num_tokens",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "completions/mean_terminated_length",
        "completions/min_terminated_length",
        "completions/max_terminated_length",
        *(attention_metric(stage, name) for stage in STAGES for name in LOGGED_METRIC_NAMES),
        *(reward_metric(func, stat) for func in reward_names for stat in ("mean", "std")),
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/low_min",
        "clip_ratio/high_mean",
        "clip_ratio/high_max",
        "clip_ratio/region_mean",
        "rewards/total_reward",
    )


# The round metrics of the default configuration (44 names).
ROUND_METRIC_NAMES: tuple[str, ...] = round_metric_names()

# Section heading -> name patterns; a pattern ending in "/" matches a prefix, any other matches exactly.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "🎯 Reward Metrics:": ("rewards/", "reward", "reward_std", "frac_reward_zero_std", "eval/"),
    "🧠 Attention Metrics:": ("attention/",),
    "📏 Completion Metrics:": ("completions/", "num_tokens"),
    "⚙️ Optimization Metrics:": (
        "entropy",
        "clip_ratio/",
        "loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "kl",
        "perf/",
    ),
}
# Metrics that match no group still get printed, so nothing logged is hidden from the terminal log.
OTHER_METRICS_HEADING = "📋 Other Metrics:"


# --------------------------------------------------------------------------------------------- helpers


def _finite(values: Iterable[Any]) -> list[float]:
    """The defined values: nulls and NaN dropped (infinities kept, they are real and worth seeing)."""
    out: list[float] = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if not math.isnan(f):
            out.append(f)
    return out


def mean_std(values: Iterable[Any]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the defined values; NaN where there are too few."""
    xs = _finite(values)
    if not xs:
        return math.nan, math.nan
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


def _fmt(value: float | None, decimals: int = 3) -> str:
    if value is None or math.isnan(value):
        return "nan"
    return f"{value:.{decimals}f}"


def _fmt_pm(values: Iterable[Any], decimals: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{_fmt(mean, decimals)} ± {_fmt(std, decimals)}"


def _json_value(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> null, floats rounded, containers recursed."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return round(f, 6) if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, Sequence | pl.Series):
        return [_json_value(v) for v in value]
    return value


def _fence(text: str, lang: str = "") -> str:
    """A fenced block that survives backtick runs inside `text` (completions may contain them)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


def _json_block(payload: Mapping[str, Any]) -> str:
    return _fence(json.dumps(_json_value(payload), indent=2, ensure_ascii=False, allow_nan=False), "json")


def _cell(text: Any) -> str:
    """A markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _letter(index: int) -> str:
    return chr(ord("A") + index)


def format_answer(choices: Sequence[str] | None, index: int | None) -> str | None:
    """`"B. red"` for index 1 of `choices`; None when the index is missing or out of range."""
    if index is None or choices is None or not 0 <= int(index) < len(choices):
        return None
    return f"{_letter(int(index))}. {choices[int(index)]}"


def _require(table: pl.DataFrame, columns: Iterable[str], report: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{report}: the round table lacks column(s) {', '.join(missing)}")


def _column(table: pl.DataFrame, name: str) -> list[Any]:
    return table.get_column(name).to_list()


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"mdi_reward_stage={stage!r} is unknown; use one of {', '.join(STAGES)}")


def _num_undefined_attention(table: pl.DataFrame) -> int:
    return sum(1 for v in _column(table, attn_column("all", "mdi")) if v is None or math.isnan(float(v)))


def attention_stage_means(table: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Batch means `{stage: {name: mean}}` over rollouts with defined values (NaN when none are defined).

    This is what `render_attention_diagnostics` puts in its JSON block and what
    `dapo_ops.reporting.charts.attention_balance_png` draws.
    """
    _require(table, [attn_column(s, n) for s in STAGES for n in ATTENTION_NAMES], "attention_stage_means")
    return {
        stage: {name: mean_std(_column(table, attn_column(stage, name)))[0] for name in ATTENTION_NAMES}
        for stage in STAGES
    }


def _header(title: str, run_name: str, checkpoint: str) -> str:
    return f"# {title}\n\nRun `{run_name}` · checkpoint `{checkpoint}`"


def _batch_note(table: pl.DataFrame) -> str:
    n = table.height
    prompts = table.get_column("prompt_index").n_unique() if "prompt_index" in table.columns else 0
    undefined = _num_undefined_attention(table)
    return (
        f"{n} rollouts from {prompts} prompts. Values are `mean ± std` (sample std, ddof=1) over rollouts; "
        f"{undefined} rollout(s) without image tokens have undefined (NaN) attention metrics and are left "
        "out of the attention means."
    )


# ------------------------------------------------------------------------------------ rollout results

# `report_samples` value that shows every rollout; 0 shows none, N > 0 shows N prompts with all G completions.
ALL_ROLLOUTS = -1


def check_report_samples(report_samples: int) -> None:
    if report_samples < ALL_ROLLOUTS:
        raise ValueError(f"report_samples={report_samples} must be -1 (every rollout), 0 (none) or a number of prompts")


def sample_prompts(table: pl.DataFrame, report_samples: int) -> list[int]:
    """The `prompt_index`es of the sample: the ⌈N/2⌉ prompts with the best mean `total_reward`, then the ⌊N/2⌋
    with the worst, for N = `report_samples` (every prompt, best first, when N is -1 or at least their number).
    Ties go to the lower prompt index; a prompt without a defined reward counts as the worst."""
    check_report_samples(report_samples)
    _require(table, ["prompt_index", "total_reward"], "sample_prompts")
    means = (table.group_by("prompt_index")
             .agg(pl.col("total_reward").cast(pl.Float64).fill_nan(None).mean().alias("mean"))
             .sort(["mean", "prompt_index"], descending=[True, False], nulls_last=True))
    ranked = [int(p) for p in means.get_column("prompt_index").to_list()]
    if report_samples == ALL_ROLLOUTS or report_samples >= len(ranked):
        return ranked
    best, worst = (report_samples + 1) // 2, report_samples // 2
    return ranked[:best] + ranked[len(ranked) - worst:]


def sample_rollouts(table: pl.DataFrame, report_samples: int) -> pl.DataFrame:
    """The rollouts the reports show: every one by `rollout_index` for -1 (`ALL_ROLLOUTS`), none for 0, else
    all G completions of each prompt of `sample_prompts`, best prompt first, by `rollout_index` within one."""
    check_report_samples(report_samples)
    if report_samples == ALL_ROLLOUTS:
        return table.sort("rollout_index")
    rank = {p: i for i, p in enumerate(sample_prompts(table, report_samples))}
    chosen = table.filter(pl.col("prompt_index").is_in(list(rank)))
    order = pl.col("prompt_index").replace_strict(rank, return_dtype=pl.Int64)
    return chosen.with_columns(order.alias("_rank")).sort(["_rank", "rollout_index"]).drop("_rank")


def _sample_note(table: pl.DataFrame, report_samples: int) -> str:
    if report_samples == ALL_ROLLOUTS:
        return ""
    prompts = len(sample_prompts(table, report_samples)) if report_samples else 0
    return (f" The sample (`report_samples={report_samples}`) is {prompts} prompt(s), best mean total reward first "
            "and then the worst, with all their completions.")


_ROLLOUT_REQUIRED = (
    "rollout_index",
    "prompt_index",
    "question",
    "choices",
    "correct_choice_idx",
    "completion",
    "vision_tokens",
    "text_tokens",
    "completion_tokens",
    "total_tokens",
    "total_reward",
    *(attn_column(s, n) for s in STAGES for n in ATTENTION_NAMES),
)
# Identification and diagnosis fields copied into each rollout's JSON when the table has them.
_ROLLOUT_OPTIONAL = (
    "prompt_index",
    "generation_index",
    "question_id",
    "completion_length",
    "is_eos",
    "advantage",
    "kept",
    "num_images",
)


def _answer_text(row: Mapping[str, Any], index_column: str = "correct_choice_idx") -> str | None:
    """The right answer shown for a row: `B. red` for multiple choice, the `solution` of a free-form row."""
    if row.get("choices") is None:
        return row.get("solution") if index_column == "correct_choice_idx" else None
    return format_answer(row["choices"], row.get(index_column))


def _with_mdi(reward_names: Sequence[str]) -> list[str | None]:
    """The reward names with None where the MDI itself is shown: just before `mdi_reward` (its input), or
    after the rewards when `mdi_reward` is not configured."""
    names: list[str | None] = list(reward_names)
    names.insert(names.index("mdi_reward") if "mdi_reward" in names else len(names), None)
    return names


def _rollout_record(row: Mapping[str, Any], mdi_reward_stage: str, reward_names: Sequence[str]) -> dict[str, Any]:
    record: dict[str, Any] = {"rollout_index": row["rollout_index"]}
    record.update({k: row[k] for k in _ROLLOUT_OPTIONAL if k in row})
    scores: dict[str, Any] = {}
    for name in _with_mdi(reward_names):
        if name is None:
            scores["mdi"] = row[attn_column(mdi_reward_stage, "mdi")]
        else:
            scores[reward_label(name)] = row[name]
    scores["total"] = row["total_reward"]
    record["rewards"] = scores
    record["attention_metrics"] = {
        stage: {name: row[attn_column(stage, name)] for name in ATTENTION_NAMES} for stage in STAGES
    }
    record["token_counts"] = {
        k: row[k] for k in ("vision_tokens", "text_tokens", "completion_tokens", "total_tokens")
    }
    choices = row["choices"]
    record["question"] = row["question"]
    record["choices"] = choices
    record["answer"] = _answer_text(row)
    if choices is None:
        record["predicted_answer"] = final_answer(str(row["completion"])) or None
    elif "predicted_choice_idx" in row:
        record["predicted_answer"] = format_answer(choices, row["predicted_choice_idx"])
    record["completion"] = row["completion"]
    return record


def render_rollout_results(
    table: pl.DataFrame,
    *,
    mdi_reward_stage: str = "all",
    run_name: str,
    checkpoint: str,
    max_samples: int | None = None,
    reward_names: Sequence[str] = DEFAULT_REWARD_FUNCS,
    report_samples: int = ALL_ROLLOUTS,
    all_rollouts_link: str | None = None,
) -> str:
    """`rollout_results.md`: overall table, MDI-per-stage table and one JSON block per sampled rollout.

    The overall table and each rollout's `rewards` have one entry per reward of `reward_names` (the
    configured `reward_funcs`), the MDI of `mdi_reward_stage` (`MDI Mean`, `rewards.mdi`) and the total.
    `Success Rate`, shown when both are configured, is the share of rollouts with both `mc_idx_reward == 1`
    and `think_format_reward == 1`. Both tables cover every rollout; the JSON blocks show the sample of
    `report_samples` (see `sample_rollouts`; by default every rollout, by `rollout_index`), the first
    `max_samples` of it when given. `all_rollouts_link`: where the file holding every rollout is (linked).
    """
    _check_stage(mdi_reward_stage)
    _require(table, [*_ROLLOUT_REQUIRED, *reward_names], "render_rollout_results")
    table = table.sort("rollout_index")

    rows = [
        ["MDI Mean", _fmt_pm(_column(table, attn_column(mdi_reward_stage, "mdi")))]
        if name is None
        else [_reward_row_title(name), _fmt_pm(_column(table, name))]
        for name in _with_mdi(reward_names)
    ]
    rows.append(["Total Reward Mean", _fmt_pm(_column(table, "total_reward"))])
    if "mc_idx_reward" in reward_names and "think_format_reward" in reward_names:
        successes = [
            a is not None and f is not None and float(a) == 1.0 and float(f) == 1.0
            for a, f in zip(_column(table, "mc_idx_reward"), _column(table, "think_format_reward"), strict=True)
        ]
        rows.append(["Success Rate", _fmt(sum(successes) / len(successes) if successes else math.nan)])
    overall = _table(["Metric", "Value"], rows)

    stage_rows = []
    for stage in STAGES:
        mdi_mean, mdi_std = mean_std(_column(table, attn_column(stage, "mdi")))
        stage_rows.append(
            [
                _STAGE_TITLES[stage],
                _fmt(mdi_mean),
                _fmt(mdi_std),
                _fmt(mean_std(_column(table, attn_column(stage, "aei_text")))[0]),
                _fmt(mean_std(_column(table, attn_column(stage, "aei_vision")))[0]),
            ]
        )
    mdi_table = _table(["Stage", "MDI Mean", "MDI Std", "AEI Text", "AEI Vision"], stage_rows)

    sample = sample_rollouts(table, report_samples)
    shown = sample if max_samples is None else sample.head(max(0, max_samples))
    samples = []
    for row in shown.iter_rows(named=True):
        title = f"### Rollout {row['rollout_index']} · prompt {row['prompt_index']}"
        if "generation_index" in row:
            title += f" · generation {row['generation_index']}"
        samples.append(f"{title}\n\n{_json_block(_rollout_record(row, mdi_reward_stage, reward_names))}")

    parts = [
        _header("Rollout results", run_name, checkpoint),
        _batch_note(table) + f" `MDI Mean` is the MDI of stage `{mdi_reward_stage}`.",
        "## Overall",
        overall,
        "## MDI by stage",
        mdi_table,
        f"## Samples\n\nShowing {shown.height} of {table.height} rollouts.{_sample_note(table, report_samples)}"
        + (f" Every rollout: [{Path(all_rollouts_link).name}]({all_rollouts_link})." if all_rollouts_link else ""),
        *samples,
    ]
    return "\n\n".join(parts) + "\n"


def _choices_text(choices: Sequence[str] | None) -> str:
    return "  ".join(f"{_letter(i)}. {c}" for i, c in enumerate(choices or []))


def rollout_sample_columns(
    sample: pl.DataFrame, image_cells: Mapping[int, Any], *, reward_names: Sequence[str] = DEFAULT_REWARD_FUNCS
) -> dict[str, list[Any]]:
    """The sample as named columns (what the MLflow table and the Dagster table show), one row per rollout:
    `image` (the `image_cells` entry of its `prompt_index`), indices, question, choices, answer, completion,
    each reward under its report label, `total`, `advantage` and `mdi/<stage>` per stage (NaN -> None)."""
    _require(sample, ["rollout_index", "prompt_index", "question", "choices", "correct_choice_idx", "completion",
                      *reward_names, "total_reward", "advantage", *(attn_column(s, "mdi") for s in STAGES)],
             "rollout_sample_columns")
    rows = list(sample.iter_rows(named=True))
    cells = {p: list(c) if isinstance(c, list) else [c] for p, c in image_cells.items()}
    most = max((len(cells[int(r["prompt_index"])]) for r in rows), default=1)
    columns: dict[str, list[Any]] = {
        # One column per image of the prompt with the most: image, image_2, ... (None where a prompt has fewer).
        ("image" if k == 0 else f"image_{k + 1}"): [
            cells[int(r["prompt_index"])][k] if k < len(cells[int(r["prompt_index"])]) else None for r in rows]
        for k in range(most)
    }
    columns.update({
        "rollout_index": [r["rollout_index"] for r in rows],
        "prompt_index": [r["prompt_index"] for r in rows],
        "question": [r["question"] for r in rows],
        "choices": [_choices_text(r["choices"]) for r in rows],
        "answer": [_answer_text(r) for r in rows],
        "completion": [r["completion"] for r in rows],
    })
    for name in reward_names:
        columns[reward_label(name)] = [_json_value(r[name]) for r in rows]
    columns["total"] = [_json_value(r["total_reward"]) for r in rows]
    columns["advantage"] = [_json_value(r["advantage"]) for r in rows]
    for stage in STAGES:
        columns[f"mdi/{stage}"] = [_json_value(r[attn_column(stage, "mdi")]) for r in rows]
    for name in VISUAL_COLUMNS:  # the masked pass's per-rollout values, when the round ran it
        if name in sample.columns:
            columns[name] = [_json_value(r[name]) for r in rows]
    return columns


def mlflow_table_json(columns: Mapping[str, Sequence[Any]]) -> str:
    """The table file `MlflowClient.log_table` writes (pandas' `orient="split"`: `{"columns", "data"}`), so the
    MLflow UI shows it as a logged table; cells holding `{"type": "image", "filepath", "compressed_filepath"}`
    (paths in the run's artifacts) are shown as images."""
    names = list(columns)
    lengths = {len(columns[n]) for n in names}
    if len(lengths) > 1:
        raise ValueError(f"mlflow_table_json: the columns have different lengths {sorted(lengths)}")
    data = [[columns[n][i] for n in names] for i in range(lengths.pop() if lengths else 0)]
    return json.dumps({"columns": names, "data": _json_value(data)}, ensure_ascii=False, allow_nan=False)


def render_rollout_sample(columns: Mapping[str, Sequence[Any]]) -> str:
    """The sample as one markdown table (the Dagster materialization's view of the MLflow table): the `image`
    cells are markdown (e.g. `![prompt 3](rollout_images/prompt-0003.png)`), numbers have 3 decimals."""
    names = list(columns)
    if not names or not columns[names[0]]:
        return "(no rollouts in the sample)"

    def show(value: Any) -> str:
        if value is None:
            return "nan"
        if isinstance(value, float):
            return _fmt(value)
        return str(value)

    images = columns.get("image", [])
    # One image per prompt: its G completions follow each other in the sample.
    rows = [["" if n == "image" and i > 0 and images[i] == images[i - 1] else show(columns[n][i]) for n in names]
            for i in range(len(columns[names[0]]))]
    return _table(names, rows)


# ------------------------------------------------------------------------------- attention diagnostics


def vision_token_bin(count: int) -> tuple[int, int]:
    """The power-of-two bin `[2^k, 2^(k+1) - 1]` that holds `count` (>= 1) vision tokens.

    Powers of two because image-token counts grow with the image area (x4 per doubled side): a round with
    56x56 and 112x112 images (4 and 16 tokens) falls into two bins, small resize jitter into one.
    """
    if count < 1:
        raise ValueError(f"vision token count {count} has no bin (a rollout without image tokens has no MDI)")
    low = 1 << (int(count).bit_length() - 1)
    return low, 2 * low - 1


def vision_token_bins(table: pl.DataFrame) -> list[tuple[tuple[int, int], pl.DataFrame]]:
    """The rollouts with image tokens split by `vision_token_bin` of their `vision_tokens` (the image-token
    mask's count that the attention metrics were computed with), smallest bin first."""
    _require(table, ["vision_tokens"], "vision_token_bins")
    with_image = table.filter(pl.col("vision_tokens") > 0)
    bins = sorted({vision_token_bin(int(v)) for v in with_image.get_column("vision_tokens").to_list()})
    return [(b, with_image.filter(pl.col("vision_tokens").is_between(*b))) for b in bins]


def _vision_bin_table(table: pl.DataFrame) -> str | None:
    """MDI per stage, MDI Std and AEI Vision (stage all) per vision-token bin beside the pooled values;
    None when the rollouts with image tokens fall into one bin (the pooled table is then the whole story)."""
    bins = vision_token_bins(table)
    if len(bins) < 2:
        return None

    def row(label: str, part: pl.DataFrame) -> list[str]:
        means = attention_stage_means(part)
        tokens = _finite(_column(part, "vision_tokens"))
        return [label, str(part.height), _fmt(math.fsum(tokens) / len(tokens), 1),
                *(_fmt(means[s]["mdi"]) for s in STAGES),
                _fmt(mean_std(_column(part, attn_column("all", "mdi")))[1]), _fmt(means["all"]["aei_vision"])]

    pooled = table.filter(pl.col("vision_tokens") > 0)
    return _table(
        ["Vision Tokens", "Rollouts", "Mean Vision Tokens", *(f"MDI {_STAGE_TITLES[s]}" for s in STAGES),
         "MDI Std All", "AEI Vision All"],
        [row("pooled", pooled), *(row(f"{lo}–{hi}", part) for (lo, hi), part in bins)],
    )


def _image_share_table(table: pl.DataFrame) -> str | None:
    """Image k's mean share per stage, one row per (images in the prompt, image k); None without prompts of
    several images."""
    if f"image_share/{STAGES[0]}" not in table.columns:
        return None
    from dapo_ops.attention.image_shares import mean_image_shares

    means = {stage: mean_image_shares(table[f"image_share/{stage}"].to_list()) for stage in STAGES}
    rows = [[f"{count} images: image {k + 1}", *(_fmt(means[s][count][k]) for s in STAGES)]
            for count, values in means[STAGES[-1]].items() for k in range(len(values))]
    return _table(["Image", *(_STAGE_TITLES[s] for s in STAGES)], rows) if rows else None


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r over the pairs where both values are finite; NaN with fewer than 3 pairs or no spread."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    if len(pairs) < 3:
        return math.nan
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def abs_log_mdi(values: Iterable[Any]) -> list[float]:
    """|ln MDI| per value; NaN where the MDI is undefined (NaN, 0 or infinite)."""
    out = []
    for v in values:
        v = math.nan if v is None else float(v)
        out.append(abs(math.log(v)) if math.isfinite(v) and v > 0 else math.nan)
    return out


def visual_dependency_summary(table: pl.DataFrame, evaluation: Mapping[str, float] | None = None) -> dict[str, float]:
    """The report's visual-dependency values: mean KL over completions and answers, pivotal-token share, blind
    accuracy and visual gain (from `evaluation`, the checkpoint's eval), and Pearson's r between |ln MDI|
    (stage all) and KL over the round's rollouts."""
    evaluation = evaluation or {}
    return {
        **{name: mean_std(_column(table, name))[0] for name in VISUAL_COLUMNS},
        EVAL_BLIND_ACCURACY: float(evaluation.get(EVAL_BLIND_ACCURACY, math.nan)),
        EVAL_VISUAL_GAIN: float(evaluation.get(EVAL_VISUAL_GAIN, math.nan)),
        "abs_log_mdi_kl_correlation": pearson(abs_log_mdi(_column(table, attn_column("all", "mdi"))),
                                              _column(table, "visual/kl_mean")),
    }


def _visual_section(table: pl.DataFrame, evaluation: Mapping[str, float] | None,
                    chart_file: str | None) -> list[str]:
    """The "Visual dependency" section: the blind eval of the checkpoint, and the masked pass's KL when the
    round ran it (empty when neither is there)."""
    if "visual/kl_mean" not in table.columns:
        return _blind_eval_section(evaluation or {})
    v = visual_dependency_summary(table, evaluation)
    rows = [
        ["KL completion (mean per token, nats)", _fmt(v["visual/kl_mean"], 4)],
        ["KL answer (tokens after `</think>`)", _fmt(v["visual/kl_answer"], 4)],
        ["Pivotal-token share (KL > threshold)", _fmt(v["visual/dependent_token_ratio"])],
        *_blind_eval_rows(v),
        ["corr(|ln MDI|, KL) over rollouts", _fmt(v["abs_log_mdi_kl_correlation"])],
    ]
    parts = ["## Visual dependency",
             "Does the answer depend on the image? Each rollout is scored again with its image degraded; KL is "
             "KL(π(·|q, I) ‖ π(·|q, I_masked)) per completion token. Blind accuracy and visual gain are this "
             "checkpoint's greedy eval with blanked images. The correlation says whether balanced attention "
             "(small |ln MDI|) goes with using the image (a negative r: the more balanced, the more dependent).",
             _table(["Metric", "Value"], rows)]
    if chart_file is not None:
        parts.append(f"![Attention balance and visual dependency per round]({chart_file})")
    return parts


def _blind_eval_rows(values: Mapping[str, float]) -> list[list[str]]:
    """The blind eval's rows of the "Visual dependency" table (NaN where the eval has no value)."""
    return [["Blind accuracy (eval, blank images)", _fmt(float(values.get(EVAL_BLIND_ACCURACY, math.nan)))],
            ["Visual gain (eval accuracy − blind)", _fmt(float(values.get(EVAL_VISUAL_GAIN, math.nan)))]]


def _blind_eval_section(evaluation: Mapping[str, float]) -> list[str]:
    """The section of a round without the masked pass (`visual_dependency` off): the blind eval only."""
    if EVAL_BLIND_ACCURACY not in evaluation:
        return []
    rows = _blind_eval_rows(evaluation)
    return ["## Visual dependency",
            "Does the answer depend on the image? This checkpoint's greedy eval again with every image blanked. "
            "The per-token KL of the rollouts needs the masked pass, which this run turned off "
            "(`visual_dependency: false`); `make reanalyze` always runs it.",
            _table(["Metric", "Value"], rows)]


def render_attention_diagnostics(
    table: pl.DataFrame,
    *,
    run_name: str,
    checkpoint: str,
    mdi_tolerance: float,
    chart_file: str | None = None,
    evaluation: Mapping[str, float] | None = None,
    visual_chart_file: str | None = None,
) -> str:
    """`attention_diagnostics.md`: per-stage MDI/AEI table, token table, the MDI by vision-token bin (when the
    round's images give more than one `vision_token_bin`), optional chart, the visual-dependency section (when
    the table has the masked pass's columns; `evaluation`: the checkpoint's eval metrics), batch-mean JSON.

    `Vision Ratio` is the token share `v = |V| / (|T| + |V|)` averaged over rollouts (a rollout with no
    key tokens at all is left out). The per-stage table and the token table are separate tables so that
    both are valid markdown.
    """
    _require(
        table,
        ["vision_tokens", "text_tokens", *(attn_column(s, n) for s in STAGES for n in ATTENTION_NAMES)],
        "render_attention_diagnostics",
    )
    means = attention_stage_means(table)
    stage_table = _table(
        ["Metric", *(_STAGE_TITLES[s] for s in STAGES)],
        [
            ["MDI Mean", *(_fmt(means[s]["mdi"]) for s in STAGES)],
            ["MDI Std", *(_fmt(mean_std(_column(table, attn_column(s, "mdi")))[1]) for s in STAGES)],
            ["AEI Text", *(_fmt(means[s]["aei_text"]) for s in STAGES)],
            ["AEI Vision", *(_fmt(means[s]["aei_vision"]) for s in STAGES)],
        ],
    )

    vision = _column(table, "vision_tokens")
    text = _column(table, "text_tokens")
    shares = [
        float(v) / (float(v) + float(t))
        for v, t in zip(vision, text, strict=True)
        if v is not None and t is not None and float(v) + float(t) > 0
    ]
    token_table = _table(
        ["Metric", "Value"],
        [
            ["Vision Tokens", _fmt_pm(vision, 1)],
            ["Text Tokens", _fmt_pm(text, 1)],
            ["Vision Ratio", _fmt(mean_std(shares)[0])],
        ],
    )

    parts = [
        _header("Attention diagnostics", run_name, checkpoint),
        _batch_note(table)
        + f" MDI tolerance R = {mdi_tolerance:g}: `mdi_balance = clip(1 − |ln MDI| / ln R, 0, 1)`.",
        "## Stages",
        stage_table,
        "## Tokens",
        token_table,
    ]
    by_bin = _vision_bin_table(table)
    if by_bin is not None:
        parts += [
            "## MDI by vision-token count",
            "Per-token attention ratios drift with the number of image tokens, so a pooled MDI mixes image"
            " sizes. Each row is the mean over the rollouts whose image-token count (the image-token mask of"
            " the attention pass) falls in that power-of-two bin; `pooled` is every rollout with image tokens.",
            by_bin,
        ]
    shares = _image_share_table(table)
    if shares is not None:
        parts += [
            "## Image shares",
            "Prompts with several images: each image's share of the vision attention (the attention mass on its"
            " tokens over the mass on all images' tokens; the vision keys above are all images' tokens). Each"
            " cell is the mean over the rollouts whose prompt has that many images.",
            shares,
        ]
    if chart_file is not None:
        parts.append(f"![Attention balance per stage]({chart_file})")
    parts += _visual_section(table, evaluation, visual_chart_file)
    parts += ["## Stage details (batch means)", _json_block({"attention_metrics": means})]
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ metrics block


def _matches(name: str, pattern: str) -> bool:
    return name.startswith(pattern) if pattern.endswith("/") else name == pattern


def metric_group(name: str) -> str:
    """The section heading a metric is printed under (`OTHER_METRICS_HEADING` when no group matches)."""
    for heading, patterns in METRIC_GROUPS.items():
        if any(_matches(name, p) for p in patterns):
            return heading
    return OTHER_METRICS_HEADING


def _display_order(reward_names: Sequence[str]) -> dict[str, int]:
    """Position of each round metric: the metrics table's order, except that the round's total reward
    follows the per-function rewards."""
    names = [n for n in round_metric_names(reward_names) if n != "rewards/total_reward"]
    last = max(i for i, n in enumerate(names) if n.startswith("rewards/"))
    names.insert(last + 1, "rewards/total_reward")
    return {name: i for i, name in enumerate(names)}


def format_metrics_block(
    metrics: Mapping[str, float], mode: str = "train", reward_names: Sequence[str] = DEFAULT_REWARD_FUNCS,
    *, accuracy_line: bool = False,
) -> str:
    """The terminal block `📊 Logging N metrics for <mode> mode`, one `   name: value` line per metric.

    N counts the round metrics (`round_metric_names(reward_names)`, 44 for the default rewards) present in
    `metrics`. Within a section those come in the metrics table's order (`rewards/total_reward` right after
    the per-function rewards), then the other metrics in the order given. Empty sections are left out.
    With `accuracy_line`, a last line names the accuracy reward that ran (`🎯 Accuracy reward: ...`).
    """
    order = _display_order(reward_names)
    count = sum(1 for name in metrics if name in order)
    sections: dict[str, list[str]] = {heading: [] for heading in (*METRIC_GROUPS, OTHER_METRICS_HEADING)}
    for name in metrics:
        sections[metric_group(name)].append(name)
    lines = [f"📊 Logging {count} metrics for {mode} mode"]
    for heading, names in sections.items():
        if not names:
            continue
        lines.append(heading)
        # Stable sort: the round metrics first in table order, the rest keep the caller's order.
        for name in sorted(names, key=lambda n: order.get(n, len(order))):
            lines.append(f"   {name}: {float(metrics[name]):.4f}")
    if accuracy_line:
        lines.append(f"🎯 Accuracy reward: {accuracy_reward_name(reward_names) or 'none (no built-in accuracy reward)'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- run terminal


def _health_table(health: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            h.get("name", ""),
            "✅ passed" if h.get("passed") else "❌ failed",
            h.get("severity", ""),
            h.get("message", ""),
            h.get("remedy", "") or "",
        ]
        for h in health
    ]
    return _table(["Check", "Status", "Severity", "Message", "Remedy"], rows)


def render_run_terminal(
    log_lines: Sequence[str],
    metrics: Mapping[str, float],
    *,
    run_name: str,
    checkpoint: str,
    health: Sequence[Mapping[str, Any]] | None = None,
    mode: str = "train",
    reward_names: Sequence[str] = DEFAULT_REWARD_FUNCS,
) -> str:
    """`run_terminal.md`: the round's log lines, health findings (when given) and the metrics block.

    Each health finding is a dict with `name`, `passed` (bool), `severity`, `message` and `remedy`.
    """
    log_text = "\n".join(line.rstrip("\n") for line in log_lines)
    parts = [
        _header("Run terminal", run_name, checkpoint),
        "## Log",
        _fence(log_text or "(no log lines)", "text"),
    ]
    if health:
        failed = sum(1 for h in health if not h.get("passed"))
        parts += [
            "## Health checks",
            f"{len(health) - failed} of {len(health)} checks passed.",
            _health_table(health),
        ]
    block = format_metrics_block(metrics, mode=mode, reward_names=reward_names, accuracy_line=True)
    parts += ["## Metrics", _fence(block, "text")]
    return "\n\n".join(parts) + "\n"


def round_summary(metrics: Mapping[str, float], reward_names: Sequence[str] = DEFAULT_REWARD_FUNCS) -> str:
    """The round's figures on the console's summary line (`make run`):
    `reward 0.975  accuracy 0.000  eval 0.000  format 0.000  MDI 1.00  entropy 5.994` (accuracy: the run's
    accuracy reward, nan without one)."""
    accuracy = metrics.get(accuracy_metric(reward_names) or "", float("nan"))
    return (f"reward {metrics['reward']:.3f}  accuracy {accuracy:.3f}  eval {metrics[EVAL_ACCURACY]:.3f}  "
            f"format {metrics[reward_metric('think_format_reward', 'mean')]:.3f}  "
            f"MDI {metrics[attention_metric('all', 'mdi')]:.2f}  entropy {metrics['entropy']:.3f}")
