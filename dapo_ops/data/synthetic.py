"""The embedded visual multiple-choice generator (A-OKVQA layout).

Every question needs the image: within a task the question text is the same for every row, and only the
picture says which of the four choices is right. Each task keeps one fixed choice order, because a tiny
model cannot learn to bind letters to shuffled choices (measured in benchmarks/learning_findings.md).

Scenes are drawn on a 2x2 grid of quadrants. At the default 56x56 px the Qwen2-VL processor makes 4x4
patches of 14 px, merged 2x2 into 4 image tokens: one token per quadrant. Colors are saturated primaries
on a mid-gray background, so they stay far apart after the processor's mean/std normalization.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from dapo_ops.store.layout import write_bytes_atomic

if TYPE_CHECKING:  # imported where used: `corpus` and the images need no polars (scripts/gpu_smoke.py)
    import polars as pl

LETTERS = "ABCD"
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 20),
    "blue": (20, 60, 230),
    "yellow": (240, 210, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COUNTS: tuple[str, ...] = ("1", "2", "3", "4")

MIN_IMAGE_SIZE = 28
DEFAULT_IMAGE_SIZE = 56


@dataclass(frozen=True)
class Task:
    """One question type: a fixed question, a fixed choice order, and the rationale for an answer."""

    name: str
    question: str
    choices: tuple[str, ...]

    def rationale(self, answer: str) -> str:
        """One short sentence stating the visual fact that decides the answer."""
        if self.name == "color":
            return f"The shape is {answer}."
        if self.name == "shape":
            return f"The shape is a {answer}."
        if self.name == "position":
            return f"The shape is in the {answer}."
        return "There is 1 shape." if answer == "1" else f"There are {answer} shapes."


TASK_SPECS: dict[str, Task] = {
    "color": Task("color", "What color is the shape?", tuple(COLORS)),
    "shape": Task("shape", "What shape is in the image?", SHAPES),
    "position": Task("position", "Where is the shape in the image?", POSITIONS),
    "count": Task("count", "How many shapes are in the image?", COUNTS),
}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)

# Tasks whose question or choice list varies per row (not in the default `TASKS` of `generate_rows`), each
# with its number of answer classes (answers are balanced over them):
# - yes_no: "Is the shape red?" / "Is the shape not red?", choices (yes, no): the same picture answers the
#   two questions oppositely, so the answer depends on the question as much as on the image.
# - color_of_shape: two shapes of different kinds and colors; "What color is the circle?" names one of them.
# - color_count: the color question with 2, 3 or 4 choices, a prefix of the color order, so a color keeps
#   its letter (binding shuffled letters needs induction-style copying the tiny model does not learn).
MIX_TASKS: dict[str, int] = {"yes_no": 2, "color_of_shape": len(COLORS), "color_count": len(COLORS)}
# Opt-in tasks for the other kinds of data (never in a default mix), each with its number of answer classes:
# - shape_count: "How many shapes are in the image?" answered with a number (free form, `solution` "1".."4").
# - two_image_color: two images of one shape each; "What color is the shape in the second image?" (4 choices).
OPT_IN_TASKS: dict[str, int] = {"shape_count": len(COUNTS), "two_image_color": len(COLORS)}
FREE_FORM_TASKS: frozenset[str] = frozenset({"shape_count"})
ALL_TASKS: tuple[str, ...] = (*TASKS, *MIX_TASKS, *OPT_IN_TASKS)

# Shape radius as a fraction of the image side: large single shapes cover several 14 px patches; the
# small ones of the position/count tasks fit inside one quadrant with a margin.
_LARGE_RADIUS = (0.25, 0.36)
_SMALL_RADIUS = (0.14, 0.21)


def _task_weights(tasks: Sequence[str], task_weights: Sequence[float] | None) -> np.ndarray:
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, e.g. ({tasks!r},), not a string")
    if not tasks:
        raise ValueError(f"tasks is empty; choose from {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks={tuple(tasks)!r} must be distinct names from {', '.join(ALL_TASKS)}")
    weights = np.ones(len(tasks)) if task_weights is None else np.asarray(task_weights, dtype=float)
    if weights.shape != (len(tasks),) or not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"task_weights={task_weights!r} needs one non-negative weight per task {tuple(tasks)!r}")
    return weights / weights.sum()


def _allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """Exact per-task counts (largest remainder), so a mix is what was asked for, not a sample of it."""
    raw = n * weights
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.9 * r  # a slightly smaller square keeps its area close to the circle's
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = 0.4 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _center_in(rng: np.random.Generator, lo: float, hi: float, r: float) -> float:
    """A center coordinate that keeps a shape of radius r (plus 1 px) inside [lo, hi]."""
    return float(rng.uniform(lo + r + 1, max(lo + r + 1, hi - r - 1)))


def _scene(task: str, answer: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw an image whose content makes `answer` (an index into the task's choices) the right one."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    colors = list(COLORS.values())
    half = size / 2
    if task in ("color", "shape"):
        r = rng.uniform(*_LARGE_RADIUS) * size
        shape = SHAPES[answer] if task == "shape" else SHAPES[rng.integers(len(SHAPES))]
        color = colors[answer] if task == "color" else colors[rng.integers(len(colors))]
        _draw_shape(draw, shape, _center_in(rng, 0, size, r), _center_in(rng, 0, size, r), r, color)
        return img
    # position and count: small shapes, one per occupied quadrant (0 top left, 1 top right, 2 bottom left, 3 bottom right)
    quadrants = [answer] if task == "position" else sorted(rng.permutation(4)[: answer + 1].tolist())
    for q in quadrants:
        r = rng.uniform(*_SMALL_RADIUS) * size
        x0, y0 = (q % 2) * half, (q // 2) * half
        cx, cy = _center_in(rng, x0, x0 + half, r), _center_in(rng, y0, y0 + half, r)
        _draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], cx, cy, r, colors[rng.integers(len(colors))])
    return img


def _mix_row(task: str, answer: int, size: int, rng: np.random.Generator) -> tuple[str, list[str], int, Image.Image, str]:
    """(question, choices, correct index, image, rationale) of a `MIX_TASKS` row with answer class `answer`."""
    names = list(COLORS)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if task == "yes_no":
        negated = bool(rng.integers(2))
        asked = int(rng.integers(len(names)))
        holds = answer == (1 if negated else 0)  # answer 0 = yes: "not c" is true iff the color is not c
        color = asked if holds else int(rng.choice([c for c in range(len(names)) if c != asked]))
        r = rng.uniform(*_LARGE_RADIUS) * size
        _draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], _center_in(rng, 0, size, r), _center_in(rng, 0, size, r),
                    r, COLORS[names[color]])
        question = f"Is the shape {'not ' if negated else ''}{names[asked]}?"
        return question, ["yes", "no"], answer, img, f"The shape is {names[color]}."
    if task == "color_of_shape":
        kinds = rng.permutation(len(SHAPES))[:2]
        other = int(rng.choice([c for c in range(len(names)) if c != answer]))
        left_first = bool(rng.integers(2))
        for k, (kind, color) in enumerate(zip(kinds, (answer, other), strict=True)):
            r = rng.uniform(*_SMALL_RADIUS) * size * 1.1
            x0 = 0.0 if (k == 0) == left_first else size / 2
            _draw_shape(draw, SHAPES[kind], _center_in(rng, x0, x0 + size / 2, r), _center_in(rng, 0, size, r), r,
                        COLORS[names[color]])
        asked = SHAPES[kinds[0]]
        return f"What color is the {asked}?", names, answer, img, f"The {asked} is {names[answer]}."
    if task == "color_count":
        count = int(rng.integers(max(2, answer + 1), len(names) + 1))
        r = rng.uniform(*_LARGE_RADIUS) * size
        _draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], _center_in(rng, 0, size, r), _center_in(rng, 0, size, r),
                    r, COLORS[names[answer]])
        return TASK_SPECS["color"].question, names[:count], answer, img, f"The shape is {names[answer]}."
    raise ValueError(f"unknown task {task!r}")


def _opt_in_row(task: str, answer: int, size: int, rng: np.random.Generator) -> dict:
    """The columns of an `OPT_IN_TASKS` row with answer class `answer` (images: PIL, in prompt order)."""
    if task == "shape_count":
        rationale = "There is 1 shape." if answer == 0 else f"There are {answer + 1} shapes."
        return {"question": TASK_SPECS["count"].question, "choices": None, "correct_choice_idx": None,
                "solution": COUNTS[answer], "images": [_scene("count", answer, size, rng)], "rationale": rationale}
    if task == "two_image_color":
        names = list(COLORS)
        which = int(rng.integers(2))
        other = int(rng.choice([c for c in range(len(names)) if c != answer]))
        colors = (answer, other) if which == 0 else (other, answer)
        images = [_scene("color", c, size, rng) for c in colors]
        ordinal = ("first", "second")[which]
        return {"question": f"What color is the shape in the {ordinal} image?", "choices": names,
                "correct_choice_idx": answer, "solution": None, "images": images,
                "rationale": f"The shape in the {ordinal} image is {names[answer]}."}
    raise ValueError(f"unknown task {task!r}")


def task_answer_kinds(tasks: Sequence[str]) -> set[str]:
    """{"choice"}, {"free"} or both: how the rows of `tasks` are answered."""
    return {"free" if t in FREE_FORM_TASKS else "choice" for t in tasks}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no metadata: same pixels, same bytes
    return buf.getvalue()


def generate_rows(
    n: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    tasks: Sequence[str] = TASKS,
    task_weights: Sequence[float] | None = None,
    id_prefix: str = "syn",
) -> pl.DataFrame:
    """`n` questions in the A-OKVQA layout, identical for identical arguments.

    Columns: question_id, question, choices (4, fixed order per task), correct_choice_idx (int64),
    image (PNG bytes, `image_size` square, RGB), rationales (one sentence), and task. Tasks are mixed in
    exact proportion to `task_weights` (default equal) and, within a task, the answers are balanced
    (each choice is right for n_task/4 rows, up to rounding) and shuffled.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} must be at least {MIN_IMAGE_SIZE} (two 14 px patches)")
    weights = _task_weights(tasks, task_weights)
    rng = np.random.default_rng(seed)
    task_of_row = np.repeat(np.arange(len(tasks)), _allocate(n, weights))
    rng.shuffle(task_of_row)
    answer_of_row = np.zeros(n, dtype=int)
    for t in range(len(tasks)):
        rows = np.flatnonzero(task_of_row == t)
        classes = {**MIX_TASKS, **OPT_IN_TASKS}.get(tasks[t]) or len(TASK_SPECS[tasks[t]].choices)
        answers = np.resize(np.arange(classes), len(rows))
        answer_of_row[rows] = rng.permutation(answers)

    opt_in = any(t in OPT_IN_TASKS for t in tasks)
    records: dict[str, list] = {k: [] for k in ("question_id", "question", "choices", "correct_choice_idx",
                                               "image", "rationales", "task", *(("images", "solution") if opt_in else ()))}
    for i in range(n):
        task, answer = tasks[task_of_row[i]], int(answer_of_row[i])
        records["question_id"].append(f"{id_prefix}-s{seed}-{i:06d}")
        if task in OPT_IN_TASKS:
            row = _opt_in_row(task, answer, image_size, rng)
            images = [_png(img) for img in row.pop("images")]
            records["image"].append(images[0])
            records["images"].append(images)
            records["rationales"].append([row.pop("rationale")])
            records["task"].append(task)
            for name, value in row.items():
                records[name].append(value)
            continue
        if opt_in:
            records["solution"].append(None)
        if task in MIX_TASKS:
            question, choices, index, img, rationale = _mix_row(task, answer, image_size, rng)
            records["question"].append(question)
            records["choices"].append(choices)
            records["correct_choice_idx"].append(index)
            records["image"].append(_png(img))
            records["rationales"].append([rationale])
            records["task"].append(task)
            continue
        spec = TASK_SPECS[task]
        records["question"].append(spec.question)
        records["choices"].append(list(spec.choices))
        records["correct_choice_idx"].append(answer)
        records["image"].append(_png(_scene(spec.name, answer, image_size, rng)))
        records["rationales"].append([spec.rationale(spec.choices[answer])])
        records["task"].append(spec.name)
    if opt_in:  # single-image rows of the other tasks: their one image
        have = iter(records["images"])
        records["images"] = [next(have) if t in OPT_IN_TASKS else [img]
                             for t, img in zip(records["task"], records["image"], strict=True)]
    import polars as pl

    from dapo_ops.data.loading import AOKVQA_SCHEMA

    types = {**AOKVQA_SCHEMA, "task": pl.String(),
             # opt-in tasks only: every image of a row, and the free-form answer (null for multiple choice)
             "images": pl.List(pl.Binary()), "solution": pl.String()}
    return pl.DataFrame(records, schema={name: types[name] for name in records})


# The Hugging Face features of the A-OKVQA layout (`datasets.Features`, image = `Image()`), as `datasets` stores
# them in a parquet file's schema metadata; written without importing `datasets`, which a GPU image may lack
# (tests/test_synthetic.py checks it equals `datasets.Features(...).arrow_schema`).
_STRING = {"dtype": "string", "_type": "Value"}
HF_FEATURES: dict[str, dict] = {
    "question_id": _STRING, "question": _STRING, "choices": {"feature": _STRING, "_type": "List"},
    "correct_choice_idx": {"dtype": "int64", "_type": "Value"}, "image": {"_type": "Image"},
    "rationales": {"feature": _STRING, "_type": "List"}, "task": _STRING,
}


# The opt-in tasks' extra columns: every image of a row, and the free-form answer.
OPT_IN_FEATURES: dict[str, dict] = {"images": {"feature": {"_type": "Image"}, "_type": "List"}, "solution": _STRING}


def arrow_schema(*, opt_in: bool = False):
    """The pyarrow schema (with `huggingface` metadata) of a synthetic dataset file; `opt_in`: with the columns
    of the opt-in tasks (`images`, `solution`)."""
    import json

    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {"question_id": pa.string(), "question": pa.string(), "choices": pa.list_(pa.string()),
             "correct_choice_idx": pa.int64(), "image": image, "rationales": pa.list_(pa.string()),
             "task": pa.string(), "images": pa.list_(image), "solution": pa.string()}
    features = {**HF_FEATURES, **(OPT_IN_FEATURES if opt_in else {})}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([(name, types[name]) for name in features], metadata=metadata)


def _write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write with the Hugging Face features in the schema metadata (image = `Image()`), atomically."""
    import polars as pl
    import pyarrow.parquet as pq

    opt_in = "images" in df.columns
    schema = arrow_schema(opt_in=opt_in)
    image_struct = {"images": pl.col("images").list.eval(
        pl.struct(pl.element().alias("bytes"), pl.lit(None, dtype=pl.String).alias("path")))} if opt_in else {}
    table = df.with_columns(
        image=pl.struct(pl.col("image").alias("bytes"), pl.lit(None, dtype=pl.String).alias("path")), **image_struct,
    ).select(schema.names).to_arrow().cast(schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_dataset(
    out_dir: str | os.PathLike[str],
    num_train: int,
    num_eval: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    tasks: Sequence[str] = TASKS,
    task_weights: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Write `train.parquet` and `eval.parquet` under `out_dir`; returns {"train": path, "eval": path}.

    The splits use disjoint seeds (2*seed and 2*seed+1) and id prefixes ("train-", "eval-"), so no
    question_id is shared. The image column is the Hugging Face `Image` struct {"bytes", "path": None}.
    Each file is written to a temporary name and renamed into place, so readers never see half a file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n, split_seed in (("train", num_train, 2 * seed), ("eval", num_eval, 2 * seed + 1)):
        df = generate_rows(n, split_seed, image_size=image_size, tasks=tasks, task_weights=task_weights,
                           id_prefix=split)
        paths[split] = out / f"{split}.parquet"
        _write_parquet_atomic(df, paths[split])
    return paths


def corpus(tasks: Sequence[str] = TASKS) -> list[str]:
    """Every text the synthetic data and the warm-start targets use, for training the tokenizer.

    Questions, choices (alone, lettered, and as a block), rationales, answer lines ("Answer: A") and
    whole targets ("<think>The shape is red.</think> Answer: A"). Deterministic and duplicate-free.
    """
    _task_weights(tasks, None)  # validates the names
    texts: dict[str, None] = {}  # insertion-ordered set
    for letter in LETTERS:
        texts[f"Answer: {letter}"] = None
    for name in tasks:
        if name in MIX_TASKS:
            texts.update(dict.fromkeys(_mix_corpus(name)))
            continue
        spec = TASK_SPECS[name]
        block = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(spec.choices))
        texts[spec.question] = None
        texts[block] = None
        texts[f"{spec.question}\n{block}"] = None
        for j, choice in enumerate(spec.choices):
            rationale = spec.rationale(choice)
            texts[choice] = None
            texts[f"{LETTERS[j]}. {choice}"] = None
            texts[rationale] = None
            texts[f"<think>{rationale}</think> Answer: {LETTERS[j]}"] = None
    return list(texts)


def opt_in_corpus(tasks: Sequence[str]) -> list[str]:
    """The texts of the `OPT_IN_TASKS` among `tasks` (none for the default tasks: their tokenizer stays as is)."""
    texts: dict[str, None] = {}
    names = list(COLORS)
    if "shape_count" in tasks:
        texts[TASK_SPECS["count"].question] = None
        for j, count in enumerate(COUNTS):
            rationale = "There is 1 shape." if j == 0 else f"There are {count} shapes."
            texts.update(dict.fromkeys((count, f"Answer: {count}", rationale, f"<think>{rationale}</think> Answer: {count}")))
    if "two_image_color" in tasks:
        block = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(names))
        for ordinal in ("first", "second"):
            question = f"What color is the shape in the {ordinal} image?"
            texts.update(dict.fromkeys((question, f"{question}\n{block}")))
            for j, c in enumerate(names):
                rationale = f"The shape in the {ordinal} image is {c}."
                texts.update(dict.fromkeys((rationale, f"<think>{rationale}</think> Answer: {LETTERS[j]}")))
    return list(texts)


def _mix_corpus(task: str) -> list[str]:
    """The questions, choice blocks and rationales a `MIX_TASKS` task can produce, plus format targets."""
    names = list(COLORS)
    if task == "yes_no":
        questions = [f"Is the shape {n}{c}?" for c in names for n in ("", "not ")]
        blocks, answers = ["A. yes\nB. no"], ["yes", "no"]
    elif task == "color_of_shape":
        questions = [f"What color is the {s}?" for s in SHAPES]
        blocks, answers = ["\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(names))], names
    else:
        questions = [TASK_SPECS["color"].question]
        blocks = ["\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(names[:k])) for k in range(2, len(names) + 1)]
        answers = names
    texts = [*questions, *blocks, *(f"{q}\n{b}" for q in questions for b in blocks)]
    texts += [f"The shape is {c}." for c in names] + [f"The {s} is {c}." for s in SHAPES for c in names]
    texts += [f"<think>The answer is {a}.</think> Answer: {LETTERS[j]}" for j, a in enumerate(answers)]
    return texts
