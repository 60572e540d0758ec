"""The dispatcher's fan-out decisions, on a fake engine group (no Ray, no vLLM: `FakeEngines`
records each submitted call and hands back an opaque reference; results never come back, so the
tests drive the dispatcher's sending side only — the real loop is in test_rollout_fanout.py)."""

from __future__ import annotations

import pytest

from services.dispatch import CALLS_PER_ENGINE, split_block
from dispatch_fakes import make_dispatcher


def _dispatcher(tmp_path, engines: int, prompts: int = 4, staleness: int = 1):
    return make_dispatcher(tmp_path, engines, prompts, staleness=staleness)


def test_split_block_is_even_contiguous_and_never_empty():
    assert split_block([0, 1, 2, 3], 3) == [[0, 1], [2], [3]]
    assert split_block([0, 1, 2, 3], 1) == [[0, 1, 2, 3]]
    assert split_block([0, 1], 5) == [[0], [1]]
    assert [c for p in split_block(list(range(11)), 4) for c in p] == list(range(11))


def test_one_engine_gets_whole_steps_as_before_fan_out(tmp_path):
    d, fake = _dispatcher(tmp_path, engines=1)
    d.fill(0, learner_busy=False)
    # staleness 1: two steps' blocks, one call of P groups each (one running, one queued)
    assert [(i, len(s)) for i, s in fake.calls] == [(0, 4), (0, 4)]


def test_a_step_is_spread_over_every_engine_least_pending_first(tmp_path):
    d, fake = _dispatcher(tmp_path, engines=3)
    d.fill(0, learner_busy=False)
    engines_per_block = [sorted(i for i, _ in fake.calls[:3]), sorted(i for i, _ in fake.calls[3:6])]
    assert engines_per_block == [[0, 1, 2], [0, 1, 2]]  # each step's 4 groups on all three engines
    assert sorted(len(s) for _, s in fake.calls[:3]) == [1, 1, 2]
    assert d.ctx.state.counters["dispatched"] == 8  # max_staleness 1: two steps ahead, not more
    assert not d.ready


def test_groups_no_engine_has_room_for_wait_and_go_to_the_first_free_engine(tmp_path):
    d, fake = _dispatcher(tmp_path, engines=3, prompts=4, staleness=3)
    d.fill(0, learner_busy=False)
    assert len(fake.calls) == 3 * CALLS_PER_ENGINE and not d.ready  # every engine full
    slow = [r for r, g in d.inflight.items() if g.engine == 1]
    for ref in [r for r, g in d.inflight.items() if g.engine == 0]:  # engine 0 is done with both
        d.inflight.pop(ref)
    d.fill(0, learner_busy=False)
    # the next step's block: engine 0 has room for two of its three parts, the third waits
    assert [i for i, _ in fake.calls[6:]] == [0, 0] and [len(p) for p in d.ready] == [1]
    waiting = d.ready[0]
    d.inflight.pop(next(r for r, g in d.inflight.items() if g.engine == 2))
    d.fill(0, learner_busy=False)
    assert fake.calls[8][0] == 2 and list(d.inflight.values())[-1].cursors == waiting  # the first free engine took it
    assert all(r in d.inflight for r in slow)  # the slow engine holds only its own two calls


def test_staleness_counts_policy_versions(tmp_path):
    d, fake = _dispatcher(tmp_path, engines=3, staleness=0)
    d.fill(0, learner_busy=False)
    assert d.ctx.state.counters["dispatched"] == 4  # synchronous: one step's block at a time
    d.fill(4, learner_busy=False)  # those 4 scored and buffered: nothing more yet
    assert d.ctx.state.counters["dispatched"] == 4
    d.inflight.clear()
    d.ctx.state.version = 1  # trained, but the engines still hold version 0
    d.fill(0, learner_busy=False)
    assert d.ctx.state.counters["dispatched"] == 4
    d.engines.loaded_version = [1, 1, 1]
    d.fill(0, learner_busy=False)
    assert d.ctx.state.counters["dispatched"] == 8


def test_a_down_engine_gets_nothing_and_does_not_hold_the_bound(tmp_path):
    d, fake = _dispatcher(tmp_path, engines=3, staleness=1)
    d.down.add(2)
    d.engines.loaded_version = [3, 3, 0]  # engine 2 lost its weights: reloaded when it is back
    d.ctx.state.version = 3
    d.fill(0, learner_busy=False)
    assert fake.calls and {i for i, _ in fake.calls} == {0, 1}
    assert [len(s) for _, s in fake.calls[:2]] == [2, 2]  # a step's 4 groups over the 2 engines up


@pytest.mark.parametrize("engines", [1, 3])
def test_a_groups_sampling_seed_depends_only_on_its_cursor(tmp_path, engines):
    from services.batching import group_seed

    d, fake = _dispatcher(tmp_path, engines=engines)
    d.fill(0, learner_busy=False)
    cursors = [c for g in d.inflight.values() for c in g.cursors]
    seeds = [s for _, ss in fake.calls for s in ss]
    assert seeds == [group_seed(0, c) for c in cursors]


def test_engine_metrics_carry_acceptance_by_position_and_the_draft_choice_per_engine(tmp_path):
    """Per engine: the interval's acceptance at each draft position (share of its drafts), and its
    last call's draft length with predicted and (once timed) measured speed-up; Prometheus labels
    them by engine under names of their own (not the run-wide family)."""
    from rollout.engine import SpecStats
    from services.metrics_export import prom_name

    d, _ = _dispatcher(tmp_path, engines=2)
    d.iv_engine_spec[0] = SpecStats(10, 30, 15, [8, 5, 2])
    d.engine_draft = [(3, 1.4, 1.25, 0, "probabilistic"), (0, 1.0, None, 0, "")]  # engine 0: a short probe, then plain
    m = d.engine_metrics(1.0)
    assert m["rollout/engine_draft_probabilistic/engine0"] == 1.0 and m["rollout/engine_draft_probabilistic/engine1"] == 0.0
    assert m["rollout/engine_draft_switch/engine0"] == 0.0 and m["rollout/engine_draft_switch/engine1"] == 0.0
    assert [m[f"rollout/engine_spec_accept_pos{i}/engine0"] for i in (1, 2, 3)] == [0.8, 0.5, 0.2]
    assert m["rollout/engine_draft_k/engine0"] == 3.0 and m["rollout/engine_draft_k/engine1"] == 0.0
    assert m["rollout/engine_draft_measured_speedup/engine0"] == 1.25
    assert "rollout/engine_draft_measured_speedup/engine1" not in m  # never timed a plain step
    assert prom_name("rollout/engine_spec_accept_pos2/engine0") == ("mtprl_rollout_engine_spec_accept_pos2", ("engine", "0"))
    d.new_interval()
    assert "rollout/engine_spec_accept_pos1/engine0" not in d.engine_metrics(1.0)  # a new interval: no drafts yet
