"""The per-round markdown reports and charts, checked against a small hand-built round table.

The table: 2 prompts x 3 rollouts. Expected `mean ± std` values are computed by hand with the sample std
(ddof=1). Rollout 5 has no image tokens, so its attention metrics are NaN and it is left out of the
attention means.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from dapo_ops.attention.metrics import METRIC_NAMES as ATTENTION_NAMES
from dapo_ops.config.dapo import STAGES
from dapo_ops.reporting.charts import attention_balance_png, learning_curves_png
from dapo_ops.reporting.reports import (
    ALL_ROLLOUTS,
    METRIC_GROUPS,
    OTHER_METRICS_HEADING,
    ROUND_METRIC_NAMES,
    format_metrics_block,
    metric_group,
    mlflow_table_json,
    render_attention_diagnostics,
    render_rollout_results,
    render_rollout_sample,
    render_run_terminal,
    rollout_sample_columns,
    sample_prompts,
    sample_rollouts,
    vision_token_bin,
)

NAN = math.nan
# MDI of stage "all" per rollout; early = 2x, middle = 1x, late = 0.5x. aei_text = mdi / 2, aei_vision = 0.5.
MDI_ALL = [1.0, 2.0, 4.0, 3.0, 5.0, NAN]
STAGE_FACTOR = {"early": 2.0, "middle": 1.0, "late": 0.5, "all": 1.0}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _balance(mdi: float) -> float:
    return NAN if math.isnan(mdi) else min(1.0, max(0.0, 1.0 - abs(math.log(mdi)) / math.log(2.0)))


def round_table() -> pl.DataFrame:
    rows = []
    accuracy = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    fmt = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    mdi_reward = [1.0, -1.0, -1.0, -1.0, -1.0, 0.0]
    vision = [16, 16, 16, 16, 16, 0]
    text = [10, 10, 10, 20, 20, 20]
    for i in range(6):
        row = {
            "rollout_index": i,
            "prompt_index": i // 3,
            "generation_index": i % 3,
            "question_id": f"q{i // 3}",
            "question": "What color is the shape?" if i < 3 else "What shape is it?",
            "choices": ["red", "green", "blue", "yellow"]
            if i < 3
            else ["circle", "square", "triangle", "star"],
            "correct_choice_idx": 1 if i < 3 else 2,
            "completion": f"<think>rollout {i}</think> Answer: B",
            "completion_length": 8 + i,
            "is_eos": True,
            "predicted_choice_idx": None if i == 5 else 1,
            "vision_tokens": vision[i],
            "text_tokens": text[i],
            "completion_tokens": 8 + i,
            "total_tokens": vision[i] + text[i] + 8 + i,
            "mc_idx_reward": accuracy[i],
            "think_format_reward": fmt[i],
            "mdi_reward": mdi_reward[i],
            "total_reward": 3.0 * accuracy[i] + fmt[i] + mdi_reward[i],
            "advantage": 0.0,
            "kept": True,
        }
        for stage in STAGES:
            mdi = MDI_ALL[i] * STAGE_FACTOR[stage]
            undefined = math.isnan(mdi)
            row.update(
                {
                    f"attn/{stage}/mdi": mdi,
                    f"attn/{stage}/aei_text": mdi / 2,
                    f"attn/{stage}/aei_vision": NAN if undefined else 0.5,
                    f"attn/{stage}/text_ratio": NAN if undefined else 0.8,
                    f"attn/{stage}/vision_ratio": NAN if undefined else 0.2,
                    f"attn/{stage}/mdi_balance": _balance(mdi),
                    f"attn/{stage}/mdi_penalty": 1.0 - _balance(mdi),
                }
            )
        rows.append(row)
    return pl.DataFrame(rows)


def json_blocks(markdown: str) -> list[dict]:
    return [json.loads(m.group(2)) for m in re.finditer(r"(`{3,})json\n(.*?)\n\1(?!`)", markdown, re.DOTALL)]


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of each table line, split at unescaped pipes."""
    return [
        [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]


def rollout_results(**kwargs) -> str:
    kwargs.setdefault("run_name", "demo")
    kwargs.setdefault("checkpoint", "ckpt-0003")
    return render_rollout_results(round_table(), **kwargs)


def diagnostics(table: pl.DataFrame | None = None, **kwargs) -> str:
    return render_attention_diagnostics(
        round_table() if table is None else table,
        run_name="demo",
        checkpoint="ckpt-0003",
        mdi_tolerance=2.0,
        **kwargs,
    )


def all_44() -> dict[str, float]:
    return {name: i / 8 for i, name in enumerate(ROUND_METRIC_NAMES)}


# ------------------------------------------------------------------------------------ rollout results


def test_rollout_results_names_run_and_checkpoint_in_header():
    first_lines = rollout_results().splitlines()[:3]
    assert first_lines[0] == "# Rollout results"
    assert "`demo`" in first_lines[2] and "`ckpt-0003`" in first_lines[2]


def test_rollout_results_overall_table_gives_mean_pm_sample_std_and_success_rate():
    md = rollout_results()
    expected = """| Metric | Value |
|---|---|
| Accuracy Mean | 0.667 ± 0.516 |
| Format Mean | 0.833 ± 0.408 |
| MDI Mean | 3.000 ± 1.581 |
| MDI Reward Mean | -0.500 ± 0.837 |
| Total Reward Mean | 2.333 ± 1.751 |
| Success Rate | 0.500 |"""
    assert expected in md


def test_rollout_results_mdi_table_has_a_row_per_stage_without_the_nan_rollout():
    md = rollout_results()
    expected = """| Stage | MDI Mean | MDI Std | AEI Text | AEI Vision |
|---|---|---|---|---|
| Early | 6.000 | 3.162 | 3.000 | 0.500 |
| Middle | 3.000 | 1.581 | 1.500 | 0.500 |
| Late | 1.500 | 0.791 | 0.750 | 0.500 |
| All | 3.000 | 1.581 | 1.500 | 0.500 |"""
    assert expected in md


def test_rollout_results_mdi_mean_follows_mdi_reward_stage():
    md = rollout_results(mdi_reward_stage="early")
    assert "| MDI Mean | 6.000 ± 3.162 |" in md
    assert json_blocks(md)[0]["rewards"]["mdi"] == 2.0


def test_rollout_results_has_one_parseable_json_block_per_rollout_with_required_keys():
    blocks = json_blocks(rollout_results())
    assert [b["rollout_index"] for b in blocks] == [0, 1, 2, 3, 4, 5]
    for block in blocks:
        assert {
            "rewards",
            "attention_metrics",
            "token_counts",
            "question",
            "choices",
            "answer",
            "completion",
        } <= set(block)
        assert set(block["rewards"]) == {"accuracy", "format", "mdi", "mdi_reward", "total"}
        assert set(block["attention_metrics"]) == set(STAGES)
        for stage in STAGES:
            assert set(block["attention_metrics"][stage]) == set(ATTENTION_NAMES)
        assert set(block["token_counts"]) == {
            "vision_tokens",
            "text_tokens",
            "completion_tokens",
            "total_tokens",
        }


def test_rollout_results_json_shows_values_answer_letter_and_nan_as_null():
    blocks = json_blocks(rollout_results())
    first, last = blocks[0], blocks[5]
    assert first["rewards"] == {"accuracy": 1.0, "format": 1.0, "mdi": 1.0, "mdi_reward": 1.0, "total": 5.0}
    assert first["attention_metrics"]["early"]["mdi"] == 2.0
    assert first["token_counts"] == {
        "vision_tokens": 16,
        "text_tokens": 10,
        "completion_tokens": 8,
        "total_tokens": 34,
    }
    assert first["answer"] == "B. green"
    assert first["choices"] == ["red", "green", "blue", "yellow"]
    assert first["completion"] == "<think>rollout 0</think> Answer: B"
    assert last["answer"] == "C. triangle"
    assert last["rewards"]["mdi"] is None
    assert all(v is None for v in last["attention_metrics"]["all"].values())


def test_rollout_results_max_samples_limits_the_json_blocks():
    md = rollout_results(max_samples=2)
    assert len(json_blocks(md)) == 2
    assert "Showing 2 of 6 rollouts." in md


def test_rollout_results_json_survives_backticks_in_a_completion():
    table = round_table().with_columns(pl.lit("<think>```code```</think> Answer: B").alias("completion"))
    blocks = json_blocks(render_rollout_results(table, run_name="demo", checkpoint="ckpt-0000"))
    assert len(blocks) == 6 and blocks[0]["completion"] == "<think>```code```</think> Answer: B"


def test_rollout_results_names_a_missing_column():
    with pytest.raises(ValueError, match="mdi_reward"):
        render_rollout_results(round_table().drop("mdi_reward"), run_name="demo", checkpoint="ckpt-0000")


def test_reports_render_nan_when_no_rollout_has_image_tokens():
    table = round_table().with_columns(
        pl.lit(NAN).alias(f"attn/{s}/{n}") for s in STAGES for n in ATTENTION_NAMES
    )
    md = render_rollout_results(table, run_name="demo", checkpoint="ckpt-0000")
    assert "| MDI Mean | nan ± nan |" in md
    assert "| All | nan | nan | nan | nan |" in md
    means = json_blocks(diagnostics(table))[0]["attention_metrics"]
    assert all(v is None for stage in means.values() for v in stage.values())


# ------------------------------------------------------------------------------------ rollout sample

PROMPT_MEANS = [1.0, 3.0, 0.0, 2.0]  # mean total reward of prompts 0..3 in `four_prompts`


def four_prompts() -> pl.DataFrame:
    """Two copies of `round_table` as 4 prompts x 3 rollouts; prompt p's totals are PROMPT_MEANS[p] - 0.5,
    + 0, + 0.5."""
    base = round_table()
    copies = [base.with_columns(pl.col("prompt_index") + 2 * k, pl.col("rollout_index") + 6 * k) for k in (0, 1)]
    table = pl.concat(copies)
    totals = [PROMPT_MEANS[p] + 0.5 * (g - 1) for p, g in zip(table["prompt_index"], table["generation_index"],
                                                              strict=True)]
    return table.with_columns(pl.Series("total_reward", totals))


def test_sample_prompts_takes_the_best_then_the_worst_prompts():
    table = four_prompts()
    assert sample_prompts(table, 2) == [1, 2]
    assert sample_prompts(table, 3) == [1, 3, 2]
    assert sample_prompts(table, 1) == [1]


def test_sample_prompts_minus_one_or_more_than_there_are_takes_every_prompt_best_first():
    table = four_prompts()
    assert sample_prompts(table, ALL_ROLLOUTS) == [1, 3, 0, 2]
    assert sample_prompts(table, 10) == [1, 3, 0, 2]
    assert sample_prompts(table, 0) == []


def test_sample_prompts_rejects_report_samples_below_minus_one():
    with pytest.raises(ValueError, match="report_samples=-2"):
        sample_prompts(four_prompts(), -2)


def test_sample_rollouts_keeps_all_completions_of_each_sampled_prompt():
    sample = sample_rollouts(four_prompts(), 2)
    assert sample["prompt_index"].to_list() == [1, 1, 1, 2, 2, 2]
    assert sample["rollout_index"].to_list() == [3, 4, 5, 6, 7, 8]
    assert sample_rollouts(four_prompts(), ALL_ROLLOUTS)["rollout_index"].to_list() == list(range(12))
    assert sample_rollouts(four_prompts(), 0).height == 0


def test_rollout_results_shows_the_sample_and_links_every_rollout():
    md = render_rollout_results(four_prompts(), run_name="demo", checkpoint="ckpt-0000", report_samples=1,
                                all_rollouts_link="all_rollouts.parquet")
    assert [b["rollout_index"] for b in json_blocks(md)] == [3, 4, 5]
    assert "Showing 3 of 12 rollouts." in md
    assert "Every rollout: [all_rollouts.parquet](all_rollouts.parquet)." in md
    # The overall tables still cover every rollout.
    assert "12 rollouts from 4 prompts" in md


def sample_columns(report_samples: int = 2) -> dict[str, list]:
    sample = sample_rollouts(four_prompts(), report_samples)
    return rollout_sample_columns(sample, {p: f"img{p}" for p in range(4)})


def test_rollout_sample_columns_have_image_texts_rewards_advantage_and_mdi_per_stage():
    columns = sample_columns()
    assert list(columns) == ["image", "rollout_index", "prompt_index", "question", "choices", "answer", "completion",
                             "accuracy", "format", "mdi_reward", "total", "advantage", "mdi/early", "mdi/middle",
                             "mdi/late", "mdi/all"]
    assert columns["image"] == ["img1"] * 3 + ["img2"] * 3
    assert columns["choices"][0] == "A. circle  B. square  C. triangle  D. star"
    assert columns["answer"][0] == "C. triangle"
    assert columns["total"][:3] == [2.5, 3.0, 3.5]
    assert columns["mdi/early"][0] == 6.0 and columns["mdi/all"][2] is None  # rollout 5 has no image tokens


def test_mlflow_table_json_is_the_split_format_that_pandas_reads_back():
    import io

    import pandas as pd
    cell = {"type": "image", "filepath": "a.png", "compressed_filepath": "a.webp"}
    text = mlflow_table_json({"image": [cell, cell], "total": [1.0, NAN], "completion": ["x", "y"]})
    payload = json.loads(text)
    assert payload["columns"] == ["image", "total", "completion"]
    assert payload["data"][0] == [cell, 1.0, "x"] and payload["data"][1][1] is None
    frame = pd.read_json(io.StringIO(text), orient="split")
    assert frame["completion"].tolist() == ["x", "y"]


def test_mlflow_table_json_names_columns_of_different_lengths():
    with pytest.raises(ValueError, match="different lengths"):
        mlflow_table_json({"a": [1, 2], "b": [1]})


def test_render_rollout_sample_is_a_table_with_one_image_per_prompt():
    rows = table_rows(render_rollout_sample(sample_columns()))
    assert rows[0][:3] == ["image", "rollout_index", "prompt_index"]
    assert [r[0] for r in rows[2:]] == ["img1", "", "", "img2", "", ""]
    assert rows[4][rows[0].index("mdi/all")] == "nan"
    assert render_rollout_sample(sample_columns(0)) == "(no rollouts in the sample)"


# ------------------------------------------------------------------------------- attention diagnostics


def test_attention_diagnostics_stage_table_rows():
    expected = """| Metric | Early | Middle | Late | All |
|---|---|---|---|---|
| MDI Mean | 6.000 | 3.000 | 1.500 | 3.000 |
| MDI Std | 3.162 | 1.581 | 0.791 | 1.581 |
| AEI Text | 3.000 | 1.500 | 0.750 | 1.500 |
| AEI Vision | 0.500 | 0.500 | 0.500 | 0.500 |"""
    assert expected in diagnostics()


def test_attention_diagnostics_token_table_uses_token_share():
    # Vision ratio = mean of 16/26 (x3), 16/36 (x2) and 0/20 = 0.456.
    expected = """| Metric | Value |
|---|---|
| Vision Tokens | 13.3 ± 6.5 |
| Text Tokens | 15.0 ± 5.5 |
| Vision Ratio | 0.456 |"""
    assert expected in diagnostics()


def test_report_tables_are_not_ragged():
    for md in (diagnostics(), diagnostics(two_image_sizes()), rollout_results()):
        for block in md.split("\n\n"):
            rows = table_rows(block)
            if rows:
                assert {len(r) for r in rows} == {len(rows[0])}


def test_attention_diagnostics_embeds_chart_only_when_given():
    assert "![Attention balance per stage](balance.png)" in diagnostics(chart_file="balance.png")
    assert "![" not in diagnostics()


def test_attention_diagnostics_json_holds_batch_means_per_stage():
    (block,) = json_blocks(diagnostics())
    metrics = block["attention_metrics"]
    assert list(metrics) == list(STAGES)
    assert set(metrics["late"]) == set(ATTENTION_NAMES)
    assert metrics["early"]["mdi"] == 6.0
    assert metrics["all"]["text_ratio"] == 0.8
    assert metrics["all"]["mdi_balance"] == 0.2  # balances 1, 0, 0, 0, 0


def test_vision_token_bins_are_powers_of_two():
    assert [vision_token_bin(n) for n in (1, 4, 7, 16, 31, 64)] == [(1, 1), (4, 7), (4, 7), (16, 31), (16, 31),
                                                                    (64, 127)]
    with pytest.raises(ValueError, match="no bin"):
        vision_token_bin(0)


def two_image_sizes() -> pl.DataFrame:
    """The round table with prompt 0 at 4 image tokens (MDI all 1, 2, 4) and prompt 1 at 16 (3, 5; rollout 5
    has no image)."""
    return round_table().with_columns(vision_tokens=pl.Series([4, 4, 4, 16, 16, 0]))


def test_attention_diagnostics_shows_mdi_per_vision_token_bin_beside_the_pooled_value():
    # Stage factors: early 2x, middle 1x, late 0.5x. Bin 4-7: MDI 1, 2, 4 (mean 2.333, std 1.528);
    # bin 16-31: 3, 5 (mean 4, std 1.414); pooled over the 5 rollouts with image tokens: mean 3, std 1.581.
    expected = """| Vision Tokens | Rollouts | Mean Vision Tokens | MDI Early | MDI Middle | MDI Late | MDI All | MDI Std All | AEI Vision All |
|---|---|---|---|---|---|---|---|---|
| pooled | 5 | 8.8 | 6.000 | 3.000 | 1.500 | 3.000 | 1.581 | 0.500 |
| 4–7 | 3 | 4.0 | 4.667 | 2.333 | 1.167 | 2.333 | 1.528 | 0.500 |
| 16–31 | 2 | 16.0 | 8.000 | 4.000 | 2.000 | 4.000 | 1.414 | 0.500 |"""
    md = diagnostics(two_image_sizes())
    assert "## MDI by vision-token count" in md
    assert expected in md


def test_attention_diagnostics_has_no_bin_table_when_all_images_give_one_bin():
    assert "## MDI by vision-token count" not in diagnostics()  # every rollout with an image has 16 tokens
    one_bin = round_table().with_columns(vision_tokens=pl.Series([16, 17, 20, 31, 16, 0]))
    assert "## MDI by vision-token count" not in diagnostics(one_bin)


# ------------------------------------------------------------------------------------ metrics block


def test_round_metric_names_are_44_unique_names_each_in_a_named_section():
    assert len(ROUND_METRIC_NAMES) == 44
    assert len(set(ROUND_METRIC_NAMES)) == 44
    assert all(metric_group(name) in METRIC_GROUPS for name in ROUND_METRIC_NAMES)


def test_metrics_block_header_counts_the_44_and_sections_come_in_order():
    lines = format_metrics_block({**all_44(), "loss": 0.5, "perf/rollout_seconds": 2.0}).splitlines()
    assert lines[0] == "📊 Logging 44 metrics for train mode"
    headings = [line for line in lines if not line.startswith("   ")]
    assert headings[1:] == [
        "🎯 Reward Metrics:",
        "🧠 Attention Metrics:",
        "📏 Completion Metrics:",
        "⚙️ Optimization Metrics:",
    ]
    assert len([line for line in lines if line.startswith("   ")]) == 46


def test_metrics_block_prints_each_metric_with_four_decimals_under_its_section():
    block = format_metrics_block(
        {"rewards/mc_idx_reward/mean": 0.75, "attention/early/mdi": 8.234, "loss": NAN}
    )
    assert block.splitlines() == [
        "📊 Logging 2 metrics for train mode",
        "🎯 Reward Metrics:",
        "   rewards/mc_idx_reward/mean: 0.7500",
        "🧠 Attention Metrics:",
        "   attention/early/mdi: 8.2340",
        "⚙️ Optimization Metrics:",
        "   loss: nan",
    ]


def test_metrics_block_groups_eval_with_rewards_and_keeps_unknown_names():
    block = format_metrics_block({"eval/accuracy": 0.5, "custom/thing": 1.0}, mode="eval")
    assert block.splitlines() == [
        "📊 Logging 0 metrics for eval mode",
        "🎯 Reward Metrics:",
        "   eval/accuracy: 0.5000",
        OTHER_METRICS_HEADING,
        "   custom/thing: 1.0000",
    ]


# ------------------------------------------------------------------------------------- run terminal


def test_run_terminal_holds_log_health_and_metrics_block():
    health = [
        {
            "name": "entropy_collapse",
            "passed": True,
            "severity": "WARN",
            "message": "entropy 1.2",
            "remedy": "",
        },
        {
            "name": "zero_std_groups",
            "passed": False,
            "severity": "WARN",
            "message": "75% of groups | zero std",
            "remedy": "raise temperature",
        },
    ]
    md = render_run_terminal(
        ["Loading model from embedded", "step 1/4 MDI(all)=3.21", "WARNING: 1 rollout without image tokens"],
        all_44(),
        run_name="demo",
        checkpoint="ckpt-0001",
        health=health,
    )
    assert md.startswith("# Run terminal")
    assert (
        "```text\nLoading model from embedded\nstep 1/4 MDI(all)=3.21\nWARNING: 1 rollout without image tokens\n```"
        in md
    )
    assert "## Health checks" in md and "1 of 2 checks passed." in md
    assert "| zero_std_groups | ❌ failed | WARN | 75% of groups \\| zero std | raise temperature |" in md
    assert "```text\n📊 Logging 44 metrics for train mode\n🎯 Reward Metrics:\n" in md


def test_run_terminal_without_health_has_no_health_section():
    md = render_run_terminal(["hello"], {}, run_name="demo", checkpoint="ckpt-0000")
    assert "## Health checks" not in md
    assert "📊 Logging 0 metrics for train mode" in md


# --------------------------------------------------------------------------------------------- charts


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_learning_curves_png_skips_missing_columns(tmp_path):
    history = pl.DataFrame(
        {
            "round": [0, 1, 2],
            "step": [0, 8, 16],
            "rewards/mc_idx_reward/mean": [0.2, 0.4, 0.6],
            "eval/accuracy": [0.25, None, 0.5],
            "attention/early/mdi": [6.0, 4.0, NAN],
            "attention/all/mdi": [3.0, 2.5, 2.0],
            "reward": [1.0, 2.0, 3.0],
        }
    )
    path = learning_curves_png(history, tmp_path / "charts" / "learning_curves.png")
    assert path == tmp_path / "charts" / "learning_curves.png"
    assert_png(path)


def test_attention_balance_png_draws_stages_including_an_undefined_one(tmp_path):
    means = {
        "early": {"text_ratio": 0.9, "vision_ratio": 0.1, "mdi": 8.0, "mdi_balance": 0.0},
        "middle": {"text_ratio": 0.6, "vision_ratio": 0.4, "mdi": 1.5},
        "late": {"text_ratio": NAN, "vision_ratio": NAN, "mdi": NAN, "mdi_balance": NAN},
        "all": {"text_ratio": 0.7, "vision_ratio": 0.3, "mdi": 3.0, "mdi_balance": 0.0},
    }
    assert_png(attention_balance_png(means, tmp_path / "balance.png", tolerance=2.0))


def test_attention_balance_png_replaces_an_existing_file(tmp_path):
    path = tmp_path / "balance.png"
    path.write_bytes(b"old")
    means = {s: {"text_ratio": 0.5, "vision_ratio": 0.5, "mdi": 1.0} for s in STAGES}
    assert_png(attention_balance_png(means, path, tolerance=2.0))


def test_the_round_summary_line_names_the_six_figures_of_a_round():
    from dapo_ops.reporting.reports import round_summary

    metrics = {"reward": 0.9751, "rewards/mc_idx_reward/mean": 0.5, "eval/accuracy": 0.25,
               "rewards/think_format_reward/mean": 1.0, "attention/all/mdi": 1.004, "entropy": 5.99412}
    assert round_summary(metrics) == "reward 0.975  accuracy 0.500  eval 0.250  format 1.000  MDI 1.00  entropy 5.994"


# ---------------------------------------------------------------------------------------- visual dependency


def with_visual(table: pl.DataFrame, kl: list[float]) -> pl.DataFrame:
    return table.with_columns(pl.Series("visual/kl_mean", kl), pl.Series("visual/kl_answer", [2 * v for v in kl]),
                              pl.Series("visual/dependent_token_ratio", [0.5] * len(kl)))


def test_the_visual_dependency_section_gives_kl_pivotal_share_blind_accuracy_gain_and_the_correlation():
    from dapo_ops.reporting.reports import abs_log_mdi, pearson

    table = round_table()
    kl = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    text = diagnostics(with_visual(table, kl), evaluation={"eval/accuracy": 0.75, "eval/blind_accuracy": 0.25,
                                                           "eval/visual_gain": 0.5},
                       visual_chart_file="visual_dependency.png")
    section = text.split("## Visual dependency", 1)[1].split("##", 1)[0]
    rows = {r[0]: r[1] for r in table_rows(section)}
    assert rows["KL completion (mean per token, nats)"] == "0.3500"
    assert rows["KL answer (tokens after `</think>`)"] == "0.7000"
    assert rows["Pivotal-token share (KL > threshold)"] == "0.500"
    assert rows["Blind accuracy (eval, blank images)"] == "0.250"
    assert rows["Visual gain (eval accuracy − blind)"] == "0.500"
    expected = pearson(abs_log_mdi(table["attn/all/mdi"].to_list()), kl)  # rollouts with an undefined MDI left out
    assert rows["corr(\\|ln MDI\\|, KL) over rollouts"] == f"{expected:.3f}"
    assert "![Attention balance and visual dependency per round](visual_dependency.png)" in section
    assert "## Visual dependency" not in diagnostics(table)  # neither masked pass nor blind eval: no section


def test_without_the_masked_pass_the_visual_section_gives_the_blind_eval_only():
    table = round_table()
    text = diagnostics(table, evaluation={"eval/accuracy": 0.75, "eval/blind_accuracy": 0.5,
                                          "eval/visual_gain": 0.25})
    section = text.split("## Visual dependency", 1)[1].split("##", 1)[0]
    rows = {r[0]: r[1] for r in table_rows(section)[2:]}  # below the header and its rule
    assert rows == {"Blind accuracy (eval, blank images)": "0.500", "Visual gain (eval accuracy − blind)": "0.250"}
    assert "visual_dependency: false" in section


def test_pearson_is_the_correlation_of_the_finite_pairs():
    from dapo_ops.reporting.reports import pearson

    assert pearson([1.0, 2.0, 3.0, math.nan], [2.0, 4.0, 6.0, 1.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])) and math.isnan(pearson([1.0, 2.0], [1.0, 2.0]))


def test_the_visual_chart_draws_both_curves_per_round(tmp_path: Path):
    from dapo_ops.reporting.charts import visual_dependency_png

    path = visual_dependency_png([{"round": 0, "abs_log_mdi": 1.2, "kl_mean": 0.01, "kl_answer": 0.02},
                                  {"round": 1, "abs_log_mdi": 0.1, "kl_mean": 0.2, "kl_answer": 0.4}],
                                 tmp_path / "visual_dependency.png")
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 100
