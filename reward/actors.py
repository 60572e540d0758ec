"""Ray reward actors: grade whole groups of completions with bounded concurrency and report
per-outcome counts and latencies.

    actor = RewardActor.options(max_concurrency=4).remote(RewardActorConfig().model_dump())
    verdicts = ray.get(actor.score_group.remote([{"kind": "math", "gold": "3", "completion": "\\\\boxed{3}"}]))
    ray.get(actor.metrics.remote())  # {"reward/outcome/ok": 1, ..., "reward/latency_p50_s": ...}

Math runs in the actor's `MathVerifierPool` (worker processes, so math-verify's SIGALRM timeouts
work although Ray calls actor methods off the main thread); code runs in the actor's `Sandbox`.
At most `max_concurrency` groups are graded at once per actor (further calls wait on a
semaphore, which is what bounds CPU use when the controller submits faster than we grade);
inside a group, math items share the pool's workers and code items run `sandbox.max_parallel`
at a time.

`RewardScorer` is the same thing without Ray, for the CLI, tests and benchmarks.
``cpu_nice`` (a run's ``resources.cpu_nice``, `runtime.cpu_priority`): the actor lowers its CPU
priority before anything else, so its math workers and sandboxes inherit it.
Not covered: placement (the controller picks resources), retries (a `timeout`/`error` verdict is
the answer; the learner decides whether to drop the sample).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from reward.code_grader import CodeGrader, extract_program, parse_tests
from reward.config import RewardActorConfig
from reward.math_verify_worker import MathVerifierPool
from reward import task_scorer
from reward.schema import OUTCOMES, REWARD_KINDS as KINDS, Verdict


class RewardMetrics:
    """Counts per (kind, outcome) and latency quantiles over a bounded window; thread-safe."""

    def __init__(self, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self.window = window
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.counts = {(k, o): 0 for k in KINDS for o in OUTCOMES}
            self.latencies: list[float] = []
            self.items = 0

    def add(self, kind: str, verdicts: Sequence[Verdict]) -> None:
        with self._lock:
            for v in verdicts:
                self.counts[(kind, v.outcome)] += 1
                self.latencies.append(v.latency_s)
            self.items += len(verdicts)
            del self.latencies[: -self.window]

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {"reward/items": self.items}
            for o in OUTCOMES:
                out[f"reward/outcome/{o}"] = sum(self.counts[(k, o)] for k in KINDS)
            for (k, o), n in self.counts.items():
                out[f"reward/{k}/{o}"] = n
            lat = sorted(self.latencies)
            if lat:
                out["reward/latency_mean_s"] = sum(lat) / len(lat)
                out["reward/latency_p50_s"] = lat[len(lat) // 2]
                out["reward/latency_p95_s"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
                out["reward/latency_max_s"] = lat[-1]
            return out


class RewardScorer:
    """Grades mixed groups of `{"kind": "math"|"code"|"reasoning_gym", "gold", "completion", ["length"],
    ["prompt_code"]}` (reasoning_gym: the task's own scorer, `reward.task_scorer`).

    For code, `gold` is a test spec (`{"type": "stdio"|"assert", ...}`) and the program is taken
    from the completion (last fenced block); `program` may be given instead of `completion`."""

    def __init__(self, config: RewardActorConfig | dict | None = None) -> None:
        self.config = RewardActorConfig.model_validate(config or {})
        self.metrics = RewardMetrics()
        self._groups = threading.BoundedSemaphore(self.config.max_concurrency)
        self._init_lock = threading.Lock()
        self._math: MathVerifierPool | None = None
        self._code: CodeGrader | None = None

    @property
    def math(self) -> MathVerifierPool:
        with self._init_lock:  # created on first use: a code-only actor never starts math workers
            if self._math is None:
                self._math = MathVerifierPool(self.config.math)
            return self._math

    @property
    def code(self) -> CodeGrader:
        with self._init_lock:
            if self._code is None:
                self._code = CodeGrader(self.config.code)
            return self._code

    def score_group(self, items: Sequence[dict[str, Any]]) -> list[Verdict]:
        for n, it in enumerate(items):
            if it.get("kind") not in KINDS:
                raise ValueError(f"item {n}: kind must be one of {KINDS}, got {it.get('kind')!r}")
        with self._groups:  # bounded concurrency across callers
            out: list[Verdict | None] = [None] * len(items)
            math_idx = [i for i, it in enumerate(items) if it["kind"] == "math"]
            code_idx = [i for i, it in enumerate(items) if it["kind"] == "code"]
            if math_idx:
                lengths = [items[i].get("length", len(items[i]["completion"])) for i in math_idx]
                vs = self.math.verify_batch([(str(items[i]["gold"]), items[i]["completion"]) for i in math_idx], lengths)
                self.metrics.add("math", vs)
                for i, v in zip(math_idx, vs):
                    out[i] = v
            if code_idx:
                pairs = []
                for i in code_idx:
                    spec = parse_tests(items[i]["gold"])
                    program = items[i].get("program")
                    if program is None:
                        program = extract_program(items[i]["completion"], items[i].get("prompt_code"),
                                                  getattr(spec, "entry_point", None))
                    pairs.append((program, spec))
                vs = self.code.grade_batch(pairs)
                self.metrics.add("code", vs)
                for i, v in zip(code_idx, vs):
                    out[i] = v
            task_idx = [i for i, it in enumerate(items) if it["kind"] == "reasoning_gym"]
            if task_idx:
                vs = [task_scorer.score(str(items[i]["gold"]), items[i]["completion"]) for i in task_idx]
                self.metrics.add("reasoning_gym", vs)
                for i, v in zip(task_idx, vs):
                    out[i] = v
            return out  # type: ignore[return-value]

    def snapshot(self) -> dict[str, float]:
        """Outcome counts and latencies, how often graders had to replace a process, and how many math
        verdicts were given by math-verify's text comparison because sympy could not compare."""
        out = self.metrics.snapshot()
        out["reward/math_worker_restarts"] = self._math.restarts if self._math else 0
        out["reward/math_text_fallbacks"] = self._math.text_fallbacks if self._math else 0
        out["reward/sandbox_restarts"] = self._code.sandbox.restarts if self._code else 0
        return out

    def close(self) -> None:
        if self._math is not None:
            self._math.close()
        if self._code is not None:
            self._code.sandbox.close()


def _remote_class() -> Any:
    import ray

    @ray.remote(num_cpus=1)
    class RewardActor:
        """Ray wrapper around `RewardScorer`; start it with `.options(max_concurrency=N)` (N ≥ the
        config's max_concurrency) so that concurrent groups reach the semaphore."""

        def __init__(self, config: dict | None = None, cpu_nice: int = 0) -> None:
            from runtime.cpu_priority import lower_cpu_priority

            # before any math worker or sandbox process exists: they inherit it
            lower_cpu_priority(cpu_nice)
            self.scorer = RewardScorer(config)

        def score_group(self, items: list[dict]) -> list[dict]:
            t0 = time.monotonic()
            verdicts = self.scorer.score_group(items)
            self._last_group_s = time.monotonic() - t0
            return [v.to_dict() for v in verdicts]

        def metrics(self) -> dict[str, float]:
            return self.scorer.snapshot()

        def reset_metrics(self) -> None:
            self.scorer.metrics.reset()

        def on_main_thread(self) -> bool:
            return threading.current_thread() is threading.main_thread()

        def shutdown(self) -> None:
            self.scorer.close()

    return RewardActor


def __getattr__(name: str) -> Any:
    # `RewardActor` is built on first access so that importing reward.actors needs no Ray.
    if name == "RewardActor":
        cls = _remote_class()
        globals()["RewardActor"] = cls
        return cls
    raise AttributeError(name)
