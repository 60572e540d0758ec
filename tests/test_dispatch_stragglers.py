"""Straggler mitigation in the dispatcher, on fakes (no Ray, no vLLM): `FakeEngines` records each
submitted call and each cancel, results are `RolloutBatch` objects the test hands back for a
call's reference (``services.dispatch.result_or_died`` is replaced), and the dispatcher's clock
is a fake one the test moves. The real loop with a slow engine is in test_rollout_fanout.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import services.dispatch as dispatch
from rollout.engine import RolloutBatch, Sample, SpecStats
from services.batching import group_seed
from services.dispatch import Dispatcher
from services.run_context import DIED
from dispatch_fakes import make_dispatcher

G = 2  # samples per prompt


@pytest.fixture
def clock(monkeypatch):
    t = SimpleNamespace(now=0.0)
    monkeypatch.setattr(dispatch.time, "monotonic", lambda: t.now)
    return t


@pytest.fixture
def results(monkeypatch):
    out: dict = {}
    monkeypatch.setattr(dispatch, "result_or_died", lambda ref: out.pop(ref))
    return out


def _dispatcher(tmp_path, engines: int = 3, factor: float = 3.0, min_s: float = 0.5):
    return make_dispatcher(tmp_path, engines, engines, samples=G, staleness=0,
                           straggler_factor=factor, straggler_min_s=min_s)


def _batch(n_prompts: int, reason: str = "length") -> RolloutBatch:
    toks = [] if reason == "cancelled" else [1, 2]
    samples = [Sample(p, [7], toks, "", [-0.1] * len(toks), reason, 0) for p in range(n_prompts) for _ in range(G)]
    return RolloutBatch(samples, SpecStats(), 0.1, sum(len(s.token_ids) for s in samples),
                        cancelled=reason == "cancelled")


def _ref_of(d: Dispatcher, engine: int, hedge: bool = False):
    return next(r for r, g in d.inflight.items() if g.engine == engine and g.hedge == hedge)


def _finish(d: Dispatcher, results: dict, ref, reason: str = "length"):
    results[ref] = DIED if reason == "died" else _batch(len(d.inflight[ref].cursors), reason)
    return [g.cursor for g in d.on_generated(ref)]


def _one_straggler(tmp_path, clock, results, **kw):
    """Engines 1 and 2 answer their part of the step after 1 s, engine 0 does not: at 3 s (3 × the
    median of 1 s per group) its call is also sent to engine 1."""
    clock.now = 0.0
    d, fake = _dispatcher(tmp_path, **kw)
    d.fill(0, learner_busy=False)
    assert [len(g.cursors) for g in d.inflight.values()] == [1, 1, 1]  # max_staleness 0: one block
    slow = _ref_of(d, 0)
    clock.now = 1.0
    served = _finish(d, results, _ref_of(d, 1)) + _finish(d, results, _ref_of(d, 2))
    return d, fake, slow, served


def test_a_straggling_call_goes_to_an_idle_engine_with_the_same_seeds_once_past_its_deadline(
        tmp_path, clock, results):
    d, fake, slow, served = _one_straggler(tmp_path, clock, results)
    cursor = d.inflight[slow].cursors
    clock.now = 2.9
    d.fill(2, learner_busy=False)
    assert len(fake.calls) == 3  # 2.9 s < 3 × 1 s: not yet
    clock.now = 3.1
    d.fill(2, learner_busy=False)
    assert len(fake.calls) == 4 and fake.calls[3] == (1, [group_seed(0, c) for c in cursor])
    assert fake.calls[3][1] == fake.calls[0][1]  # the same sampling seeds as the slow engine's call
    assert d.ctx.state.counters["straggler_redispatch"] == 1
    assert d.cursors() == cursor  # one group, though two calls carry it
    d.fill(2, learner_busy=False)
    assert len(fake.calls) == 4  # sent a second time once only
    # the copy wins: the group is served once, the slow engine is cancelled and its result discarded
    clock.now = 5.0
    assert _finish(d, results, _ref_of(d, 1, hedge=True)) == cursor
    assert fake.cancels == [0]
    assert _finish(d, results, slow, "cancelled") == []
    c = d.ctx.state.counters
    assert c["straggler_discarded"] == 1 and c["redispatched"] == 0 and not d.queue
    assert sorted(served + cursor) == [0, 1, 2] and not d.inflight and not d.copies and not d.won
    assert d.engine_metrics(1.0)["rollout/straggler_redispatch"] == 1.0


def _hedged(tmp_path, clock, results):
    """`_one_straggler` at 3.1 s: engine 0's call is out twice (``slow`` and its ``copy`` on engine 1)."""
    d, fake, slow, _ = _one_straggler(tmp_path, clock, results)
    clock.now = 3.1
    d.fill(2, learner_busy=False)
    return d, fake, slow, _ref_of(d, 1, hedge=True), d.inflight[slow].cursors


def test_the_original_winning_discards_the_copy_and_cancels_its_engine(tmp_path, clock, results):
    d, fake, slow, copy, cursor = _hedged(tmp_path, clock, results)
    assert _finish(d, results, slow) == cursor
    assert fake.cancels == [1]
    assert _finish(d, results, copy) == []  # finished too, but late: discarded
    assert d.ctx.state.counters["straggler_discarded"] == 1 and not d.queue


def test_a_lost_copy_is_not_queued_again_while_the_other_carries_the_group(tmp_path, clock, results):
    d, fake, slow, copy, cursor = _hedged(tmp_path, clock, results)
    assert _finish(d, results, slow, "died") == []  # the slow engine died: the copy carries the group
    assert not d.queue and d.ctx.state.counters["redispatched"] == 0 and 0 in d.down
    assert _finish(d, results, copy) == cursor
    assert d.ctx.state.counters["straggler_discarded"] == 0 and not fake.cancels
    # both copies lost: the group is queued again, once
    d2, _, slow2, copy2, lost = _hedged(tmp_path / "b", clock, results)
    assert _finish(d2, results, copy2, "cancelled") == [] and not d2.queue
    assert _finish(d2, results, slow2, "died") == [] and list(d2.queue) == lost


@pytest.mark.parametrize("case", ["off", "no_idle_engine", "floor"])
def test_no_second_copy_when_off_before_the_floor_or_with_no_idle_engine(tmp_path, clock, results, case):
    kw = {"off": {"factor": 0.0}, "floor": {"min_s": 30.0}}.get(case, {})
    d, fake = _dispatcher(tmp_path / case, **kw)
    d.fill(0, learner_busy=False)
    clock.now = 1.0
    _finish(d, results, _ref_of(d, 1))
    _finish(d, results, _ref_of(d, 2))
    if case == "no_idle_engine":  # engines 1 and 2 took other work (e.g. the next block's)
        d._submit(1, [40])
        d._submit(2, [41])
    sent = len(fake.calls)
    clock.now = 20.0
    d.fill(2, learner_busy=False)
    assert len(fake.calls) == sent and d.ctx.state.counters["straggler_redispatch"] == 0
