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

from benchmarks import attention, launch_overhead, roofline, round_vs_trl, run_all, shared_prefix  # noqa: E402


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


def test_roofline_benchmark_compares_the_caches_on_identical_tokens_and_puts_each_phase_under_its_peak():
    result = roofline.run(quick=True, log=lambda _: None)
    assert result["generation"]["realistic"]["token_identical"] and result["generation"]["embedded"]["token_identical"]
    phases = result["phases"]
    for name in ("update", "teacher_forced", "prefill"):
        assert phases[name]["flops"] > 0 and phases[name]["fraction_of_peak"]["cpu"] > 0
    # The update runs forward + backward over the teacher-forced pass's tokens: about 3x its matmul FLOPs.
    assert 2.0 < phases["update"]["flops"] / phases["teacher_forced"]["flops"] < 4.0
    assert phases["decode"]["roofline_seconds"]["cpu"] <= phases["decode"]["seconds"]["cpu"]
    assert set(run_all.GOALS) >= {"static_cache_generation_speedup", "update_fraction_of_peak",
                                  "teacher_forced_fraction_of_peak", "decode_fraction_of_bandwidth"}
    assert "| static |" in roofline.markdown(result)


def test_the_work_counter_adds_the_sdpa_kernels_flop_counter_mode_misses_on_the_cpu():
    import torch

    q = torch.randn(2, 4, 8, 16)
    with roofline.WorkCounter().count() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.mm(torch.ones(3, 5), torch.ones(5, 7))
    assert counter.sdpa_flops == 4 * 2 * 4 * 8 * 8 * 16 and counter.flops == counter.sdpa_flops + 2 * 3 * 5 * 7


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


# ------------------------------------------------------------------------ the ablation's rows, cache, tables


def _ablation_run(seed: int, eval_accuracy: list[float], all_mdi: list[float], status: str = "ok", **extra) -> dict:
    stages = [{"early": 0.1, "middle": 0.2, "late": 0.3, "all": m} for m in all_mdi]
    return {"seed": seed, "status": status, "eval_accuracy": eval_accuracy, "train_accuracy": eval_accuracy[:-1],
            "abs_log_mdi": stages, "chance": 0.25, **extra}


def test_every_objective_row_is_a_valid_config_and_dapo_is_the_shaping_default():
    from benchmarks import ablation
    from dapo_ops.config.dapo import DapoConfig

    rows = {r.name: r for r in ablation.objective_rows()}
    assert {"dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "gspo", "delta_4", "top_entropy_0.2",
            "normalize_then_sum", "mask_truncated", "entropy_coef_0.01"} <= set(rows)
    configs = {name: DapoConfig(**row.overrides) for name, row in rows.items()}
    assert configs["gspo"].importance_sampling_level == "sequence" and configs["sapo"].loss_type == "sapo"
    assert len({json.dumps(c.to_dict(), sort_keys=True, default=str) for c in configs.values()}) == len(rows)
    default = next(r for r in ablation.default_rows() if r.name == ablation.shaping_row_name(DapoConfig()))
    key = ablation.job_key(rows["dapo"].overrides, 0, "embedded", "src")
    assert key == ablation.job_key(default.overrides, 0, "embedded", "src")  # trained once, read by both rows
    assert len({key, ablation.job_key({}, 1, "embedded", "src"), ablation.job_key({}, 0, "unseen", "src"),
                ablation.job_key({}, 0, "embedded", "changed")}) == 4


def test_an_unknown_ablation_row_is_an_error_naming_it():
    from benchmarks import ablation

    with pytest.raises(ValueError, match="unknown ablation row.*lion.*known rows: dapo"):
        ablation.select_rows(ablation.objective_rows(), ["sapo", "lion"], ["dapo", "sapo"])
    assert [r.name for r in ablation.select_rows(ablation.objective_rows(), ["sapo"], ["sapo"])] == ["sapo"]


def test_the_longest_of_two_jobs_with_one_config_is_trained_and_the_shorter_reads_its_prefix():
    from benchmarks import ablation

    short = ablation.Job("embedded", "dapo", 0, 2, {}, "k")
    long = ablation.Job("embedded", "clip", 0, 3, {"mdi_shaping": "clip"}, "k")
    assert ablation.unique_jobs([short, long]) == [long]
    runs = ablation.collect([short, long], {"k": _ablation_run(0, [0.2, 0.4, 0.6, 0.8], [1.0, 0.9, 0.8, 0.7])})
    assert runs["embedded"]["dapo"][0]["eval_accuracy"] == [0.2, 0.4, 0.6]
    assert runs["embedded"]["dapo"][0]["train_accuracy"] == [0.2, 0.4]
    assert len(runs["embedded"]["clip"][0]["abs_log_mdi"]) == 4


def test_a_run_that_went_nan_after_the_asked_rounds_is_a_finished_run_of_those_rounds():
    from benchmarks import ablation

    nan_in_round_2 = _ablation_run(0, [0.2, 0.4, 0.5], [1.0, 0.9, 0.8], status="nan", error="round 2: loss nan")
    assert ablation.truncate(nan_in_round_2, 2)["status"] == "ok"
    assert ablation.truncate(nan_in_round_2, 3)["status"] == "nan"


def test_cached_results_are_reused_unless_they_are_shorter_or_crashed(tmp_path):
    from benchmarks import ablation

    def cache(key: str, status: str, rounds: int) -> ablation.Job:
        (tmp_path / f"{key}.json").write_text(json.dumps({**_ablation_run(0, [0.5] * (rounds + 1), [1.0] * (rounds + 1),
                                                                          status=status), "rounds": rounds}))
        return ablation.Job("embedded", key, 0, 4, {}, key)

    assert ablation.cached_result(tmp_path, cache("long", "ok", 4))["rounds"] == 4
    assert ablation.cached_result(tmp_path, cache("nan", "nan", 2))["status"] == "nan"  # NaN is NaN on a re-run
    assert ablation.cached_result(tmp_path, cache("short", "ok", 2)) is None
    assert ablation.cached_result(tmp_path, cache("crash", "crash", 4)) is None
    assert ablation.cached_result(tmp_path, ablation.Job("embedded", "new", 0, 4, {}, "missing")) is None
    lines: list[str] = []
    jobs = [ablation.Job("embedded", "dapo", 0, 4, {}, "long"), ablation.Job("embedded", "sapo", 0, 2, {}, "nan")]
    results = ablation.run_jobs(jobs, tmp_path, {"embedded": "embedded"}, parallel=2, echo=lines.append)
    assert set(results) == {"long", "nan"} and lines == [f"2 run(s) cached in {tmp_path}, 0 to train, 2 at a time"]


def test_objective_rows_report_nan_runs_beside_the_means_of_the_finished_seeds(tmp_path):
    from benchmarks import ablation

    objectives = {"embedded": {
        "dapo": [_ablation_run(0, [0.2, 0.6], [1.0, 0.8]), _ablation_run(1, [0.4, 0.8], [0.6, 0.4])],
        "sapo": [_ablation_run(0, [0.2, 0.7], [1.0, 0.5]),
                 _ablation_run(1, [0.4], [0.6], status="nan", error="round 0: non-finite loss")],
    }}
    result = ablation.assemble({}, 0, "clip", 1.0, objectives, objective_rounds=1)
    section = result["objectives"]["datasets"]["embedded"]
    assert section["summary"]["dapo"]["eval_accuracy_last"] == pytest.approx((0.7, math.sqrt(0.02)))
    assert section["summary"]["sapo"]["seeds_ok"] == 1 and section["summary"]["sapo"]["seeds_failed"] == 1
    assert section["summary"]["sapo"]["abs_log_mdi_all_last"] == pytest.approx((0.5, 0.0))
    assert section["failures"] == {"sapo": ["seed 1: nan (round 0: non-finite loss)"]}
    table = ablation.markdown(result)
    assert "| sapo | `loss_type=sapo` | 1 | seed 1: nan (round 0: non-finite loss) | 0.200 ± 0.000 | 0.700 ± 0.000 |" \
        in table
    path = tmp_path / "part.json"
    path.write_text(json.dumps(result))
    merged = ablation.merge([path], "clip")
    assert json.loads(json.dumps(merged["objectives"])) == json.loads(json.dumps(result["objectives"]))


def test_objective_rows_of_one_dataset_and_seed_share_ckpt_0000_and_a_row_changing_the_warm_start_does_not():
    from benchmarks import ablation

    def job(row: ablation.Row, seed: int = 0, dataset: str = "embedded") -> ablation.Job:
        return ablation.make_job(dataset, row, seed, 3, "src")

    rows = ablation.objective_rows()
    assert len({ablation.setup_key(job(r), "src") for r in [*rows, *ablation.default_rows()]}) == 1
    assert ablation.setup_key(job(rows[0], seed=1), "src") != ablation.setup_key(job(rows[0]), "src")
    assert ablation.setup_key(job(rows[0], dataset="unseen"), "src") != ablation.setup_key(job(rows[0]), "src")
    own = job(ablation.Row("short_warmup", {"warmup_steps": 5}))
    assert ablation.setup_key(own, "src") == own.key
    planned = ablation.plan_jobs([], rows[:2], ["embedded", "unseen"], [0, 1], 8, 3, "src")
    assert [(j.seed, j.row, j.dataset) for j in planned[:3]] == [(0, "dapo", "embedded"), (0, "dapo", "unseen"),
                                                                (0, "grpo", "embedded")]


def test_the_visual_rows_are_valid_configs_that_share_one_ckpt_0000():
    from benchmarks import ablation
    from dapo_ops.config.dapo import DapoConfig

    rows = {r.name: r for r in ablation.visual_rows()}
    assert list(rows) == ["default", "vppo", "papo"]
    configs = {name: DapoConfig(**row.overrides) for name, row in rows.items()}
    assert configs["vppo"].vppo_token_ratio < 1 and configs["vppo"].vppo_advantage_weighting
    assert configs["papo"].papo_coef > 0 and configs["papo"].papo_entropy_coef > 0
    assert rows["default"].overrides == {"visual_dependency": True}  # the default config, measured
    keys = {ablation.setup_key(ablation.make_job("embedded", r, 0, 8, "src"), "src") for r in rows.values()}
    assert len(keys) == 1  # the terms act after ckpt-0000
    # The masked pass changes no ckpt-0000 (its eval always has the blind accuracy): the objective rows share it.
    dapo = next(r for r in ablation.objective_rows() if r.name == "dapo")
    assert keys == {ablation.setup_key(ablation.make_job("embedded", dapo, 0, 8, "src"), "src")}


def test_the_visual_section_puts_eval_accuracy_visual_gain_and_mdi_side_by_side(tmp_path):
    from benchmarks import ablation

    def run(seed: int, gain: list[float]) -> dict:
        return _ablation_run(seed, [0.3, 0.5], [0.6, 0.1], visual_gain=gain,
                             visual_kl=[{"kl_mean": 0.01, "kl_answer": 0.02}, {"kl_mean": 0.1, "kl_answer": 0.3}])

    section = ablation.assemble_visual({"default": [run(0, [0.0, 0.2]), run(1, [0.0, 0.4])],
                                        "papo": [run(0, [0.0, 0.1])]}, 1)
    assert section["summary"]["default"]["visual_gain_last"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert section["summary"]["papo"]["visual_kl_last"] == pytest.approx((0.1, 0.0))
    text = "\n".join(ablation.visual_markdown(section))
    assert "| default | `visual_dependency=True` | 2 | 0.500 ± 0.000 | 0.300 ± 0.141 | 0.100 ± 0.000 | 0.100 ± 0.000 |" \
        in text
    path = tmp_path / "part.json"
    path.write_text(json.dumps({"runs": {}, "rounds": 0, "seconds": 1.0, "visual": section}))
    merged = ablation.merge([path], "clip")["visual"]["summary"]
    assert json.loads(json.dumps(merged)) == json.loads(json.dumps(section["summary"]))


def test_visual_dependency_benchmark_times_both_sides_and_reports_the_overhead():
    from benchmarks import visual_dependency

    result = visual_dependency.run(quick=True, log=lambda _: None)
    assert len(result["rounds"]["with"]) == len(result["rounds"]["without"]) == 1
    assert math.isfinite(result["summary"]["visual_dependency_round_overhead"])
    assert result["medians"]["with"]["eval"] > 0 and result["medians"]["without"]["teacher-forced pass"] > 0
    assert "visual_dependency_round_overhead" in visual_dependency.markdown(result)
    assert "visual_dependency" in run_all.BENCHMARKS and "visual_dependency_round_overhead" in run_all.GOALS


def test_a_partial_run_says_which_sections_it_re_measured():
    machine = {"cpu_count": 2, "cpu": "x", "device": "cpu", "torch": "t", "transformers": "tf", "trl": None,
               "dagster": None, "torch_threads": 1}
    summary = run_all.summarize({})
    partial = run_all.render({}, summary, machine, 60.0, only=["roofline"])
    assert "Sections roofline re-measured by `python -m benchmarks.run_all --only roofline`" in partial
    assert "Generated by `make bench`" in run_all.render({}, summary, machine, 60.0)
