"""load_rl_dataset: the TRL, verl and EasyR1 layouts (and A-OKVQA) from every kind of source, with bad rows
quarantined by reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest

from dapo_ops.data import synthetic
from dapo_ops.data.loading import load_mc_dataset
from dapo_ops.data.rl_loading import RL_SCHEMA, load_rl_dataset, load_rl_splits, source_layout
from tests import layout_datasets as L


def _png(count: int = 1, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    L.shapes_image(count, seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["trl", "verl", "easyr1"])
@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_each_trainer_layout_is_detected_from_its_columns_in_each_source_form(tmp_path: Path, layout: str,
                                                                               form: str) -> None:
    source = L.write(layout, tmp_path / (f"{layout}.parquet" if form == "parquet" else layout), n=8)
    assert source_layout(source) == layout
    kept, quarantined = load_rl_dataset(source)
    assert kept.schema == pl.Schema(RL_SCHEMA)
    assert kept.height + quarantined.height == 8
    assert kept["choices"].null_count() == kept.height  # free form
    assert all(s.strip() for s in kept["solution"].to_list())


def test_verl_rows_read_the_ground_truth_and_keep_the_prompts_own_instruction(tmp_path: Path) -> None:
    kept, _ = load_rl_dataset(L.write("verl", tmp_path / "geo.parquet", n=8))
    row = kept.row(0, named=True)
    assert row["solution"] == "1"
    assert row["question"].startswith("<image>How many shapes") and "\\boxed{}" in row["question"]
    assert row["question_id"] == "local/shapes-train-0"
    assert row["num_images"] == 1 and row["answer_kind"] == "number"


def test_bad_rows_are_quarantined_naming_the_row_and_the_problem(tmp_path: Path) -> None:
    _, verl = load_rl_dataset(L.write("verl", tmp_path / "verl.parquet", n=8))
    reasons = dict(zip(verl["source_row"].to_list(), verl["reason"].to_list(), strict=True))
    assert reasons[1].startswith("row 1 ") and "answer is empty" in reasons[1]
    assert "2 image placeholder(s) in the prompt for 1 image(s)" in reasons[2]
    assert "image does not decode" in reasons[3]
    assert set(verl["kind"].to_list()) == {"empty answer", "image count mismatch", "image does not decode"}
    _, easy = load_rl_dataset(L.write("easyr1", tmp_path / "easy.parquet", n=8))
    assert dict(zip(easy["source_row"].to_list(), easy["kind"].to_list(), strict=True)) == {
        1: "no text", 2: "image count mismatch"}


def test_several_images_per_prompt_are_kept_in_prompt_order(tmp_path: Path) -> None:
    kept, _ = load_rl_dataset(L.write("easyr1", tmp_path / "easy.parquet", n=8))
    two = kept.filter(pl.col("num_images") == 2)
    assert two.height == 3
    row = two.row(0, named=True)
    assert row["question"].count("<image>") == 2 and row["image"] == row["images"][0]
    assert row["answer_kind"] == "word"


def test_trl_images_column_and_image_parts_count_alike(tmp_path: Path) -> None:
    L.trl_dataset(6, images_column=True).to_parquet(str(tmp_path / "trl.parquet"))
    kept, quarantined = load_rl_dataset(tmp_path / "trl.parquet")
    assert source_layout(tmp_path / "trl.parquet") == "trl"
    assert kept.height == 5 and quarantined["kind"].to_list() == ["image count mismatch"]


def test_trl_system_message_is_kept_and_a_prompt_without_image_part_gets_its_images_first(tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "Reply with one word."}, {"role": "user", "content": "What is shown?"}]
    rows = [{"prompt": prompt, "image": {"bytes": _png(), "path": None}, "solution": "circle"}] * 2
    pl.DataFrame(rows).write_parquet(tmp_path / "trl.parquet")
    kept, quarantined = load_rl_dataset(tmp_path / "trl.parquet")
    assert quarantined.height == 0
    assert kept["system_prompt"].to_list() == ["Reply with one word."] * 2
    assert kept["question"].to_list() == ["What is shown?"] * 2


def test_jsonl_reads_image_paths_relative_to_the_file_and_quarantines_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(2))
    lines = [json.dumps({"problem": "<image>How many shapes?", "answer": 2, "images": ["img/a.png"]}),
             "{not json",
             json.dumps({"problem": "<image>How many?", "answer": "3", "images": ["img/missing.png"]})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    kept, quarantined = load_rl_dataset(tmp_path / "data.jsonl")
    assert source_layout(tmp_path / "data.jsonl") == "easyr1"
    assert kept["solution"].to_list() == ["2"] and kept["num_images"].to_list() == [2 - 1]
    assert quarantined["kind"].to_list() == ["unreadable row", "image not found"]
    assert "line 2 is not valid JSON" in quarantined["reason"][0]


def test_easyr1_keys_rename_the_columns_read(tmp_path: Path) -> None:
    rows = [{"query": "<image>Which color?", "gt": "red", "pics": [{"bytes": _png(), "path": None}]}] * 3
    pl.DataFrame(rows).write_parquet(tmp_path / "custom.parquet")
    with pytest.raises(ValueError, match="query, gt, pics"):
        load_rl_dataset(tmp_path / "custom.parquet")
    kept, _ = load_rl_dataset(tmp_path / "custom.parquet", prompt_key="query", answer_key="gt", image_key="pics")
    assert kept["solution"].to_list() == ["red"] * 3
    assert source_layout(tmp_path / "custom.parquet", prompt_key="query", answer_key="gt", image_key="pics") == "easyr1"


def test_an_undetectable_layout_names_the_columns_found_and_the_keys_to_set(tmp_path: Path) -> None:
    pl.DataFrame({"text": ["a"], "label": ["b"]}).write_parquet(tmp_path / "odd.parquet")
    with pytest.raises(ValueError) as error:
        load_rl_dataset(tmp_path / "odd.parquet")
    message = str(error.value)
    assert "odd.parquet" in message and "(text, label)" in message
    assert all(key in message for key in ("dataset_layout", "prompt_key", "answer_key", "image_key"))


def test_a_forced_layout_missing_its_columns_says_which(tmp_path: Path) -> None:
    L.write("easyr1", tmp_path / "easy.parquet", n=4)
    with pytest.raises(ValueError, match="dataset_layout=verl needs column"):
        load_rl_dataset(tmp_path / "easy.parquet", layout="verl")


def test_aokvqa_rows_load_as_before_and_load_mc_dataset_keeps_its_schema(tmp_path: Path) -> None:
    synthetic.write_dataset(tmp_path, num_train=12, num_eval=4, seed=0)
    mc_kept, _ = load_mc_dataset(tmp_path / "train.parquet")
    rl_kept, _ = load_rl_dataset(tmp_path / "train.parquet")
    assert source_layout(tmp_path) == "aokvqa"
    assert rl_kept.select(mc_kept.columns).equals(mc_kept)
    assert rl_kept["answer_kind"].unique().to_list() == ["choice"]
    splits = load_rl_splits(tmp_path)
    assert (splits["train"][0].height, splits["eval"][0].height) == (12, 4)


def test_free_form_datasets_named_otherwise_load_as_easyr1_with_their_images_first(tmp_path: Path) -> None:
    # R1-V / open-r1 multimodal: image, problem, solution with <answer> tags; no placeholders anywhere.
    rows = [{"image": {"bytes": _png(c), "path": None}, "problem": "How many shapes?",
             "solution": f"<answer> {c} </answer>"} for c in (1, 2, 3)]
    pl.DataFrame(rows).write_parquet(tmp_path / "r1v.parquet")
    kept, quarantined = load_rl_dataset(tmp_path / "r1v.parquet")
    assert source_layout(tmp_path / "r1v.parquet") == "easyr1" and quarantined.height == 0
    assert kept["solution"].to_list() == ["1", "2", "3"]


def test_once_a_source_uses_placeholders_a_row_without_one_is_quarantined(tmp_path: Path) -> None:
    rows = [{"problem": p, "answer": "2", "images": [{"bytes": _png(2), "path": None}]}
            for p in ("<image>How many?", "How many?")]
    pl.DataFrame(rows).write_parquet(tmp_path / "easy.parquet")
    kept, quarantined = load_rl_dataset(tmp_path / "easy.parquet")
    assert kept.height == 1
    assert "0 image placeholder(s) in the prompt for 1 image(s)" in quarantined["reason"][0]


def test_default_rewards_follow_the_data_and_configured_ones_stay(tmp_path: Path) -> None:
    from dapo_ops.config.dapo import DapoConfig
    from dapo_ops.data.rl_loading import config_for_dataset

    verl = L.write("verl", tmp_path / "verl.parquet", n=4)
    assert config_for_dataset(DapoConfig(dataset=str(verl))).reward_funcs == [
        "accuracy_reward", "think_format_reward", "mdi_reward"]
    assert config_for_dataset(DapoConfig()).reward_funcs == ["mc_idx_reward", "think_format_reward", "mdi_reward"]
    mixed = config_for_dataset(DapoConfig(synthetic_tasks=["color", "shape_count"]))
    assert (mixed.reward_funcs[:2], mixed.reward_weights) == (["mc_idx_reward", "accuracy_reward"], [3.0, 3.0, 1.0, 1.0])
    custom = DapoConfig(dataset=str(verl), reward_funcs=["accuracy_reward"], reward_weights=[1.0])
    assert config_for_dataset(custom) is custom
    with pytest.raises(ValueError, match="dataset_layout='geo'"):
        DapoConfig(dataset_layout="geo")


def test_scienceqa_and_mathvista_style_columns_are_read_as_they_are_meant(tmp_path: Path) -> None:
    # ScienceQA: choices and an integer answer index; MathVista: `image` a path string, `decoded_image` the image.
    pl.DataFrame([{"question": "Which is a mammal?", "choices": ["cat", "trout"], "answer": 0,
                   "image": {"bytes": _png(), "path": None}}] * 2).write_parquet(tmp_path / "sqa.parquet")
    kept, _ = load_rl_dataset(tmp_path / "sqa.parquet")
    assert source_layout(tmp_path / "sqa.parquet") == "aokvqa" and kept["correct_choice_idx"].to_list() == [0, 0]
    pl.DataFrame([{"question": "What is x?", "answer": "3", "image": "images/1.jpg",
                   "decoded_image": {"bytes": _png(), "path": None}}] * 2).write_parquet(tmp_path / "mv.parquet")
    kept, quarantined = load_rl_dataset(tmp_path / "mv.parquet")
    assert (kept.height, quarantined.height) == (2, 0) and kept["solution"].to_list() == ["3", "3"]
