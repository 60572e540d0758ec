"""Straggler mitigation in the dispatcher, on fakes (no Ray, no vLLM): `FakeEngines` records each
submitted call and each cancel, results are `RolloutBatch` objects the test hands back for a
call's reference (``services.dispatch.result_or_died`` is replaced), and the dispatcher's clock
is a fake one the test moves. The real loop with a slow engine is in test_rollout_fanout.py."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

import services.dispatch as dispatch
from rollout.engine import RolloutBatch, Sample, SpecStats
from services.batching import group_seed
from services.dispatch import Dispatcher
from services.run_context import DIED, RunContext
from services.spec import RunSpec

G = 2  # samples per prompt


class FakeEngine:
    def __init__(self, log: list, i: int) -> None:
        self.cancel = SimpleNamespace(remote=lambda: log.append(i))
        self.info = SimpleNamespace(remote=lambda: ("probe", i))  # a down engine's probe


class FakeEngines:
    """What `Dispatcher` uses of `rollout.group.EngineGroup`."""

    def __init__(self, n: int) -> None:
        self.cancels: list[int] = []
        self.engines = [FakeEngine(self.cancels, i) for i in range(n)]
        self.loaded_version = [0] * n
        self.calls: list[tuple[int, list[int]]] = []  # (engine, seeds) per call
        self._ref = itertools.count()

    def submit(self, i, prompts, sampling, seeds):
        self.calls.append((i, list(seeds)))
        return ("ref", next(self._ref))

    def accept(self, i, batch) -> bool:
        return True

    def confirm(self, i, version, ok) -> None:
        pass


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
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    spec = RunSpec.model_validate({
        "model": {"path": "some/model"}, "data": {"dataset": f"jsonl:{data}", "seed": 0},
        "rollout": {"engines": engines, "prompts_per_step": engines, "samples_per_prompt": G, "max_tokens": 8,
                    "straggler_factor": factor, "straggler_min_s": min_s},
        "schedule": {"steps": 10, "max_staleness": 0}})
    items = [SimpleNamespace(prompt=f"p{i}") for i in range(50)]
    tok = SimpleNamespace(encode=lambda text, add_special_tokens=False: [len(text)])
    fake = FakeEngines(engines)
    return Dispatcher(RunContext(spec, items, tok), fake, lambda *a: None), fake


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


def test_the_original_winning_discards_the_copy_and_cancels_its_engine(tmp_path, clock, results):
    d, fake, slow, served = _one_straggler(tmp_path, clock, results)
    clock.now = 3.1
    d.fill(2, learner_busy=False)
    copy = _ref_of(d, 1, hedge=True)
    cursor = d.inflight[slow].cursors
    assert _finish(d, results, slow) == cursor
    assert fake.cancels == [1]
    assert _finish(d, results, copy) == []  # finished too, but late: discarded
    assert d.ctx.state.counters["straggler_discarded"] == 1 and not d.queue


def test_a_lost_copy_is_not_queued_again_while_the_other_carries_the_group(tmp_path, clock, results):
    d, fake, slow, served = _one_straggler(tmp_path, clock, results)
    clock.now = 3.1
    d.fill(2, learner_busy=False)
    copy = _ref_of(d, 1, hedge=True)
    cursor = d.inflight[slow].cursors
    assert _finish(d, results, slow, "died") == []  # the slow engine died: the copy carries the group
    assert not d.queue and d.ctx.state.counters["redispatched"] == 0 and 0 in d.down
    assert _finish(d, results, copy) == cursor
    assert d.ctx.state.counters["straggler_discarded"] == 0 and not fake.cancels
    # both copies lost: the group is queued again, once
    d2, _, slow2, _ = _one_straggler(tmp_path / "b", clock, results)
    clock.now = 3.1
    d2.fill(2, learner_busy=False)
    copy2 = _ref_of(d2, 1, hedge=True)
    lost = d2.inflight[slow2].cursors
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
