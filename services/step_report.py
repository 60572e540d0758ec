"""Step reports: one metrics record per learner step — to ``<run dir>/metrics.jsonl``, the sink
(the registry, Prometheus) and the progress bar — and the metrics interval it covers.

The record holds the learner's metrics, the reward actors' snapshot, the engines' drafting
counters, throughput and idle fractions of the interval since the previous step, and the run's
exact-accounting counters (``loop/<counter>_total``). `services.metrics_export.METRIC_CATALOG`
names the ones on the dashboard.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from reward.schema import GRADER_FAILURES
from services.launcher import MetricsSink
from services.run_context import BusyClock, IntervalStats, RunContext


class StepReporter:
    """Owns the metric history file and the interval's start."""

    def __init__(self, ctx: RunContext, run_id: str, run_dir: Path, sink: MetricsSink | None,
                 progress: bool, loop) -> None:
        self.ctx, self.run_id, self.sink, self.progress = ctx, run_id, sink, progress
        self.loop = loop  # the controller: its parts' clocks and queues
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history_len = 0
        self.t_start = time.perf_counter()

    def clocks(self) -> tuple[BusyClock, BusyClock, BusyClock]:
        lp = self.loop
        return lp.dispatch.clock, lp.rewards.clock, lp.learning.clock

    def new_interval(self) -> None:
        self.ctx.stats = IntervalStats()
        for clock in self.clocks():
            clock.iv_busy0 = clock.read()
        self.loop.dispatch.new_interval()

    def report(self, learner_metrics: dict[str, float], groups: list) -> bool:
        """Write the step's record; False when the sink says the run is over (cancelled through
        the API). Starts the next interval."""
        ctx, lp = self.ctx, self.loop
        now = time.perf_counter()
        iv = ctx.stats
        wall = max(now - iv.t0, 1e-9)
        st = ctx.state
        gen, score, learn = self.clocks()
        m = dict(learner_metrics)
        m.update(lp.rewards.snapshot())
        m.update(iv.spec.as_metrics())
        m.update(lp.dispatch.cum_spec.as_metrics("rollout/cum_"))
        m.update(lp.dispatch.engine_metrics(wall))
        m.update({
            "policy_version": float(st.version),
            "rollout/tokens_per_s": iv.tokens / wall,
            "rollout/engine_tokens_per_s": iv.tokens / iv.engine_s if iv.engine_s else 0.0,
            "rollout/num_tokens": float(iv.tokens),
            "batch/groups_dropped_stale": float(iv.dropped_stale),
            "loop/groups_dropped_constant": float(iv.dropped_constant),
            "loop/groups_dropped_errors": float(iv.dropped_errors),
            "loop/samples_dropped_errors": float(sum(iv.dropped_samples.values())),
            "loop/buffer_groups": float(len(lp.learning.buffer)),
            "loop/inflight_groups": float(len(lp.live_cursors()) - len(lp.learning.buffer)),
            "loop/idle_frac_rollout": 1.0 - min(1.0, (gen.read() - gen.iv_busy0) / wall),
            "loop/idle_frac_reward": 1.0 - min(1.0, (score.read() - score.iv_busy0) / wall),
            "loop/idle_frac_learner": 1.0 - min(1.0, (learn.read() - learn.iv_busy0) / wall),
            "loop/engines": float(len(lp.engines.engines)),
            "loop/step_wall_s": wall,
            "loop/trained_samples_per_s": sum(len(g.responses) for g in groups) / wall,
            "sync/weight_s": lp.weights.last_sync_s,
            "time/elapsed_s": now - self.t_start,
            "time/eta_s": (now - self.t_start) / max(st.step, 1) * (ctx.spec.schedule.steps - st.step),
        })
        failures = sorted({o for outs in GRADER_FAILURES.values() for o in outs})
        m.update({f"reward/dropped/{o}": float(iv.dropped_samples[o]) for o in failures})
        m.update({f"loop/{k}_total": float(v) for k, v in st.counters.items()})
        m = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": st.step, **m}) + "\n")
        self.history_len += 1
        self.loop.tracking.log(m, st.step)  # no-op without `tracking:` in the spec
        go_on = self.sink is None or self.sink.report_step(self.run_id, st.step, m)
        if self.progress:
            from tqdm import tqdm

            tqdm.write(self._progress_line(m))
        self.new_interval()
        return go_on

    def _progress_line(self, m: dict[str, float]) -> str:
        st, steps = self.ctx.state, self.ctx.spec.schedule.steps
        parts = [f"step {st.step}/{steps}",
                 f"reward {m.get('batch/reward_mean', float('nan')):.3f}",
                 f"acc {m.get('batch/accuracy', float('nan')):.3f}",
                 f"clip {m.get('ratio/clip_frac', float('nan')):.3f}"]
        lam = [v for k, v in m.items() if k.startswith("mtp/lambda/")]
        if lam:
            parts.append("λ " + ",".join(f"{x:.2f}" for x in lam))
        parts += [f"accept {m.get('rollout/spec_acceptance_rate', 0.0):.2f}",
                  f"{m.get('rollout/tokens_per_s', 0.0):.0f} tok/s",
                  f"stale {m.get('batch/staleness_mean', 0.0):.1f}",
                  f"ETA {m.get('time/eta_s', 0.0):.0f}s"]
        return " | ".join(parts)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` records (those of the checkpoint being restored)."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.path.write_text("".join(x + "\n" for x in lines[:n]))
        self.history_len = min(n, len(lines))

    def history(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.event(self.run_id, kind, payload)
        if self.progress and kind == "log":
            from tqdm import tqdm

            tqdm.write(payload.get("message", ""))
