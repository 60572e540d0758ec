"""Reasoning-gym tasks with text answers are graded by the task's own scorer (unit tests: the real
reasoning-gym package and the reward actor's scorer class in this process, no Ray)."""

from __future__ import annotations

import json

from reward.actors import RewardScorer
from reward.datasets import reasoning_gym_items
from reward.schema import grader_failed
from reward.task_scorer import MATH_VERIFY_TASKS, answer_text, score


def _item(task="word_sorting", i=0):
    return reasoning_gym_items(task, seed=3, size=4)[i]


def test_text_tasks_carry_where_their_entry_comes_from_numeric_ones_stay_math():
    it = _item()
    assert it.kind == "reasoning_gym"
    assert json.loads(it.gold) == {"task": "word_sorting", "seed": 3, "size": 4, "config": {}, "index": 0}
    for task in MATH_VERIFY_TASKS[:2]:
        num = _item(task)
        assert num.kind == "math" and num.gold == num.meta["answer"]


def test_the_tasks_scorer_judges_the_answer_found_in_the_completion():
    it = _item()
    right, other = it.meta["answer"], _item(i=1).meta["answer"]
    assert right != other
    assert score(it.gold, f"Sorted: <answer>{right}</answer>").outcome == "ok"
    assert score(it.gold, f"so the list is \\boxed{{{right}}}").reward == 1.0  # the prompt asks for a box
    assert score(it.gold, f"working...\n{right}").outcome == "ok"  # the last line, failing all else
    wrong = score(it.gold, f"<answer>{other}</answer>")
    assert wrong.outcome == "wrong" and wrong.reward < 1.0
    # the last tag wins, as reasoning-gym's own extract_answer reads it
    assert answer_text(f"<answer>{other}</answer> no: <answer>{right}</answer>") == right


def test_a_scorer_failure_is_a_grader_error_not_a_wrong_answer():
    v = score(json.dumps({"task": "word_sorting", "seed": 3}), "<answer>x</answer>")
    assert v.outcome == "error" and "KeyError" in v.detail
    assert grader_failed("reasoning_gym", v.outcome)  # dropped by reward.on_error, never trained as 0
    assert not grader_failed("reasoning_gym", "wrong")


def test_the_reward_actor_grades_a_mixed_group_and_counts_per_kind():
    it, num = _item(), _item("basic_arithmetic")
    scorer = RewardScorer()
    try:
        vs = scorer.score_group([
            {"kind": "reasoning_gym", "gold": it.gold, "completion": f"<answer>{it.meta['answer']}</answer>"},
            {"kind": "reasoning_gym", "gold": it.gold, "completion": "<answer>no</answer>"},
            {"kind": "math", "gold": num.gold, "completion": f"\\boxed{{{num.gold}}}"},
        ])
        m = scorer.snapshot()
    finally:
        scorer.close()
    assert [v.outcome for v in vs] == ["ok", "wrong", "ok"]
    assert m["reward/reasoning_gym/ok"] == 1 and m["reward/reasoning_gym/wrong"] == 1 and m["reward/math/ok"] == 1
    assert m["reward/outcome/ok"] == 2
