"""Loading RL datasets in any layout (`layouts`): A-OKVQA multiple choice, TRL, verl, EasyR1.

`load_rl_dataset` reads the same sources as `data.load_mc_dataset` (a parquet file, a folder of parquet
shards or splits, a `datasets.save_to_disk` folder) plus a JSON-lines file (image paths relative to it),
detects the layout from the columns (or takes `layout`), and validates every row into one schema
(`RL_SCHEMA`): the prompt text with `<image>` marks, 1..N images, and either choices with the right index or a
free-form `solution`. A row that fails is quarantined with a reason naming the row and the problem; in
particular a row whose image placeholders (or image parts) and images disagree never reaches the model.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from dapo_ops.config.dapo import EMBEDDED
from dapo_ops.data import loading as data
from dapo_ops.data import synthetic
from dapo_ops.data.answers import answer_kind
from dapo_ops.data.layouts import AUTO, IMAGE_MARK, Keys, Layout, RawRow, detect_layout

if TYPE_CHECKING:
    from dapo_ops.config.dapo import DapoConfig

RL_SCHEMA: dict[str, pl.DataType] = {
    "question_id": pl.String(),
    "question": pl.String(),  # the user text; `<image>` marks where images go (none: images first)
    "choices": pl.List(pl.String()),  # null: a free-form question
    "correct_choice_idx": pl.Int64(),  # null: a free-form question
    "solution": pl.String(),  # the free-form answer (null for multiple choice)
    "answer_kind": pl.String(),  # choice, number, formula or word
    "image": pl.Binary(),  # the first image
    "images": pl.List(pl.Binary()),  # every image, in prompt order
    "num_images": pl.Int64(),
    "system_prompt": pl.String(),  # the dataset's own system message (wins over the built-in instruction)
    "rationales": pl.List(pl.String()),
    "source_row": pl.Int64(),
}


_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _solution(value: Any) -> tuple[str | None, tuple[str, str] | None]:
    """The answer as text: a number is written out, a list gives its first entry (VQA-style answer lists),
    `<answer> 3 </answer>` (R1-V's solutions) its content."""
    if isinstance(value, list | tuple):
        value = next((v for v in value if v is not None and str(v).strip()), None)
    if value is None or isinstance(value, bool | Mapping):
        return None, ("empty answer", "answer is missing" if value is None else f"answer {value!r} is not text")
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    tagged = _ANSWER_TAG_RE.search(text)
    text = tagged.group(1) if tagged else text
    return (text.strip(), None) if text.strip() else (None, ("empty answer", "answer is empty"))


class _RowValidator(data._Validator):
    """Validates rows of any layout into `RL_SCHEMA`."""

    schema = RL_SCHEMA

    def __init__(self, source: Path, multi_part: bool, layout: Layout, keys: Keys) -> None:
        super().__init__(source, multi_part)
        self.layout = layout
        self.keys = keys

    def _uses_marks(self, part: data._Part, kinds: Mapping[str, str]) -> bool:
        """Whether any prompt of `part` holds an `<image>` placeholder (reads the prompt column only)."""
        column = self.layout.keys(self.keys, kinds).prompt_key
        return any(IMAGE_MARK in str(record.get(column)) for records in part.records([column]) for record in records)

    def add_part(self, part: data._Part) -> None:
        kinds = part.kinds()
        detect_layout(kinds, self.keys, forced=self.layout.name, label=part.label)  # every part has the columns
        self.marks_used = self.layout.text_marks and self._uses_marks(part, kinds)
        local = 0
        for records in part.records(self.layout.columns(kinds, self.keys)):
            out: dict[str, list[Any]] = {k: [] for k in RL_SCHEMA}
            for record in records:
                self._row(record, kinds, part, local, out)
                local += 1
            self.kept.append(pl.DataFrame(out, schema=RL_SCHEMA))
        self.next_row += local

    def _images(self, raw: RawRow, part: data._Part, problems: list[tuple[str, str]]) -> list[bytes]:
        images: list[bytes] = []
        for k, value in enumerate(raw.images):
            image, problem = self._resolve_image(value, part)
            if problem is None and (decode := data._image_problem(image)) is not None:
                problem = ("image does not decode", decode)
            if problem is not None:
                kind, message = problem
                problems.append((kind, f"image {k}: {message}" if len(raw.images) > 1 else message))
            else:
                images.append(image)
        if not raw.images:
            problems.append(("no image", "the row has no image"))
        elif raw.marks is not None and raw.marks != len(raw.images):
            problems.append(("image count mismatch",
                             f"{raw.marks} image placeholder(s) in the prompt for {len(raw.images)} image(s)"))
        return images

    def _row(self, record: Mapping[str, Any], kinds: Mapping[str, str], part: data._Part, local: int,
             out: dict[str, list[Any]]) -> None:
        row = self.next_row + local
        if "__error__" in record:
            self.quarantine(f"{part.stem}-{local}", None, row, local, part, [("unreadable row", record["__error__"])])
            return
        raw = self.layout.row(record, kinds, self.keys)
        if self.layout.text_marks and not self.marks_used:
            raw.marks = None  # no placeholders anywhere in this source: the images go first
        qid = str(raw.question_id) if raw.question_id is not None and str(raw.question_id).strip() else f"{part.stem}-{local}"
        problems = list(raw.problems)
        text = raw.text
        idx, solution, kind = None, None, "choice"
        if raw.choices is not None or (self.layout.name == "aokvqa" and raw.solution is None):
            idx, found = data.mc_problems(text, raw.choices, raw.index, self.keys.answer_key or "correct_choice_idx")
            problems += found
        else:
            if not isinstance(text, str) or not text.replace(IMAGE_MARK, "").strip():
                problems.append(("no text", "the prompt has no text" if text is not None else "the prompt is missing"))
            solution, problem = _solution(raw.solution)
            if problem:
                problems.append(problem)
            else:
                kind = answer_kind(solution)
        images = self._images(raw, part, problems)
        if not problems and qid in self.seen_ids:
            problems.append(("duplicate question_id", f"question_id duplicates row {self.seen_ids[qid]}"))
        if problems:
            self.quarantine(qid, text, row, local, part, problems)
            return
        self.seen_ids[qid] = row
        values = {
            "question_id": qid, "question": text, "choices": list(raw.choices) if raw.choices is not None else None,
            "correct_choice_idx": idx, "solution": solution, "answer_kind": kind, "image": images[0],
            "images": images, "num_images": len(images), "system_prompt": raw.system_prompt,
            "rationales": raw.rationales, "source_row": row,
        }
        for name, value in values.items():
            out[name].append(value)


def _load(path: Path, parts: list[data._Part], layout: str, keys: Keys) -> tuple[pl.DataFrame, pl.DataFrame]:
    found = detect_layout(parts[0].kinds(), keys, forced=layout, label=parts[0].label)
    validator = _RowValidator(path, len(parts) > 1, found, keys)
    for part in parts:
        validator.add_part(part)
    return validator.result()


def source_layout(source: str | os.PathLike[str], *, layout: str = AUTO, prompt_key: str | None = None,
                  answer_key: str | None = None, image_key: str | None = None) -> str:
    """The layout name of `source` (read from its first table's columns, no rows); ValueError when unknown."""
    path = Path(source)
    parts = next(iter(data._discover(path).values()))
    return detect_layout(parts[0].kinds(), Keys(prompt_key, answer_key, image_key), forced=layout,
                         label=parts[0].label).name


def load_rl_dataset(
    source: str | os.PathLike[str], *, split: str | None = None, prompt_key: str | None = None,
    answer_key: str | None = None, image_key: str | None = None, layout: str = AUTO,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Load and validate a source in any layout; returns (kept rows in `RL_SCHEMA`, quarantined rows).

    The split rule is `data.load_mc_dataset`'s. `layout` ("auto", "aokvqa", "trl", "verl", "easyr1") forces a
    layout; `prompt_key`, `answer_key`, `image_key` name the columns to read. Raises ValueError naming the
    columns found when the layout cannot be told, and when no row is usable.
    """
    path = Path(source)
    return _load(path, data._pick_split(data._discover(path), path, split), layout,
                 Keys(prompt_key, answer_key, image_key))


def load_rl_splits(
    source: str | os.PathLike[str], *, eval_fraction: float = data.DEFAULT_EVAL_FRACTION, layout: str = AUTO,
    prompt_key: str | None = None, answer_key: str | None = None, image_key: str | None = None,
) -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    """`data.load_mc_splits` for any layout: the source's own train and eval splits, else a stable hash split."""
    keys = Keys(prompt_key, answer_key, image_key)
    return data.load_splits(source, lambda path, parts: _load(path, parts, layout, keys), eval_fraction=eval_fraction)


def dataset_answer_kinds(config: DapoConfig) -> set[str]:
    """{"choice"}, {"free"} or both: what the run's data asks (from the synthetic tasks, or the source's layout,
    read from its columns only). Raises the layout's ValueError for a source whose layout cannot be told."""
    if config.dataset == EMBEDDED:
        return synthetic.task_answer_kinds(config.synthetic_tasks)
    layout = source_layout(config.dataset, layout=config.dataset_layout, prompt_key=config.prompt_key,
                           answer_key=config.answer_key, image_key=config.image_key)
    return {"choice"} if layout == "aokvqa" else {"free"}


def config_for_dataset(config: DapoConfig) -> DapoConfig:
    """`config` with its default rewards following the data (`DapoConfig.for_answer_kinds`)."""
    return config.for_answer_kinds(dataset_answer_kinds(config))


def check_rewards_fit(reward_names: list[str], kinds: set[str], source: str) -> None:
    """Refuse free-form data scored for accuracy by `mc_idx_reward` alone (it reads choice letters only)."""
    free = kinds - {"choice"}
    if free and "mc_idx_reward" in reward_names and "accuracy_reward" not in reward_names:
        raise ValueError(
            f"{source} has free-form answers ({', '.join(sorted(free))}) but reward_funcs scores accuracy with "
            "mc_idx_reward only, which reads choice letters; add accuracy_reward to reward_funcs (with a weight)"
        )



def images_per_prompt(config: DapoConfig) -> tuple[int, str]:
    """(the most images a prompt of the run has, where that number comes from): `images_per_prompt` when set,
    else the dataset's image column (lists counted, no image decoded), else the synthetic tasks' (2 with
    `two_image_color`)."""
    if config.images_per_prompt is not None:
        return config.images_per_prompt, "images_per_prompt"
    if config.dataset == EMBEDDED:
        return (2 if "two_image_color" in config.synthetic_tasks else 1), "the synthetic tasks"
    path = Path(config.dataset)
    keys = Keys(config.prompt_key, config.answer_key, config.image_key)
    most = 1
    for parts in data._discover(path).values():
        for part in parts:
            kinds = part.kinds()
            layout = detect_layout(kinds, keys, forced=config.dataset_layout, label=part.label)
            columns = [c for c in ("images", layout.image_column(kinds, layout.keys(keys, kinds))) if c and c in kinds]
            for records in part.records(columns[:1]):
                for record in records:
                    value = record.get(columns[0]) if columns else None
                    if isinstance(value, list | tuple):
                        most = max(most, len(value))
    return most, str(path)


# ---------------------------------------------------------------------------------------------------
# make check-data

ANSWER_KIND_NAMES = {"choice": "choice letter", "number": "number", "formula": "formula", "word": "word"}


@dataclass
class DataCheck:
    """What `make check-data` reports about a source, without training."""

    source: str
    layout: str
    splits: dict[str, tuple[int, int]]  # split -> (usable rows, quarantined rows)
    quarantine_kinds: dict[str, int]  # problem kind -> rows with it
    quarantine_examples: dict[str, str]  # problem kind -> the first reason naming it
    images_per_prompt: dict[int, int]  # images -> usable rows
    answer_kinds: dict[str, int]  # choice letter / number / formula / word -> usable rows
    prompt_tokens: dict[str, float] | None = None  # min/mean/max/rows, in the model's tokens

    @property
    def usable(self) -> int:
        return sum(kept for kept, _ in self.splits.values())

    def render(self) -> str:
        lines = [f"dataset: {self.source}", f"layout: {self.layout}", "splits:"]
        lines += [f"  {name}: {kept} usable, {quarantined} quarantined" for name, (kept, quarantined) in self.splits.items()]
        lines.append("quarantined by kind:" if self.quarantine_kinds else "quarantined by kind: none")
        for kind, count in self.quarantine_kinds.items():
            lines.append(f"  {kind}: {count}  (e.g. {self.quarantine_examples[kind]})")
        lines.append("images per prompt: " + ", ".join(f"{n}: {c}" for n, c in self.images_per_prompt.items()))
        lines.append("answer kinds: " + ", ".join(f"{k}: {c}" for k, c in self.answer_kinds.items()))
        if self.prompt_tokens is not None:
            t = self.prompt_tokens
            lines.append(f"prompt tokens (model): min {t['min']:.0f}, mean {t['mean']:.1f}, max {t['max']:.0f} "
                         f"over {t['rows']:.0f} rows")
        lines.append(f"usable rows: {self.usable}" + ("" if self.usable else " -- nothing to train on"))
        return "\n".join(lines)


def check_dataset(
    source: str | os.PathLike[str], *, layout: str = AUTO, prompt_key: str | None = None,
    answer_key: str | None = None, image_key: str | None = None,
    count_prompt_tokens: Callable[[pl.DataFrame], list[int]] | None = None,
) -> DataCheck:
    """Load and validate every split of `source` (nothing is written) into a `DataCheck`. With
    `count_prompt_tokens` (rows -> each prompt's length in a model's tokens) the prompt lengths too.
    Raises ValueError when the source cannot be read or its layout cannot be told."""
    path = Path(source)
    keys = Keys(prompt_key, answer_key, image_key)
    found = data._discover(path)
    first = next(iter(found.values()))[0]
    detected = detect_layout(first.kinds(), keys, forced=layout, label=first.label)
    splits: dict[str, tuple[int, int]] = {}
    kept_frames: list[pl.DataFrame] = []
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for name, parts in found.items():
        validator = _RowValidator(path, len(parts) > 1, detected, keys)
        for part in parts:
            validator.add_part(part)
        kept = pl.concat(validator.kept) if validator.kept else pl.DataFrame(schema=RL_SCHEMA)
        kept_frames.append(kept)
        splits[name or "all"] = (kept.height, len(validator.quarantined))
        for row in validator.quarantined:
            for kind in row["kind"].split("; "):
                kinds[kind] += 1
                examples.setdefault(kind, row["reason"])
    kept = pl.concat(kept_frames)
    tokens = None
    if count_prompt_tokens is not None and kept.height:
        counts = count_prompt_tokens(kept)
        tokens = {"min": min(counts), "mean": sum(counts) / len(counts), "max": max(counts), "rows": len(counts)}
    return DataCheck(
        source=str(path), layout=detected.name, splits=splits, quarantine_kinds=dict(kinds.most_common()),
        quarantine_examples=examples,
        images_per_prompt=dict(sorted(Counter(kept["num_images"].to_list()).items())),
        answer_kinds={ANSWER_KIND_NAMES[k]: c for k, c in Counter(kept["answer_kind"].to_list()).most_common()},
        prompt_tokens=tokens,
    )
