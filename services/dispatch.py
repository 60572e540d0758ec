"""Dispatch: data cursors → prompt groups on the rollout engines, and finished batches back.

Prompt groups leave in chunks of ``rollout.prompts_per_step`` groups per engine call (``n =
samples_per_prompt`` each, a per-group sampling seed, `services.batching.group_seed`). A chunk may
start only while the policy that will consume it is at most ``max_staleness`` versions ahead of
the weights the engines hold: with ``v`` steps done (plus one if the learner is busy), ``live``
groups in flight, being scored or buffered, and the engines at version ``u``, dispatch iff
``v + live // P − u ≤ max_staleness``.

A chunk lost with its engine (it died, or came back from a restarted instance serving the on-disk
weights) goes back to the front of the queue, in order, and the engine is recovered; a group
cancelled on the engine is queued again alone.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import RayActorError

from rollout.engine import SpecStats
from services.batching import ScoredGroup, group_seed
from services.run_context import DIED, BusyClock, RunContext, result_or_died

log = logging.getLogger(__name__)


@dataclass
class GenCall:
    engine: int
    cursors: list[int]
    epoch: int


class Dispatcher:
    """Owns the cursor queue (groups to redo first) and the generation calls in flight."""

    def __init__(self, ctx: RunContext, engines, event: Callable[[str, dict], None]) -> None:
        self.ctx, self.engines, self.event = ctx, engines, event
        self.clock = BusyClock()
        self.queue: collections.deque[int] = collections.deque()
        self.inflight: dict[ray.ObjectRef, GenCall] = {}
        self.cum_spec = SpecStats()  # the engines' cumulative drafting counters, as last reported

    def reset(self, pending: list[int]) -> None:
        """Start over from a checkpoint: ``pending`` groups first; calls in flight are forgotten."""
        self.queue = collections.deque(sorted(pending))
        self.inflight = {}
        self.clock.active = 0

    def cursors(self) -> list[int]:
        return [c for g in self.inflight.values() for c in g.cursors]

    def refs(self) -> list[ray.ObjectRef]:
        return list(self.inflight)

    # ---- sending --------------------------------------------------------------------------------
    def may_dispatch(self, live_elsewhere: int, learner_busy: bool) -> bool:
        st = self.ctx.state
        live = len(self.cursors()) + live_elsewhere
        steps_ahead = st.version + (1 if learner_busy else 0) + live // self.ctx.P
        return steps_ahead - min(self.engines.loaded_version) <= self.ctx.spec.schedule.max_staleness

    def fill(self, live_elsewhere: int, learner_busy: bool) -> None:
        """Send chunks while the staleness bound allows and an engine has room (one running, one
        queued behind it)."""
        n_eng = len(self.engines.engines)
        busy = collections.Counter(g.engine for g in self.inflight.values())
        while self.may_dispatch(live_elsewhere, learner_busy):
            free = [i for i in range(n_eng) if busy[i] < 2]
            if not free:
                return
            i = min(free, key=lambda e: busy[e])
            self._submit(i, self._next_cursors(self.ctx.P))
            busy[i] += 1

    def _next_cursors(self, n: int) -> list[int]:
        st = self.ctx.state
        out = []
        while len(out) < n and self.queue:
            out.append(self.queue.popleft())
        while len(out) < n:
            out.append(st.next_cursor)
            st.next_cursor += 1
            st.counters["dispatched"] += 1
        return out

    def _submit(self, i: int, cursors: list[int]) -> None:
        ctx, r = self.ctx, self.ctx.spec.rollout
        prompts = [ctx.prompt_ids(c) for c in cursors]
        seeds = [group_seed(ctx.spec.data.seed, c) for c in cursors]
        sampling = {"n": r.samples_per_prompt, "temperature": r.temperature, "top_p": r.top_p,
                    "max_tokens": r.max_tokens}
        try:
            ref = self.engines.submit(i, prompts, sampling, seeds)
        except Exception as e:  # noqa: BLE001 - recovering the engine failed: put the work back
            log.warning("engine %d unavailable (%s)", i, e)
            self.queue.extendleft(reversed(cursors))
            raise
        self.inflight[ref] = GenCall(i, cursors, ctx.epoch)
        self.clock.start()

    # ---- receiving ------------------------------------------------------------------------------
    def on_generated(self, ref) -> list[ScoredGroup]:
        """A generation call finished: the groups to score (none if it was lost or is void)."""
        g = self.inflight.pop(ref)
        self.clock.stop()
        batch = result_or_died(ref)
        ctx = self.ctx
        if g.epoch != ctx.epoch:
            return []
        if batch is DIED:
            log.warning("engine %d died mid-batch; re-dispatching %d groups", g.engine, len(g.cursors))
            self._redispatch(g.cursors)
            self.engines.recover(g.engine)
            self.event("log", {"message": f"rollout engine {g.engine} restarted; "
                                          f"{len(g.cursors)} groups re-dispatched"})
            return []
        if not self.engines.accept(g.engine, batch):  # served by a restarted engine's disk weights
            self._redispatch(g.cursors)
            return []
        stats = ctx.stats
        stats.tokens += batch.num_generated_tokens
        stats.engine_s += batch.seconds
        stats.spec = stats.spec + batch.spec
        self.cum_spec = batch.cumulative_spec
        groups = {c: ScoredGroup(c, list(ctx.prompt_ids(c))) for c in g.cursors}
        redo: set[int] = set()
        for s in batch.samples:
            c = g.cursors[s.prompt_index]
            if s.finish_reason == "cancelled":
                redo.add(c)
                continue
            grp = groups[c]
            grp.responses.append(list(s.token_ids))
            grp.logprobs.append(list(s.logprobs))
            grp.versions.append(s.policy_version)
            grp.finish_reasons.append(s.finish_reason)
            grp.texts.append(s.text)
        out = []
        for c in g.cursors:
            if c in redo:
                ctx.count("redispatched")
                self.queue.appendleft(c)
            else:
                out.append(groups[c])
        return out

    def _redispatch(self, cursors: list[int]) -> None:
        """A chunk lost with its engine: its groups go first in the queue, in order."""
        self.ctx.count("faults_rollout")
        self.ctx.count("redispatched", len(cursors))
        self.queue.extendleft(reversed(cursors))

    # ---- stopping -------------------------------------------------------------------------------
    def cancel_all(self) -> None:
        """Void what the engines are generating (a rollback: it was for the abandoned policy)."""
        try:
            self.engines.cancel()
        except RayActorError:
            pass

    def shutdown(self) -> None:
        """Stop generation still in flight and wait for it, so shared engines are free again."""
        if not self.inflight:
            return
        self.cancel_all()
        try:
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=60)
        except Exception:  # noqa: BLE001
            pass
