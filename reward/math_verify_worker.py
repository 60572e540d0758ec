"""Math verification in a pool of worker processes with hard parent-side deadlines.

Why processes: math-verify bounds its own work with SIGALRM, which only works on a process's
main thread (off it, it raises, and veRL's broad `except` turned every score into a silent 0), and
SIGALRM cannot interrupt long C-level work inside sympy/gmpy (e.g. `(10^{100000})!`). So each item
runs on the main thread of a worker process, with math-verify's own timeout as the first line and
a parent-side wall-clock deadline as the hard one: past it the worker is SIGKILLed and replaced,
and the item is reported as `timeout`. A worker that dies (segfault, OOM) yields `error`. Neither
is ever folded into `wrong`.

Covered: extraction (`reward/extract.py`; the rules are in its docstring and docs/rewards.md) in
the parent, `math_verify.parse` of gold and answer and `math_verify.verify(gold, answer)` (gold
first: verify is not symmetric) on each (gold, answer) pair in the workers (`judge`: when sympy
cannot compare a pair, math-verify's own text comparison decides, as with its defaults; only a
failure with no text to compare is an `error`), format and overlong shaping, per-outcome counters. Shortcuts that do not change a verdict: two plain
integers are compared in the parent (exactly what math-verify does with two sympy Integers),
identical (gold, answer) pairs in a batch are graded once, checked verdicts (ok/wrong, never
timeout/error) are cached, and workers cache parsed texts. Workers are plain `python -m`
subprocesses speaking length-prefixed JSON on stdin/stdout (no multiprocessing: nothing of the
caller's `__main__` is re-imported, and it works the same inside Ray actors).

Not covered: judging free-form proofs; answers that sympy cannot compare are graded by
math-verify's text comparison (exact match of the extracted texts), so `12:00` vs `12:00 pm` is
`wrong`; the deadline is per item, so a batch of N
stuck items takes about N / num_workers deadlines.

    pool = MathVerifierPool(MathConfig(num_workers=2))
    verdicts = pool.verify_batch([("\\frac12", "... \\boxed{0.5}")])
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing.connection as mpc
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from reward.config import MathConfig
from reward.extract import extract_answer
from reward.schema import OUTCOMES, Verdict

_WORKER_ADDRESS_SPACE = 4 << 30  # a runaway sympy expansion ends as MemoryError, not host OOM
_PARSE_CACHE = 4096
_WARMUP = [(r"\frac{1}{2}", "0.5"), (r"(-\infty, 0)", r"(-\infty,0)"), (r"\{1,2\}", r"\{2,1\}"), ("x=3", "3"),
           (r"[0,1] \cup [2,3]", r"[2,3]\cup[0,1]"), (r"\sqrt{2}", r"\sqrt 2"), ("x^2+1", "1+x^2"),
           (r"5\text{ cm}", "5"), (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}")]
_STARTUP_DEADLINE_S = 60.0  # importing sympy + math-verify takes ~0.5 s idle, much more on a loaded host
_REPO_ROOT = str(Path(__file__).resolve().parents[1])  # so `-m reward...` resolves to this package


_DELIM_RE = re.compile(r"(?<!\\)\$")  # an unescaped $ (a LaTeX math delimiter, not a dollar sign)


_INT_RE = re.compile(r"-?\d{1,100}")


def _integer_verdict(gold: str, answer: str) -> tuple[str, str] | None:
    """Both plain integers (the bulk of GSM8K / reasoning-gym answers): math-verify would parse
    both to sympy Integers and compare them exactly, so compare here and skip the round trip.
    Anything else (decimals, commas, LaTeX, units) goes to math-verify."""
    g, a = gold.strip(), answer.strip()
    if _INT_RE.fullmatch(g) and _INT_RE.fullmatch(a):
        return ("ok", "") if int(g) == int(a) else ("wrong", "answer differs from gold")
    return None


def _wrap(text: str) -> str:
    # math-verify's LaTeX extractor reads \boxed{} contents most reliably (units, \text, spacing);
    # a gold that already carries delimiters is parsed as given.
    return text if ("\\boxed" in text or _DELIM_RE.search(text)) else "\\boxed{" + text + "}"


def judge(gold_p: list[Any], pred_p: list[Any], compare: Callable[[Any, Any], bool]) -> tuple[str, str, bool]:
    """(outcome, detail, fell_back) of a parsed gold against a parsed answer, decided as
    math-verify's own `verify(gold, pred)` decides it, without hiding why a comparison failed.

    `parse` returns [sympy value, text] (its `fallback_mode="first_match"` appends the extracted
    text), and `verify` is true if any (gold, pred) pair matches: two sympy values by sympy, two
    texts by exact comparison after stripping, mixed pairs never. With its defaults a pair that
    raises or times out counts as False and the next pair is tried, which is how `12:00` (sympy
    reads 12/0 = zoo and cannot compare it) is still judged by its text. `compare` is `verify` on
    one pair with `raise_on_error=True`, so every failure is seen here:

    - a pair matches -> `ok` (also after a failed sympy pair: equal texts are math-verify's verdict);
    - else a pair timed out -> `timeout` (never folded into `wrong`);
    - else a pair raised and two texts were compared -> `wrong`, as math-verify's defaults judge
      it, with the error in the detail;
    - else a pair raised and there was no text to compare -> `error`.

    `fell_back` is true when sympy failed and the texts decided (counted by the pool).
    """
    from math_verify.errors import TimeoutException  # lazy: math_verify imports sympy

    failure: str | None = None  # the first sympy failure, for the detail
    timed_out = text_compared = False
    for g, t in itertools.product(gold_p, pred_p):
        is_text = isinstance(g, str) and isinstance(t, str)
        text_compared |= is_text and bool(g.strip()) and bool(t.strip())
        try:
            if compare(g, t):
                if failure is None:
                    return "ok", "", False
                return "ok", f"equal texts (sympy could not compare: {failure})", True
        except TimeoutException:
            timed_out = True
            failure = failure or "timeout"
        except Exception as e:  # noqa: BLE001 -- reported below, never swallowed into a silent 0
            failure = failure or f"{type(e).__name__}: {str(e)[:200]}"
    if timed_out:
        return "timeout", "math-verify timed out inside the worker", False
    if failure is not None:
        if text_compared:
            return "wrong", f"texts differ (sympy could not compare: {failure})", True
        return "error", failure, False
    return "wrong", "answer differs from gold", False


def _read_frame(f: Any) -> Any:
    head = f.read(4)
    if len(head) < 4:
        raise EOFError
    n = int.from_bytes(head, "big")
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return json.loads(data)


def _write_frame(f: Any, obj: Any) -> None:
    data = json.dumps(obj).encode()
    f.write(len(data).to_bytes(4, "big") + data)
    f.flush()


def _serve(inner_timeout: int, float_rounding: int, strict: bool) -> None:
    """Worker loop (`python -m reward.math_verify_worker --serve ...`): read (gold, answer) frames
    on stdin, answer (outcome, detail) frames on the original stdout. Runs on the main thread."""
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints must not corrupt the protocol stream
    proto_in = os.fdopen(0, "rb")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which kills us
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_ADDRESS_SPACE, _WORKER_ADDRESS_SPACE))
    except (ValueError, OSError):
        pass
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]

    def compare(g: Any, t: Any) -> bool:  # one (gold, pred) pair; `judge` sees every failure
        return verify(g, t, float_rounding=float_rounding, strict=strict,
                      timeout_seconds=inner_timeout, raise_on_error=True)
    # Parsed golds and answers, by text: a GRPO group shares one gold and repeats answers, and
    # parsing is most of the cost. Only successful parses are kept (a timeout raises past the cache).
    parsed: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def cached_parse(text: str) -> Any:
        if text in parsed:
            parsed.move_to_end(text)
            return parsed[text]
        value = parse(_wrap(text), configs, parsing_timeout=inner_timeout, raise_on_error=True)
        parsed[text] = value
        if len(parsed) > _PARSE_CACHE:
            parsed.popitem(last=False)
        return value

    # Warm up before reporting ready: the first interval/set/matrix comparison pays for sympy's
    # lazy imports (a second or more on a loaded host), which must not eat a real item's deadline.
    for g, a in _WARMUP:
        try:
            verify(cached_parse(g), cached_parse(a), timeout_seconds=inner_timeout)
        except Exception:  # incl. TimeoutException: warm-up is best effort
            pass
    parsed.clear()
    _write_frame(proto_out, "ready")
    while True:
        try:
            gold, answer = _read_frame(proto_in)
        except EOFError:
            return
        try:
            gold_p = cached_parse(gold)
            if not gold_p:
                reply = ["error", f"gold answer {gold[:80]!r} could not be parsed"]
            else:
                pred_p = cached_parse(answer)
                if not pred_p:
                    reply = ["wrong", "answer could not be parsed"]
                else:
                    reply = list(judge(gold_p, pred_p, compare))  # [outcome, detail, fell_back]
        except TimeoutException:
            reply = ["timeout", "math-verify timed out inside the worker"]
        except Exception as e:  # reported as `error` with its type, never as a wrong answer
            reply = ["error", f"{type(e).__name__}: {str(e)[:200]}"]
        _write_frame(proto_out, reply)


class _Worker:
    """A verifier subprocess. Plain `python -m` rather than multiprocessing: nothing of the
    parent's `__main__` is re-imported, and it behaves the same inside a Ray actor."""

    __slots__ = ("proc", "state", "job", "t0")

    def __init__(self, cfg: MathConfig) -> None:
        cmd = [sys.executable, "-m", "reward.math_verify_worker", "--serve",
               str(cfg.inner_timeout_s), str(cfg.float_rounding), str(int(cfg.strict))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_REPO_ROOT)
        self.state = "starting"  # -> idle <-> busy
        self.job: int | None = None
        self.t0 = time.monotonic()

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class MathVerifierPool:
    """`num_workers` verifier processes; `verify_batch` grades a whole group, in order.

    Thread-safe (one batch at a time); use `close()` or a `with` block to stop the workers."""

    def __init__(self, config: MathConfig | None = None) -> None:
        self.config = config or MathConfig()
        self._lock = threading.RLock()  # one batch at a time; re-entered by the cache helpers
        self.counts: collections.Counter[str] = collections.Counter({o: 0 for o in OUTCOMES})
        self.restarts = 0
        self.cache_hits = 0
        self.text_fallbacks = 0  # verdicts math-verify's text comparison gave after sympy failed
        # (gold, extracted answer) -> (outcome, detail), for checked verdicts only (ok/wrong): never
        # a timeout or an error, which may not recur.
        self._cache: collections.OrderedDict[tuple[str, str], tuple[str, str]] = collections.OrderedDict()
        self._workers = [_Worker(self.config) for _ in range(self.config.num_workers)]  # they warm up meanwhile

    def __enter__(self) -> "MathVerifierPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self.config)
        self.restarts += 1

    def _cache_get(self, gold: str, answer: str) -> tuple[str, str] | None:
        with self._lock:
            hit = self._cache.get((gold, answer))
            if hit is not None:
                self._cache.move_to_end((gold, answer))
                self.cache_hits += 1
            return hit

    def _cache_put(self, key: tuple[str, str], value: tuple[str, str]) -> None:
        # called with self._lock held
        if self.config.cache_size:
            self._cache[key] = value
            if len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    def _shape(self, outcome: str, detail: str, source: str, length: int, latency: float) -> Verdict:
        c = self.config
        if outcome in ("ok", "wrong"):
            r = c.correct_reward if outcome == "ok" else c.wrong_reward
            if source == "boxed":
                r += c.format_reward
            if c.overlong is not None:
                r += c.overlong.penalty(length)
        else:
            r = c.failure_reward
        self.counts[outcome] += 1
        return Verdict(outcome, r, detail, latency)  # type: ignore[arg-type]

    def verify(self, gold: str, completion: str, length: int | None = None) -> Verdict:
        return self.verify_batch([(gold, completion)], None if length is None else [length])[0]

    def verify_batch(self, items: Sequence[tuple[str, str]], lengths: Sequence[int] | None = None) -> list[Verdict]:
        """Grade `(gold, completion)` pairs; `lengths` (e.g. token counts) feed overlong shaping,
        defaulting to character counts."""
        with self._lock:
            return self._verify_batch(items, lengths)

    def _verify_batch(self, items: Sequence[tuple[str, str]], lengths: Sequence[int] | None) -> list[Verdict]:
        c = self.config
        if lengths is not None and len(lengths) != len(items):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(items)} items")
        results: list[Verdict | None] = [None] * len(items)
        todo: collections.deque[tuple[int, str, str]] = collections.deque()
        sources: list[str] = [""] * len(items)
        t_start = [0.0] * len(items)
        first_of: dict[tuple[str, str], int] = {}
        dups: dict[int, list[int]] = {}
        for i, (gold, completion) in enumerate(items):
            if not isinstance(gold, str) or not isinstance(completion, str):
                raise TypeError(f"item {i}: gold and completion must be str")
            n = lengths[i] if lengths is not None else len(completion)
            ext = extract_answer(completion, c.fallbacks, c.multiple_boxed, c.max_completion_chars)
            sources[i] = ext.source
            if ext.answer is None:
                results[i] = self._shape("wrong", "no answer found", "none", n, 0.0)
            elif len(ext.answer) > c.max_answer_chars:
                results[i] = self._shape("wrong", f"answer longer than {c.max_answer_chars} chars", ext.source, n, 0.0)
            elif (fast := _integer_verdict(gold, ext.answer)) is not None:
                results[i] = self._shape(fast[0], fast[1], ext.source, n, 0.0)
            elif (hit := self._cache_get(gold, ext.answer)) is not None:
                results[i] = self._shape(hit[0], hit[1], ext.source, n, 0.0)
            elif (gold, ext.answer) in first_of:  # same pair earlier in this batch: graded once
                dups[first_of[(gold, ext.answer)]].append(i)
            else:
                first_of[(gold, ext.answer)] = i
                dups[i] = []
                todo.append((i, gold, ext.answer))
        jobs = {i: (gold, ans) for i, gold, ans in todo}
        length_of = (lambda i: lengths[i]) if lengths is not None else (lambda i: len(items[i][1]))

        if not self._workers:
            raise RuntimeError("MathVerifierPool is closed")
        while todo or any(w.state == "busy" for w in self._workers):
            for k, w in enumerate(self._workers):
                if w.state == "idle" and todo:
                    i, gold, ans = todo.popleft()
                    try:
                        _write_frame(w.proc.stdin, [gold, ans])
                    except (BrokenPipeError, OSError):  # died while idle: replace, retry the item
                        self._replace(k)
                        todo.appendleft((i, gold, ans))
                        continue
                    w.state, w.job, w.t0 = "busy", i, time.monotonic()
                    t_start[i] = w.t0
            watched = [w for w in self._workers if w.state != "idle"]
            now = time.monotonic()
            ends = [w.t0 + (c.deadline_s if w.state == "busy" else _STARTUP_DEADLINE_S) for w in watched]
            ready = set(mpc.wait([w.proc.stdout for w in watched], timeout=max(0.0, min(ends) - now)))
            now = time.monotonic()
            for k, w in enumerate(self._workers):
                if w.state == "idle":
                    continue
                i = w.job
                if w.proc.stdout in ready:
                    try:
                        msg = _read_frame(w.proc.stdout)
                    except (EOFError, OSError, ValueError):
                        code = w.proc.poll()
                        self._replace(k)
                        if i is not None:
                            results[i] = self._shape("error", f"verifier process died (exit code {code})",
                                                     sources[i], length_of(i), now - t_start[i])
                        elif self.restarts > 8 * c.num_workers + 8:
                            raise RuntimeError(f"math verifier workers keep dying at start (exit code {code})")
                        continue
                    if w.state == "starting":
                        w.state = "idle"
                        continue
                    w.state, w.job = "idle", None
                    outcome, detail = msg[0], msg[1]
                    if len(msg) > 2 and msg[2]:  # sympy failed and the texts decided (see `judge`)
                        self.text_fallbacks += 1
                    if outcome in ("ok", "wrong"):
                        self._cache_put(jobs[i], (outcome, detail))
                    results[i] = self._shape(outcome, detail, sources[i], length_of(i), now - t_start[i])
                elif w.state == "busy" and now - w.t0 >= c.deadline_s:
                    self._replace(k)  # the stuck worker is killed; its replacement warms up
                    results[i] = self._shape("timeout", f"no verdict within {c.deadline_s}s; worker killed",
                                             sources[i], length_of(i), now - t_start[i])
                elif w.state == "starting" and now - w.t0 >= _STARTUP_DEADLINE_S:
                    self._replace(k)
        for i, others in dups.items():
            for j in others:
                v = results[i]
                results[j] = self._shape(v.outcome, v.detail, sources[j], length_of(j), v.latency_s)  # type: ignore[union-attr]
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def worker_pids(pool: MathVerifierPool) -> list[int]:
    """The live workers' pids (for tests and diagnostics)."""
    return [w.proc.pid for w in pool._workers]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
    elif len(sys.argv) == 3:  # python -m reward.math_verify_worker GOLD COMPLETION
        with MathVerifierPool(MathConfig(num_workers=1)) as p:
            print(p.verify(sys.argv[1], sys.argv[2]).to_json())
    else:
        sys.exit("usage: python -m reward.math_verify_worker GOLD COMPLETION")
