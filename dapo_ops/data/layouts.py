"""Dataset layouts: how the trainers' datasets spell a prompt, its images and its answer.

Each layout is one `Layout` subclass in `LAYOUTS` (a new layout is one more class): it says from the columns
whether a source is in its layout (`matches`), which columns to read, and turns one source row into a
`RawRow`, the one schema `data` validates (text with `<image>` marks where images go, the images, the answer).

- `aokvqa`: `question`, `choices`, `correct_choice_idx` (or `label_idx`), one `image` (multiple choice).
- `trl`: TRL's conversational `prompt` (messages whose content holds `{"type": "image"}` parts), an `image` or
  `images` column, the answer in `solution` (TRL's `accuracy_reward` column).
- `verl`: `prompt` chat messages whose text holds `<image>` placeholders, `images` (a list of {bytes, path}),
  `reward_model: {style, ground_truth}` (verl's examples/data_preprocess/geo3k.py).
- `easyr1`: `problem` with `<image>` placeholders, `answer`, `images` (EasyR1's examples/config.yaml).

`prompt_key`, `answer_key` and `image_key` (EasyR1's names) rename the columns a layout reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

IMAGE_MARK = "<image>"  # where an image goes in a prompt's text (verl's and EasyR1's placeholder)

LAYOUT_NAMES: tuple[str, ...] = ("aokvqa", "trl", "verl", "easyr1")
AUTO = "auto"
ID_COLUMNS = ("question_id", "id", "uid")


@dataclass(frozen=True)
class Keys:
    """EasyR1's column keys; None = the layout's own name."""

    prompt_key: str | None = None
    answer_key: str | None = None
    image_key: str | None = None

    def given(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class RawRow:
    """One source row in the common schema, before validation.

    `text`: the user text, `<image>` marking each image's place (no mark: the images go first); `marks`: how
    many places the prompt gives images (None: the layout puts them itself); `images`: raw values (bytes,
    {bytes, path} structs, paths); `choices`/`index` for multiple choice, else `solution`.
    """

    text: Any
    images: list[Any]
    marks: int | None = None
    system_prompt: str | None = None
    choices: Any = None
    index: Any = None
    solution: Any = None
    rationales: list[str] = field(default_factory=list)
    question_id: Any = None
    problems: list[tuple[str, str]] = field(default_factory=list)


def column_kind(value: Any) -> str:
    """"str", "list", "struct", "bytes", "null" or "other" for one value (JSON rows, Python objects)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, Mapping):
        return "struct"
    if isinstance(value, Sequence):
        return "list"
    return "other"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes | bytearray | memoryview | Mapping) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _string_list(value: Any) -> list[str]:
    return [str(v) for v in _as_list(value) if v is not None and str(v).strip()]


def _first_id(record: Mapping[str, Any]) -> Any:
    return next((record[c] for c in ID_COLUMNS if record.get(c) is not None), None)


def _messages_text(messages: Any, *, parts_mark: bool) -> tuple[str | None, str | None, int, str | None]:
    """(system text, user text, image marks, problem) of a chat-message list. Image parts become `<image>`
    marks when `parts_mark`; text placeholders `<image>` are counted either way. Non-system turns are joined."""
    if isinstance(messages, str):
        return None, messages, messages.count(IMAGE_MARK), None
    if not isinstance(messages, Sequence) or not messages:
        return None, None, 0, "prompt is not a list of chat messages"
    system: list[str] = []
    turns: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping) or "content" not in message:
            return None, None, 0, "a prompt message has no content"
        content = message["content"]
        pieces: list[str] = []
        for part in [content] if isinstance(content, str) else _as_list(content):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("image", "image_url") and parts_mark:
                pieces.append(IMAGE_MARK)
            elif isinstance(part, Mapping) and part.get("text") is not None:
                pieces.append(str(part["text"]))
        text = "".join(pieces)
        (system if message.get("role") == "system" else turns).append(text)
    user = "\n".join(t for t in turns if t)
    return ("\n".join(system) or None), user, user.count(IMAGE_MARK), None


class Layout:
    """A dataset layout: its name, its default keys, how to recognise it, how to read a row."""

    name: ClassVar[str]
    defaults: ClassVar[Keys]
    # Whether prompts place images with `<image>` placeholders in their text (verl, EasyR1). A source whose
    # prompts hold none at all gets its images before the text; once a source uses them, every row must
    # have one per image (a row that lost one, e.g. to truncation, is quarantined).
    text_marks: ClassVar[bool] = False

    def keys(self, given: Keys, kinds: Mapping[str, str] | None = None) -> Keys:
        """The columns read: the given keys, else the layout's own names."""
        return Keys(
            prompt_key=given.prompt_key or self.defaults.prompt_key,
            answer_key=given.answer_key or self.defaults.answer_key,
            image_key=given.image_key or self.defaults.image_key,
        )

    def image_column(self, kinds: Mapping[str, str], keys: Keys) -> str | None:
        return keys.image_key if keys.image_key in kinds else None

    def matches(self, kinds: Mapping[str, str], given: Keys) -> bool:
        """True when columns (name -> kind) hold this layout's prompt, answer and images."""
        keys = self.keys(given, kinds)
        return (keys.prompt_key in kinds and keys.answer_key in kinds
                and self.image_column(kinds, keys) is not None and self._kinds_fit(kinds, keys))

    def _kinds_fit(self, kinds: Mapping[str, str], keys: Keys) -> bool:
        return True

    def columns(self, kinds: Mapping[str, str], given: Keys) -> list[str]:
        """The columns to read (the layout's own plus any id column)."""
        keys = self.keys(given, kinds)
        wanted = [keys.prompt_key, keys.answer_key, self.image_column(kinds, keys), *self.extra, *ID_COLUMNS]
        return [c for c in dict.fromkeys(wanted) if c and c in kinds]

    extra: ClassVar[tuple[str, ...]] = ()

    def row(self, record: Mapping[str, Any], kinds: Mapping[str, str], given: Keys) -> RawRow:
        raise NotImplementedError


class AOKVQA(Layout):
    """A-OKVQA multiple choice; also the embedded data's own extension: an `images` list (several images per
    prompt) and rows with null `choices` and a `solution` (free form)."""

    name = "aokvqa"
    defaults = Keys("question", "correct_choice_idx", "image")
    extra = ("choices", "label_idx", "rationales", "images", "solution")

    def keys(self, given: Keys, kinds: Mapping[str, str] | None = None) -> Keys:
        keys = super().keys(given, kinds)
        if (given.answer_key is None and kinds is not None and keys.answer_key not in kinds
                and "label_idx" not in kinds and kinds.get("answer") == "other"):
            # ScienceQA-style multiple choice: `choices` and an integer `answer` (the right index).
            return Keys(keys.prompt_key, "answer", keys.image_key)
        return keys

    def matches(self, kinds: Mapping[str, str], given: Keys) -> bool:
        keys = self.keys(given, kinds)
        has_index = keys.answer_key in kinds or (given.answer_key is None and "label_idx" in kinds)
        return keys.prompt_key in kinds and "choices" in kinds and has_index and keys.image_key in kinds

    def row(self, record: Mapping[str, Any], kinds: Mapping[str, str], given: Keys) -> RawRow:
        keys = self.keys(given, kinds)
        index = record.get(keys.answer_key)
        if index is None and given.answer_key is None:
            index = record.get("label_idx")
        question = record.get(keys.prompt_key)
        images = record.get("images") if given.image_key is None and record.get("images") else None
        return RawRow(text=question, images=list(images) if images else [record.get(keys.image_key)],
                      choices=record.get("choices"), index=index, solution=record.get("solution"),
                      rationales=_string_list(record.get("rationales")), question_id=_first_id(record))


class TRL(Layout):
    name = "trl"
    defaults = Keys("prompt", "solution", "images")

    def image_column(self, kinds: Mapping[str, str], keys: Keys) -> str | None:
        return next((c for c in (keys.image_key, "images", "image") if c in kinds), None)

    def _kinds_fit(self, kinds: Mapping[str, str], keys: Keys) -> bool:
        return kinds[keys.prompt_key] == "list"  # TRL's VLM prompts are conversational

    def row(self, record: Mapping[str, Any], kinds: Mapping[str, str], given: Keys) -> RawRow:
        keys = self.keys(given, kinds)
        system, text, marks, problem = _messages_text(record.get(keys.prompt_key), parts_mark=True)
        images = _as_list(record.get(self.image_column(kinds, keys) or ""))
        # TRL's prepare_multimodal_messages puts the images first when the prompt has no image part.
        row = RawRow(text=text, images=images, marks=marks or None, system_prompt=system,
                     solution=record.get(keys.answer_key), question_id=_first_id(record))
        if problem:
            row.problems.append(("prompt not messages", problem))
        return row


class Verl(Layout):
    name = "verl"
    defaults = Keys("prompt", "reward_model", "images")
    text_marks = True
    extra = ("data_source", "extra_info")

    def _kinds_fit(self, kinds: Mapping[str, str], keys: Keys) -> bool:
        return kinds[keys.prompt_key] in ("list", "str") and (keys.answer_key == "reward_model"
                                                              or kinds[keys.answer_key] == "struct")

    def row(self, record: Mapping[str, Any], kinds: Mapping[str, str], given: Keys) -> RawRow:
        keys = self.keys(given, kinds)
        system, text, marks, problem = _messages_text(record.get(keys.prompt_key), parts_mark=False)
        answer = record.get(keys.answer_key)
        if isinstance(answer, Mapping):
            answer = answer.get("ground_truth")
        extra = record.get("extra_info")
        qid = _first_id(record)
        if qid is None and isinstance(extra, Mapping) and extra.get("index") is not None:
            qid = f"{record.get('data_source') or 'verl'}-{extra.get('split') or 'row'}-{extra['index']}"
        row = RawRow(text=text, images=_as_list(record.get(keys.image_key)), marks=marks, system_prompt=system,
                     solution=answer, question_id=qid)
        if problem:
            row.problems.append(("prompt not messages", problem))
        return row


class EasyR1(Layout):
    """EasyR1's plain-text prompts. Auto-detection also takes the names other free-form VLM datasets use
    (R1-V / open-r1 multimodal `problem, solution, image`; ChartQA `query, label`; VQA `question, answer`)."""

    name = "easyr1"
    defaults = Keys("problem", "answer", "images")
    text_marks = True
    synonyms: ClassVar[dict[str, tuple[str, ...]]] = {
        "prompt_key": ("problem", "question", "query", "prompt"),
        "answer_key": ("answer", "solution", "ground_truth", "label", "answers"),
        "image_key": ("images", "image", "decoded_image"),
    }

    def keys(self, given: Keys, kinds: Mapping[str, str] | None = None) -> Keys:
        def pick(name: str) -> str | None:
            explicit = getattr(given, name)
            if explicit or kinds is None:
                return explicit or getattr(self.defaults, name)
            present = [c for c in self.synonyms[name] if c in kinds]
            if name == "image_key":  # MathVista: `image` holds a path string, `decoded_image` the image
                present = [c for c in present if kinds[c] != "str"] or present
            return next(iter(present), getattr(self.defaults, name))

        return Keys(pick("prompt_key"), pick("answer_key"), pick("image_key"))

    def _kinds_fit(self, kinds: Mapping[str, str], keys: Keys) -> bool:
        return kinds[keys.prompt_key] in ("str", "null")

    def row(self, record: Mapping[str, Any], kinds: Mapping[str, str], given: Keys) -> RawRow:
        keys = self.keys(given, kinds)
        text = record.get(keys.prompt_key)
        marks = text.count(IMAGE_MARK) if isinstance(text, str) else 0
        return RawRow(text=text, images=_as_list(record.get(keys.image_key)), marks=marks,
                      solution=record.get(keys.answer_key), question_id=_first_id(record))


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (AOKVQA(), Verl(), TRL(), EasyR1())}


def detect_layout(kinds: Mapping[str, str], given: Keys, *, forced: str = AUTO, label: str = "source") -> Layout:
    """The layout of a source with columns `kinds` (name -> kind): `forced` when not "auto", else the first of
    aokvqa, verl, trl, easyr1 that matches. Raises ValueError naming the columns found and the keys to set."""
    if forced != AUTO:
        if forced not in LAYOUTS:
            raise ValueError(f"dataset_layout={forced!r} is unknown; use auto or one of {', '.join(LAYOUT_NAMES)}")
        layout = LAYOUTS[forced]
        keys = layout.keys(given, kinds)
        missing = [k for k in (keys.prompt_key, keys.answer_key) if k not in kinds]
        if layout.image_column(kinds, keys) is None:
            missing.append(keys.image_key or "image")
        if missing:
            raise ValueError(
                f"{label}: dataset_layout={forced} needs column(s) {', '.join(map(str, missing))}; found "
                f"{', '.join(kinds) or 'no columns'}; set prompt_key, answer_key and image_key to the columns to read"
            )
        return layout
    for layout in LAYOUTS.values():
        if layout.matches(kinds, given):
            return layout
    raise ValueError(
        f"{label}: cannot tell the dataset layout from its columns ({', '.join(kinds) or 'no columns'}); expected "
        "aokvqa (question, choices, correct_choice_idx, image), trl (prompt, solution, image|images), verl "
        "(prompt, reward_model, images) or easyr1 (problem, answer, images). Set dataset_layout to one of "
        f"{', '.join(LAYOUT_NAMES)} and prompt_key, answer_key, image_key to the columns that hold the prompt, "
        "the answer and the images"
    )
