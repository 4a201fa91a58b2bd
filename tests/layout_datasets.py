"""Datasets in the TRL, verl and EasyR1 layouts, made the way their users make them (with `datasets`), plus a
few bad rows each. Shared by the tests; `python -m tests.layout_datasets verl out.parquet` writes one by hand."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from dapo_ops.data import synthetic

COLORS = list(synthetic.COLORS)
INSTRUCTION = " You FIRST think about the reasoning process as an internal monologue and then provide the final " \
              "answer. The final answer MUST BE put in \\boxed{}."  # verl's geo3k instruction_following


def shapes_image(count: int, seed: int, size: int = 56) -> Image.Image:
    """`count` (1-4) small shapes on the synthetic data's gray background."""
    return synthetic._scene("count", count - 1, size, np.random.default_rng(seed))  # noqa: SLF001 - test data


def corrupt_png() -> bytes:
    buffer = io.BytesIO()
    shapes_image(1, 0).save(buffer, format="PNG")
    return buffer.getvalue()[:40]


def _counts(n: int) -> list[int]:
    return [1 + (i % 4) for i in range(n)]


def trl_dataset(n: int = 12, *, images_column: bool = False) -> datasets.Dataset:
    """TRL's VLM layout: conversational `prompt` with an image part, `image` (or `images`), `solution`;
    the last row's prompt has two image parts for its one image (a mismatch)."""
    rows: dict[str, list] = {"prompt": [], "image": [], "solution": []}
    for i, count in enumerate(_counts(n)):
        parts = [{"type": "image", "text": None}, {"type": "text", "text": "How many shapes are in the image?"}]
        if i == n - 1:
            parts = [{"type": "image", "text": None}, *parts]
        rows["prompt"].append([{"role": "user", "content": parts}])
        rows["image"].append(shapes_image(count, i))
        rows["solution"].append(str(count))
    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "image": datasets.Image(),
        "solution": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_dict(rows, features=features)
    if images_column:
        ds = ds.map(lambda row: {"images": [row["image"]]}, remove_columns=["image"])
    return ds


def verl_dataset(n: int = 12) -> datasets.Dataset:
    """verl's geo3k layout; row 1 has an empty ground truth, row 2 two `<image>` for one image, row 3 an image
    that does not decode."""
    rows: dict[str, list] = {"data_source": [], "prompt": [], "images": [], "ability": [], "reward_model": [],
                             "extra_info": []}
    for i, count in enumerate(_counts(n)):
        problem = "<image>How many shapes are in the picture?"
        if i == 2:
            problem = "<image><image>How many shapes are in the picture?"
        image = {"bytes": corrupt_png(), "path": None} if i == 3 else shapes_image(count, i)
        rows["data_source"].append("local/shapes")
        rows["prompt"].append([{"role": "user", "content": problem + INSTRUCTION}])
        rows["images"].append([image])
        rows["ability"].append("math")
        rows["reward_model"].append({"style": "rule", "ground_truth": "" if i == 1 else str(count)})
        rows["extra_info"].append({"split": "train", "index": i, "answer": str(count), "question": problem})
    features = datasets.Features({
        "data_source": datasets.Value("string"),
        "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "images": [datasets.Image()],
        "ability": datasets.Value("string"),
        "reward_model": {"style": datasets.Value("string"), "ground_truth": datasets.Value("string")},
        "extra_info": {"split": datasets.Value("string"), "index": datasets.Value("int64"),
                       "answer": datasets.Value("string"), "question": datasets.Value("string")},
    })
    return datasets.Dataset.from_dict(rows, features=features)


def easyr1_dataset(n: int = 12) -> datasets.Dataset:
    """EasyR1's layout: `problem` with `<image>` placeholders, `answer`, `images`; every third row has two
    images (which is larger), row 1 has no text besides its placeholder, row 2 an image too few."""
    rows: dict[str, list] = {"problem": [], "answer": [], "images": []}
    for i, count in enumerate(_counts(n)):
        if i % 3 == 0:
            other = 1 + (count % 4)
            rows["problem"].append("<image> <image> Which picture has more shapes, the first or the second?")
            rows["answer"].append("first" if count > other else "second")
            rows["images"].append([shapes_image(count, i), shapes_image(other, 100 + i)])
        else:
            rows["problem"].append("<image>" if i == 1 else "<image> <image> How many shapes?" if i == 2
                                   else "<image>How many shapes are there?")
            rows["answer"].append(str(count))
            rows["images"].append([shapes_image(count, i)])
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": [datasets.Image()]})
    return datasets.Dataset.from_dict(rows, features=features)


BUILDERS = {"trl": trl_dataset, "verl": verl_dataset, "easyr1": easyr1_dataset}


def write(layout: str, out: Path, n: int = 12) -> Path:
    """The layout's dataset as a parquet file (`.parquet`) or a save_to_disk folder (any other name)."""
    ds = BUILDERS[layout](n)
    if out.suffix == ".parquet":
        ds.to_parquet(str(out))
    else:
        ds.save_to_disk(str(out))
    return out


if __name__ == "__main__":
    write(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 12)
