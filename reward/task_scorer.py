"""Grading by a reasoning-gym task's own scorer (`dataset.score_answer(answer, entry)`).

Which tasks use it (`uses_own_scorer`): every registered reasoning-gym task except the numeric
ones the suite trains on (`MATH_VERIFY_TASKS`: their answers are numbers, which math-verify
grades at least as faithfully and with the answer-finding rules of docs/rewards.md). A task such
as ``word_sorting`` answers with text that only its own scorer can judge.

The gold is not the entry itself (reasoning-gym metadata need not survive JSON) but where it comes
from: task, seed, size, task config and index (`task_gold`). The grader re-creates the dataset
(deterministic in its seed; cached) and scores against the very entry the prompt was made from.

The answer scored (`answer_text`): the last ``<answer>…</answer>`` (reasoning-gym's own
convention), else the answer found by `reward.extract.extract_answer` (the prompt asks for
``\\boxed{}``; final-answer phrases), else the completion's last non-empty line. The reward is the
scorer's value in [0, 1] (some tasks give partial credit); the outcome is ``ok`` at 1, else
``wrong``; a scorer that raises is ``error`` (a grader failure, dropped by ``reward.on_error``).
Scorers run in the reward actor's process; they are plain Python over short strings.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from reward.extract import extract_answer
from reward.schema import Verdict

#: Numeric-answer tasks graded by math-verify (their `kind` stays "math").
MATH_VERIFY_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic")


def uses_own_scorer(task: str) -> bool:
    return task not in MATH_VERIFY_TASKS


def task_gold(task: str, seed: int, size: int, config: dict[str, Any], index: int) -> str:
    """The gold of one item: where its entry comes from, as JSON."""
    return json.dumps({"task": task, "seed": seed, "size": size, "config": config, "index": index}, sort_keys=True)


@functools.lru_cache(maxsize=16)
def _dataset(task: str, seed: int, size: int, config_json: str):
    import reasoning_gym

    return reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(config_json))


def answer_text(completion: str) -> str | None:
    """The answer a completion gives (see the module docstring for the order of the rules)."""
    from reasoning_gym.utils import extract_answer as tagged

    found = tagged(completion)
    if found is not None:
        return found
    found = extract_answer(completion).answer
    if found is not None:
        return found
    lines = [ln.strip() for ln in completion.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def score(gold: str, completion: str) -> Verdict:
    """One completion judged by its task's own scorer."""
    t0 = time.perf_counter()
    try:
        g = json.loads(gold)
        ds = _dataset(g["task"], int(g["seed"]), int(g["size"]), json.dumps(g["config"], sort_keys=True))
        value = float(ds.score_answer(answer_text(completion), ds[int(g["index"])]))
    except Exception as e:  # noqa: BLE001 - a scorer's failure is the grader's, never the answer's
        return Verdict("error", 0.0, f"{type(e).__name__}: {e}"[:300], time.perf_counter() - t0)
    value = min(1.0, max(0.0, value))
    return Verdict("ok" if value >= 1.0 else "wrong", value, f"task score {value:g}", time.perf_counter() - t0)
