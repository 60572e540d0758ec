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
_LATEX_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)


@dataclasses.dataclass(frozen=True, slots=True)
class Extraction:
    answer: str | None
    source: str  # "boxed", a fallback name, or "none"


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` in order, with balanced braces; an unclosed box is ignored."""
    out = []
    for m in _BOX_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2  # an escaped brace \{ does not open or close the box
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1].strip())
    return out


def _clean(ans: str) -> str:
    ans = ans.strip()
    ans = re.split(r"\n", ans, maxsplit=1)[0].strip()
    ans = ans.rstrip(".。").strip()
    if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
        ans = ans.strip("$").strip()
    return ans


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
            hits = _LATEX_RE.findall(text)
            return next((g.strip() for g in hits[-1] if g), None) if hits else None
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
