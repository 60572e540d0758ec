"""Dispatch: data cursors → prompt groups on every rollout engine, and finished batches back.

**Fan-out.** A step's ``P = rollout.prompts_per_step`` prompt groups are admitted together as a
*block*, split as evenly as possible over the engines that are up (``P = 4`` over 3 engines: 2,
1, 1 groups per call; ``n = samples_per_prompt`` samples each, a per-group sampling seed,
`services.batching.group_seed`, so a group's samples do not depend on which engine served it).
Each part goes to the engine with the fewest pending tokens (estimated as groups × samples ×
``max_tokens`` of its calls in flight) among those with room: two calls each, one running and
one queued behind it. Parts no engine has room for yet wait in ``ready`` — admitted, not
started — and the first engine to free up takes them (work stealing: a slow engine holds at most
its two calls, everything else flows to the others). With one engine a block is one call of
``P`` groups, as before fan-out.

**Staleness** is counted in policy versions: a block may be admitted only while the policy that
will consume it is at most ``max_staleness`` versions ahead of the weights the engines hold —
with ``v`` steps done (plus one if the learner is busy), ``live`` groups admitted, generating,
being scored or buffered, and the engines at version ``u``, iff ``v + live // P − u ≤
max_staleness`` — so all N engines generate at once (``max_staleness = 0`` is the synchronous
loop: one block at a time, spread over every engine).

**Faults.** A call lost with its engine (it died, or came back from a restarted instance serving
the on-disk weights) puts its groups back at the front of the queue, in order; the engine is
marked down and probed without blocking the loop (the other engines take the groups meanwhile),
and loaded with the latest weights once it answers. A group cancelled on the engine is queued
again alone.
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

CALLS_PER_ENGINE = 2  # one running, one queued behind it: no idle gap between an engine's calls


@dataclass
class GenCall:
    engine: int
    cursors: list[int]
    epoch: int
    tokens: int  # pending-token estimate of the call


def split_block(cursors: list[int], parts: int) -> list[list[int]]:
    """``cursors`` in ``parts`` contiguous pieces, sizes differing by at most one (larger first),
    no empty piece."""
    parts = max(1, min(parts, len(cursors)))
    q, r = divmod(len(cursors), parts)
    out, i = [], 0
    for k in range(parts):
        n = q + (1 if k < r else 0)
        out.append(cursors[i:i + n])
        i += n
    return out


class Dispatcher:
    """Owns the cursor queue (groups to redo first), the admitted parts not yet sent, the
    generation calls in flight and each engine's load, clock and tally."""

    def __init__(self, ctx: RunContext, engines, event: Callable[[str, dict], None]) -> None:
        self.ctx, self.engines, self.event = ctx, engines, event
        n = len(engines.engines)
        self.clock = BusyClock()  # any engine generating
        self.engine_clocks = [BusyClock() for _ in range(n)]
        self.groups_served = [0] * n  # groups each engine returned, since the run started
        self.peak_engines = 0  # most engines generating at once, since the run started
        self.iv_groups0 = [0] * n  # … at the start of the metrics interval
        self.queue: collections.deque[int] = collections.deque()
        self.ready: collections.deque[list[int]] = collections.deque()
        self.inflight: dict[ray.ObjectRef, GenCall] = {}
        self.probes: dict[ray.ObjectRef, int] = {}  # engines marked down: a call that answers once it is back
        self.down: set[int] = set()
        self.cum_spec = SpecStats()  # the engines' cumulative drafting counters, as last reported
        self.iv_engine_spec = [SpecStats() for _ in range(n)]  # each engine's drafts in the interval
        # each engine's last call: (tokens drafted per step, predicted speed-up, measured or None)
        self.engine_draft: list[tuple[int, float, float | None] | None] = [None] * n

    def reset(self, pending: list[int]) -> None:
        """Start over from a checkpoint: ``pending`` groups first; calls in flight are forgotten."""
        self.queue = collections.deque(sorted(pending))
        self.ready = collections.deque()
        self.inflight = {}
        for clock in [self.clock, *self.engine_clocks]:
            clock.active = 0

    def cursors(self) -> list[int]:
        return [c for g in self.inflight.values() for c in g.cursors] + [c for p in self.ready for c in p]

    def refs(self) -> list[ray.ObjectRef]:
        return list(self.inflight) + list(self.probes)

    def busy(self) -> bool:
        return bool(self.inflight)

    # ---- sending --------------------------------------------------------------------------------
    def may_dispatch(self, live_elsewhere: int, learner_busy: bool) -> bool:
        st = self.ctx.state
        live = len(self.cursors()) + live_elsewhere
        steps_ahead = st.version + (1 if learner_busy else 0) + live // self.ctx.P
        # an engine that is down is reloaded with the latest weights when it is back: not a bound
        synced = min((v for i, v in enumerate(self.engines.loaded_version) if i not in self.down), default=None)
        return synced is not None and steps_ahead - synced <= self.ctx.spec.schedule.max_staleness

    def _calls(self) -> collections.Counter:
        return collections.Counter(g.engine for g in self.inflight.values())

    def _with_room(self) -> list[int]:
        calls = self._calls()
        return [i for i in range(len(self.engines.engines)) if i not in self.down and calls[i] < CALLS_PER_ENGINE]

    def fill(self, live_elsewhere: int, learner_busy: bool) -> None:
        """Send admitted parts to engines with room; admit new blocks while the staleness bound
        allows and nothing admitted is still waiting."""
        while True:
            self._send_ready()
            if self.ready or not self._with_room() or not self.may_dispatch(live_elsewhere, learner_busy):
                return
            up = len(self.engines.engines) - len(self.down)
            self.ready.extend(split_block(self._next_cursors(self.ctx.P), up))

    def _send_ready(self) -> None:
        pending = collections.Counter()
        for g in self.inflight.values():
            pending[g.engine] += g.tokens
        while self.ready:
            room = self._with_room()
            if not room:
                return
            i = min(room, key=lambda e: (pending[e], e))
            part = self.ready.popleft()
            pending[i] += self._submit(i, part)

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

    def _submit(self, i: int, cursors: list[int]) -> int:
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
        tokens = len(cursors) * r.samples_per_prompt * r.max_tokens
        self.inflight[ref] = GenCall(i, cursors, ctx.epoch, tokens)
        self.clock.start()
        self.engine_clocks[i].start()
        self.peak_engines = max(self.peak_engines, len({g.engine for g in self.inflight.values()}))
        return tokens

    # ---- receiving ------------------------------------------------------------------------------
    def on_generated(self, ref) -> list[ScoredGroup]:
        """A generation call finished: the groups to score (none if it was lost or is void)."""
        g = self.inflight.pop(ref)
        self.clock.stop()
        self.engine_clocks[g.engine].stop()
        batch = result_or_died(ref)
        ctx = self.ctx
        if g.epoch != ctx.epoch:
            return []
        if batch is DIED:
            log.warning("engine %d died mid-batch; re-dispatching %d groups", g.engine, len(g.cursors))
            self._redispatch(g.cursors)
            self.mark_down(g.engine)
            self.event("log", {"message": f"rollout engine {g.engine} lost; "
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
        self.iv_engine_spec[g.engine] = self.iv_engine_spec[g.engine] + batch.spec
        self.engine_draft[g.engine] = (batch.draft_k, batch.predicted_speedup, batch.measured_speedup)
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
        self.groups_served[g.engine] += len(out)
        return out

    def _redispatch(self, cursors: list[int]) -> None:
        """A call lost with its engine: its groups go first in the queue, in order."""
        self.ctx.count("faults_rollout")
        self.ctx.count("redispatched", len(cursors))
        self.queue.extendleft(reversed(cursors))

    def mark_down(self, i: int) -> bool:
        """Leave engine i out until it answers (Ray restarts it); its other call fails alike.
        False if it was down already."""
        if i in self.down:
            return False
        self.down.add(i)
        self.engines.confirm(i, 0, False)  # reloaded before its next batch
        self.probes[self.engines.engines[i].info.remote()] = i
        return True

    def on_probe(self, ref) -> None:
        """A down engine answered (restarted) or is gone for good: bring it back with the latest
        weights (`EngineGroup.recover`: a new actor if Ray gave up) and use it again."""
        i = self.probes.pop(ref)
        self.engines.recover(i)
        self.down.discard(i)

    # ---- metrics --------------------------------------------------------------------------------
    def new_interval(self) -> None:
        for clock in self.engine_clocks:
            clock.iv_busy0 = clock.read()
        self.iv_groups0 = list(self.groups_served)
        self.iv_engine_spec = [SpecStats() for _ in self.engine_clocks]

    def engine_metrics(self, wall: float) -> dict[str, float]:
        """Per engine: busy fraction, groups served, acceptance by draft position over the interval,
        and its last call's draft length with predicted and measured speed-up (rollout.adaptive_draft).
        The per-engine names differ from the run-wide ones (``engine_`` prefix): one metric family
        carries one label set in Prometheus."""
        out: dict[str, float] = {}
        for i, clock in enumerate(self.engine_clocks):
            out[f"rollout/engine_busy_frac/engine{i}"] = min(1.0, (clock.read() - clock.iv_busy0) / wall)
            out[f"rollout/engine_groups/engine{i}"] = float(self.groups_served[i] - self.iv_groups0[i])
            for pos, rate in enumerate(self.iv_engine_spec[i].acceptance_by_position(), 1):
                out[f"rollout/engine_spec_accept_pos{pos}/engine{i}"] = rate
            if self.engine_draft[i] is not None:
                k, predicted, measured = self.engine_draft[i]
                out[f"rollout/engine_draft_k/engine{i}"] = float(k)
                out[f"rollout/engine_draft_predicted_speedup/engine{i}"] = predicted
                if measured is not None:
                    out[f"rollout/engine_draft_measured_speedup/engine{i}"] = measured
        return out

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
