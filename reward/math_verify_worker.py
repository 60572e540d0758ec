"""Math verification in a pool of worker processes with hard parent-side deadlines.

Why processes: math-verify bounds its own work with SIGALRM, which only works on a process's
main thread (off it, it raises, and veRL's broad `except` turned every score into a silent 0), and
SIGALRM cannot interrupt long C-level work inside sympy/gmpy (e.g. `(10^{100000})!`). So each item
runs on the main thread of a worker process, with math-verify's own timeout as the first line and
a parent-side wall-clock deadline as the hard one: past it the worker is SIGKILLed and replaced,
and the item is reported as `timeout`. A worker that dies (segfault, OOM) yields `error`. Neither
is ever folded into `wrong`.

Covered: extraction (`reward/extract.py`) in the parent, `math_verify.parse` of gold and answer
and `math_verify.verify(gold, answer)` (gold first: verify is not symmetric) in the workers, format
and overlong shaping, per-outcome counters. Not covered: judging free-form proofs; answers that
math-verify cannot parse are graded by its string fallback (exact match after normalisation).

    pool = MathVerifierPool(MathConfig(num_workers=2))
    verdicts = pool.verify_batch([("\\frac12", "... \\boxed{0.5}")])
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection as mpc
import os
import signal
import threading
import time
from typing import Any, Sequence

from reward.config import MathConfig
from reward.extract import extract_answer
from reward.types import OUTCOMES, Verdict

_WORKER_ADDRESS_SPACE = 4 << 30  # a runaway sympy expansion ends as MemoryError, not host OOM


def _wrap(text: str) -> str:
    # math-verify's LaTeX extractor reads \boxed{} contents most reliably (units, \text, spacing);
    # a gold that already carries delimiters is parsed as given.
    return text if ("\\boxed" in text or "$" in text) else "\\boxed{" + text + "}"


def _worker_main(conn: mpc.Connection, inner_timeout: int, float_rounding: int, strict: bool) -> None:
    """Worker loop: receive (gold, answer) pairs, reply (outcome, detail). Runs on the main thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which kills us
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_ADDRESS_SPACE, _WORKER_ADDRESS_SPACE))
    except (ValueError, OSError):
        pass
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    while True:
        try:
            gold, answer = conn.recv()
        except EOFError:
            return
        try:
            gold_p = parse(_wrap(gold), configs, parsing_timeout=inner_timeout, raise_on_error=True)
            if not gold_p:
                reply = ("error", f"gold answer {gold[:80]!r} could not be parsed")
            else:
                pred_p = parse(_wrap(answer), configs, parsing_timeout=inner_timeout, raise_on_error=True)
                if not pred_p:
                    reply = ("wrong", "answer could not be parsed")
                else:
                    ok = verify(gold_p, pred_p, float_rounding=float_rounding, strict=strict,
                                timeout_seconds=inner_timeout, raise_on_error=True)
                    reply = ("ok", "") if ok else ("wrong", "answer differs from gold")
        except TimeoutException:
            reply = ("timeout", "math-verify timed out inside the worker")
        except Exception as e:  # reported as `error` with its type, never as a wrong answer
            reply = ("error", f"{type(e).__name__}: {str(e)[:200]}")
        conn.send(reply)


class _Worker:
    __slots__ = ("proc", "conn", "job", "t0")

    def __init__(self, ctx: Any, cfg: MathConfig) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, cfg.inner_timeout_s, cfg.float_rounding, cfg.strict))
        self.proc.start()
        child.close()
        self.conn = parent
        self.job: int | None = None
        self.t0 = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        finally:
            self.conn.close()


class MathVerifierPool:
    """`num_workers` verifier processes; `verify_batch` grades a whole group, in order.

    Thread-safe (one batch at a time); use `close()` or a `with` block to stop the workers."""

    def __init__(self, config: MathConfig | None = None) -> None:
        self.config = config or MathConfig()
        # forkserver: replacing a killed worker forks a process that already imported sympy and
        # math-verify (tens of ms) instead of re-importing them (about a second); and unlike plain
        # fork it is safe from a threaded parent such as a Ray actor.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["math_verify", "reward.math_verify_worker"])
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter({o: 0 for o in OUTCOMES})
        self.restarts = 0
        self._workers = [_Worker(self._ctx, self.config) for _ in range(self.config.num_workers)]

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
        self._workers[i] = _Worker(self._ctx, self.config)
        self.restarts += 1

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
        c = self.config
        if lengths is not None and len(lengths) != len(items):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(items)} items")
        results: list[Verdict | None] = [None] * len(items)
        todo: collections.deque[tuple[int, str, str]] = collections.deque()
        sources: list[str] = [""] * len(items)
        t_start = [0.0] * len(items)
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
            else:
                todo.append((i, gold, ext.answer))
        length_of = (lambda i: lengths[i]) if lengths is not None else (lambda i: len(items[i][1]))

        with self._lock:
            if not self._workers:
                raise RuntimeError("MathVerifierPool is closed")
            while todo or any(w.job is not None for w in self._workers):
                for k, w in enumerate(self._workers):
                    if w.job is None and todo:
                        i, gold, ans = todo.popleft()
                        try:
                            w.conn.send((gold, ans))
                        except (BrokenPipeError, OSError):  # died while idle: replace, retry the item
                            self._replace(k)
                            todo.appendleft((i, gold, ans))
                            continue
                        w.job, w.t0 = i, time.monotonic()
                        t_start[i] = w.t0
                busy = [w for w in self._workers if w.job is not None]
                if not busy:
                    continue
                wait_s = max(0.0, min(w.t0 for w in busy) + c.deadline_s - time.monotonic())
                ready = set(mpc.wait([w.conn for w in busy], timeout=wait_s))
                now = time.monotonic()
                for k, w in enumerate(self._workers):
                    i = w.job
                    if i is None:
                        continue
                    if w.conn in ready:
                        try:
                            outcome, detail = w.conn.recv()
                        except (EOFError, OSError):
                            code = w.proc.exitcode if not w.proc.is_alive() else None
                            self._replace(k)
                            results[i] = self._shape("error", f"verifier process died (exit code {code})",
                                                     sources[i], length_of(i), now - t_start[i])
                            continue
                        w.job = None
                        results[i] = self._shape(outcome, detail, sources[i], length_of(i), now - t_start[i])
                    elif now - w.t0 >= c.deadline_s:
                        self._replace(k)  # the stuck worker is killed; its replacement is idle
                        results[i] = self._shape("timeout", f"no verdict within {c.deadline_s}s; worker killed",
                                                 sources[i], length_of(i), now - t_start[i])
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def worker_pids(pool: MathVerifierPool) -> list[int]:
    """The live workers' pids (for tests and diagnostics)."""
    return [w.proc.pid for w in pool._workers if w.proc.pid is not None]


if __name__ == "__main__":  # python -m reward.math_verify_worker GOLD COMPLETION
    import sys
    with MathVerifierPool(MathConfig(num_workers=1)) as p:
        print(p.verify(sys.argv[1], sys.argv[2]).to_json())
    os._exit(0)
