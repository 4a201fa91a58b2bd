"""Write a small visual multiple-choice dataset in the A-OKVQA layout that no test ships, for trying
`make run DATASET=<dir>` as a new user would.

It differs from the embedded generator on purpose: other wording, 64x64 images on a light background,
eight colors and six shapes, 2 to 8 shuffled choices per question, and yes/no questions with negations
("Is the figure not green?"). Columns: question_id, question, choices, correct_choice_idx, direct_answers,
rationales, image ({"bytes", "path"} struct), as in the released A-OKVQA parquet files.

    python scripts/make_unseen_dataset.py /tmp/unseen --train 2048 --eval 256 --seed 7
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30), "orange": (245, 140, 0), "yellow": (235, 220, 20), "green": (30, 160, 50),
    "cyan": (0, 200, 210), "blue": (30, 60, 220), "purple": (140, 40, 180), "black": (20, 20, 20),
}
FIGURES = ("disk", "box", "triangle", "plus", "diamond", "bar")
KINDS = ("colour", "figure", "yes_no")


def _draw(draw: ImageDraw.ImageDraw, figure: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    if figure == "disk":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif figure == "box":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif figure == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif figure == "plus":
        w = 0.35 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif figure == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # bar: a wide horizontal rectangle
        draw.rectangle((cx - r, cy - 0.35 * r, cx + r, cy + 0.35 * r), fill=fill)


def _image(figure: str, colour: str, size: int, rng: np.random.Generator) -> bytes:
    shade = int(rng.integers(200, 246))
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    r = float(rng.uniform(0.24, 0.34)) * size
    cx, cy = (float(rng.uniform(r + 1, size - r - 1)) for _ in range(2))
    _draw(ImageDraw.Draw(img), figure, cx, cy, r, COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _choices(answer: str, pool: tuple[str, ...], rng: np.random.Generator) -> tuple[list[str], int]:
    """The answer plus 1-7 distractors from `pool` (capped by its size), shuffled."""
    k = int(rng.integers(2, min(8, len(pool)) + 1))
    others = [p for p in pool if p != answer]
    picked = [answer, *rng.choice(others, size=k - 1, replace=False).tolist()]
    order = rng.permutation(k)
    shuffled = [picked[i] for i in order]
    return shuffled, shuffled.index(answer)


def make_row(i: int, split: str, size: int, rng: np.random.Generator) -> dict:
    figure = FIGURES[int(rng.integers(len(FIGURES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "colour":
        question = ["Which colour is the object?", "What is the colour of the figure drawn here?"][int(rng.integers(2))]
        choices, idx = _choices(colour, tuple(COLOURS), rng)
        rationale = f"The {figure} is painted {colour}."
    elif kind == "figure":
        question = ["Which figure is drawn?", "What kind of object do you see?"][int(rng.integers(2))]
        choices, idx = _choices(figure, FIGURES, rng)
        rationale = f"The picture shows a {colour} {figure}."
    else:
        asked = colour if rng.random() < 0.5 else list(COLOURS)[int(rng.integers(len(COLOURS)))]
        negated = bool(rng.random() < 0.5)
        question = f"Is the figure {'not ' if negated else ''}{asked}?"
        truth = (colour == asked) != negated
        choices = ["yes", "no"] if rng.random() < 0.5 else ["no", "yes"]
        idx = choices.index("yes" if truth else "no")
        rationale = f"The figure is {colour}, so the answer is {choices[idx]}."
    return {
        "question_id": f"unseen-{split}-{i:05d}",
        "question": question,
        "choices": choices,
        "correct_choice_idx": idx,
        "direct_answers": [choices[idx]] * 10,
        "rationales": [rationale],
        "image": {"bytes": _image(figure, colour, size, rng), "path": None},
    }


def write_split(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", args.train, 0), ("validation", args.eval, 1)):
        rng = np.random.default_rng([args.seed, offset])
        write_split(args.out_dir / f"{split}.parquet", [make_row(i, split, args.image_size, rng) for i in range(n)])
    print(f"wrote {args.train} train and {args.eval} validation rows to {args.out_dir}")


if __name__ == "__main__":
    main()
