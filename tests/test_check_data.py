"""`make check-data`: the data check names the layout, counts rows per split, groups quarantine reasons, and
fails when nothing is usable."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from dapo_ops.data import synthetic
from dapo_ops.data.rl_loading import check_dataset
from dapo_ops.models.tiny_families import save_tiny_family
from pipelines.cli import main
from tests import layout_datasets as L


def test_the_report_names_layout_splits_kinds_images_and_answer_kinds(tmp_path: Path) -> None:
    report = check_dataset(L.write("easyr1", tmp_path / "easy.parquet", n=12))
    assert report.layout == "easyr1"
    assert report.splits == {"all": (10, 2)}
    assert report.quarantine_kinds == {"no text": 1, "image count mismatch": 1}
    assert report.images_per_prompt == {1: 6, 2: 4}
    assert report.answer_kinds == {"number": 6, "word": 4}
    text = report.render()
    assert "layout: easyr1" in text and "image count mismatch: 1  (e.g. row 2 " in text


def test_splits_of_a_multiple_choice_source_are_counted_apart(tmp_path: Path) -> None:
    synthetic.write_dataset(tmp_path, num_train=6, num_eval=3, seed=0)
    report = check_dataset(tmp_path)
    assert report.layout == "aokvqa" and report.splits == {"train": (6, 0), "eval": (3, 0)}
    assert report.answer_kinds == {"choice letter": 9}


def test_prompt_lengths_in_a_models_tokens_and_exit_codes(tmp_path: Path, capsys) -> None:
    model = save_tiny_family("qwen2_5_vl", tmp_path / "model", ["How many shapes are in the picture?"])
    source = L.write("verl", tmp_path / "verl.parquet", n=6)
    assert main(["check-data", "--dataset", str(source), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "layout: verl" in out and "prompt tokens (model): min " in out
    bad = tmp_path / "bad.parquet"
    pl.read_parquet(source).with_columns(pl.lit(None, dtype=pl.Struct({"style": pl.String, "ground_truth": pl.String}))
                                         .alias("reward_model")).write_parquet(bad)
    assert main(["check-data", "--dataset", str(bad)]) == 1
    assert "usable rows: 0" in capsys.readouterr().out
    pl.DataFrame({"text": ["a"]}).write_parquet(tmp_path / "odd.parquet")
    assert main(["check-data", "--dataset", str(tmp_path / "odd.parquet")]) == 2
    assert "cannot tell the dataset layout" in capsys.readouterr().err


def test_make_plan_counts_the_images_per_prompt_of_the_dataset(tmp_path: Path, capsys) -> None:
    source = L.write("easyr1", tmp_path / "easy.parquet", n=6)
    assert main(["plan", "--set", f"dataset={source}"]) == 0
    out = capsys.readouterr().out
    assert f"images per prompt: 2 (from {source})" in out and "(8 image tokens a prompt)" in out
    assert main(["plan", "--set", "images_per_prompt=3"]) == 0
    assert "(12 image tokens a prompt)" in capsys.readouterr().out
