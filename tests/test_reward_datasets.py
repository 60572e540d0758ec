"""Dataset loaders: reasoning-gym tasks, HumanEval, user JSONL layouts, splits and prompt templates."""

from __future__ import annotations

import json
import shutil

import pytest

from reward.datasets import (MATH_TEMPLATE, humaneval_items, jsonl_items, reasoning_gym_items, render_prompt,
                             split)
from reward.schema import AssertTests, RewardItem


class FakeChatTokenizer:
    """Any object with apply_chat_template will do; this one records what it was given."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False, **kw):
        self.calls.append((conversation, tokenize, add_generation_prompt))
        body = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in conversation)
        return body + ("<|assistant|>" if add_generation_prompt else "")


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum", "gsm_symbolic"])
def test_reasoning_gym_tasks_are_seeded_and_sized(task):
    a = reasoning_gym_items(task, seed=3, size=20)
    b = reasoning_gym_items(task, seed=3, size=20)
    c = reasoning_gym_items(task, seed=4, size=20)
    assert len(a) == 20 and all(isinstance(x, RewardItem) and x.kind == "math" for x in a)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert [x.prompt for x in a] != [x.prompt for x in c]
    assert all(x.prompt.endswith("within \\boxed{}.") and x.gold for x in a)
    assert len({x.id for x in a}) == 20


def test_reasoning_gym_golds_verify_against_themselves():
    from reward.config import MathConfig
    from reward.math_verify_worker import MathVerifierPool

    items = [it for t in ("basic_arithmetic", "chain_sum", "gsm_symbolic") for it in reasoning_gym_items(t, seed=0, size=10)]
    with MathVerifierPool(MathConfig(num_workers=2)) as pool:
        verdicts = pool.verify_batch([(it.gold, f"so \\boxed{{{it.gold}}}") for it in items])
        wrong = pool.verify_batch([(it.gold, f"so \\boxed{{{it.gold}1}}") for it in items])
    assert all(v.outcome == "ok" for v in verdicts)
    assert all(v.outcome == "wrong" for v in wrong)


def test_humaneval_has_164_problems_with_assert_tests():
    items = humaneval_items()
    assert len(items) == 164 and len({x.id for x in items}) == 164
    for it in items:
        assert it.kind == "code" and isinstance(it.gold, AssertTests)
        assert it.gold.prelude and f"def {it.gold.entry_point}" in it.meta["reference_program"]
        assert "def check(candidate)" in it.gold.test


def test_prompt_template_and_chat_template():
    tok = FakeChatTokenizer()
    p = render_prompt("What is 2+2?", "math", tokenizer=tok, system="Be brief.")
    assert p.startswith("<|system|>Be brief.<|end|><|user|>What is 2+2?") and p.endswith("<|assistant|>")
    assert tok.calls[0][1] is False and tok.calls[0][2] is True
    assert render_prompt("Q", "math", template="Solve: {question}") == "Solve: Q"
    assert render_prompt("Q", "math") == MATH_TEMPLATE.format(question="Q")
    with pytest.raises(TypeError, match="apply_chat_template"):
        render_prompt("Q", "math", tokenizer=object())
    items = reasoning_gym_items("chain_sum", seed=0, size=2, tokenizer=tok)
    assert all(x.prompt.startswith("<|user|>") for x in items)


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_user_jsonl_layouts(tmp_path):
    gsm = _write(tmp_path / "gsm.jsonl", [{"question": "Q1", "answer": "steps\n#### 1,200"}])
    math = _write(tmp_path / "math.jsonl", [{"problem": "P", "solution": r"so \boxed{\frac{1}{2}}", "level": "Level 2"},
                                            {"problem": "P2", "solution": "x", "answer": "7"}])
    dapo = _write(tmp_path / "dapo.jsonl", [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve X. Answer: $Answer"}],
                                             "ability": "MATH", "reward_model": {"ground_truth": "34", "style": "rule"},
                                             "extra_info": {"index": "abc"}}])
    mbpp = _write(tmp_path / "mbpp.jsonl", [{"task_id": 11, "text": "Remove first and last occurrence of a char.",
                                             "code": "def remove_Occ(s,ch):\n    i = s.find(ch)\n    j = s.rfind(ch)\n    if i < 0:\n        return s\n    s = s[:i] + s[i+1:]\n    j = s.rfind(ch)\n    return s[:j] + s[j+1:] if j >= 0 else s\n",
                                             "test_list": ['assert remove_Occ("hello","l") == "heo"',
                                                           'assert remove_Occ("abcda","a") == "bcd"'],
                                             "test_setup_code": "", "challenge_test_list": []}])
    (g,) = jsonl_items(gsm)
    assert g.gold == "1200" and g.kind == "math" and g.prompt.startswith("Q1")
    m1, m2 = jsonl_items(math, layout="math")
    assert (m1.gold, m2.gold) == (r"\frac{1}{2}", "7")
    (d,) = jsonl_items(dapo)
    assert d.gold == "34" and d.prompt == "Solve X. Answer: $Answer" and d.id.endswith("abc")
    iso = _write(tmp_path / "mbpp2.jsonl", [{"task_id": 12, "text": "Area of a circle.", "code": "import math\ndef area(r):\n    return math.pi * r * r\n",
                                             "test_list": ["assert math.isclose(area(1), 3.141592653589793)"]}])
    (c,) = jsonl_items(iso)
    assert c.gold.prelude == "import math\n"  # the assert borrowed the program's import in MBPP
    (b,) = jsonl_items(mbpp)
    assert b.kind == "code" and b.gold.entry_point == "remove_Occ" and "Your code should pass" in b.prompt
    if shutil.which("bwrap"):
        from reward.code_grader import CodeGrader
        g = CodeGrader()
        assert g.grade(b.meta["reference_program"], b.gold).outcome == "ok"
        assert g.grade("def remove_Occ(s, ch):\n    return s\n", b.gold).outcome == "wrong"
        assert g.grade(c.meta["reference_program"], c.gold).outcome == "ok"
        faker = "from unittest import mock as math\ndef area(r):\n    return 0\n"
        assert g.grade(faker, c.gold).outcome == "wrong"  # the program's imports never reach the checker


def test_bad_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "#### 1"}\n{"foo": 1}\n\n{not json\n{"question": "q2", "answer": "#### 2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: 2 of 4 rows are bad — line 2: ValueError: cannot tell the layout.*"
                                         r"; line 4: ValueError: not JSON"):
        jsonl_items(f)


def test_split_is_disjoint_stable_and_seeded():
    items = reasoning_gym_items("basic_arithmetic", seed=0, size=400)
    train, held = split(items, 0.25, seed=1)
    assert len(train) + len(held) == 400 and not {x.id for x in train} & {x.id for x in held}
    assert 60 <= len(held) <= 140
    train2, held2 = split(list(reversed(items)), 0.25, seed=1)
    assert {x.id for x in held2} == {x.id for x in held}  # order does not matter
    _, held3 = split(items, 0.25, seed=2)
    assert {x.id for x in held3} != {x.id for x in held}
    with pytest.raises(ValueError, match="held_out_fraction"):
        split(items, 1.0)


def test_parquet_and_datasets_dirs_read_verl_rows_fields_and_a_system_prompt(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reward.datasets import disk_items, parquet_items
    from learner.tiny import make_tokenizer

    verl = [{"data_source": "lighteval/MATH", "prompt": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "1+1?"}],
             "reward_model": {"style": "rule", "ground_truth": "2"}, "extra_info": {"index": 7}}]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "v.parquet")
    tok = make_tokenizer()
    (item,) = parquet_items(tmp_path / "v.parquet", tokenizer=tok)
    assert item.gold == "2" and item.id == "lighteval/MATH/7" and "Be brief." in item.prompt and "1+1?" in item.prompt
    (item,) = parquet_items(tmp_path / "v.parquet", tokenizer=tok, system="Think.")
    assert "Think." in item.prompt and "Be brief." not in item.prompt  # the spec's system prompt wins
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "2+3?", "sol": {"final": 5}, "k": "a"}])}
                         ).save_to_disk(str(tmp_path / "d"))
    (item,) = disk_items(tmp_path / "d", fields={"prompt": "text", "answer": "sol.final", "id": "k"})
    assert (item.prompt, item.gold, item.id) == ("2+3?", "5", "d/a")
    with pytest.raises(ValueError, match="holds splits \\['train'\\], not 'test'"):
        disk_items(tmp_path / "d", split_name="test")


def test_bad_paths_and_rows_are_reported_with_their_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reward.datasets import disk_items, parquet_items

    rows = [{"q": "a?", "a": "1"}, {"q": "b?", "a": ""}, {"q": "c?", "a": "3"}, {"q": None, "a": "4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: 2 of 4 rows are bad — row 1: ValueError: empty answer.*; "
                                         r"row 3: ValueError: prompt must be text"):
        parquet_items(tmp_path / "t.parquet", fields={"prompt": "q", "answer": "a"})
    with pytest.raises(ValueError, match="4 of 4 rows are bad — row 0: KeyError"):
        parquet_items(tmp_path / "t.parquet", fields={"prompt": "question", "answer": "a"})
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        parquet_items(tmp_path / "junk.parquet")
    with pytest.raises(ValueError, match="not a `datasets.save_to_disk` directory"):
        disk_items(tmp_path)


def test_any_registered_reasoning_gym_task_is_accepted_and_others_refused():
    from pydantic import ValidationError

    from services.spec import SKIP_FILE_CHECKS, DataSpec, reasoning_gym_registered

    assert len(reasoning_gym_registered()) > 50
    assert DataSpec(dataset="reasoning_gym:word_sorting").dataset == "reasoning_gym:word_sorting"
    with pytest.raises(ValidationError, match="registers no task 'nope'"):
        DataSpec(dataset="reasoning_gym:nope")
    with pytest.raises(ValidationError, match="data.fields needs answer"):
        DataSpec.model_validate({"dataset": "jsonl:x.jsonl", "fields": {"prompt": "q"}},
                                context={SKIP_FILE_CHECKS: True})
    with pytest.raises(ValidationError, match="not both"):
        DataSpec.model_validate({"dataset": "jsonl:x.jsonl", "fields": {"prompt": "q", "answer": "a", "tests": "t"}},
                                context={SKIP_FILE_CHECKS: True})


def test_code_rows_through_fields_are_graded_by_their_tests(tmp_path):
    """`data.fields: {prompt, tests}` makes code items from any table: the asserts (a list, or one
    text) become the check of an AssertTests gold (the function under test named by the calls),
    graded in the sandbox like MBPP's own rows."""
    import json

    from reward.code_grader import CodeGrader
    from reward.datasets import jsonl_items

    rows = [{"ask": "Write add(a, b).", "checks": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]},
            {"ask": "Write sq(x).", "checks": "assert sq(3) == 9\nassert sq(-2) == 4\n"},
            {"ask": "Nothing to test.", "checks": []}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    add, sq = jsonl_items(tmp_path / "c.jsonl", fields={"prompt": "ask", "tests": "checks"})
    assert add.kind == sq.kind == "code" and (add.gold.entry_point, sq.gold.entry_point) == ("add", "sq")
    ok, bad = CodeGrader().grade_batch([("def add(a, b):\n    return a + b\n", add.gold),
                                        ("def sq(x):\n    return x * 2\n", sq.gold)])
    assert (ok.outcome, bad.outcome) == ("ok", "wrong")
    (tmp_path / "c3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="1 of 3 rows are bad — line 3: ValueError: no tests in 'checks'"):
        jsonl_items(tmp_path / "c3.jsonl", fields={"prompt": "ask", "tests": "checks"})
