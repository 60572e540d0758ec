"""Taking the program out of a code completion, and normalising stdio outputs (no sandbox needed)."""

from __future__ import annotations

import pytest

from reward.code_grader import extract_program, normalise_output, parse_tests

PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n'


def test_last_fenced_block_wins():
    text = "Try:\n```python\ndef f():\n    return 1\n```\nBetter:\n```py\ndef f():\n    return 2\n```\nDone."
    assert extract_program(text) == "def f():\n    return 2\n"
    assert extract_program("```\nprint(1)\n```") == "print(1)\n"
    assert extract_program("print(3)") == "print(3)"


def test_humaneval_prompt_imports_are_added_and_bare_bodies_completed():
    full = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    prog = extract_program(full, PROMPT, "total")
    assert prog.startswith("from typing import List\n") and "return sum(xs)" in prog
    body = "    return sum(xs)\n"
    assert extract_program(body, PROMPT, "total") == PROMPT + body


def test_normalise_output_ignores_line_endings_and_trailing_space():
    assert normalise_output("1 2  \r\n3\r\n\n") == normalise_output("1 2\n3") == "1 2\n3"
    assert normalise_output(" 1") != normalise_output("1")


def test_test_specs_are_validated():
    assert parse_tests({"type": "stdio", "cases": [{"input": "", "output": "1"}]}).type == "stdio"
    with pytest.raises(ValueError):
        parse_tests({"type": "stdio", "cases": []})
    with pytest.raises(ValueError):
        parse_tests({"type": "assert", "entry_point": "bad name", "test": ""})
    with pytest.raises(ValueError):
        parse_tests({"type": "junit"})
