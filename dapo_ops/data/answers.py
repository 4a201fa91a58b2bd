"""Free-form answers: what a completion answers, what kind an answer is, and whether two answers agree.

Shared by the data checks (answer kinds) and `rewards.accuracy_reward` / the eval (agreement), so both read
answers one way. Numbers agree by value (`3`, `3.0`, `3.00`; `1/2`, `\\frac{1}{2}`, `0.5`), formulas through
`math-verify` (TRL's `accuracy_reward` uses it too), words after folding case, surrounding punctuation and
articles.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import unicodedata
from fractions import Fraction

ANSWER_KINDS: tuple[str, ...] = ("choice", "number", "formula", "word")

_ANSWER_LINE_RE = re.compile(r"(?:\banswer\b|答案)\s*(?:is\s*)?[:：=]\s*(?P<answer>[^\n]*)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FINAL_CUE_RE = re.compile(
    r"^(?:so|thus|therefore|hence)?[\s,]*(?:the\s+)?(?:final\s+)?(?:answer|result)\s*(?:is|=|:)\s*", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_LATEX_HINT_RE = re.compile(r"[\\^_{}=]|\$|\d\s*[a-zA-Z]|[a-zA-Z]\s*[+\-*/]\s*[\w(]|\bsqrt\b|π")
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = " \t\n\r.,;:!?\"'`“”‘’()[]{}<>*"


def _balanced(text: str, start: int) -> str | None:
    """The text inside the brace group that opens just before `start`, or None when it never closes."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced."""
    found = None
    for match in _BOXED_RE.finditer(text):
        inner = _balanced(text, match.end())
        if inner is not None:
            found = inner
    return found


def final_answer(text: str) -> str:
    """The answer a completion gives: in the text after the last `</think>` (the whole text without one), the
    last explicit `Answer: ...` line, else the last `\\boxed{...}`, else the final non-empty line with a
    leading "the answer is" dropped. A boxed value inside the answer line wins over the line's other text."""
    _, sep, after = text.rpartition("</think>")
    region = unicodedata.normalize("NFKC", after if sep else text).strip()
    lines = list(_ANSWER_LINE_RE.finditer(region))
    if lines:
        answer = lines[-1].group("answer").strip()
        return last_boxed(answer) or answer
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed.strip()
    statements = [line.strip() for line in region.splitlines() if line.strip()]
    return _FINAL_CUE_RE.sub("", statements[-1]).strip() if statements else ""


def _strip_math(text: str) -> str:
    """Drop `$...$`, `\\(...\\)`, `\\boxed{}`, `\\text{}` wrappers and surrounding punctuation."""
    text = unicodedata.normalize("NFKC", text).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("$", "").replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    text = re.sub(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\!", "").replace("\\,", "").replace("\\%", "%").replace("\\left", "").replace("\\right", "")
    return text.strip(_PUNCT.replace("(", "").replace(")", "").replace("{", "").replace("}", ""))


def as_number(text: str) -> float | None:
    """The value of a plain number, fraction (`1/2`, `\\frac{1}{2}`), percentage or `1,000`; else None."""
    value = _strip_math(text).replace(" ", "").rstrip("%").rstrip(".")
    frac = _FRAC_RE.fullmatch(value)
    if frac:
        value = f"{frac.group(1)}/{frac.group(2)}"
    if _THOUSANDS_RE.fullmatch(value):
        value = value.replace(",", "")
    numerator, slash, denominator = value.partition("/")
    try:
        if slash:
            if not (_NUMBER_RE.fullmatch(numerator) and _NUMBER_RE.fullmatch(denominator)):
                return None
            result = float(Fraction(numerator) / Fraction(denominator))
        elif _NUMBER_RE.fullmatch(value):
            result = float(value)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return result if math.isfinite(result) else None


def answer_kind(solution: str) -> str:
    """`number`, `formula` (LaTeX or an expression) or `word` (anything else, phrases included)."""
    if as_number(solution) is not None:
        return "number"
    return "formula" if _LATEX_HINT_RE.search(solution) else "word"


def normalize_words(text: str) -> str:
    """Case folded, surrounding punctuation stripped, articles dropped, whitespace collapsed."""
    words = unicodedata.normalize("NFKC", _strip_math(text)).casefold().strip(_PUNCT).split()
    return " ".join(w for w in (w.strip(_PUNCT) for w in words) if w and w not in _ARTICLES)


def _math_verify(solution: str, prediction: str) -> bool:
    """`math-verify`'s verdict; timeouts only in the main thread (it uses signal.alarm, as TRL notes)."""
    from math_verify import parse, verify  # lazy: sympy is slow to import and only formulas need it

    main = threading.current_thread() is threading.main_thread()
    if not main:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    timeout = 5 if main else None

    def wrapped(text: str) -> str:
        return text if "$" in text or "\\boxed" in text else f"${text}$"

    gold = parse(wrapped(solution), parsing_timeout=timeout)
    if not gold:
        return False
    answer = parse(wrapped(prediction), parsing_timeout=timeout)
    return bool(answer) and bool(verify(gold, answer, timeout_seconds=timeout))


def answers_match(prediction: str, solution: str) -> bool:
    """Whether `prediction` (an extracted answer) states `solution`: numbers by value (relative 1e-6), then
    words after `normalize_words`, then formulas by `math-verify`."""
    if not prediction.strip():
        return False
    gold_value, value = as_number(solution), as_number(prediction)
    if gold_value is not None and value is not None:
        return math.isclose(gold_value, value, rel_tol=1e-6, abs_tol=1e-9)
    gold_words = normalize_words(solution)
    if gold_words and gold_words == normalize_words(prediction):
        return True
    if answer_kind(solution) == "word" and gold_value is None:
        return False
    try:
        return _math_verify(solution, prediction)
    except Exception:  # a parser failure on odd text is a wrong answer, not a crashed round
        return False
