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

**Stragglers.** An engine that is alive but slow holds its calls: with the staleness bound
reached, the step waits for them while the other engines idle. Whenever an engine is idle, the
oldest call of every other engine (the one it is running) is checked against a deadline derived
from its peers: ``max(rollout.straggler_min_s, rollout.straggler_factor × m × groups)``, ``m`` the
median per-group seconds of the last ``2 × engines`` successful calls (the current and previous
blocks' parts), measured from when the call could start (sent, or its engine's previous call
came back). A call past it is sent once more, unchanged, to an idle engine: the same cursors,
hence the same per-group seeds. Per group, the first copy to come back finished wins; the other
copy's engine is then cancelled (`RolloutEngine.cancel`: the late copy and any call queued behind
it on that engine; the queued one's unfinished groups are queued again like any cancelled group)
and whatever the late copy returns is discarded. A copy that is lost (its engine died, restarted,
or cancelled it) while the other is still out is not queued again: the other carries the group.
Counters: ``straggler_redispatch`` (groups sent a second time), ``straggler_discarded`` (late
copies thrown away); per step ``rollout/straggler_redispatch`` and ``rollout/straggler_discarded``.
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
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
    sent: float = 0.0  # time.monotonic() of the submit
    hedge: bool = False  # a straggler's second copy (never itself duplicated)


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
        self.engine_draft: list[tuple[int, float, float | None, int, str] | None] = [None] * n
        # stragglers: calls outstanding per duplicated cursor, and those a copy already served
        self.copies: collections.Counter[int] = collections.Counter()
        self.won: set[int] = set()
        self.free_at = [0.0] * n  # time.monotonic() each engine's last call came back
        self.per_group_s: collections.deque[float] = collections.deque(maxlen=max(4, 2 * n))
        self.iv_straggler0 = (0, 0)  # straggler counters at the start of the metrics interval
        self.stragglers: list[tuple[int, int, list[int]]] = []  # (slow engine, engine of the copy, groups)

    def reset(self, pending: list[int]) -> None:
        """Start over from a checkpoint: ``pending`` groups first; calls in flight are forgotten."""
        self.queue = collections.deque(sorted(pending))
        self.ready = collections.deque()
        self.inflight = {}
        self.copies, self.won = collections.Counter(), set()
        for clock in [self.clock, *self.engine_clocks]:
            clock.active = 0

    def cursors(self) -> list[int]:
        """Groups admitted and not yet returned, each once (a straggler's two copies are one group)."""
        live = [c for g in self.inflight.values() for c in g.cursors] + [c for p in self.ready for c in p]
        return list(dict.fromkeys(live))

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
                break
            up = len(self.engines.engines) - len(self.down)
            self.ready.extend(split_block(self._next_cursors(self.ctx.P), up))
        if not self.ready:
            self._hedge_stragglers()

    def straggler_deadline(self, groups: int) -> float | None:
        """Seconds after which a running call of ``groups`` groups straggles (None: off, or no
        finished call to compare with yet)."""
        r = self.ctx.spec.rollout
        if r.straggler_factor <= 0 or not self.per_group_s:
            return None
        return max(r.straggler_min_s, r.straggler_factor * statistics.median(self.per_group_s) * groups)

    def _hedge_stragglers(self) -> None:
        """Send each straggling running call once more, to an idle engine (module docstring)."""
        calls = self._calls()
        idle = [i for i in range(len(self.engines.engines)) if i not in self.down and calls[i] == 0]
        if not idle or self.straggler_deadline(1) is None:
            return
        now = time.monotonic()
        running: dict[int, GenCall] = {}
        for g in self.inflight.values():  # insertion order: an engine's oldest call is the one it runs
            running.setdefault(g.engine, g)
        for e, g in sorted(running.items(), key=lambda kv: kv[1].sent):
            if not idle:
                return
            if g.hedge or g.epoch != self.ctx.epoch or any(c in self.copies for c in g.cursors):
                continue
            started = max(g.sent, self.free_at[e])
            if now - started < self.straggler_deadline(len(g.cursors)):
                continue
            target = idle.pop(0)
            try:
                self._submit(target, g.cursors, hedge=True)
            except Exception:  # noqa: BLE001 - the idle engine is unavailable: the original still runs
                continue
            for c in g.cursors:
                self.copies[c] = 2
            self.stragglers.append((e, target, list(g.cursors)))
            self.ctx.count("straggler_redispatch", len(g.cursors))
            log.warning("engine %d straggles (%.1f s on %d groups): sent them to engine %d too",
                        e, now - started, len(g.cursors), target)
            self.event("log", {"message": f"rollout engine {e} straggles ({now - started:.1f} s); "
                                          f"{len(g.cursors)} groups also sent to engine {target}"})

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

    def _submit(self, i: int, cursors: list[int], hedge: bool = False) -> int:
        ctx, r = self.ctx, self.ctx.spec.rollout
        prompts = [ctx.prompt_ids(c) for c in cursors]
        seeds = [group_seed(ctx.spec.data.seed, c) for c in cursors]
        sampling = {"n": r.samples_per_prompt, "temperature": r.temperature, "top_p": r.top_p,
                    "max_tokens": r.max_tokens}
        try:
            ref = self.engines.submit(i, prompts, sampling, seeds)
        except Exception as e:  # noqa: BLE001 - recovering the engine failed: put the work back
            log.warning("engine %d unavailable (%s)", i, e)
            if not hedge:
                self.queue.extendleft(reversed(cursors))
            raise
        tokens = len(cursors) * r.samples_per_prompt * r.max_tokens
        self.inflight[ref] = GenCall(i, list(cursors), ctx.epoch, tokens, time.monotonic(), hedge)
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
        now = time.monotonic()
        started = max(g.sent, self.free_at[g.engine])
        self.free_at[g.engine] = now
        batch = result_or_died(ref)
        ctx = self.ctx
        if g.epoch != ctx.epoch:
            return []
        if batch is DIED:
            lost = self._lost(g.cursors)
            log.warning("engine %d died mid-batch; re-dispatching %d groups", g.engine, len(lost))
            self._redispatch(lost)
            self.mark_down(g.engine)
            self.event("log", {"message": f"rollout engine {g.engine} lost; "
                                          f"{len(lost)} groups re-dispatched"})
            return []
        if not self.engines.accept(g.engine, batch):  # served by a restarted engine's disk weights
            self._redispatch(self._lost(g.cursors))
            return []
        stats = ctx.stats
        stats.tokens += batch.num_generated_tokens
        stats.engine_s += batch.seconds
        stats.spec = stats.spec + batch.spec
        self.cum_spec = batch.cumulative_spec
        self.iv_engine_spec[g.engine] = self.iv_engine_spec[g.engine] + batch.spec
        self.engine_draft[g.engine] = (batch.draft_k, batch.predicted_speedup, batch.measured_speedup,
                                        batch.draft_k if batch.draft_switch is None else batch.draft_switch,
                                        batch.draft_method)
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
        out, redo_now, losers = [], [], set()
        for c in g.cursors:
            copy = self._settle(c)
            if copy == "late":  # its other copy came back first
                ctx.count("straggler_discarded")
            elif c in redo:
                if copy == "only":
                    redo_now.append(c)
            else:
                out.append(groups[c])
                if copy == "other":  # first of two copies: the other is late
                    self.won.add(c)
                    losers |= {h.engine for h in self.inflight.values() if c in h.cursors}
        for c in reversed(redo_now):
            ctx.count("redispatched")
            self.queue.appendleft(c)
        for e in sorted(losers):
            self._cancel_engine(e)
        self.groups_served[g.engine] += len(out)
        if out and not batch.cancelled:  # a peer time for the straggler deadline (not a late copy's)
            self.per_group_s.append((now - started) / len(g.cursors))
        return out

    def _settle(self, c: int) -> str:
        """One copy of group ``c`` came back: 'only' (no other copy was sent, or it is already
        back unserved), 'other' (the other copy is still out, nobody served the group yet) or
        'late' (the other copy served it: discard this one)."""
        if c not in self.copies:
            return "only"
        self.copies[c] -= 1
        late = c in self.won
        if self.copies[c] <= 0:
            del self.copies[c]
            self.won.discard(c)
            return "late" if late else "only"
        return "late" if late else "other"

    def _lost(self, cursors: list[int]) -> list[int]:
        """Of a lost call's groups, those to queue again: not those its other copy carries or
        already served."""
        out = []
        for c in cursors:
            copy = self._settle(c)
            if copy == "late":
                self.ctx.count("straggler_discarded")
            elif copy == "only":
                out.append(c)
        return out

    def _cancel_engine(self, i: int) -> None:
        """Stop the late copy on engine ``i`` (without waiting: `RolloutEngine.cancel` aborts within
        one engine step; the call comes back and is discarded)."""
        try:
            self.engines.engines[i].cancel.remote()
        except Exception:  # noqa: BLE001 - the engine is gone: its call comes back as lost
            pass

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
        self.iv_straggler0 = self._straggler_counts()

    def _straggler_counts(self) -> tuple[int, int]:
        c = self.ctx.state.counters
        return c.get("straggler_redispatch", 0), c.get("straggler_discarded", 0)

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
                k, predicted, measured, switch, method = self.engine_draft[i]
                out[f"rollout/engine_draft_k/engine{i}"] = float(k)
                out[f"rollout/engine_draft_probabilistic/engine{i}"] = float(method == "probabilistic")
                out[f"rollout/engine_draft_switch/engine{i}"] = float(switch)
                out[f"rollout/engine_draft_predicted_speedup/engine{i}"] = predicted
                if measured is not None:
                    out[f"rollout/engine_draft_measured_speedup/engine{i}"] = measured
        (sent, discarded), (sent0, discarded0) = self._straggler_counts(), self.iv_straggler0
        out["rollout/straggler_redispatch"] = float(max(0, sent - sent0))
        out["rollout/straggler_discarded"] = float(max(0, discarded - discarded0))
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
