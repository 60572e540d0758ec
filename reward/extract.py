"""Final-answer extraction from a math completion, following math-verify's own rules.

The parent process (a reward actor) finds the answer here with string work only, on a bounded
tail of the completion and in linear time; `reward/math_verify_worker.py` then parses and compares
it with math-verify in a worker process. The rules below are math-verify 0.9.0's (its `parse`
with `LatexExtractionConfig()` / `ExprExtractionConfig()`, and latex2sympy2_extended's boxed
normalisation) unless marked *departure*; docs/rewards.md ("Math grading rules") has the same
list with the reasons. Each rule, with an example:

1. **Boxes first; several boxes form one answer.** Of several `\\boxed{}` / `\\fbox{}`, the last one
   is taken together with the boxes just before it that math-verify joins to it: walking back from
   the last box, an earlier box joins while it is < 10 characters from the next one, or < 70 with
   "and", "or", "," or ";" in between and a different content; repeated contents count once.
   The group is graded as a set. `\\boxed{3} and \\boxed{5}` -> `3, 5`; `\\boxed{7} and the check
   \\boxed{7}` -> `7`; `\\boxed{3}. Then I noticed the slip in step two. So ... \\boxed{7}` -> `7`.
   (`multiple_boxed` = `last` / `first` / `all` choose the last box alone, the first, or every box.)
2. **A box's content is LaTeX**: `$` inside it is a stray delimiter and is dropped, as math-verify's
   normalisation drops it: `$\\boxed{x^2+1$}` -> `x^2+1`. A bare comma separates elements
   (`\\boxed{3,5}` is the set {3, 5}; `\\boxed{1,000}` is 1000, latex2sympy's thousands rule).
3. **A final-answer line after the last box wins** (fallback `answer_is` on): "the final answer
   is X" ties with a box in math-verify (both priority 50) and the one that ends last is taken;
   *departure*: "Final answer: X" is treated the same (math-verify's pattern needs "is" there, so
   its `answer:` pattern, ranked below boxes, would keep the box). Only a line whose answer is
   math (rule 4a/4b) beats a box. `\\boxed{5} ... \\nFinal answer: 7` -> `7`; `Final answer: 5?
   ... \\boxed{7}` -> `7`; `\\boxed{7}. Final answer: as shown above.` -> `7`. A plain "Answer: X"
   or "the answer is X" never beats a box (math-verify ranks them below boxes).
4. **After a marker** ("the answer is", "Answer:", "final answer is/:", "####") the answer is what
   math-verify's anchored patterns take right after it, not the rest of the line:
   a. a LaTeX span `$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]`: `the final answer is $\\frac12$ since` -> `\\frac12`;
   b. a number or plain arithmetic (`1,000`, `3,5`, `1/2`, `2^10`, `-4`, `10%`) followed by a word,
      sentence punctuation or the line's end: `the final answer is 42 because ...` -> `42`;
   c. otherwise the rest of the line up to its first sentence end (". "): `is 3\\sqrt{2}. I hope` ->
      `3\\sqrt{2}`.
   With no box, the fallbacks are tried in the configured order (default `answer_is`,
   `gsm8k_hash`); of several phrases the last one is taken.
5. **Fallbacks**: `answer_is` ('the answer is 4.' -> `4`), `gsm8k_hash` ('#### 1,234' -> `1234`),
   `last_number` (the last number: 'we get 3 then 8' -> `8`; lenient), `last_latex` (the last
   `$..$` / `\\[..\\]` / `\\(..\\)` span: 'so $x=2$ done' -> `x=2`).
6. **Numbers** (`normalize_number`), math-verify's `ExprExtractionConfig` reading: a 1-3 digit head
   then groups of exactly three digits, each after a comma or a space, is one number with thousands
   separators (`1,000` and `1 000` -> `1000`; `3,500` -> `3500`); any other digits,digits is a
   decimal comma (`3,5` -> `3.5`, `1,25` -> `1.25`). In LaTeX (boxes, spans) only the unambiguous
   separators are read so: `1\\,000`, `1~000`, `1{,}000` -> `1000`, `3{,}5` -> `3.5`
   (*departure*: latex2sympy reads `1\\,000` as the product 1*000 = 0 and `3{,}5` as a set).

Not covered: answers only stated in prose ('it is five'); a phrase answer that is LaTeX without
delimiters and not a number is cut at the sentence end only ('x = 3 because' stays as is).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Sequence

from reward.config import Fallback

MultipleBoxed = Literal["last_group", "last", "first", "all"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_SEPARATOR_RE = re.compile(r"\b(?:and|or)\b|,|;")  # latex2sympy2_extended's VALID_SEPARATOR_PATTERN
_STRAY_DOLLAR_RE = re.compile(r"(?<!\\)\$")
# "the answer is", "Answer:", "**Final Answer:**", "final answer =": group `final` marks rule 3's lines
_MARKER_RE = re.compile(r"(?P<final>final\s+)?answer\**\s*(?:is\b|:|=)\s*\**\s*:?[^\S\n]*", re.IGNORECASE)
_HASH_RE = re.compile(r"####[^\S\n]*")

# Numbers as math-verify's ExprExtractionConfig reads them (parser.py, `number_re`): thousands
# groups after a 1-3 digit head (comma or space), else an optional decimal point or comma.
_NUM = r"(?:[1-9]\d{0,2}(?:[ ,]\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)"
_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:[ ,]\d{3})+(?:\.\d+)?")
_DECIMAL_COMMA_RE = re.compile(r"-?\d+,\d+")
# LaTeX's unambiguous digit-group separators: thin/normal/medium spaces, a tie, a braced comma
_TEX_SEP = r"(?:\\,|\\ |\\;|\\:|~|\{,\}| )"
_TEX_THOUSANDS_RE = re.compile(rf"(?P<int>-?[1-9]\d{{0,2}}(?:{_TEX_SEP}\d{{3}})+)(?P<frac>(?:\.|\{{,\}})\d+)?")
_TEX_DECIMAL_COMMA_RE = re.compile(r"-?\d+\{,\}\d+")
# Rule 4b: a number or plain arithmetic right after a marker, ending at a word, sentence
# punctuation or the end ("42 because", "42.", "42, so", "42"); "42 + 8 = 50" or "3\sqrt{2}" is not one.
_LEAD_NUMBER_RE = re.compile(
    rf"-?{_NUM}(?:[^\S\n]*[-+*/^×÷][^\S\n]*-?{_NUM})*(?:[^\S\n]*\\?%)?"
    r"(?=[^\S\n]*$|[.;!?](?:\s|$)|,[^\S\n]+(?!-?\d)|[^\S\n]+(?!(?:and|or)\b)[A-Za-z])")
_LEAD_LATEX_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_LAST_NUMBER_RE = re.compile(rf"(?<![\d.])-?{_NUM}(?:/\d+)?")


@dataclasses.dataclass(frozen=True, slots=True)
class Extraction:
    answer: str | None
    source: str  # "boxed", a fallback name, or "none"


@dataclasses.dataclass(frozen=True, slots=True)
class _Box:
    start: int  # index of the backslash of \boxed
    close: int  # index of the closing brace
    content: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Phrase:
    end: int  # index just past the marker
    answer: str
    is_math: bool  # rule 4a/4b matched (a LaTeX span or a number), not just a cut sentence


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


def _boxes(text: str) -> list[_Box]:
    """Every closed `\\boxed{...}` / `\\fbox{...}` in order. Linear time: thousands of unclosed boxes
    cost one pass, not one pass each; an unclosed box is ignored."""
    found = [(m.start(), m.end()) for m in _BOX_RE.finditer(text)]
    if not found:
        return []
    match = _matching_braces(text)
    return [_Box(s, match[e - 1], text[e: match[e - 1]].strip()) for s, e in found if e - 1 in match]


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` in order, with balanced braces; an unclosed box is ignored."""
    return [b.content for b in _boxes(text)]


def _last_group(text: str, boxes: list[_Box]) -> list[str]:
    """Rule 1: the last box and the boxes math-verify joins to it, in text order (latex2sympy2_extended
    `extract_boxed_content(mode="last")`: its `should_extract_boxed` test, and consecutive repeats
    kept once)."""
    group: list[str] = []
    later_start: int | None = None
    for b in reversed(boxes):
        if later_start is not None:
            if b.close > later_start:  # encloses the later box (a nested \boxed): math-verify stops
                break
            between = text[b.close + 1: later_start]
            joined = len(between) < 10 or (b.content != group[-1] and len(between) < 70
                                           and _BOX_SEPARATOR_RE.search(between) is not None)
            if not joined:
                break
        if not group or group[-1] != b.content:
            group.append(b.content)
        later_start = b.start
    return group[::-1]


def normalize_number(text: str, latex: bool) -> str:
    """Rule 6: `text` with thousands separators removed and a decimal comma made a point, when the
    whole of it is one number written so; anything else is returned unchanged. `latex` selects the
    LaTeX separators (for box contents and `$..$` spans), where a bare comma is left to latex2sympy
    (thousands in `1,000`, an element separator in `3,5`)."""
    s = text.strip()
    if latex:
        if m := _TEX_THOUSANDS_RE.fullmatch(s):
            return re.sub(_TEX_SEP, "", m["int"]) + (m["frac"] or "").replace("{,}", ".")
        if _TEX_DECIMAL_COMMA_RE.fullmatch(s):
            return s.replace("{,}", ".")
        return text
    if _THOUSANDS_RE.fullmatch(s):
        return s.replace(",", "").replace(" ", "")
    if _DECIMAL_COMMA_RE.fullmatch(s):
        return s.replace(",", ".")
    return text


def _box_answer(content: str) -> str:
    """Rule 2 and 6 on one box's content."""
    return normalize_number(_STRAY_DOLLAR_RE.sub("", content).strip(), latex=True)


def _after_marker(rest: str) -> tuple[str, bool] | None:
    """Rule 4: the answer at the start of `rest` (the text after a marker) and whether it is math
    (4a/4b) rather than a cut sentence (4c)."""
    rest = rest.split("\n", 1)[0].strip().lstrip("*").strip()
    if not rest:
        return None
    m = _LEAD_LATEX_RE.match(rest)
    if m:
        span = next(g for g in m.groups() if g is not None).strip()
        return (normalize_number(span, latex=True), True) if span else None
    m = _LEAD_NUMBER_RE.match(rest)
    if m:
        return normalize_number(m.group(), latex=False), True
    sentence = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0].strip().rstrip("。").strip()
    if sentence.startswith("$") and sentence.endswith("$") and len(sentence) > 1:
        sentence = sentence.strip("$").strip()
    return (normalize_number(sentence, latex=False), False) if sentence else None


def _last_phrase(text: str, final_only: bool = False) -> _Phrase | None:
    """The last answer phrase (rule 4) with a non-empty answer; `final_only`: "final answer" ones."""
    markers = [m for m in _MARKER_RE.finditer(text) if m["final"] or not final_only]
    for m in reversed(markers[-64:]):  # bounded: each try reads up to a line of text
        found = _after_marker(text[m.end(): m.end() + 2000])
        if found:
            return _Phrase(m.end(), *found)
    return None


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
    if best is None or not best[1].strip():
        return None
    return normalize_number(best[1].strip(), latex=True)


def _fallback(text: str, name: Fallback) -> str | None:
    match name:
        case "answer_is":
            phrase = _last_phrase(text)
            return phrase.answer if phrase else None
        case "gsm8k_hash":
            hits = list(_HASH_RE.finditer(text))
            found = _after_marker(text[hits[-1].end(): hits[-1].end() + 2000]) if hits else None
            return found[0] if found else None
        case "last_number":
            hits = _LAST_NUMBER_RE.findall(text)
            return normalize_number(hits[-1], latex=False) if hits else None
        case "last_latex":
            return _last_latex(text)
        case _:
            raise ValueError(f"unknown fallback extractor {name!r}")


def extract_answer(completion: str, fallbacks: Sequence[Fallback] = ("answer_is", "gsm8k_hash"),
                   multiple_boxed: MultipleBoxed = "last_group", max_chars: int = 16_000) -> Extraction:
    """The completion's final answer and where it came from (`Extraction(None, "none")` if absent);
    the rules are in the module docstring."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    text = completion[-max_chars:]
    boxes = [b for b in _boxes(text) if b.content]
    if boxes:
        if "answer_is" in fallbacks:  # rule 3: a final-answer line after the last box wins
            line = _last_phrase(text, final_only=True)
            if line is not None and line.is_math and line.end > boxes[-1].close:
                return Extraction(line.answer, "answer_is")
        match multiple_boxed:
            case "last_group":
                contents = _last_group(text, boxes)
            case "last":
                contents = [boxes[-1].content]
            case "first":
                contents = [boxes[0].content]
            case "all":
                contents = [b.content for b in boxes]
            case _:
                raise ValueError(f"multiple_boxed must be last_group|last|first|all, got {multiple_boxed!r}")
        answers = [a for a in map(_box_answer, contents) if a]
        if answers:
            return Extraction(", ".join(answers), "boxed")
    for name in fallbacks:
        ans = _fallback(text, name)
        if ans:
            return Extraction(ans, name)
    return Extraction(None, "none")
