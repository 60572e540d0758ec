"""`mtprl verify` run as a subprocess: one JSON verdict per item, in order, with outcome/reward/detail."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADD = {"type": "assert", "entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


def verify(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # `python -m services.cli_verify` is the same Typer app that `mtprl verify` mounts.
    return subprocess.run([sys.executable, "-m", "services.cli_verify", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


def lines(out: str) -> list[dict]:
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    for r in rows:
        assert set(r) == {"outcome", "reward", "detail"}
    return rows


def test_math_single(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(r"We get $\frac{1}{2}$, so the answer is \boxed{0.5}.")
    r = verify("math", "--gold", r"\frac{1}{2}", "--completion", str(f))
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [{"outcome": "ok", "reward": 1.0, "detail": ""}]
    r = verify("math", "--gold", "3", "--completion", "-", stdin="no idea")
    assert lines(r.stdout) == [{"outcome": "wrong", "reward": 0.0, "detail": "no answer found"}]


def test_math_jsonl_keeps_order_and_reports_bad_lines(tmp_path):
    f = tmp_path / "m.jsonl"
    rows = [{"gold": "3", "completion": r"\boxed{3}"}, "not json", {"gold": "4", "completion": "The answer is 5"},
            {"gold": 7, "completion": "#### 7"}, {"completion": "x"}, {"gold": "1", "completion": r"\boxed{(10^{100000})!}"}]
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    r = verify("math", "--jsonl", str(f), "--deadline", "3")
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    assert [o["outcome"] for o in out] == ["ok", "error", "wrong", "ok", "error", "timeout"]
    assert "line 2" in out[1]["detail"] and "line 5" in out[4]["detail"]


def test_math_usage_errors_exit_2(tmp_path):
    assert verify("math", "--gold", "3").returncode == 2
    assert verify("math", "--gold", "3", "--completion", str(tmp_path / "missing.txt")).returncode == 2


@needs_bwrap
def test_code_single_assert_and_stdio(tmp_path):
    prog, tests = tmp_path / "p.py", tmp_path / "t.json"
    prog.write_text("def add(a, b):\n    return a + b\n")
    tests.write_text(json.dumps(ADD))
    r = verify("code", "--program", str(prog), "--tests", str(tests))
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [{"outcome": "ok", "reward": 1.0, "detail": "all tests passed"}]
    prog.write_text("print(sum(map(int, input().split())))\n")
    tests.write_text(json.dumps({"type": "stdio", "cases": [{"input": "1 2", "output": "3"},
                                                            {"input": "2 2", "output": "5"}]}))
    out = lines(verify("code", "--program", str(prog), "--tests", str(tests)).stdout)
    assert out[0]["outcome"] == "wrong" and out[0]["detail"].startswith("1/2 cases passed")


@needs_bwrap
def test_code_jsonl(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"program": "def add(a, b):\n    return a + b\n", "tests": ADD},
            {"program": "def add(a, b):\n    return 0\n", "tests": ADD},
            {"program": "import time\ntime.sleep(30)\n", "tests": ADD},
            {"program": "x", "tests": {"type": "nope"}},
            {"program": "while True:\n    print('x' * 4096)\n", "tests": {"type": "stdio", "cases": [{"input": "", "output": ""}]}}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    r = verify("code", "--jsonl", str(f), "--timeout", "2")
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    assert [o["outcome"] for o in out] == ["ok", "wrong", "timeout", "error", "sandbox_violation"]
    assert "invalid tests" in out[3]["detail"]


@needs_bwrap
def test_code_bad_tests_file_exits_2(tmp_path):
    prog, tests = tmp_path / "p.py", tmp_path / "t.json"
    prog.write_text("pass\n")
    tests.write_text('{"type": "assert"}')
    r = verify("code", "--program", str(prog), "--tests", str(tests))
    assert r.returncode == 2 and "invalid tests" in r.stderr


def test_code_without_bwrap_refuses_unless_unsafe_local(tmp_path):
    prog, tests = tmp_path / "p.py", tmp_path / "t.json"
    prog.write_text("def add(a, b):\n    return a + b\n")
    tests.write_text(json.dumps(ADD))
    env_path = tmp_path / "bin"
    env_path.mkdir()
    (env_path / "sh").symlink_to("/bin/sh")  # a PATH with no bwrap
    base = [sys.executable, "-m", "services.cli_verify", "code", "--program", str(prog), "--tests", str(tests)]
    r = subprocess.run(base, cwd=REPO, capture_output=True, text=True, env={"PATH": str(env_path)}, timeout=120)
    assert r.returncode == 2 and "bubblewrap" in r.stderr
    r = subprocess.run(base + ["--unsafe-local"], cwd=REPO, capture_output=True, text=True,
                       env={"PATH": str(env_path)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout)[0]["outcome"] == "ok"


@pytest.mark.skipif(importlib.util.find_spec("services.cli_model") is None,
                    reason="the lead's mtprl CLI needs services.cli_model, absent in this checkout")
def test_mtprl_verify_is_mounted():
    r = subprocess.run([str(REPO / ".venv" / "bin" / "mtprl"), "verify", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "math" in r.stdout and "code" in r.stdout
