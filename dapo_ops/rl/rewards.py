"""Reward functions with TRL's reward-function signature, their registry, and the one scorer of a round.

Every function is `f(prompts, completions, completion_ids, **columns) -> list[float | None]`: TRL passes `prompts`,
`completions`, `completion_ids` and each dataset column as keyword lists with one entry per rollout.
`completions` are plain strings or conversational message lists (`[{"role": "assistant", "content": ...}]`).
`None` means "not applicable to this rollout" (TRL's convention): `total_rewards` counts it as 0 and batch
means should leave it out.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dapo_ops.common.names import attn_column
from dapo_ops.config.registry import (
    DEFAULT_REWARD_FUNCS,
    REWARD_FUNCTIONS,
    RewardFunction,
    needs_attention,
    register_reward,
    resolve_reward,
    reward_name,
)
from dapo_ops.data.answers import answers_match, as_number, final_answer

if TYPE_CHECKING:  # only for annotations: polars is not needed to score
    import polars as pl

    from dapo_ops.config.dapo import DapoConfig

__all__ = [
    "ACCURACY_REWARDS",
    "DEFAULT_REWARD_FUNCS",
    "accuracy_reward",
    "accuracy_reward_name",
    "answer_correct",
    "REWARD_FUNCTIONS",
    "THINK_FORMAT_PATTERN",
    "completion_text",
    "extract_choice",
    "mc_idx_reward",
    "mdi_balance",
    "mdi_reward",
    "needs_attention",
    "register_reward",
    "resolve_reward",
    "reward_name",
    "score_completions",
    "score_rollouts",
    "think_format_reward",
    "total_rewards",
]

DEFAULT_NUM_CHOICES = 4  # A-OKVQA always has four choices; used only when no `choices` column arrives.

# TRL's `think_format_reward` pattern and flags, verbatim (trl/rewards/format_rewards.py).
THINK_FORMAT_PATTERN = r"^<think>(?!.*<think>)(.*?)</think>.*$"
_THINK_FORMAT_RE = re.compile(THINK_FORMAT_PATTERN, re.DOTALL | re.MULTILINE)


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself, or the content of the first message (TRL's convention).

    Multimodal content given as a list of parts (`[{"type": "text", "text": ...}]`) is joined.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
    elif isinstance(completion, Sequence) and len(completion) > 0:
        first = completion[0]
        content = first.get("content", "") if isinstance(first, dict) else first
    else:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in content]
        return "".join(p for p in parts if p)
    return "" if content is None else str(content)


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------

# A letter is "standalone" when it is not part of a word, a contraction ("I'm"), a hyphenation ("X-ray") or an
# abbreviation ("e.g.", "U.S.").
_NOT_BEFORE = r"(?<![A-Za-z0-9_'’.])"
_NOT_AFTER = r"(?![A-Za-z0-9_'’]|-[A-Za-z]|\.[A-Za-z])"
_OPEN = "([{【"
_CLOSE = ")]}】"

# Explicit answer statements, strongest first. Within one kind the first occurrence wins.
_CUE_RE = re.compile(
    r"(?:\banswer\b|\bans\b|答案|答)"
    r"[ \t]*(?:(?:is|was|would[ \t]+be|should[ \t]+be|will[ \t]+be|为|是|选|選|:|=|-)[ \t]*)*"
    r"(?:(?:option|choice|letter|选项)[ \t]*)?"
    r"(?P<open>[(\[{【]?)[ \t]*(?P<letter>[A-Za-z])[ \t]*(?P<close>[)\]}】]?)" + _NOT_AFTER,
    re.IGNORECASE,
)
_BRACKET_RE = re.compile(r"[\[【][ \t]*(?P<letter>[A-Za-z])[ \t]*[\]】]")
_LINE_START_RE = re.compile(r"^[ \t]*\(?(?P<letter>[A-Za-z])[.)](?=\s|$)", re.MULTILINE)
_STANDALONE_RE = re.compile(_NOT_BEFORE + r"(?P<letter>[A-Za-z])" + _NOT_AFTER)

# After "A"/"I" these words make the letter a choice ("A is correct"); any other lower-case word makes it the
# English article or pronoun ("A cat sits", "I think").
_A_VERBS = "is|was|seems|looks|matches|fits|would|should|must|has|appears|describes|corresponds"
_I_VERBS = "is|seems|looks|matches|fits|has|appears|describes|corresponds"
_WORD_AFTER_RE = re.compile(r"[ \t]+(?P<word>[a-z]+)")
_ON_LINE_ALONE_RE = re.compile(r"[ \t]*[.):!]?[ \t]*(?:\n|$)")
_MARK_AFTER_RE = re.compile(r"[.):](?:\s|$)")
_CHOICE_WORD_BEFORE_RE = re.compile(r"(?:option|choice|letter)[ \t]*$", re.IGNORECASE)


def _answer_region(text: str) -> str:
    """The text after the last `</think>` when present, else the whole text; full-width forms folded (NFKC)."""
    _, sep, after = text.rpartition("</think>")
    return unicodedata.normalize("NFKC", after if sep else text)


def _reads_as_word(text: str, start: int, end: int) -> bool:
    """True when the letter text[start:end] is an English word ("a cat", "A cat", "I think") rather than a choice."""
    letter = text[start:end]
    if not (letter.islower() or letter in "AI"):
        return False
    match = _WORD_AFTER_RE.match(text, end)
    if match is None:
        return False
    if letter.islower():
        return True
    verbs = _A_VERBS if letter == "A" else _I_VERBS
    return re.fullmatch(verbs, match.group("word")) is None


def _is_marked(text: str, start: int, end: int) -> bool:
    """True when a lower-case letter, "A" or "I" is used as a choice label rather than as a word."""
    before = text[:start].rstrip(" \t")
    if start > 0 and text[start - 1] in _OPEN and end < len(text) and text[end] in _CLOSE:
        return True  # (a), [A], 【I】
    line_start = before == "" or before.endswith("\n")
    if line_start and _ON_LINE_ALONE_RE.match(text, end):
        return True  # the letter is the whole line, maybe with one punctuation mark: "a", "A.", "b)"
    if _MARK_AFTER_RE.match(text, end):
        return True  # "so the choice is a." ... "a) ..."
    if _CHOICE_WORD_BEFORE_RE.search(before):
        return True  # "option a"
    # "A"/"I" count unless an English word follows ("So A is correct" counts, "A cat sits" does not).
    return text[start:end] in "AI" and not _reads_as_word(text, start, end)


def _letter_index(letter: str, num_choices: int) -> int | None:
    index = ord(letter.upper()) - ord("A")
    return index if 0 <= index < num_choices else None


def _explicit_letter(text: str) -> str | None:
    """The letter of the first explicit answer statement; None when there is no statement."""
    for match in _CUE_RE.finditer(text):
        bracketed = bool(match.group("open")) and bool(match.group("close"))
        start, end = match.span("letter")
        if bracketed or not _reads_as_word(text, start, end):
            return match.group("letter")
    for pattern in (_BRACKET_RE, _LINE_START_RE):
        match = pattern.search(text)
        if match is not None:
            return match.group("letter")
    return None


def _last_standalone_letter(text: str, num_choices: int) -> int | None:
    for match in reversed(list(_STANDALONE_RE.finditer(text))):
        letter = match.group("letter")
        index = _letter_index(letter, num_choices)
        if index is None:
            continue  # only choice letters count here; a stray "X" or "Z" is not an answer
        start, end = match.span("letter")
        if (letter.isupper() and letter not in "AI") or _is_marked(text, start, end):
            return index
    return None


def _unique_verbatim_choice(text: str, choices: Sequence[str]) -> int | None:
    """The index of the one choice whose text appears in `text` (case-insensitive, whole words).

    A match inside a longer matched choice ("red" inside "dark red") does not count separately; if two
    different choices appear, the answer is ambiguous and None is returned.
    """
    haystack = text.casefold()
    spans: list[tuple[int, int, int]] = []
    for index, choice in enumerate(choices):
        needle = unicodedata.normalize("NFKC", str(choice)).strip().casefold()
        if not needle:
            continue
        pattern = r"(?<![0-9a-z])" + re.escape(needle) + r"(?![0-9a-z])"
        spans.extend((m.start(), m.end(), index) for m in re.finditer(pattern, haystack))
    found = {
        index
        for start, end, index in spans
        if not any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans)
    }
    return found.pop() if len(found) == 1 else None


def extract_choice(text: str, num_choices: int, choices: Sequence[str] | None = None) -> int | None:
    """The 0-based choice a completion answers, or None when it gives no usable answer.

    Reads the text after `</think>` when present, else the whole text, with full-width forms folded
    (`Ｂ` → `B`, `：` → `:`). In order:
    1. the first explicit answer statement — `Answer: B`, `answer is (B)`, `The answer is b.`, `答案：B`,
       `答案是B`; else the first bracketed letter `[B]`/`【B】`; else a letter opening a line as `B.` or `B)`.
       An explicit letter beyond `num_choices` is a wrong answer: None, without looking further;
    2. else the last standalone choice letter. Upper-case letters count unless they read as English
       ("A cat", "I think"); lower-case letters count only when marked as a label (`(a)`, `a.`, alone on a line,
       `option a`);
    3. else the index of the unique choice string quoted verbatim (case-insensitive, whole words).
    """
    region = _answer_region(text)
    explicit = _explicit_letter(region)
    if explicit is not None:
        return _letter_index(explicit, num_choices)
    index = _last_standalone_letter(region, num_choices)
    if index is not None:
        return index
    if choices is not None and len(choices) > 0:
        return _unique_verbatim_choice(region, choices)
    return None


def _is_listlike(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict))


def _column(values: Any, n: int, name: str) -> list[Any]:
    """A per-rollout column (list, tuple, array, Series) of length n, or a scalar broadcast to n rows."""
    if not _is_listlike(values):
        return [values] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} completions")
    return list(values)


def _scalar(value: Any) -> Any:
    """A setting that may arrive as a column (TRL passes extra columns as lists): its first entry."""
    return value[0] if _is_listlike(value) and len(value) > 0 else value


def mc_idx_reward(
    completions: Sequence[Any],
    correct_choice_idx: Sequence[int | None] | None = None,
    choices: Sequence[Sequence[str]] | None = None,
    **kw: Any,
) -> list[float | None]:
    """1.0 when the extracted answer (see `extract_choice`) is the correct choice, else 0.0.

    `label_idx` is accepted as a synonym of `correct_choice_idx`. The number of choices comes from `choices`,
    else from a `num_choices` column, else it is 4 (A-OKVQA). A rollout without a label gets None (TRL's
    "not applicable").
    """
    n = len(completions)
    labels = correct_choice_idx if correct_choice_idx is not None else kw.get("label_idx")
    if labels is None:
        raise ValueError("mc_idx_reward needs the correct_choice_idx (or label_idx) column")
    labels = _column(labels, n, "correct_choice_idx")
    choice_lists = _column(choices, n, "choices") if choices is not None else [None] * n
    counts = _column(kw.get("num_choices"), n, "num_choices")
    rewards: list[float | None] = []
    for completion, label, row_choices, count in zip(completions, labels, choice_lists, counts, strict=True):
        if label is None or (isinstance(label, float) and math.isnan(label)):
            rewards.append(None)
            continue
        row_choices = [str(c) for c in row_choices] if _is_listlike(row_choices) else None
        num_choices = len(row_choices) if row_choices else int(count or DEFAULT_NUM_CHOICES)
        answer = extract_choice(completion_text(completion), num_choices, row_choices)
        rewards.append(1.0 if answer is not None and answer == int(label) else 0.0)
    return rewards


_LAST_NUMBER_RE = re.compile(r"[+-]?\d+(?:[.,]\d+)*(?:/\d+)?")


def _free_form_correct(text: str, solution: str) -> bool:
    """The completion's final answer states `solution`; for a number, the last number of a final statement
    ("There are 3 shapes.") counts too."""
    answer = final_answer(text)
    if answers_match(answer, solution):
        return True
    if as_number(solution) is None:
        return False
    numbers = _LAST_NUMBER_RE.findall(answer)
    return bool(numbers) and answers_match(numbers[-1], solution)


def accuracy_reward(completions: Sequence[Any], solution: Sequence[Any] | None = None, **kw: Any) -> list[float | None]:
    """1.0 when a completion's final answer agrees with `solution`, else 0.0; None where a row has no solution
    (a multiple-choice row, scored by `mc_idx_reward`). TRL's `accuracy_reward` signature.

    The answer is read after the last `</think>` (`answers.final_answer`: an explicit `Answer: ...`, else
    `\\boxed{...}`, else the final statement) and compared by `answers.answers_match`: numbers by value, LaTeX
    by `math-verify`, words after folding case, surrounding punctuation and articles.
    """
    n = len(completions)
    if solution is None:
        raise ValueError("accuracy_reward needs the `solution` column (the free-form answer of each row)")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, _column(solution, n, "solution"), strict=True):
        if gold is None or (isinstance(gold, float) and math.isnan(gold)) or not str(gold).strip():
            rewards.append(None)
            continue
        rewards.append(1.0 if _free_form_correct(completion_text(completion), str(gold)) else 0.0)
    return rewards


def answer_correct(completions: Sequence[Any], rows: pl.DataFrame) -> list[float]:
    """1.0/0.0 per completion against its data row: `mc_idx_reward`'s rule for a row with choices,
    `accuracy_reward`'s for a free-form row (what `eval/accuracy` counts)."""
    choices = rows["choices"].to_list()
    labels = rows["correct_choice_idx"].to_list()
    solutions = rows["solution"].to_list() if "solution" in rows.columns else [None] * rows.height
    out: list[float] = []
    for completion, row_choices, label, gold in zip(completions, choices, labels, solutions, strict=True):
        if row_choices is not None:
            value = mc_idx_reward([completion], correct_choice_idx=[label], choices=[list(row_choices)])[0]
        else:
            value = accuracy_reward([completion], solution=[gold])[0]
        out.append(float(value or 0.0))
    return out


def think_format_reward(completions: Sequence[Any], **kw: Any) -> list[float]:
    """TRL's `think_format_reward`: 1.0 when the completion matches `^<think>(?!.*<think>)(.*?)</think>.*$`.

    Same pattern and flags (DOTALL | MULTILINE) as `trl.rewards.think_format_reward`; unlike TRL's, it also
    accepts plain-string completions.
    """
    return [1.0 if _THINK_FORMAT_RE.match(completion_text(c)) else 0.0 for c in completions]


# ---------------------------------------------------------------------------------------------------------------
# Attention balance reward
# ---------------------------------------------------------------------------------------------------------------


def _finite_positive(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def mdi_balance(mdi: float, tolerance: float = 2.0) -> float:
    """`clip(1 − |ln mdi| / ln R, 0, 1)` with R = tolerance (> 1); NaN when mdi is undefined (NaN, ≤ 0)."""
    if tolerance <= 1:
        raise ValueError(f"mdi_tolerance={tolerance} must be greater than 1")
    value = _finite_positive(mdi)
    if value is None:
        return math.nan
    return min(1.0, max(0.0, 1.0 - abs(math.log(value)) / math.log(tolerance)))


ZSCORE_FLOOR = 0.05  # the smallest spread `group_zscore` divides by, as a fraction of ln(mdi_tolerance)


def _std(values: Sequence[float], mean: float) -> float:
    """Population std of `values` around `mean` (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def mdi_reward(
    completions: Sequence[Any],
    mdi: Sequence[float | None] | None = None,
    mdi_tolerance: float = 2.0,
    mdi_shaping: str = "clip",
    num_generations: int | None = None,
    **kw: Any,
) -> list[float | None]:
    """A reward for balanced modality attention, from each rollout's MDI (stage `mdi_reward_stage`); in [−1, 1]
    except for `log_distance`.

    Shapings (`mdi_shaping`), with d = |ln mdi| and R = `mdi_tolerance`:
    - `clip` (this function's default, the classic formula): `2·mdi_balance − 1 = 2·clip(1 − d / ln R, 0, 1) − 1`. It is +1 at MDI = 1
      and saturates at −1 once MDI is a factor R or more off balance, so a group whose MDIs are all far
      from 1 (the seed's MDI 4–8) gets the same −1 everywhere: no learning signal.
    - `log_distance` (`DapoConfig`'s default): `1 − 2·d / ln R`, the `clip` line without the clip: the same value inside the band, and
      the same slope at any distance from balance. Unbounded below (MDI 4 off balance gives −3 at R = 2). Its
      GRPO advantages equal `group_log_distance`'s up to that shaping's ±1 clip, and it is per-rollout, so it
      has a pathwise gradient (`mdi_pathwise_coef`, dapo_ops.attention.pathwise).
    - `group_log_distance`: `clip(2·(mean_g d − d_i) / ln R, −1, 1)`, where mean_g runs over the defined MDIs
      of rollout i's group (G = `num_generations` consecutive rows). Rewards a rollout for being closer to
      MDI = 1, on the log scale, than its siblings. Inside the clip band it equals the group-centred `clip`
      reward (same slope 2/ln R), and unlike `clip` it keeps that slope at any distance from balance. The
      group centring does not change GRPO advantages (they subtract the group mean anyway) and keeps the value
      in [−1, 1]; equal distances give 0, never an amplified noise signal. Its batch mean stays near 0 by
      construction: watch `attention/*/mdi` for progress.

    - `group_zscore`: `clip((mean_g d − d_i) / max(std_g d, 0.05·ln R), −1, 1)`: the same ranking as
      `group_log_distance`, divided by the group's own spread of d instead of ln R / 2. Siblings share one
      image and differ little in attention (std of d ≈ 0.06 on the embedded run, so `group_log_distance`
      has a within-group std of ≈ 0.18 beside 3·accuracy's ≈ 1.1, a few per cent of the advantage); the
      z-score gives the attention term a spread comparable to the accuracy term's. The floor keeps groups
      whose distances are (nearly) equal from turning float noise into a ±1 signal.

    An undefined MDI (None, NaN, no image tokens) gives None: the rollout contributes 0 to the total reward
    (`total_rewards`) and is left out of batch means and of its group's mean_g. A group with a single defined
    MDI gets 0 under `group_log_distance`.
    """
    n = len(completions)
    if mdi is None:
        raise ValueError("mdi_reward needs the per-rollout `mdi` column (the MDI of mdi_reward_stage)")
    values = [_finite_positive(v) for v in _column(mdi, n, "mdi")]
    tolerance = float(_scalar(mdi_tolerance))
    if tolerance <= 1:
        raise ValueError(f"mdi_tolerance={tolerance} must be greater than 1")
    shaping = _scalar(mdi_shaping)
    if shaping == "clip":
        return [None if v is None else 2.0 * mdi_balance(v, tolerance) - 1.0 for v in values]
    if shaping == "log_distance":
        return [None if v is None else 1.0 - 2.0 * abs(math.log(v)) / math.log(tolerance) for v in values]
    if shaping not in ("group_log_distance", "group_zscore"):
        raise ValueError(
            f"mdi_shaping={shaping!r} is unknown; use 'clip', 'log_distance', 'group_log_distance' or 'group_zscore'"
        )
    group = int(_scalar(num_generations) or 0)
    if group < 1 or n % group:
        raise ValueError(
            f"mdi_shaping={shaping!r} needs num_generations dividing the {n} completions; got {num_generations}"
        )
    scale = math.log(tolerance)
    rewards: list[float | None] = []
    for first in range(0, n, group):
        distances = [None if v is None else abs(math.log(v)) for v in values[first : first + group]]
        defined = [d for d in distances if d is not None]
        mean = sum(defined) / len(defined) if defined else 0.0
        spread = scale / 2.0
        if shaping == "group_zscore":
            spread = max(_std(defined, mean), ZSCORE_FLOOR * scale)
        rewards.extend(None if d is None else min(1.0, max(-1.0, (mean - d) / spread)) for d in distances)
    return rewards


# ---------------------------------------------------------------------------------------------------------------
# Registry and total
# ---------------------------------------------------------------------------------------------------------------

register_reward(mc_idx_reward)
register_reward(accuracy_reward)
register_reward(think_format_reward)
register_reward(mdi_reward, needs_attention=True)


# The built-in accuracy rewards: the choice letter of multiple-choice rows, the final answer of free-form rows.
ACCURACY_REWARDS: tuple[str, ...] = ("mc_idx_reward", "accuracy_reward")


def accuracy_reward_name(reward_names: Sequence[str]) -> str | None:
    """Which built-in accuracy reward(s) a run is scored by ("mc_idx_reward", "accuracy_reward", both joined
    with "+"), or None when neither is configured."""
    found = [name for name in ACCURACY_REWARDS if name in reward_names]
    return "+".join(found) or None


def _as_float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def score_completions(
    funcs: Mapping[str, RewardFunction],
    *,
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    **columns: Any,
) -> dict[str, list[float]]:
    """Each reward of `funcs` over one batch, TRL's way (`f(prompts=, completions=, completion_ids=, **columns)`),
    as `{name: values}` with None ("not applicable") stored as NaN. A reward returning the wrong number of
    values fails, naming it."""
    n = len(completions)
    scored: dict[str, list[float]] = {}
    for name, func in funcs.items():
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if values is None or len(values) != n:
            got = "None" if values is None else f"{len(values)} values"
            raise ValueError(f"reward {name!r} returned {got} for {n} completions")
        scored[name] = [_as_float(v) for v in values]
    return scored


def score_rollouts(
    config: DapoConfig, table: pl.DataFrame, attention: pl.DataFrame | None = None
) -> dict[str, list[float]]:
    """The configured rewards (`config.reward_funcs`) of one round's rollouts: `{name: values}`, NaN = None.

    `table` has one row per rollout with at least `completion` (the rollouts table: `question`, `choices`,
    `correct_choice_idx`, `completion_ids`, `completion_length`, `is_eos`, ...). Every column is passed to
    the rewards as a keyword list, as TRL passes dataset columns; `question` is also passed as `prompts`.
    With `attention` (the round's attention table, same rows) its columns are passed too, plus `mdi`, the
    MDI of `config.mdi_reward_stage`; without it the rewards that need attention are left out (dynamic-
    sampling refill scores before the teacher-forced pass). The config values rewards read (`mdi_tolerance`,
    `mdi_shaping`, `num_generations`, `max_completion_length`) are passed as scalars.
    """
    funcs = {reward_name(entry): resolve_reward(entry) for entry in config.reward_funcs}
    if attention is None:
        funcs = {name: f for name, f in funcs.items() if not needs_attention(f)}
    columns: dict[str, Any] = {c: table.get_column(c).to_list() for c in table.columns if c not in ("image", "images")}
    completions = columns.pop("completion")
    n = len(completions)
    if attention is not None:
        if attention.height != n:
            raise ValueError(f"the attention table has {attention.height} rows for {n} rollouts")
        columns.update({c: attention.get_column(c).to_list() for c in attention.columns if c not in columns})
        columns["mdi"] = attention.get_column(attn_column(config.mdi_reward_stage, "mdi")).to_list()
    if "choices" in columns:
        columns["choices"] = [None if c is None else list(c) for c in columns["choices"]]
    prompts = columns.get("question", [None] * n)
    completion_ids = columns.pop("completion_ids", [[] for _ in range(n)])
    columns.update(
        mdi_tolerance=config.mdi_tolerance,
        mdi_shaping=config.mdi_shaping,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
    )
    return score_completions(funcs, prompts=prompts, completions=completions, completion_ids=completion_ids,
                             **columns)


def total_rewards(per_func: dict[str, Sequence[float | None]], weights: dict[str, float]) -> list[float]:
    """`Σ_f w_f · r_f` per rollout, as TRL's weighted `nansum`: None/NaN rewards contribute 0.

    A rollout for which every function returned None/NaN is unscorable and gets NaN (TRL marks it the same
    way; `advantages.group_advantages` then leaves it out of its group's statistics and gives it 0).
    """
    if not per_func:
        raise ValueError("total_rewards needs at least one reward function's values")
    missing = sorted(set(per_func) - set(weights))
    if missing:
        raise ValueError(f"no reward weight for {', '.join(missing)}")
    lengths = {name: len(values) for name, values in per_func.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"reward lists differ in length: {lengths}")
    n = next(iter(lengths.values()))
    totals: list[float] = []
    for i in range(n):
        total, scored = 0.0, False
        for name, values in per_func.items():
            value = values[i]
            if value is None or math.isnan(float(value)):
                continue
            total += float(weights[name]) * float(value)
            scored = True
        totals.append(total if scored else math.nan)
    return totals
