"""Final-answer extraction from a math completion: `\\boxed{}` first, then configurable fallbacks.

Covered: `\\boxed{...}` and `\\fbox{...}` with nested braces (first / last / all of several),
'the answer is X' / 'Answer: X', GSM8K's '#### X', the last number, the last LaTeX span.
Not covered: answers only stated in prose ('it is five'), answers split across several boxes in
a way other than a comma list. Extraction is pure string work on a bounded tail of the
completion and runs in linear time, so it is safe in the parent process; parsing and comparing the
extracted answer (sympy) happens in `reward/math_verify_worker.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Sequence

from reward.config import Fallback

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_HASH_RE = re.compile(r"####\s*(.+)")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


@dataclasses.dataclass(frozen=True, slots=True)
class Extraction:
    answer: str | None
    source: str  # "boxed", a fallback name, or "none"


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its `}`, in one pass (escaped `\\{`/`\\}` are not braces)."""
    match: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
        i += 1
    return match


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` in order, with balanced braces; an unclosed box is ignored.
    Linear time: thousands of unclosed boxes cost one pass, not one pass each."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return []
    match = _matching_braces(text)
    return [text[s: match[s - 1]].strip() for s in starts if s - 1 in match]


def _clean(ans: str) -> str:
    ans = ans.strip()
    ans = re.split(r"\n", ans, maxsplit=1)[0].strip()
    ans = ans.rstrip(".。").strip()
    if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
        ans = ans.strip("$").strip()
    return ans


def _last_latex(text: str) -> str | None:
    """The last `$...$`, `$$...$$`, `\\[...\\]` or `\\(...\\)` span, searched from the end (a
    backtracking regex is quadratic on thousands of unclosed openers)."""
    best: tuple[int, str] | None = None
    for open_, close in (("\\[", "\\]"), ("\\(", "\\)")):
        end = text.rfind(close)
        start = text.rfind(open_, 0, end) if end > 0 else -1
        if start >= 0 and (best is None or end > best[0]):
            best = (end, text[start + 2: end])
    end = text.rfind("$")
    if end > 0:
        if text[end - 1] == "$":  # a "$$...$$" display: the closer is the doubled dollar
            start, inner_end, width = text.rfind("$$", 0, end - 1), end - 1, 2
        else:
            start, inner_end, width = text.rfind("$", 0, end), end, 1
        if start >= 0 and (best is None or end > best[0]):
            best = (end, text[start + width: inner_end])
    return (best[1].strip() or None) if best else None


def _fallback(text: str, name: Fallback) -> str | None:
    match name:
        case "answer_is":
            hits = _ANSWER_IS_RE.findall(text)
            return _clean(hits[-1]) or None if hits else None
        case "gsm8k_hash":
            hits = _HASH_RE.findall(text)
            return _clean(hits[-1]).replace(",", "") or None if hits else None
        case "last_number":
            hits = _NUMBER_RE.findall(text)
            return hits[-1].replace(",", "") if hits else None
        case "last_latex":
            return _last_latex(text)
        case _:
            raise ValueError(f"unknown fallback extractor {name!r}")


def extract_answer(completion: str, fallbacks: Sequence[Fallback] = ("answer_is", "gsm8k_hash"),
                   multiple_boxed: Literal["last", "first", "all"] = "last",
                   max_chars: int = 16_000) -> Extraction:
    """The completion's final answer and where it came from (`Extraction(None, "none")` if absent)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    text = completion[-max_chars:]
    boxes = [b for b in boxed_contents(text) if b]
    if boxes:
        match multiple_boxed:
            case "last":
                return Extraction(boxes[-1], "boxed")
            case "first":
                return Extraction(boxes[0], "boxed")
            case "all":
                return Extraction(", ".join(boxes), "boxed")
            case _:
                raise ValueError(f"multiple_boxed must be last|first|all, got {multiple_boxed!r}")
    for name in fallbacks:
        ans = _fallback(text, name)
        if ans:
            return Extraction(ans, name)
    return Extraction(None, "none")
