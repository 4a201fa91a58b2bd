"""The embedded visual multiple-choice generator: deterministic, answerable only from the image, balanced."""

from __future__ import annotations

import io
import itertools

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dapo_ops.data import synthetic
from dapo_ops.data.loading import load_mc_dataset
from dapo_ops.data.synthetic import (
    BACKGROUND,
    COLORS,
    TASK_SPECS,
    TASKS,
    corpus,
    generate_rows,
    write_dataset,
)


def _pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img, dtype=np.int32)


def _shape_mask(pixels: np.ndarray) -> np.ndarray:
    return np.any(pixels != np.asarray(BACKGROUND), axis=-1)


def _read_answer_from_pixels(task: str, pixels: np.ndarray) -> int:
    """A hand-written oracle: if it can read every answer, the answer is in the image."""
    mask = _shape_mask(pixels)
    size = pixels.shape[0]
    ys, xs = np.nonzero(mask)
    if task == "color":
        mean = pixels[mask].mean(axis=0)
        return int(np.argmin([np.linalg.norm(mean - np.asarray(c)) for c in COLORS.values()]))
    if task == "shape":
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        # bounding-box fill ratios: square 1.0, circle ~0.79, cross ~0.64, triangle ~0.5
        return 1 if fill > 0.9 else 0 if fill > 0.72 else 3 if fill > 0.57 else 2
    half = size // 2
    occupied = [mask[y0 : y0 + half, x0 : x0 + half].any() for y0 in (0, half) for x0 in (0, half)]
    if task == "position":
        assert sum(occupied) == 1
        return occupied.index(True)
    return sum(occupied) - 1  # count: one shape per occupied quadrant; choices are "1".."4"


def test_same_seed_gives_identical_rows_and_image_bytes() -> None:
    assert generate_rows(48, seed=7).equals(generate_rows(48, seed=7))


def test_different_seeds_give_different_images_and_answers() -> None:
    a, b = generate_rows(48, seed=7), generate_rows(48, seed=8)
    assert a["image"].to_list() != b["image"].to_list()
    assert a["correct_choice_idx"].to_list() != b["correct_choice_idx"].to_list()


def test_rows_have_the_a_okvqa_layout_with_four_choices() -> None:
    df = generate_rows(40, seed=0)
    assert df.schema == pl.Schema(
        {
            "question_id": pl.String,
            "question": pl.String,
            "choices": pl.List(pl.String),
            "correct_choice_idx": pl.Int64,
            "image": pl.Binary,
            "rationales": pl.List(pl.String),
            "task": pl.String,
        }
    )
    assert df["question_id"].n_unique() == 40
    assert all(len(c) == 4 for c in df["choices"].to_list())
    assert df["correct_choice_idx"].is_between(0, 3).all()


@pytest.mark.parametrize("image_size", [56, 84])
def test_images_are_rgb_pngs_of_the_requested_size(image_size: int) -> None:
    for png in generate_rows(12, seed=1, image_size=image_size)["image"]:
        assert _pixels(png).shape == (image_size, image_size, 3)


def test_image_size_below_two_patches_is_rejected() -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_rows(4, seed=0, image_size=20)


def test_each_task_keeps_one_fixed_choice_order_and_one_question_text() -> None:
    df = generate_rows(200, seed=2)
    for task, group in df.group_by("task"):
        spec = TASK_SPECS[task[0]]
        assert group["question"].unique().to_list() == [spec.question]
        assert all(choices == list(spec.choices) for choices in group["choices"].to_list())


def test_question_text_never_reveals_the_answer() -> None:
    df = generate_rows(200, seed=3)
    # The same question text is paired with every possible answer, so only the image can decide.
    for _question, group in df.group_by("question"):
        assert sorted(group["correct_choice_idx"].unique().to_list()) == [0, 1, 2, 3]
    for row in df.iter_rows(named=True):
        answer = row["choices"][row["correct_choice_idx"]]
        assert answer.lower() not in row["question"].lower()


@pytest.mark.parametrize("task", TASKS)
def test_the_image_alone_determines_the_answer(task: str) -> None:
    df = generate_rows(80, seed=4, tasks=(task,))
    read = [_read_answer_from_pixels(task, _pixels(png)) for png in df["image"]]
    assert read == df["correct_choice_idx"].to_list()


def test_answers_are_balanced_within_each_task() -> None:
    df = generate_rows(403, seed=5)
    for _task, group in df.group_by("task"):
        counts = group["correct_choice_idx"].value_counts()["count"].to_list()
        assert len(counts) == 4 and max(counts) - min(counts) <= 1


def test_task_mix_and_weights_are_exact() -> None:
    only_color = generate_rows(30, seed=0, tasks=("color",))
    assert only_color["task"].unique().to_list() == ["color"]
    mixed = generate_rows(400, seed=0, tasks=("color", "count"), task_weights=(3, 1))
    assert mixed["task"].value_counts().sort("task").rows() == [("color", 300), ("count", 100)]


@pytest.mark.parametrize(
    "kwargs", [{"tasks": ("colour",)}, {"tasks": ()}, {"tasks": "color"}, {"task_weights": (1, 1)}]
)
def test_unknown_tasks_or_mismatched_weights_are_rejected(kwargs: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        generate_rows(4, seed=0, **kwargs)


def test_rationale_is_one_sentence_naming_the_visual_fact() -> None:
    df = generate_rows(120, seed=6)
    for row in df.iter_rows(named=True):
        (rationale,) = row["rationales"]
        answer = row["choices"][row["correct_choice_idx"]]
        assert answer in rationale and rationale.endswith(".") and rationale.count(".") == 1
    first_red = df.filter((pl.col("task") == "color") & (pl.col("correct_choice_idx") == 0)).row(0, named=True)
    assert first_red["rationales"] == ["The shape is red."]


def test_single_shapes_cover_several_vision_patches() -> None:
    patch = 14
    for png in generate_rows(60, seed=7, tasks=("color", "shape"))["image"]:
        mask = _shape_mask(_pixels(png))
        ys, xs = np.nonzero(mask)
        assert mask.sum() >= 1.5 * patch * patch
        assert len(set(ys // patch)) >= 2 and len(set(xs // patch)) >= 2


def test_colors_stay_far_apart_after_the_qwen2_vl_image_processor() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil()
    colors = [*COLORS.values(), BACKGROUND]
    out = processor(images=[Image.new("RGB", (56, 56), c) for c in colors], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]] * len(colors)
    # Each patch row is (channel, time, 14, 14) flattened; a solid image gives one value per channel.
    normalized = out["pixel_values"].reshape(len(colors), 16, 3, -1).mean(dim=(1, 3)).numpy()
    distances = [np.linalg.norm(normalized[i] - normalized[j]) for i, j in itertools.combinations(range(len(colors)), 2)]
    assert min(distances) > 1.5


def test_write_dataset_writes_train_and_eval_with_disjoint_ids_and_hf_image_structs(tmp_path) -> None:
    paths = write_dataset(tmp_path / "data", num_train=24, num_eval=8, seed=1)
    assert paths == {"train": tmp_path / "data" / "train.parquet", "eval": tmp_path / "data" / "eval.parquet"}
    train, evals = pl.read_parquet(paths["train"]), pl.read_parquet(paths["eval"])
    assert (train.height, evals.height) == (24, 8)
    assert train.schema["image"] == pl.Struct({"bytes": pl.Binary, "path": pl.String})
    assert train["image"].struct.field("path").is_null().all()
    assert not set(train["question_id"]) & set(evals["question_id"])
    assert train["image"].struct.field("bytes").to_list() != evals["image"].struct.field("bytes").to_list()[:24]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["eval.parquet", "train.parquet"]  # no temp files


def test_write_dataset_is_byte_for_byte_reproducible(tmp_path) -> None:
    a = write_dataset(tmp_path / "a", num_train=16, num_eval=4, seed=3, tasks=("color",))
    b = write_dataset(tmp_path / "b", num_train=16, num_eval=4, seed=3, tasks=("color",))
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["eval"].read_bytes() == b["eval"].read_bytes()


def test_written_files_carry_hf_features_and_pass_the_loader(tmp_path) -> None:
    paths = write_dataset(tmp_path, num_train=12, num_eval=4, seed=0)
    assert b"huggingface" in pq.read_schema(paths["train"]).metadata
    import datasets

    ds = datasets.Dataset.from_parquet(str(paths["train"]), cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (56, 56)
    kept, quarantined = load_mc_dataset(paths["train"])
    assert (kept.height, quarantined.height) == (12, 0)


def test_corpus_covers_every_text_the_model_sees_or_writes() -> None:
    texts = corpus()
    assert texts == corpus() and len(texts) == len(set(texts))
    for spec in TASK_SPECS.values():
        assert spec.question in texts
        for letter, choice in zip(synthetic.LETTERS, spec.choices, strict=True):
            assert choice in texts and spec.rationale(choice) in texts
            assert f"<think>{spec.rationale(choice)}</think> Answer: {letter}" in texts
    assert {"Answer: A", "Answer: B", "Answer: C", "Answer: D"} <= set(texts)
    assert "What shape is in the image?" not in corpus(tasks=("color",))


def _pixel_color(pixels: np.ndarray) -> str:
    mean = pixels[_shape_mask(pixels)].mean(axis=0)
    return list(COLORS)[int(np.argmin([np.linalg.norm(mean - np.asarray(c)) for c in COLORS.values()]))]


def test_yes_no_answers_depend_on_the_question_and_the_image() -> None:
    df = generate_rows(80, seed=4, tasks=("yes_no",))
    assert {q.startswith("Is the shape not ") for q in df["question"]} == {True, False}
    for row in df.iter_rows(named=True):
        asked = row["question"].removesuffix("?").split()[-1]
        holds = (_pixel_color(_pixels(row["image"])) == asked) != (" not " in row["question"])
        assert row["choices"] == ["yes", "no"] and row["correct_choice_idx"] == (0 if holds else 1)
    assert sorted(df["correct_choice_idx"].value_counts()["count"].to_list()) == [40, 40]


def test_color_of_shape_names_one_of_two_shapes_of_different_colors() -> None:
    df = generate_rows(40, seed=5, tasks=("color_of_shape",))
    assert df["question"].n_unique() > 1
    for row in df.iter_rows(named=True):
        pixels = _pixels(row["image"])
        colors = {tuple(p) for p in pixels[_shape_mask(pixels)].tolist()}
        assert len(colors) == 2 and tuple(COLORS[row["choices"][row["correct_choice_idx"]]]) in colors


def test_color_count_varies_the_number_of_choices_and_keeps_each_colors_letter() -> None:
    df = generate_rows(60, seed=6, tasks=("color_count",))
    assert {len(c) for c in df["choices"]} == {2, 3, 4}
    for row in df.iter_rows(named=True):
        assert row["choices"] == list(COLORS)[: len(row["choices"])]
        assert row["choices"][row["correct_choice_idx"]] == _pixel_color(_pixels(row["image"]))


def test_corpus_covers_the_mixed_tasks_questions() -> None:
    texts = corpus(("yes_no", "color_of_shape"))
    assert "Is the shape not red?" in texts and "What color is the circle?" in texts
    assert len(texts) == len(set(texts))


def test_the_files_schema_is_the_hugging_face_features_without_importing_datasets() -> None:
    datasets = pytest.importorskip("datasets")
    string = datasets.Value("string")
    features = datasets.Features({
        "question_id": string, "question": string, "choices": datasets.List(string),
        "correct_choice_idx": datasets.Value("int64"), "image": datasets.Image(),
        "rationales": datasets.List(string), "task": string,
    })
    assert synthetic.arrow_schema().equals(features.arrow_schema, check_metadata=True)
