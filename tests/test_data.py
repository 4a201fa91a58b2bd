"""Loading A-OKVQA-layout data from every supported source form, with per-row validation and quarantine."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from PIL import Image

from dapo_ops.data.loading import (
    KEPT_SCHEMA,
    QUARANTINE_SCHEMA,
    decode_image,
    load_mc_dataset,
    load_mc_splits,
)
from dapo_ops.data.synthetic import generate_rows, write_dataset


def _rows(n: int = 5, seed: int = 0) -> pl.DataFrame:
    """Valid rows in the A-OKVQA layout with the image as raw PNG bytes."""
    return generate_rows(n, seed, tasks=("color",)).drop("task")


def _png(size: tuple[int, int] = (16, 16), mode: str = "RGB", color: Any = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _with_row(df: pl.DataFrame, i: int, **changes: Any) -> pl.DataFrame:
    rows = df.to_dicts()
    rows[i].update(changes)
    return pl.DataFrame(rows, infer_schema_length=None)


def _write(df: pl.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    return path


# --- accepted source forms ------------------------------------------------------------------------


def test_single_parquet_with_image_bytes_keeps_every_row_in_the_contract_schema(tmp_path) -> None:
    rows = _rows(6)
    kept, quarantined = load_mc_dataset(_write(rows, tmp_path / "mc.parquet"))
    assert kept.schema == pl.Schema(KEPT_SCHEMA)
    assert quarantined.schema == pl.Schema(QUARANTINE_SCHEMA) and quarantined.height == 0
    assert kept["source_row"].to_list() == list(range(6))
    assert kept.drop("source_row").equals(rows)


def test_hf_image_struct_column_is_accepted(tmp_path) -> None:
    paths = write_dataset(tmp_path, num_train=6, num_eval=2, seed=0)
    kept, _ = load_mc_dataset(paths["train"])
    assert kept["image"].to_list() == pl.read_parquet(paths["train"])["image"].struct.field("bytes").to_list()


def test_struct_with_only_a_path_reads_the_image_next_to_the_parquet_file(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    rows = _rows(1).with_columns(
        image=pl.struct(pl.lit(None, pl.Binary).alias("bytes"), pl.lit("img/a.png").alias("path"))
    )
    kept, _ = load_mc_dataset(_write(rows, tmp_path / "mc.parquet"))
    assert kept["image"].to_list() == [_png()]


def test_relative_path_images_resolve_from_the_file_folder_or_the_source_folder(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "top.png").write_bytes(_png(color=(0, 0, 255)))
    (tmp_path / "shards" / "local").mkdir(parents=True)
    (tmp_path / "shards" / "local" / "near.png").write_bytes(_png(color=(0, 255, 0)))
    _write(_rows(1).with_columns(image=pl.lit("images/top.png")), tmp_path / "shards" / "a.parquet")
    _write(_rows(1, seed=1).with_columns(image=pl.lit("local/near.png")), tmp_path / "shards" / "b.parquet")
    kept, quarantined = load_mc_dataset(tmp_path)
    assert quarantined.height == 0
    assert [decode_image(b).getpixel((0, 0)) for b in kept["image"]] == [(0, 0, 255), (0, 255, 0)]


def test_folder_of_shards_is_read_in_sorted_order_with_source_rows_across_shards(tmp_path) -> None:
    rows = _rows(7)
    _write(rows.slice(4), tmp_path / "part-1.parquet")
    _write(rows.slice(0, 4), tmp_path / "part-0.parquet")
    kept, _ = load_mc_dataset(tmp_path)
    assert kept["question_id"].to_list() == rows["question_id"].to_list()
    assert kept["source_row"].to_list() == list(range(7))


def test_save_to_disk_dataset_folder_is_loaded(tmp_path) -> None:
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "correct_choice_idx": datasets.Value("int64"),
            "image": datasets.Image(),
            "rationales": datasets.List(datasets.Value("string")),
        }
    )
    rows = _rows(5)
    records = rows.to_dict(as_series=False)
    records["image"] = [{"bytes": b, "path": None} for b in records["image"]]
    datasets.Dataset.from_dict(records, features=features).save_to_disk(str(tmp_path / "ds"))
    kept, quarantined = load_mc_dataset(tmp_path / "ds")
    assert quarantined.height == 0
    assert kept.drop("source_row").equals(rows)


@pytest.fixture
def dataset_dict_dir(tmp_path) -> Path:
    import datasets

    splits = {"train": _rows(6, seed=0), "validation": _rows(4, seed=1)}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_polars(df) for name, df in splits.items()}
    ).save_to_disk(str(tmp_path / "dd"))
    return tmp_path / "dd"


def test_save_to_disk_dataset_dict_loads_train_unless_a_split_is_named(dataset_dict_dir: Path) -> None:
    assert load_mc_dataset(dataset_dict_dir)[0].height == 6
    assert load_mc_dataset(dataset_dict_dir, split="validation")[0].height == 4
    with pytest.raises(ValueError, match="no split 'test'.*train, validation"):
        load_mc_dataset(dataset_dict_dir, split="test")


def test_label_idx_is_a_synonym_of_correct_choice_idx(tmp_path) -> None:
    rows = _rows(4)
    kept, _ = load_mc_dataset(_write(rows.rename({"correct_choice_idx": "label_idx"}), tmp_path / "mc.parquet"))
    assert kept["correct_choice_idx"].to_list() == rows["correct_choice_idx"].to_list()


def test_missing_question_ids_and_rationales_get_stable_ids_and_empty_lists(tmp_path) -> None:
    path = _write(_rows(3).drop("question_id", "rationales"), tmp_path / "aokvqa.parquet")
    kept, _ = load_mc_dataset(path)
    assert kept["question_id"].to_list() == ["aokvqa-0", "aokvqa-1", "aokvqa-2"]
    assert kept["rationales"].to_list() == [[], [], []]
    assert load_mc_dataset(path)[0]["question_id"].to_list() == kept["question_id"].to_list()


# --- bad rows are quarantined with a reason ---------------------------------------------------------


def _truncated_png() -> bytes:
    data = _png((64, 64), color=(10, 200, 30))
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()[:-300]


BAD_ROWS = {
    "corrupt image bytes": ({"image": b"not an image at all"}, "image does not decode"),
    "truncated PNG": ({"image": _truncated_png()}, "truncated"),
    "truncated JPEG": ({"image": _truncated_jpeg()}, "truncated"),
    "index out of range": ({"correct_choice_idx": 5}, "correct_choice_idx 5 out of range for 4 choices"),
    "negative index": ({"correct_choice_idx": -1}, "correct_choice_idx -1 out of range"),
    "missing index": ({"correct_choice_idx": None}, "correct_choice_idx is missing"),
    "fractional index": ({"correct_choice_idx": 1.5}, "correct_choice_idx 1.5 is not an integer"),
    "missing question": ({"question": None}, "question is missing"),
    "blank question": ({"question": "   "}, "question is empty"),
    "one choice": ({"choices": ["red"], "correct_choice_idx": 0}, "only 1 choice(s); need at least 2"),
    "empty choice": ({"choices": ["red", "", "blue", "yellow"]}, "choice(s) [1] empty"),
    "missing image": ({"image": None}, "image is missing"),
}


@pytest.mark.parametrize("change, expected", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_is_quarantined_with_a_reason_naming_row_and_problem(tmp_path, change, expected) -> None:
    rows = _rows(5)
    kept, quarantined = load_mc_dataset(_write(_with_row(rows, 2, **change), tmp_path / "mc.parquet"))
    assert kept["source_row"].to_list() == [0, 1, 3, 4]
    (bad,) = quarantined.to_dicts()
    qid = rows["question_id"][2]
    assert bad["source_row"] == 2 and bad["question_id"] == qid
    assert bad["reason"].startswith(f"row 2 (question_id={qid}): ")
    assert expected in bad["reason"]


def test_image_path_that_does_not_exist_is_quarantined(tmp_path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    rows = _rows(2).with_columns(image=pl.Series(["ok.png", "missing.png"]))
    kept, quarantined = load_mc_dataset(_write(rows, tmp_path / "mc.parquet"))
    assert kept.height == 1
    assert "image file 'missing.png' not found" in quarantined["reason"][0]


def test_every_problem_of_a_row_is_listed(tmp_path) -> None:
    rows = _with_row(_rows(2), 1, question="", correct_choice_idx=9, image=b"junk")
    _, quarantined = load_mc_dataset(_write(rows, tmp_path / "mc.parquet"))
    reason = quarantined["reason"][0]
    assert "question is empty" in reason and "out of range" in reason and "image does not decode" in reason
    assert quarantined["kind"][0] == "empty question; index out of range; image does not decode"


def test_duplicate_question_id_is_quarantined_not_kept_twice(tmp_path) -> None:
    rows = _rows(3)
    rows = _with_row(rows, 2, question_id=rows["question_id"][0])
    kept, quarantined = load_mc_dataset(_write(rows, tmp_path / "mc.parquet"))
    assert kept["source_row"].to_list() == [0, 1]
    assert "duplicates row 0" in quarantined["reason"][0]


def test_bad_row_in_a_shard_names_the_shard(tmp_path) -> None:
    rows = _rows(4)
    _write(rows.slice(0, 2), tmp_path / "part-0.parquet")
    _write(_with_row(rows.slice(2), 1, correct_choice_idx=7), tmp_path / "part-1.parquet")
    _, quarantined = load_mc_dataset(tmp_path)
    (bad,) = quarantined.to_dicts()
    assert bad["source_row"] == 3 and bad["source_file"].endswith("part-1.parquet")
    assert "part-1.parquet row 1" in bad["reason"]


# --- unusable sources raise ValueError naming the source ---------------------------------------------


def test_unreadable_file_raises_naming_the_file(tmp_path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_text("question,choices\nnot,parquet\n")
    with pytest.raises(ValueError, match=r"broken\.parquet.*not a readable parquet file"):
        load_mc_dataset(path)


@pytest.mark.parametrize("column", ["question", "choices", "correct_choice_idx", "image"])
def test_missing_required_column_raises_naming_file_and_column(tmp_path, column) -> None:
    _write(_rows(2), tmp_path / "part-0.parquet")
    _write(_rows(2, seed=1).drop(column), tmp_path / "part-1.parquet")
    with pytest.raises(ValueError, match=rf"part-1\.parquet: missing required column\(s\) {column}"):
        load_mc_dataset(tmp_path)


def test_no_usable_row_raises_naming_the_source_and_summarizing_reasons(tmp_path) -> None:
    rows = _rows(3).with_columns(correct_choice_idx=pl.lit(9, pl.Int64))
    rows = _with_row(rows, 0, image=b"junk")
    path = _write(rows, tmp_path / "all-bad.parquet")
    with pytest.raises(ValueError, match="all-bad.parquet: no usable rows") as info:
        load_mc_dataset(path)
    assert "3x index out of range" in str(info.value) and "1x image does not decode" in str(info.value)


def test_empty_or_missing_sources_raise_naming_the_source(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_mc_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no parquet files"):
        load_mc_dataset(tmp_path)
    with pytest.raises(ValueError, match="empty.parquet: no usable rows"):
        load_mc_dataset(_write(_rows(0), tmp_path / "empty.parquet"))


# --- splits ---------------------------------------------------------------------------------------


def test_split_files_written_by_the_generator_become_train_and_eval(tmp_path) -> None:
    paths = write_dataset(tmp_path, num_train=10, num_eval=4, seed=0)
    splits = load_mc_splits(tmp_path)
    assert splits["train"][0]["question_id"].to_list() == pl.read_parquet(paths["train"])["question_id"].to_list()
    assert splits["eval"][0]["question_id"].to_list() == pl.read_parquet(paths["eval"])["question_id"].to_list()
    assert load_mc_dataset(tmp_path)[0].height == 10  # a multi-split folder loads its train split


def test_named_shards_define_splits_and_validation_wins_over_test(tmp_path) -> None:
    _write(_rows(3, seed=0), tmp_path / "data" / "train-00000-of-00002.parquet")
    _write(_rows(3, seed=1), tmp_path / "data" / "train-00001-of-00002.parquet")
    _write(_rows(2, seed=2), tmp_path / "data" / "validation-00000-of-00001.parquet")
    _write(_rows(2, seed=3).drop("correct_choice_idx"), tmp_path / "data" / "test-00000-of-00001.parquet")
    _write(pl.DataFrame({"reason": ["unrelated"]}), tmp_path / "quarantine.parquet")
    splits = load_mc_splits(tmp_path)
    assert splits["train"][0].height == 6 and splits["eval"][0].height == 2


def test_dataset_dict_splits_are_used(dataset_dict_dir: Path) -> None:
    splits = load_mc_splits(dataset_dict_dir)
    assert (splits["train"][0].height, splits["eval"][0].height) == (6, 4)


def test_a_source_without_splits_is_split_by_a_stable_hash_of_question_id(tmp_path) -> None:
    rows = _rows(300)
    splits = load_mc_splits(_write(rows, tmp_path / "all.parquet"))
    train_ids, eval_ids = (set(splits[s][0]["question_id"]) for s in ("train", "eval"))
    assert not train_ids & eval_ids and train_ids | eval_ids == set(rows["question_id"])
    assert 15 <= len(eval_ids) <= 45
    # The split depends on the id, not on the row's position or the other rows.
    shuffled = load_mc_splits(_write(rows.reverse().head(200), tmp_path / "other.parquet"))
    assert set(shuffled["eval"][0]["question_id"]) == eval_ids & set(rows.reverse().head(200)["question_id"])


def test_hash_split_of_a_tiny_source_leaves_a_row_on_each_side(tmp_path) -> None:
    splits = load_mc_splits(_write(_rows(2), tmp_path / "two.parquet"))
    assert (splits["train"][0].height, splits["eval"][0].height) == (1, 1)


def test_quarantined_rows_follow_their_split(tmp_path) -> None:
    write_dataset(tmp_path, num_train=4, num_eval=4, seed=0)
    rows = pl.read_parquet(tmp_path / "eval.parquet")
    bad = rows.with_columns(correct_choice_idx=pl.when(pl.int_range(4) == 1).then(8).otherwise(pl.col("correct_choice_idx")))
    bad.write_parquet(tmp_path / "eval.parquet")
    splits = load_mc_splits(tmp_path)
    assert splits["train"][1].height == 0 and splits["eval"][1]["source_row"].to_list() == [1]


# --- images and speed -------------------------------------------------------------------------------


def test_decode_image_returns_rgb_and_composites_transparency_on_white() -> None:
    assert decode_image(_png(mode="L", color=40)).mode == "RGB"
    clear = decode_image(_png(mode="RGBA", color=(255, 0, 0, 0)))
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)


def test_twenty_thousand_rows_validate_in_seconds(tmp_path) -> None:
    rows = _rows(16)
    many = pl.concat([rows] * 1250).with_columns(question_id=pl.format("q{}", pl.int_range(20_000)))
    path = _write(many, tmp_path / "big.parquet")
    start = time.perf_counter()
    kept, _ = load_mc_dataset(path)
    assert kept.height == 20_000
    assert time.perf_counter() - start < 15
