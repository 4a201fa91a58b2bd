"""Smoke test: every benchmark of `make bench` runs in a tiny configuration and reports what it promises.

Never timed assertions: the numbers themselves are what `make bench` is for.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

# `benchmarks/` sits beside the installed packages, not inside them: make it importable under plain `pytest` too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import attention, launch_overhead, round_vs_trl, run_all, shared_prefix  # noqa: E402


@pytest.fixture(scope="module")
def attention_result() -> dict:
    return attention.run(quick=True, lengths=[64], repeats=1, memory=False, log=lambda _: None)


@pytest.fixture(scope="module")
def round_result() -> dict:
    return round_vs_trl.run(quick=True, log=lambda _: None)


def test_attention_benchmark_times_the_three_cases_and_its_lean_path_matches_the_oracle(attention_result):
    row = attention_result["rows"][0]
    assert set(row["median_seconds"]) == {"plain", "lean", "eager"}
    assert all(s > 0 for s in row["median_seconds"].values())
    assert row["image_tokens"] > 0 and row["text_tokens"] > 0
    assert attention_result["lean_vs_oracle_max_abs_diff"] < 1e-4
    assert "attention_time_overhead" in attention_result["summary"]


def test_attention_memory_case_reports_extra_peak_bytes():
    result = attention.memory_case("lean", 64, attention.TINY, "cpu", 1, 0.75, quick=True)
    assert result["case"] == "lean" and result["extra_bytes"] >= 0


def test_round_benchmark_runs_trl_the_library_and_the_pipeline_on_the_same_prompts(round_result):
    assert round_result["prompt_tokens_identical"]
    for side in ("trl", "library", "pipeline"):
        assert len(round_result["rounds"][side]) == round_result["shape"]["measured_rounds"]
        assert round_result["medians"][side]["total"] > 0
    summary = round_result["summary"]
    assert summary["round_time_ratio_vs_trl"] > 0 and summary["pipeline_round_time_ratio_vs_trl"] > 0


def test_run_all_writes_markdown_and_json_with_the_headline_summary(attention_result, round_result, tmp_path):
    machine = {"cpu_count": 2, "cpu": "test", "device": "cpu", "torch": "x", "transformers": "x", "trl": "x",
               "dagster": "x", "torch_threads": 2, "load_average": [1.0, 1.0, 1.0]}
    text = run_all.write_results({"attention": attention_result, "round_vs_trl": round_result}, machine, tmp_path,
                                 wall=1.0, quick=True)
    document = json.loads((tmp_path / "results.json").read_text())
    for key in run_all.GOALS:
        assert key in document["summary"]
        assert document["summary"]["goals"][key]["goal"] == run_all.GOALS[key][0]
    assert not math.isnan(document["summary"]["round_time_ratio_vs_trl"])
    assert (tmp_path / "results.md").read_text() == text
    assert "| `attention_time_overhead` |" in text


def test_shared_prefix_benchmark_batch_has_groups_and_its_forwards_agree():
    policy = shared_prefix.build_policy(shared_prefix.QUICK, "cpu")
    batch = shared_prefix.fixed_rollouts(policy, shared_prefix.QUICK)
    assert batch.prompt_index.tolist() == [0, 0, 1, 1] and bool(batch.prompt_vision_mask.any())
    assert shared_prefix.max_logp_diff(policy, batch)["logp"] < 1e-5


def test_a_speedup_goal_is_met_from_above_and_a_ratio_goal_from_below():
    summary = run_all.summarize({"x": {"summary": {"shared_prefix_update_speedup": 3.5,
                                                   "shared_prefix_update_memory_ratio": 0.6}}})
    assert summary["goals"]["shared_prefix_update_speedup"]["met"]
    assert not summary["goals"]["shared_prefix_update_memory_ratio"]["met"]
    assert "| `shared_prefix_update_speedup` |" in run_all.summary_markdown(summary)


def test_two_processes_pay_off_once_the_work_they_save_exceeds_the_launch_overhead():
    # 10 s of work takes 6 s on 2 processes (ratio 0.6) after 8 s of launch: even at 20 s of work (2x the model).
    point = launch_overhead.crossover(10.0, 6.0, 8.0)
    assert point["work_ratio"] == 0.6
    assert point["crossover_work_s"] == pytest.approx(20.0) and point["crossover_model_scale"] == pytest.approx(2.0)
    work = point["crossover_work_s"]
    assert 0.6 * work + 8.0 == pytest.approx(work)  # the break-even point itself
    assert math.isinf(launch_overhead.crossover(1.0, 1.2, 8.0)["crossover_work_s"])  # 2 processes never win
    assert "launch_overhead" in run_all.BENCHMARKS
