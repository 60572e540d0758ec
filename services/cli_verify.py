"""`mtprl verify`: check rewards outside a run, for people and scripts.

    mtprl verify math --gold '\\frac12' --completion answer.txt
    mtprl verify math --jsonl items.jsonl          # {"gold": ..., "completion": ...} per line
    mtprl verify code --program sol.py --tests tests.json
    mtprl verify code --jsonl items.jsonl          # {"program": ..., "tests": {...}} per line

Each item prints one JSON line `{"outcome", "reward", "detail"}`, in input order; outcome is one
of ok, wrong, timeout, error, sandbox_violation. Tests are `{"type": "stdio", "cases": [{"input",
"output"}]}` or `{"type": "assert", "entry_point", "test"[, "prelude"]}`. `--completion -` reads
stdin. Exit status: 0 when verdicts were printed (whatever they say), 2 for unusable input or
when no sandbox is available (pass `--unsafe-local` to run code without isolation, trusted code only).
A malformed JSONL line yields an `error` verdict for that line and the rest still run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Check math answers and programs with the same graders a run uses.")


def _emit(verdict: dict[str, Any]) -> None:
    print(json.dumps({"outcome": verdict["outcome"], "reward": verdict["reward"], "detail": verdict["detail"]},
                     ensure_ascii=False), flush=True)


def _bad_input(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        _bad_input(f"cannot read {path}: {e.strerror}")
        raise  # unreachable


def _jsonl(path: Path, keys: tuple[str, str]) -> list[tuple[int, Any]]:
    """(line number, (a, b)) per non-empty line, or (line number, error text) for a bad line."""
    rows: list[tuple[int, Any]] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or any(k not in row for k in keys):
                raise ValueError(f"expected an object with keys {list(keys)}")
            rows.append((n, (row[keys[0]], row[keys[1]])))
        except ValueError as e:
            rows.append((n, f"line {n}: {e}"))
    return rows


def _error(detail: str) -> dict[str, Any]:
    return {"outcome": "error", "reward": 0.0, "detail": detail}


@app.command("math")
def verify_math(
    gold: Optional[str] = typer.Option(None, "--gold", help="Gold answer (LaTeX or plain)."),
    completion: Optional[Path] = typer.Option(None, "--completion", help="File with the completion ('-' = stdin)."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help='JSONL of {"gold", "completion"} objects.'),
    deadline: float = typer.Option(5.0, help="Hard per-item deadline in seconds."),
    workers: int = typer.Option(2, help="Verifier processes."),
) -> None:
    """Verify math answers with math-verify (\\boxed{} first, then 'answer is' / '####')."""
    from reward.config import MathConfig
    from reward.math_verify_worker import MathVerifierPool

    if (jsonl is None) == (gold is None or completion is None):
        _bad_input("give either --gold and --completion, or --jsonl")
    if deadline <= 1:
        _bad_input(f"--deadline must be above 1 s (math-verify's own timeout counts whole seconds), got {deadline}")
    try:
        # math-verify's SIGALRM fires first (whole seconds, below the hard deadline); the parent kills after
        cfg = MathConfig(deadline_s=deadline, inner_timeout_s=max(1, min(3, int(deadline - 1e-9))), num_workers=workers)
    except ValueError as e:
        _bad_input(str(e))
    rows = _jsonl(jsonl, ("gold", "completion")) if jsonl else [(1, (gold, _read_text(completion)))]
    good = [(n, r) for n, r in rows if isinstance(r, tuple)]
    bad_types = [n for n, (g, c) in good if not isinstance(g, (str, int, float)) or not isinstance(c, str)]
    with MathVerifierPool(cfg) as pool:
        items = [(str(g), c) for n, (g, c) in good if n not in bad_types]
        verdicts = iter(pool.verify_batch(items) if items else [])
        for n, r in rows:
            if isinstance(r, str):
                _emit(_error(r))
            elif n in bad_types:
                _emit(_error(f"line {n}: gold must be a string or number and completion a string"))
            else:
                _emit(next(verdicts).to_dict())


@app.command("code")
def verify_code(
    program: Optional[Path] = typer.Option(None, "--program", help="Python file to test ('-' = stdin)."),
    tests: Optional[Path] = typer.Option(None, "--tests", help='JSON test spec ({"type": "stdio"|"assert", ...}).'),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help='JSONL of {"program", "tests"} objects.'),
    timeout: float = typer.Option(10.0, help="Wall-clock deadline per program, seconds."),
    unsafe_local: bool = typer.Option(False, "--unsafe-local",
                                      help="Run WITHOUT the bubblewrap sandbox (trusted code only)."),
) -> None:
    """Run programs against tests inside the sandbox and grade them."""
    from pydantic import ValidationError

    from reward.code_grader import CodeGrader, parse_tests
    from reward.config import CodeConfig, SandboxConfig
    from reward.sandbox import Sandbox, SandboxUnavailable

    if (jsonl is None) == (program is None or tests is None):
        _bad_input("give either --program and --tests, or --jsonl")
    if jsonl:
        rows = _jsonl(jsonl, ("program", "tests"))
    else:
        try:
            spec = json.loads(_read_text(tests))
        except ValueError as e:
            _bad_input(f"{tests}: not JSON: {e}")
        rows = [(1, (_read_text(program), spec))]
    parsed: list[tuple[int, Any]] = []
    for n, r in rows:
        if isinstance(r, tuple):
            try:
                if not isinstance(r[0], str):
                    raise ValueError("program must be a string")
                r = (r[0], parse_tests(r[1]))
            except (ValidationError, ValueError) as e:
                msg = f"line {n}: invalid tests: {e}".replace("\n", " ")
                if not jsonl:
                    _bad_input(msg)
                r = msg
        parsed.append((n, r))
    try:
        cfg = CodeConfig(sandbox=SandboxConfig(mode="unsafe_local" if unsafe_local else "bwrap", wall_timeout_s=timeout))
        sandbox = Sandbox(cfg.sandbox)
    except SandboxUnavailable as e:
        _bad_input(str(e))
    with sandbox:
        grader = CodeGrader(cfg, sandbox)
        items = [r for _, r in parsed if isinstance(r, tuple)]
        verdicts = iter(grader.grade_batch(items) if items else [])
        for _, r in parsed:
            _emit(_error(r) if isinstance(r, str) else next(verdicts).to_dict())
if __name__ == "__main__":
    app()
