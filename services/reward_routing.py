"""Reward routing: generated groups → the reward actors (round robin) → scored groups, filtered.

A dead reward actor's group is re-scored half a second later (Ray restarts the actor). With
``reward.on_error: drop`` a sample whose grading failed (`reward.schema.grader_failed`) leaves its
group, and a group left with fewer than 2 samples is dropped whole (``dropped_errors``). DAPO
dynamic sampling drops groups whose rewards are all equal, up to ``(max_refill_factor − 1) × P``
per learner step (the dispatcher refills them, since dropped groups no longer count as live).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from reward.schema import grader_failed
from services.batching import ScoredGroup, reward_items
from services.run_context import DIED, BusyClock, IntervalStats, RunContext, result_or_died

log = logging.getLogger(__name__)


@dataclass
class ScoreCall:
    actor: int
    group: ScoredGroup
    epoch: int


def drop_failed_samples(grp: ScoredGroup, kind: str, stats: IntervalStats, counters: dict[str, int]) -> bool:
    """Take the samples whose grading failed out of ``grp`` (counted per outcome); False when
    fewer than 2 valid samples are left: the group is dropped whole and counted."""
    failed = [grader_failed(kind, o) for o in grp.outcomes]
    if not any(failed):
        return True
    for outcome in grp.drop_samples(failed):
        stats.dropped_samples[outcome] += 1
    if len(grp.responses) >= 2:  # a group to compare against: GRPO over the valid members
        return True
    counters["dropped_errors"] += 1
    stats.dropped_errors += 1
    return False


class RewardRouter:
    """Owns the scoring calls in flight, the groups waiting to be re-scored and the step's
    dynamic-sampling budget."""

    def __init__(self, ctx: RunContext, actors: list) -> None:
        self.ctx, self.actors = ctx, actors
        self.clock = BusyClock()
        self._next = -1
        self.inflight: dict[ray.ObjectRef, ScoreCall] = {}
        self.retry: list[tuple[float, ScoredGroup]] = []
        self.constant_drops = 0  # dropped as constant since the learner's last step started

    def reset(self) -> None:
        self.inflight, self.retry, self.constant_drops = {}, [], 0
        self.clock.active = 0

    def new_step(self) -> None:
        self.constant_drops = 0

    def cursors(self) -> list[int]:
        return [s.group.cursor for s in self.inflight.values()] + [g.cursor for _, g in self.retry]

    def refs(self) -> list[ray.ObjectRef]:
        return list(self.inflight)

    def busy(self) -> bool:
        return bool(self.inflight or self.retry)

    def submit(self, grp: ScoredGroup) -> None:
        k = self._next = (self._next + 1) % len(self.actors)
        ref = self.actors[k].score_group.remote(reward_items(grp, self.ctx.item(grp.cursor)))
        self.inflight[ref] = ScoreCall(k, grp, self.ctx.epoch)
        self.clock.start()

    def resubmit_due(self) -> None:
        now = time.monotonic()
        ready = [g for t, g in self.retry if t <= now]
        self.retry = [(t, g) for t, g in self.retry if t > now]
        for g in ready:
            self.submit(g)

    def on_scored(self, ref) -> ScoredGroup | None:
        """A scoring call finished: the group for the learner's buffer, or None (dropped, void, or
        waiting to be re-scored)."""
        s = self.inflight.pop(ref)
        self.clock.stop()
        verdicts = result_or_died(ref)
        ctx = self.ctx
        if s.epoch != ctx.epoch:
            return None
        if verdicts is DIED:
            log.warning("reward actor %d died; re-scoring group %d", s.actor, s.group.cursor)
            ctx.count("faults_reward")
            self.retry.append((time.monotonic() + 0.5, s.group))
            return None
        grp = s.group
        grp.rewards = [float(v["reward"]) for v in verdicts]
        grp.outcomes = [str(v["outcome"]) for v in verdicts]
        spec = ctx.spec
        if spec.reward.on_error == "drop" and not drop_failed_samples(
                grp, ctx.item(grp.cursor).kind, ctx.stats, ctx.state.counters):
            return None
        if spec.algorithm.dapo.dynamic_sampling and grp.constant_reward():
            if self.constant_drops < (spec.schedule.max_refill_factor - 1) * ctx.P:
                self.constant_drops += 1
                ctx.count("dropped_constant")
                ctx.stats.dropped_constant += 1
                return None
        return grp

    def snapshot(self) -> dict[str, float]:
        """The reward actors' metrics, summed (latencies: the maximum)."""
        out: dict[str, float] = {}
        try:
            snaps = ray.get([a.metrics.remote() for a in self.actors], timeout=5)
        except (RayActorError, GetTimeoutError):
            return out
        for snap in snaps:
            for k, v in snap.items():
                if "latency" in k:
                    out[k] = max(out.get(k, 0.0), v)
                else:
                    out[k] = out.get(k, 0.0) + v
        return out

    def wait_inflight(self) -> None:
        if self.inflight:
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=60)
