"""Grade programs against test specifications by running them in the sandbox; the verdict is
decided here, in the parent, from what the trusted harness reported.

    grader = CodeGrader(CodeConfig())
    grader.grade(program, {"type": "stdio", "cases": [{"input": "1 2\\n", "output": "3"}]})
    grader.grade(program, {"type": "assert", "entry_point": "add", "test": "def check(c): ..."})

- stdio: every case's stdout comes back (bounded) and is compared here with the expected output
  after normalising line ends and trailing whitespace; a case passes only with exit status 0.
- assert (HumanEval/MBPP): the harness ran `check(candidate)` in its own interpreter against
  plain-data results of the program's function (see `reward/_sandbox_harness.py`); it passes only
  if the harness's nonce-keyed record says so.

Outcome mapping: the wall deadline → `timeout`; a crossed limit (memory, processes, output, CPU
seconds, file size), processes left running after the program ended, or a forged/malformed
verdict channel → `sandbox_violation`; the sandbox failing on its own → `error`; otherwise `ok`
when every test passes and `wrong` when one does not.

Not covered: tests that need objects other than plain data to cross between test and program
(callbacks, class instances, mutation of arguments observed by the test); stdio checkers with
tolerances or multiple valid answers (exact comparison only).
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
from typing import Any, Sequence

from pydantic import TypeAdapter

from reward.config import CodeConfig
from reward.sandbox import RunResult, Sandbox
from reward.schema import AssertTests, CodeTests, StdioTests, Verdict

_TESTS = TypeAdapter(CodeTests)
_LIMIT_SIGNALS = {signal.SIGXCPU: "CPU-time limit", signal.SIGXFSZ: "file-size limit"}


def parse_tests(tests: Any) -> StdioTests | AssertTests:
    """Validate a test specification given as a dict (or JSON-decoded object)."""
    if isinstance(tests, (StdioTests, AssertTests)):
        return tests
    return _TESTS.validate_python(tests)


def normalise_output(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _limit_signal(status: str) -> str | None:
    if status.startswith("signal:"):
        return _LIMIT_SIGNALS.get(int(status.split(":")[1]))
    return None


class CodeGrader:
    """Thread-safe; `grade_batch` keeps up to `sandbox.max_parallel` programs running."""

    def __init__(self, config: CodeConfig | None = None, sandbox: Sandbox | None = None) -> None:
        self.config = config or CodeConfig()
        self.sandbox = sandbox or Sandbox(self.config.sandbox)  # raises SandboxUnavailable without bwrap

    def _verdict(self, outcome: str, detail: str, latency: float, reward: float | None = None) -> Verdict:
        c = self.config
        if reward is None:
            reward = {"ok": c.correct_reward, "wrong": c.wrong_reward}.get(outcome, c.failure_reward)
        return Verdict(outcome, reward, detail, latency)  # type: ignore[arg-type]

    def grade(self, program: str, tests: Any, timeout_s: float | None = None) -> Verdict:
        """One program against its tests; `timeout_s` overrides the sandbox's wall deadline."""
        if not isinstance(program, str):
            raise TypeError(f"program must be str, got {type(program).__name__}")
        spec = parse_tests(tests)
        if isinstance(spec, StdioTests):
            res = self.sandbox.run_stdio(program, [c.input.encode() for c in spec.cases], timeout_s)
            return self._judge_stdio(spec, res, timeout_s)
        res = self.sandbox.run_function(program, spec.entry_point, spec.test, spec.prelude, timeout_s)
        return self._judge_function(res, timeout_s)

    def grade_batch(self, items: Sequence[tuple[str, Any]]) -> list[Verdict]:
        specs = [(p, parse_tests(t)) for p, t in items]  # fail fast on a bad spec, before running anything
        if len(specs) <= 1:
            return [self.grade(p, t) for p, t in specs]
        with concurrent.futures.ThreadPoolExecutor(self.sandbox.config.max_parallel) as ex:
            return list(ex.map(lambda pt: self.grade(*pt), specs))

    # -- judging ------------------------------------------------------------------------------------

    def _judge_common(self, res: RunResult, timeout_s: float | None) -> Verdict | None:
        t = res.elapsed_s
        if res.violations:
            return self._verdict("sandbox_violation", "; ".join(res.violations), t)
        if res.timed_out:
            limit = self.sandbox.config.wall_timeout_s if timeout_s is None else timeout_s
            return self._verdict("timeout", f"no verdict within {limit}s; sandbox killed", t)
        if res.channel_error:
            if res.channel_error.startswith("sandbox exited"):
                tail = res.stderr.decode("utf-8", "replace")[-300:]
                return self._verdict("error", f"{res.channel_error}: {tail}", t)
            return self._verdict("sandbox_violation", res.channel_error, t)
        return None

    def _judge_function(self, res: RunResult, timeout_s: float | None = None) -> Verdict:
        early = self._judge_common(res, timeout_s)
        if early:
            return early
        recs = [r for k, r in res.records if k == "function"]
        if len(recs) != 1:
            return self._verdict("error", f"expected one function record, got {len(recs)}", res.elapsed_s)
        r = recs[0]
        max_out = self.sandbox.config.max_output_bytes
        if r["leftover_processes"]:
            return self._verdict("sandbox_violation", f"left {r['leftover_processes']} process(es) running", res.elapsed_s)
        if lim := _limit_signal(r["status"]):
            return self._verdict("sandbox_violation", f"program killed by the {lim}", res.elapsed_s)
        if r["stdout_size"] > max_out or r["stderr_size"] > max_out:
            return self._verdict("sandbox_violation", f"output exceeded {max_out} bytes", res.elapsed_s)
        if r["passed"]:
            return self._verdict("ok", "all tests passed", res.elapsed_s)
        return self._verdict("wrong", r["detail"], res.elapsed_s)

    def _judge_stdio(self, spec: StdioTests, res: RunResult, timeout_s: float | None = None) -> Verdict:
        early = self._judge_common(res, timeout_s)
        if early:
            return early
        cases = {r["index"]: r for k, r in res.records if k == "case"}
        if sorted(cases) != list(range(len(spec.cases))):
            return self._verdict("error", f"expected {len(spec.cases)} case records, got {len(cases)}", res.elapsed_s)
        max_out = self.sandbox.config.max_output_bytes
        passed, first_fail = 0, ""
        for i, case in enumerate(spec.cases):
            r = cases[i]
            if r["leftover_processes"]:
                return self._verdict("sandbox_violation", f"case {i}: left {r['leftover_processes']} process(es) running",
                                     res.elapsed_s)
            if r["status"] == "output_limit" or r["stderr_size"] > max_out:
                return self._verdict("sandbox_violation", f"case {i}: output exceeded {max_out} bytes", res.elapsed_s)
            if lim := _limit_signal(r["status"]):
                return self._verdict("sandbox_violation", f"case {i}: program killed by the {lim}", res.elapsed_s)
            got = normalise_output(r["stdout"].decode("utf-8", "replace"))
            if r["status"] == "exit:0" and got == normalise_output(case.output):
                passed += 1
            elif not first_fail:
                why = r["status"] if r["status"] != "exit:0" else f"expected {case.output[:60]!r}, got {got[:60]!r}"
                first_fail = f"case {i} failed: {why}"
        n = len(spec.cases)
        if passed == n:
            return self._verdict("ok", f"{n}/{n} cases passed", res.elapsed_s)
        reward = (self.config.wrong_reward + (self.config.correct_reward - self.config.wrong_reward) * passed / n
                  if self.config.partial_credit else None)
        return self._verdict("wrong", f"{passed}/{n} cases passed; {first_fail}", res.elapsed_s, reward)


_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str, prompt_code: str | None = None, entry_point: str | None = None) -> str:
    """The program in a completion: the last fenced code block, else the whole text. For
    HumanEval-style prompts the prompt's import lines are prepended when the program lacks them
    (models often restate the function without `from typing import List`), and a bare function
    body (no `def entry_point`) is appended to the prompt."""
    blocks = _FENCE_RE.findall(completion)
    code = blocks[-1] if blocks else completion
    if prompt_code and entry_point:
        if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
            return prompt_code + code
        imports = [ln for ln in prompt_code.splitlines() if re.match(r"(from\s+\S+\s+)?import\s", ln)]
        missing = [ln for ln in imports if ln not in code]
        if missing:
            code = "\n".join(missing) + "\n" + code
    return code
