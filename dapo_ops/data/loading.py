"""Loading and validation of visual multiple-choice data in the A-OKVQA layout.

A source is a parquet file, a folder of parquet files (shards, optionally split by name: `train-*`,
`validation/`, `eval.parquet`, ...) or a `datasets.save_to_disk` folder (a Dataset or a DatasetDict).
Every row is checked; a row that fails goes to the quarantine table with a reason naming the row and
the problem, never silently dropped.

Split rule for `load_mc_dataset`: when a source holds several splits (a DatasetDict, or parquet files
named by split) it loads the `split` argument, else "train", else the only split there is; otherwise it
raises and lists the splits. It never concatenates splits, which would leak evaluation rows into
training. `load_mc_splits` returns both train and eval.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

# The A-OKVQA layout's columns, as the embedded dataset is written (`data.synthetic`) and a loaded one is kept.
AOKVQA_SCHEMA: dict[str, pl.DataType] = {
    "question_id": pl.String(),
    "question": pl.String(),
    "choices": pl.List(pl.String()),
    "correct_choice_idx": pl.Int64(),
    "image": pl.Binary(),
    "rationales": pl.List(pl.String()),
}
KEPT_SCHEMA: dict[str, pl.DataType] = {**AOKVQA_SCHEMA, "source_row": pl.Int64()}
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "question_id": pl.String(),
    "question": pl.String(),
    "source_row": pl.Int64(),
    "reason": pl.String(),
    "kind": pl.String(),  # the short problem names, "; "-joined, for grouping (e.g. "index out of range")
    "source_file": pl.String(),
}
INDEX_COLUMNS = ("correct_choice_idx", "label_idx")  # label_idx is a synonym
REQUIRED_COLUMNS = ("question", "choices", "image")
OPTIONAL_COLUMNS = ("question_id", "rationales")
_WANTED = (*REQUIRED_COLUMNS, *INDEX_COLUMNS, *OPTIONAL_COLUMNS)  # other columns are not read

# Split names as they appear in file/folder names, mapped to the split they mean. The eval split is the
# first of EVAL_SPLITS present: A-OKVQA's test split has no labels, so validation wins over test.
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "val", "val": "val", "eval": "eval", "evaluation": "eval",
    "dev": "dev", "test": "test",
}
EVAL_SPLITS = ("validation", "val", "eval", "dev", "test")
DEFAULT_EVAL_FRACTION = 0.1
_CHUNK_ROWS = 2048  # rows validated per chunk, so image bytes are not held twice in Python lists


@dataclass(frozen=True)
class _Part:
    """One table of a source: a parquet file or one split of a save_to_disk folder."""

    label: str  # how reasons and errors name it
    stem: str  # prefix of synthesized question ids
    image_dirs: tuple[Path, ...]  # where relative image paths are looked up, in order
    read: Callable[[], pl.DataFrame] = field(compare=False)  # the A-OKVQA columns, checked
    kinds: Callable[[], dict[str, str]] = field(compare=False, default=dict)  # column -> layouts.column_kind
    records: Callable[[list[str]], Iterator[list[dict[str, Any]]]] = field(compare=False, default=iter)


def _dtype_kind(dtype: pl.DataType) -> str:
    """The `layouts.column_kind` of a column type."""
    if dtype == pl.String:
        return "str"
    if isinstance(dtype, pl.List | pl.Array):
        return "list"
    if isinstance(dtype, pl.Struct):
        return "struct"
    if dtype == pl.Binary:
        return "bytes"
    return "null" if dtype == pl.Null else "other"


def _frame_records(frame: Callable[[list[str]], pl.DataFrame]) -> Callable[[list[str]], Iterator[list[dict[str, Any]]]]:
    def records(columns: list[str]) -> Iterator[list[dict[str, Any]]]:
        df = frame(columns)
        for start in range(0, df.height, _CHUNK_ROWS):
            yield df.slice(start, _CHUNK_ROWS).to_dicts()

    return records


def decode_image(data: bytes | bytearray | memoryview) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (transparent pixels composited on white)."""
    with Image.open(io.BytesIO(bytes(data))) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")


def _image_problem(data: bytes) -> str | None:
    """None when the bytes decode completely; else why not. Truncated data fails in `load()`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # DCT-domain downscaling still reads the whole entropy-coded stream (truncation is
                # caught) at a fraction of the cost of a full-size decode.
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            if img.width < 1 or img.height < 1:
                return "image has zero size"
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        return f"image does not decode ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------------------------------
# Source discovery


def _split_of(relative: Path) -> str | None:
    """The split a parquet file belongs to, from its folder names or file name tokens, if any."""
    for part in (*relative.parent.parts, relative.stem):
        for token in re.split(r"[-_.\s]+", part.lower()):
            if token in _SPLIT_ALIASES:
                return _SPLIT_ALIASES[token]
    return None


def _parquet_part(path: Path, source_dir: Path, label: str) -> _Part:
    dirs = tuple(dict.fromkeys((path.parent, source_dir)))

    def read() -> pl.DataFrame:
        try:
            names = list(pl.read_parquet_schema(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
        _check_columns(names, str(path))
        try:
            return pl.read_parquet(path, columns=[c for c in names if c in _WANTED])
        except Exception as exc:
            raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc

    def frame(columns: list[str]) -> pl.DataFrame:
        try:
            return pl.read_parquet(path, columns=columns)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc

    def kinds() -> dict[str, str]:
        try:
            return {name: _dtype_kind(dtype) for name, dtype in pl.read_parquet_schema(path).items()}
        except Exception as exc:
            raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc

    return _Part(label=label, stem=path.stem, image_dirs=dirs, read=read, kinds=kinds, records=_frame_records(frame))


def _jsonl_part(path: Path) -> _Part:
    """A JSON-lines file: one row per line; relative image paths are read from the file's folder. A line
    that is not a JSON object becomes a row holding `__error__`, quarantined with the line number."""
    import json

    def rows() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    value = {"__error__": f"line {number} is not valid JSON ({exc.msg})"}
                out.append(value if isinstance(value, dict) else {"__error__": f"line {number} is not a JSON object"})
        return out

    def kinds() -> dict[str, str]:
        from dapo_ops.data.layouts import column_kind

        found: dict[str, str] = {}
        for row in rows():
            for name, value in row.items():
                if name != "__error__" and found.get(name, "null") == "null":
                    found[name] = column_kind(value)
        return found

    def records(columns: list[str]) -> Iterator[list[dict[str, Any]]]:
        all_rows = rows()
        for start in range(0, len(all_rows), _CHUNK_ROWS):
            yield all_rows[start:start + _CHUNK_ROWS]

    def read() -> pl.DataFrame:
        raise ValueError(f"{path}: a JSONL source holds free-form layouts; load it with load_rl_dataset")

    return _Part(label=str(path), stem=path.stem, image_dirs=(path.parent,), read=read, kinds=kinds, records=records)


def _hf_part(dataset: Any, source: Path, split: str | None) -> _Part:
    label = f"{source}[{split}]" if split else str(source)
    stem = f"{source.name}-{split}" if split else source.name
    dirs = (source / split, source) if split else (source,)

    def read() -> pl.DataFrame:
        _check_columns(dataset.column_names, label)
        columns = [c for c in dataset.column_names if c in _WANTED]
        # The arrow format returns the stored table (Image features as {"bytes", "path"} structs)
        # without decoding images, and respects any index mapping of the saved dataset.
        table = dataset.select_columns(columns).with_format("arrow")[:]
        return pl.DataFrame(pl.from_arrow(table))

    def frame(columns: list[str]) -> pl.DataFrame:
        return pl.DataFrame(pl.from_arrow(dataset.select_columns(columns).with_format("arrow")[:]))

    def kinds() -> dict[str, str]:
        schema = pl.DataFrame(pl.from_arrow(dataset.with_format("arrow")[:0])).schema
        return {name: _dtype_kind(dtype) for name, dtype in schema.items()}

    return _Part(label=label, stem=stem, image_dirs=dirs, read=read, kinds=kinds, records=_frame_records(frame))


def _discover(source: Path) -> dict[str | None, list[_Part]]:
    """Split name -> the parts that hold it; key None for a source without splits."""
    if not source.exists():
        raise ValueError(f"dataset source {source} does not exist")
    if source.is_file():
        if source.suffix.lower() in (".jsonl", ".ndjson"):
            return {None: [_jsonl_part(source)]}
        return {None: [_parquet_part(source, source.parent, str(source))]}
    if (source / "dataset_dict.json").is_file() or (
        (source / "state.json").is_file() and (source / "dataset_info.json").is_file()
    ):
        import datasets  # lazy: only save_to_disk folders need it

        try:
            loaded = datasets.load_from_disk(str(source))
        except Exception as exc:
            raise ValueError(f"{source}: cannot load the datasets.save_to_disk folder ({type(exc).__name__}: {exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            return {_SPLIT_ALIASES.get(name.lower(), name): [_hf_part(ds, source, name)] for name, ds in loaded.items()}
        return {None: [_hf_part(loaded, source, None)]}
    files = sorted(
        p for p in source.rglob("*.parquet")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(source).parts)
    )
    if not files:
        raise ValueError(f"{source}: no parquet files and no datasets.save_to_disk data in this folder")
    splits = {f: _split_of(f.relative_to(source)) for f in files}
    named = any(s is not None for s in splits.values())
    layout: dict[str | None, list[_Part]] = {}
    for f, split in splits.items():
        if named and split is None:
            continue  # files beside named splits (e.g. quarantine.parquet) belong to no split
        layout.setdefault(split, []).append(_parquet_part(f, source, str(f)))
    return layout


def _pick_split(layout: dict[str | None, list[_Part]], source: Path, split: str | None) -> list[_Part]:
    if None in layout:
        if split is not None:
            raise ValueError(f"{source} has no splits; drop split={split!r} or point at a split folder/file")
        return layout[None]
    names = sorted(layout)
    if split is not None:
        key = _SPLIT_ALIASES.get(split.lower(), split)
        if key not in layout:
            raise ValueError(f"{source} has no split {split!r}; it has {', '.join(names)}")
        return layout[key]
    if "train" in layout:
        return layout["train"]
    if len(layout) == 1:
        return layout[names[0]]
    raise ValueError(f"{source} holds several splits ({', '.join(names)}) and none is 'train'; pass split=")


# ---------------------------------------------------------------------------------------------------
# Row validation


def _check_columns(names: list[str], label: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if not any(c in names for c in INDEX_COLUMNS):
        missing.append("correct_choice_idx (or label_idx)")
    if missing:
        raise ValueError(
            f"{label}: missing required column(s) {', '.join(missing)}; found {', '.join(names) or 'no columns'}"
        )


def _index(value: Any, column: str) -> tuple[int | None, tuple[str, str] | None]:
    """(index, None) or (None, (kind, message))."""
    if value is None:
        return None, ("missing index", f"{column} is missing")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()))
    ):
        return None, ("index not an integer", f"{column} {value!r} is not an integer")
    return int(value), None


def _string_list(value: Any) -> list[str]:
    """Rationales are optional: be lenient, keep whatever text there is."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [str(v) for v in value if v is not None]


def mc_problems(question: Any, choices: Any, index_value: Any, index_col: str) -> tuple[int | None, list[tuple[str, str]]]:
    """(answer index, problems as (kind, message)) of a multiple-choice row's question, choices and index."""
    problems: list[tuple[str, str]] = []
    if question is None:
        problems.append(("missing question", "question is missing"))
    elif not isinstance(question, str):
        problems.append(("question not a string", f"question is a {type(question).__name__}, not a string"))
    elif not question.strip():
        problems.append(("empty question", "question is empty"))
    choices_ok = False
    if choices is None:
        problems.append(("missing choices", "choices are missing"))
    elif isinstance(choices, str) or not isinstance(choices, list | tuple):
        problems.append(("choices not a list", f"choices is a {type(choices).__name__}, not a list"))
    elif len(choices) < 2:
        problems.append(("fewer than 2 choices", f"only {len(choices)} choice(s); need at least 2"))
    else:
        bad = [j for j, c in enumerate(choices) if not isinstance(c, str) or not c.strip()]
        if bad:
            problems.append(("empty choice", f"choice(s) {bad} empty or not strings"))
        else:
            choices_ok = True
    idx, problem = _index(index_value, index_col)
    if problem:
        problems.append(problem)
    elif choices_ok and not 0 <= idx < len(choices):
        problems.append(("index out of range", f"{index_col} {idx} out of range for {len(choices)} choices"))
    return idx, problems


class _Validator:
    """Validates the rows of one source part by part, numbering rows across the whole source."""

    schema: dict[str, pl.DataType] = KEPT_SCHEMA

    def __init__(self, source: Path, multi_part: bool) -> None:
        self.source = source
        self.multi_part = multi_part
        self.next_row = 0
        self.kept: list[pl.DataFrame] = []
        self.quarantined: list[dict[str, Any]] = []
        self.kinds: Counter[str] = Counter()
        self.seen_ids: dict[str, int] = {}

    def add_part(self, part: _Part) -> None:
        df = part.read()
        index_col = next(c for c in INDEX_COLUMNS if c in df.columns)
        fallback_col = "label_idx" if index_col == "correct_choice_idx" and "label_idx" in df.columns else None
        for offset, chunk in self._chunks(df):
            self.kept.append(self._chunk(chunk, part, offset, index_col, fallback_col))
        self.next_row += df.height

    @staticmethod
    def _chunks(df: pl.DataFrame) -> Iterator[tuple[int, pl.DataFrame]]:
        for start in range(0, df.height, _CHUNK_ROWS):
            yield start, df.slice(start, _CHUNK_ROWS)

    def quarantine(self, qid: str, question: Any, row: int, local: int, part: _Part,
                   problems: list[tuple[str, str]]) -> None:
        """Record a row that fails, with a reason naming the row (and its file in a multi-file source)."""
        where = f"row {row} (question_id={qid})"
        if self.multi_part:
            where += f" [{part.label} row {local}]"
        self.kinds.update(kind for kind, _ in problems)
        self.quarantined.append({
            "question_id": qid,
            "question": question if isinstance(question, str) else None,
            "source_row": row,
            "reason": f"{where}: " + "; ".join(msg for _, msg in problems),
            "kind": "; ".join(kind for kind, _ in problems),
            "source_file": part.label,
        })

    def _resolve_image(self, value: Any, part: _Part) -> tuple[bytes | None, tuple[str, str] | None]:
        if isinstance(value, dict):
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            return (data, None) if data else (None, ("image missing", "image bytes are empty"))
        if value is None:
            return None, ("image missing", "image is missing")
        if not isinstance(value, str) or not value.strip():
            return None, ("image missing", f"image {value!r} is neither bytes nor a path")
        path = Path(value)
        candidates = [path] if path.is_absolute() else [d / path for d in part.image_dirs]
        for candidate in candidates:
            try:
                if candidate.is_file():
                    return candidate.read_bytes(), None
            except OSError as exc:  # e.g. a name too long, or no permission
                return None, ("image unreadable", f"image file {candidate} cannot be read ({exc})")
        where = ", ".join(str(d) for d in part.image_dirs) if not path.is_absolute() else "absolute path"
        return None, ("image not found", f"image file {value!r} not found (looked in {where})")

    def _chunk(self, chunk: pl.DataFrame, part: _Part, offset: int, index_col: str, fallback_col: str | None) -> pl.DataFrame:
        n = chunk.height
        col = {c: chunk[c].to_list() if c in chunk.columns else [None] * n for c in _WANTED}
        index_values = col[index_col]
        if fallback_col:
            index_values = [v if v is not None else w for v, w in zip(index_values, col[fallback_col], strict=True)]
        out: dict[str, list[Any]] = {k: [] for k in KEPT_SCHEMA}
        for i in range(n):
            local = offset + i
            row = self.next_row + local
            raw_id = col["question_id"][i]
            qid = str(raw_id) if raw_id is not None and str(raw_id).strip() else f"{part.stem}-{local}"
            question = col["question"][i]
            choices = col["choices"][i]
            idx, problems = mc_problems(question, choices, index_values[i], index_col)

            image, problem = self._resolve_image(col["image"][i], part)
            if problem:
                problems.append(problem)
            elif (decode_problem := _image_problem(image)) is not None:
                problems.append(("image does not decode", decode_problem))

            if not problems and qid in self.seen_ids:
                problems.append(("duplicate question_id", f"question_id duplicates row {self.seen_ids[qid]}"))

            if problems:
                self.quarantine(qid, question, row, local, part, problems)
                continue
            self.seen_ids[qid] = row
            out["question_id"].append(qid)
            out["question"].append(question)
            out["choices"].append(list(choices))
            out["correct_choice_idx"].append(idx)
            out["image"].append(image)
            out["rationales"].append(_string_list(col["rationales"][i]))
            out["source_row"].append(row)
        return pl.DataFrame(out, schema=KEPT_SCHEMA)

    def result(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        kept = pl.concat(self.kept) if self.kept else pl.DataFrame(schema=self.schema)
        quarantined = pl.DataFrame(self.quarantined, schema=QUARANTINE_SCHEMA)
        if kept.height == 0:
            if self.next_row == 0:
                raise ValueError(f"{self.source}: no usable rows (the source has no rows)")
            summary = ", ".join(f"{count}x {kind}" for kind, count in self.kinds.most_common())
            raise ValueError(
                f"{self.source}: no usable rows; all {self.next_row} quarantined ({summary}); "
                f"first: {self.quarantined[0]['reason']}"
            )
        return kept, quarantined


def _load_parts(source: Path, parts: list[_Part]) -> tuple[pl.DataFrame, pl.DataFrame]:
    validator = _Validator(source, multi_part=len(parts) > 1)
    for part in parts:
        validator.add_part(part)
    return validator.result()


def load_mc_dataset(source: str | os.PathLike[str], *, split: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Load and validate an A-OKVQA-layout source; returns (kept rows, quarantined rows).

    kept: question_id, question, choices, correct_choice_idx (int64), image (encoded bytes that decode),
    rationales, source_row (0-based position in the source, counting across shards in sorted order).
    quarantined: question_id, question, source_row, reason, kind (short problem names), source_file.
    `split` picks a split of a multi-split source (default "train"; see the module docstring).
    Raises ValueError naming the source (or the file) when it cannot be read, lacks a required column,
    or has no usable row.
    """
    path = Path(source)
    return _load_parts(path, _pick_split(_discover(path), path, split))


def _hash_fraction(question_id: str) -> float:
    """A stable number in [0, 1) per question id (independent of Python's hash seed)."""
    digest = hashlib.blake2b(question_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _hash_split(
    kept: pl.DataFrame, quarantined: pl.DataFrame, eval_fraction: float
) -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    def is_eval(df: pl.DataFrame) -> pl.Series:
        return pl.Series([_hash_fraction(q) < eval_fraction for q in df["question_id"].to_list()], dtype=pl.Boolean)

    kept_eval, quar_eval = is_eval(kept), is_eval(quarantined)
    if not kept_eval.any() or kept_eval.all():
        # Too few rows for the fraction to land on both sides: move the row with the smallest (or
        # largest) hash across, so both splits have a usable row, still deterministically.
        fractions = [_hash_fraction(q) for q in kept["question_id"].to_list()]
        pick = min if not kept_eval.any() else max
        flip = pick(range(kept.height), key=fractions.__getitem__)
        kept_eval = kept_eval.scatter(flip, not kept_eval[flip])
    return {
        "train": (kept.filter(~kept_eval), quarantined.filter(~quar_eval)),
        "eval": (kept.filter(kept_eval), quarantined.filter(quar_eval)),
    }


def load_mc_splits(
    source: str | os.PathLike[str], *, eval_fraction: float = DEFAULT_EVAL_FRACTION
) -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    """{"train": (kept, quarantined), "eval": (kept, quarantined)} from a source.

    Uses the source's own splits when it has them: "train" and the first of validation, val, eval, dev,
    test (parquet files/folders named so, or a DatasetDict). Otherwise (or when only one split exists)
    splits deterministically by a stable hash of question_id, `eval_fraction` of rows to eval.
    """
    return load_splits(source, _load_parts, eval_fraction=eval_fraction)


Loaded = tuple[pl.DataFrame, pl.DataFrame]  # (kept, quarantined)


def load_splits(source: str | os.PathLike[str], load: Callable[[Path, list[_Part]], Loaded], *,
                eval_fraction: float) -> dict[str, Loaded]:
    """{"train": ..., "eval": ...} of `load(path, parts)`: the source's own train and eval splits, else one
    table (the unsplit source, its train split or its only split) split by `_hash_split`."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    path = Path(source)
    layout = _discover(path)
    eval_name = next((name for name in EVAL_SPLITS if name in layout), None)
    if "train" in layout and eval_name is not None:
        return {"train": load(path, layout["train"]), "eval": load(path, layout[eval_name])}
    if None in layout:
        parts = layout[None]
    elif "train" in layout:
        parts = layout["train"]
    elif len(layout) == 1:
        (parts,) = layout.values()
    else:
        raise ValueError(
            f"{path} holds splits {', '.join(sorted(str(k) for k in layout))} and none is 'train'; "
            "point at one split, or name the splits train and validation"
        )
    kept, quarantined = load(path, parts)
    if kept.height < 2:
        raise ValueError(f"{path}: only {kept.height} usable row; a train/eval split needs at least 2")
    return _hash_split(kept, quarantined, eval_fraction)
