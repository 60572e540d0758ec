"""SyntheticRunActor: a stand-in run controller with **synthetic** metrics.

What it is for: exercising the control plane end to end (REST, registry, Prometheus, Grafana,
CLI, restarts) on a machine without GPUs or models, in tests and demos. It trains nothing: each
"step" sleeps ``synthetic_step_seconds`` and reports made-up but plausible values (reward rising,
loss falling, λ per head, acceptance rate, …) for every key of
``services.metrics_export.METRIC_CATALOG``, plus a fake ``checkpoint`` event every
``schedule.checkpoint_every`` steps (no file is written).

What is real: it is a detached, named Ray actor created by :class:`services.launcher.RayLauncher`
exactly as the real controller will be; it reports only through the
:class:`services.launcher.MetricsSink` interface (the Redis sink); it obeys pause, resume and
cancel, both from actor calls and from the registry's state, which it reads at every step
boundary (so a lost call cannot leave it running against the user's wish).

The real run controller replaces this class in ``RayLauncher(actor_cls=…)``.
"""

from __future__ import annotations

import asyncio
import math
import random
import traceback
from typing import Any

import ray

from services.metrics_export import METRIC_CATALOG
from services.registry import COMPLETED, FAILED, RUNNING, TERMINAL_STATES, RedisSink
from services.spec import read_num_mtp


def synthetic_metrics(step: int, total: int, heads: int, rng: random.Random) -> dict[str, float]:
    """Made-up values with the right names, ranges and trends (NOT measurements)."""
    x = step / max(total, 1)
    noise = lambda s: rng.gauss(0.0, s)  # noqa: E731
    acc = min(1.0, max(0.0, 0.1 + 0.7 * (1 - math.exp(-4 * x)) + noise(0.03)))
    g, drafted = 64, 400
    accepted = int(drafted * min(0.95, 0.55 + 0.3 * x + noise(0.02)))
    correct = int(round(acc * g))
    timeouts = rng.randint(0, 1)
    wall = abs(1.0 + noise(0.1)) + 0.05  # seconds per step
    m: dict[str, float] = {
        "loss/total": 0.5 * math.exp(-2 * x) + noise(0.02),
        "ratio/clip_frac": abs(0.02 + noise(0.003)),
        "ratio/token_mean": 1.0 + noise(0.005),
        "ratio/token_var": abs(0.01 + noise(0.002)),
        "ratio/block_mean": 1.0 + noise(0.006),
        "ratio/block_var": abs(0.012 + noise(0.002)),
        "ratio/approx_kl": abs(0.002 + noise(0.0005)),
        "optim/grad_norm": abs(1.0 + noise(0.2)),
        "policy/entropy": 1.2 * math.exp(-x) + 0.2,
        "policy/kl_ref": abs(0.01 * x + noise(0.002)),
        "batch/reward_mean": acc - 0.05 * timeouts / g,
        "batch/accuracy": acc,
        "batch/response_len_mean": 180 + 60 * x + noise(5),
        "batch/staleness_mean": abs(0.6 + noise(0.1)),
        "batch/staleness_max": 1.0,
        "batch/groups_dropped_stale": float(rng.randint(0, 2)),
        "rollout/tokens_per_s": 1500 + 400 * x + noise(50),
        "perf/tokens_per_s": 5000 + noise(200),
        "rollout/spec_acceptance_rate": accepted / drafted,
        "rollout/spec_mean_acceptance_length": 1.0 + accepted / drafted,
        "rollout/spec_accept_pos1": accepted / drafted,
        "sync/weight_s": abs(0.8 + noise(0.1)),
        "reward/latency_mean_s": abs(0.05 + noise(0.01)),
        "reward/latency_p95_s": abs(0.2 + noise(0.03)),
        "reward/outcome/ok": float(correct * step),  # cumulative, like the reward actors'
        "reward/outcome/wrong": float((g - correct - timeouts) * step),
        "reward/outcome/timeout": float(timeouts * step),
        "reward/outcome/error": 0.0,
        "reward/outcome/sandbox_violation": 0.0,
        "policy_version": float(step),
        # the run loop's own metrics (services/controller.py): a learner-bound async loop
        "loop/idle_frac_rollout": min(1.0, abs(0.3 + noise(0.05))),
        "loop/idle_frac_reward": min(1.0, abs(0.9 + noise(0.03))),
        "loop/idle_frac_learner": min(1.0, abs(0.05 + noise(0.02))),
        "loop/buffer_groups": float(rng.randint(0, 8)),
        "loop/inflight_groups": float(rng.randint(4, 16)),
        "loop/engines": 2.0,
        "loop/step_wall_s": wall,
        "loop/trained_samples_per_s": g / wall,
        "loop/groups_dropped_constant": float(rng.randint(0, 1)),
        "loop/groups_dropped_errors": float(step % 50 == 0),
        "loop/samples_dropped_errors": float(timeouts),
        "reward/dropped/timeout": float(timeouts),
        "reward/dropped/error": 0.0,
    }
    # cumulative accounting, consistent with itself: dispatched = trained + dropped + in flight
    trained, stale, constant, errors = step * 4, step // 10, step // 7, step // 50
    m.update({
        "loop/dispatched_total": float(trained + stale + constant + errors + m["loop/inflight_groups"]
                                       + m["loop/buffer_groups"]),
        "loop/trained_total": float(trained),
        "loop/dropped_stale_total": float(stale),
        "loop/dropped_constant_total": float(constant),
        "loop/dropped_errors_total": float(errors),
        "loop/faults_rollout_total": float(step // 40),
        "loop/faults_reward_total": float(step // 60),
        "loop/faults_learner_total": float(step // 100),
        "loop/redispatched_total": float(2 * (step // 40)),
        "loop/rolled_back_total": float(3 * (step // 100)),
        "loop/straggler_redispatch_total": float(step // 30),
        "loop/straggler_discarded_total": float(step // 30),
        "rollout/straggler_redispatch": float(step % 30 == 0),
        "rollout/straggler_discarded": float(step % 30 == 0),
    })
    engines = int(m["loop/engines"])
    for i in range(engines):  # every engine kept busy, each returning its share of the groups
        m[f"rollout/engine_busy_frac/engine{i}"] = min(1.0, abs(0.9 + noise(0.05)))
        m[f"rollout/engine_groups/engine{i}"] = float(4 // engines)  # 4 groups a step, as below
        m[f"rollout/engine_spec_accept_pos1/engine{i}"] = min(1.0, abs(accepted / drafted + noise(0.02)))
        m[f"rollout/engine_draft_k/engine{i}"] = 1.0
        m[f"rollout/engine_draft_switch/engine{i}"] = 1.0
        m[f"rollout/engine_draft_probabilistic/engine{i}"] = float(step < 20)  # auto: greedy drafts once sharp
        m[f"rollout/engine_draft_predicted_speedup/engine{i}"] = 1.0 + accepted / drafted / 1.2
        m[f"rollout/engine_draft_measured_speedup/engine{i}"] = 1.0 + accepted / drafted / 1.2 + noise(0.05)
    for d in METRIC_CATALOG:
        if not d.per_head:
            continue
        for h in range(d.heads_from, heads + 1):
            key = d.key.replace("{h}", str(h))
            if key.startswith("mtp/clip_frac/"):
                m[key] = abs(0.02 + 0.01 * h + noise(0.003))
            elif key.startswith("mtp/lambda/"):
                m[key] = 0.3 / h + noise(0.05)
            elif key.startswith("mtp/c_hat/"):
                m[key] = 0.01 / h + noise(0.002)
            else:  # mtp/v2_hat
                m[key] = abs(0.03 * h + noise(0.003))
    missing = {d.key for d in METRIC_CATALOG if not (d.per_head or d.per_engine)} - m.keys()
    assert not missing, f"synthetic metrics miss {missing}"
    return m


@ray.remote(num_cpus=0)
class SyntheticRunActor:
    """A detached run actor reporting synthetic metrics (see the module docstring)."""

    def __init__(self, run_id: str, spec: dict[str, Any], sink_config: dict[str, Any]):
        self.run_id = run_id
        self.spec = spec
        self.sink = RedisSink(
            sink_config["redis_url"],
            metrics_history_cap=sink_config.get("metrics_history_cap", 5000),
            events_cap=sink_config.get("events_cap", 10000),
        )
        self.step_seconds = float(sink_config.get("synthetic_step_seconds", 0.2))
        self.flush_timeout_s = float(sink_config.get("sink_flush_timeout_s", 600.0))
        sched = spec.get("schedule", {})
        self.total = int(sched.get("steps", 100))
        self.ckpt_every = int(sched.get("checkpoint_every", 0))
        try:
            self.heads = read_num_mtp(spec["model"]["path"]) or 1
        except (OSError, ValueError, KeyError):
            self.heads = 1
        self.step = 0
        self._runnable = asyncio.Event()
        self._runnable.set()
        self._cancelled = False
        self._task: asyncio.Task | None = None

    async def start(self) -> bool:
        """Spawn the loop inside the actor and return: the caller (the API) may go away."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._main())
        return True

    async def pause(self) -> None:
        self._runnable.clear()

    async def resume(self) -> None:
        self._runnable.set()

    async def cancel(self) -> None:
        self._cancelled = True
        self._runnable.set()

    async def status(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "step": self.step,
                "done": self._task is not None and self._task.done()}

    async def _may_continue(self) -> bool:
        """Block while paused; False when the run must stop. The registry's state wins over
        the in-actor flags (it is what the user set)."""
        while True:
            state = self.sink.get_state(self.run_id)
            if self._cancelled or state in TERMINAL_STATES or state is None:
                return False
            if state == RUNNING:
                return True
            # Paused: sleep until a resume call wakes us, re-reading the registry at least every
            # 0.2 s in case the call was lost (API crash between the transition and the call).
            self._runnable.clear()
            try:
                await asyncio.wait_for(self._runnable.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass

    async def _main(self) -> None:
        rng = random.Random(hash(self.run_id) & 0xFFFF)
        try:
            if not self.sink.set_state(self.run_id, RUNNING):
                return  # cancelled before it started
            self.sink.event(self.run_id, "log", {"message": "synthetic run started (fake metrics)"})
            for step in range(1, self.total + 1):
                if not await self._may_continue():
                    return
                await asyncio.sleep(self.step_seconds)  # the "training step"
                metrics = synthetic_metrics(step, self.total, self.heads, rng)
                if not self.sink.report_step(self.run_id, step, metrics):
                    return  # cancelled during the step
                self.step = step
                if self.ckpt_every and step % self.ckpt_every == 0:
                    self.sink.event(self.run_id, "checkpoint", {
                        "step": step, "policy_version": step, "synthetic": True,
                        "path": f"synthetic://{self.run_id}/step-{step}"})
            self.sink.set_state(self.run_id, COMPLETED)
        except Exception as e:  # the run failed: say so in the registry, with the error
            self.sink.set_state(self.run_id, FAILED, error=f"{type(e).__name__}: {e}")
            self.sink.event(self.run_id, "log", {"message": traceback.format_exc()[-2000:]})
        finally:
            # As the real run actor: what Redis did not take yet (an outage) is flushed first.
            await asyncio.to_thread(self.sink.close, flush_timeout_s=self.flush_timeout_s)
            self._exit_soon()

    def _exit_soon(self) -> None:
        # A finished run's actor leaves; a detached actor would otherwise live forever.
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: ray.kill(ray.get_runtime_context().current_actor, no_restart=True))


__all__ = ["SyntheticRunActor", "synthetic_metrics"]
