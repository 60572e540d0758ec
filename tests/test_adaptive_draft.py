"""Adaptive drafting's policy (rollout.adaptive_draft) against fakes: a fake engine whose step time
is a given function of batch size and draft length, and whose drafts are accepted by position with
given probabilities (counted exactly, no randomness), so each test knows the right k."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rollout.adaptive_draft import AdaptiveDraftConfig, AdaptiveDrafter, CallSteps, Choice, bucket, expected_tokens

K = 3


class Spec:
    """A fake of rollout.engine.SpecStats: the counters CallSteps and the drafter read."""

    def __init__(self, num_drafts: float = 0.0, accepted_per_pos: list[float] | None = None):
        self.num_drafts = num_drafts
        self.accepted_per_pos = list(accepted_per_pos or [0.0] * K)

    def __add__(self, other: "Spec") -> "Spec":
        return Spec(self.num_drafts + other.num_drafts, [a + b for a, b in zip(self.accepted_per_pos, other.accepted_per_pos)])

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + sum(self.accepted_per_pos) / self.num_drafts if self.num_drafts else 1.0


def verified(k: int, drafts: float, accept: list[float]) -> Spec:
    """The counters of a step verifying ``drafts`` drafts of length k: position i reached in
    proportion Π a_j (exact expectations, no randomness)."""
    per_pos, reach = [], drafts
    for a in accept[:k]:
        reach *= a
        per_pos.append(reach)
    return Spec(drafts if k else 0.0, per_pos + [0.0] * (K - k))


def run_call(drafter: AdaptiveDrafter, choice: Choice, accept: list[float], cost, batch: int, sampled: bool,
             drafts: int, steps: int) -> CallSteps:
    """One call as rollout.engine runs it: a prefill step that proposes at the choice's length, then
    ``steps`` decode steps, each verifying the drafts the step before proposed and proposing at the
    length in force (a short probe switches when CallSteps says so)."""
    call = CallSteps(choice, Spec())
    k_now = proposed = choice.k
    call.record(1.0, False, Spec())
    for _ in range(steps):
        spec, proposed = verified(proposed, drafts / steps, accept), k_now
        switch = call.record(cost(batch, k_now), True, spec)
        if switch is not None:
            k_now = switch
    drafter.observe_call(choice, batch, sampled, call)
    return call


def run_calls(drafter: AdaptiveDrafter, calls: int, accept: list[float], cost, batch: int = 8,
              sampled: bool = True, drafts: int = 200, steps: int = 20, log: list | None = None) -> list[int]:
    """Simulate ``calls`` generation calls; returns the chosen k of each (``log`` gets each Choice).
    ``accept``: conditional acceptance per position (or per draft method: {method: [a_i]});
    ``cost(b, k)``: seconds of one decode step."""
    ks = []
    for _ in range(calls):
        choice = drafter.choose(batch, sampled)
        ks.append(choice.k)
        if log is not None:
            log.append(choice)
        run_call(drafter, choice, accept[choice.method] if isinstance(accept, dict) else accept, cost, batch,
                 sampled, drafts, steps)
    return ks


def test_expected_tokens_is_one_plus_the_sum_of_acceptance_products():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0, 1.0, 1.0], 3) == 4.0
    a = 0.7  # i.i.d. acceptance: Leviathan et al.'s (1 - a^(k+1)) / (1 - a)
    assert expected_tokens([a] * 4, 4) == pytest.approx((1 - a**5) / (1 - a))


def test_bucket_is_the_next_power_of_two():
    assert [bucket(b) for b in (0, 1, 2, 3, 8, 9, 33)] == [1, 1, 2, 4, 8, 16, 64]


def test_a_head_that_never_accepts_stops_drafting_after_its_first_call():
    d = AdaptiveDrafter({"enabled": True, "probe_every": 8}, K)
    ks = run_calls(d, 24, accept=[0.0] * K, cost=lambda b, k: 1.0 + 0.1 * k)
    assert ks[0] == K  # the first call measures every position
    probes = {8 - 1, 24 - 1}  # call 8 probes k = 1; it confirmed k = 0, so the gap doubles: call 24
    assert all(k == 0 for i, k in enumerate(ks[1:], 1) if i not in probes), ks
    assert [ks[i] for i in sorted(probes)] == [1, 1]  # the neighbour of k = 0
    assert d.acceptance(sampled=True)[0] < 0.05


def test_a_head_that_always_accepts_drafts_the_maximum():
    d = AdaptiveDrafter({"enabled": True, "probe_every": 8}, K)
    ks = run_calls(d, 24, accept=[1.0] * K, cost=lambda b, k: 1.0 + 0.2 * k)
    assert all(k == K for i, k in enumerate(ks) if (i + 1) % 8), ks
    assert d.speedups(8, True)[K] == pytest.approx(4 / 1.6, rel=0.02)  # measured costs replaced the prior


def test_drafting_that_costs_more_than_it_gains_is_dropped_once_a_plain_step_is_measured():
    """Perfect acceptance, but each drafted token costs 1.5 plain steps: S(k) = (1+k)/(1+1.5k) < 1.
    The first call drafts for probe_steps steps and runs the rest plain (no plain step timed at
    its batch size yet), so it times both, and drafting stops from the second call on; the probes
    after it are short (probe_steps steps at k = 1, the rest plain)."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 4, "probe_steps": 8}, K)
    log: list = []
    ks = run_calls(d, 16, accept=[1.0] * K, cost=lambda b, k: 1.0 + 1.5 * k, log=log)
    assert (log[0].k, log[0].steps, log[0].rest_k) == (K, 8, 0)
    assert ks[1:3] == [0, 0] and (ks[3], log[3].steps, log[3].rest_k) == (1, 8, 0), ks  # call 4: short probe
    assert all(k == 0 for i, k in enumerate(ks[4:], 4) if i != 11), ks  # the next probe: call 12
    whole = AdaptiveDrafter({"enabled": True, "probe_every": 4, "probe_steps": 0}, K)  # whole-call probes
    ks = run_calls(whole, 4, accept=[1.0] * K, cost=lambda b, k: 1.0 + 1.5 * k, log=log)
    assert ks[:3] == [K, K, K] and ks[3] == 0, ks  # the prior drafts until a probe times a plain call
    assert all(c.rest_k is None for c in log[-4:])


def test_the_choice_depends_on_the_batch_size():
    """Drafting is cheap at batch 1 (spare compute) and dear at batch 64 (compute-bound): the same
    head drafts the most at one and nothing at the other."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000}, K)
    d.observe_acceptance(True, K, 1000, [800, 640, 512])
    for b in (1, 64):
        for k in range(K + 1):
            d.observe_steps(k, b, [1.0 + (0.05 if b == 1 else 2.0) * k])
    assert d.choose(1, True).k == K
    assert d.choose(64, True).k == 0
    assert d.choose(48, True).k == 0  # bucket 64


def test_a_good_first_position_and_bad_later_ones_draft_one_token():
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000, "prior_weight": 0.5}, K)
    run_calls(d, 6, accept=[0.9, 0.1, 0.1], cost=lambda b, k: 1.0 + 0.1 * k)
    assert d.choose(8, True).k == 1
    s = d.speedups(8, True)
    assert s[1] == pytest.approx(1.9 / 1.1, rel=0.02) and s[1] > s[2] > s[3]  # the first call timed both


def test_greedy_and_sampled_calls_keep_their_own_acceptance():
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000}, K)
    run_calls(d, 4, accept=[0.0] * K, cost=lambda b, k: 1.0 + 0.1 * k, sampled=True)
    run_calls(d, 4, accept=[1.0] * K, cost=lambda b, k: 1.0 + 0.1 * k, sampled=False)
    assert d.choose(8, sampled=True).k == 0 and d.choose(8, sampled=False).k == K


def test_measured_speedup_is_tokens_per_step_over_the_time_against_plain_steps():
    d = AdaptiveDrafter({"enabled": True}, K)
    assert d.measured_speedup(8, [([1.0], 3.0)]) is None  # no plain step timed yet
    d.observe_steps(0, 8, [0.5, 0.4, 9.0])  # the median: a step slowed by another process is ignored
    assert d.measured_speedup(7, [([1.0, 1.0, 1.0], 3.0)]) == pytest.approx(3.0 * 0.5 / 1.0)  # bucket 8
    assert d.measured_speedup(1, [([1.0], 3.0)]) is None  # bucket 1: no plain call of that size timed
    # Two phases: 2 steps of 1 s at 3 tokens a step, then 2 plain steps of 0.5 s: 8 tokens in 3 s.
    assert d.measured_speedup(8, [([1.0, 1.0], 3.0), ([0.5, 0.5], 1.0)]) == pytest.approx(8 * 0.5 / 3.0)


def test_a_larger_calls_last_steps_do_not_stand_for_a_smaller_calls_cost():
    """Costs are filed under the call's batch size, whatever its steps' running count: a batch-32
    call at k = 0 times bucket 32 only. (Filed per step, its tail, the last sequence or two still
    running, set bucket 1's plain time, which made drafting look cheap at batch 1.)"""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000, "prior_weight": 0.0}, 1)
    d.observe_acceptance(True, 1, 1000, [240])  # acceptance 0.24: E(1) = 1.24
    d.observe_steps(0, 32, [2.0] * 30 + [1.3] * 10)  # a batch-32 call: 30 full steps, a slow tail of 10
    d.observe_steps(1, 1, [1.43])  # a batch-1 call drafting 1
    assert d.plain_step_seconds(1) is None and d.plain_step_seconds(32) == pytest.approx(2.0)
    d.observe_steps(0, 1, [1.0])  # a batch-1 plain call: a k = 1 step costs 1.43 of it
    assert d.cost_ratio(1, 1) == pytest.approx(1.43)
    assert d.choose(1, True).k == 0  # 1.24 / 1.43 < 1: not worth drafting at batch 1


def test_config_bounds_and_typos_are_refused():
    with pytest.raises(ValidationError, match="probe_every"):
        AdaptiveDraftConfig(probe_every=1)
    with pytest.raises(ValidationError, match="ewma"):
        AdaptiveDraftConfig(ewma=0)
    with pytest.raises(ValidationError, match="extra"):
        AdaptiveDraftConfig(enabeld=True)
    with pytest.raises(ValueError, match="num_speculative_tokens >= 1"):
        AdaptiveDrafter({}, 0)


def test_engine_config_refuses_adaptive_drafting_without_drafts_and_vllm_gets_a_schedule():
    from rollout.config import EngineConfig
    from rollout.engine import vllm_args

    with pytest.raises(ValidationError, match="adaptive_draft"):
        EngineConfig(model="m", num_speculative_tokens=0, adaptive_draft={"enabled": True})
    fixed = vllm_args(EngineConfig(model="m", num_speculative_tokens=3))
    assert "num_speculative_tokens_per_batch_size" not in fixed["speculative_config"]
    adaptive = vllm_args(EngineConfig(model="m", num_speculative_tokens=3, adaptive_draft={"enabled": True}))
    assert adaptive["speculative_config"]["num_speculative_tokens_per_batch_size"] == [(1, 64, 3)]


def test_run_spec_passes_adaptive_drafting_and_reports_its_errors_at_its_field(tiny_ckpt):
    from services.spec import RunSpec, spec_problems

    spec = {"model": {"path": str(tiny_ckpt)}, "data": {"dataset": "reasoning_gym:basic_arithmetic"},
            "rollout": {"num_speculative_tokens": 2, "adaptive_draft": {"enabled": True, "probe_every": 4}}}
    cfg = RunSpec.model_validate(spec).engine_config()
    assert cfg.adaptive_draft.enabled and cfg.adaptive_draft.probe_every == 4
    spec["rollout"]["num_speculative_tokens"] = 0
    problems = spec_problems(RunSpec.model_validate(spec))
    assert any(p["loc"][:2] == ("rollout", "adaptive_draft") for p in problems), problems
    with pytest.raises(ValidationError):
        RunSpec.model_validate({**spec, "rollout": {"adaptive_draft": {"probe_every": 0}}})


def test_a_gain_below_min_gain_does_not_draft():
    """S(1) = 1.02 (acceptance 0.12, drafts 10 % dearer) is within timing noise: not drafted."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000, "prior_weight": 0.0, "min_gain": 0.03}, 1)
    d.observe_acceptance(True, 1, 1000, [120])
    d.observe_steps(0, 8, [1.0])
    d.observe_steps(1, 8, [1.1])
    assert d.speedups(8, True)[1] == pytest.approx(1.12 / 1.1)
    assert d.choose(8, True).k == 0
    d.config.min_gain = 0.0
    assert d.choose(8, True).k == 1


def test_a_cost_ratio_below_one_is_noise_and_never_switches_on_a_useless_head():
    """Plain steps timed while another process slowed them look dearer than drafting ones: the
    ratio is held at ≥ 1 (and non-decreasing in k), so a head accepting nothing stays off."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000, "prior_weight": 0.0}, 2)
    d.observe_acceptance(True, 2, 1000, [5, 0])
    d.observe_steps(0, 8, [1.0])
    d.observe_steps(1, 8, [0.6])
    d.observe_steps(2, 8, [1.4])
    assert d.cost_ratio(8, 1) == pytest.approx(0.6)  # the raw measurement...
    s = d.speedups(8, True)
    assert s[1] == pytest.approx(1.005) and s[2] == pytest.approx(1.005 / 1.4)  # ...held at >= 1
    assert d.choose(8, True).k == 0


def test_probes_back_off_while_they_confirm_the_choice_and_reset_when_it_changes():
    d = AdaptiveDrafter({"enabled": True, "probe_every": 4}, K)
    ks = run_calls(d, 60, accept=[0.0] * K, cost=lambda b, k: 1.0 + 0.3 * k)
    probes = [i + 1 for i, k in enumerate(ks) if k and i]
    assert probes == [4, 12, 28, 60], ks  # gaps 4, 8, 16, 32 (at most PROBE_BACKOFF x probe_every)
    # The head turns perfect: the next probe (call 92, k = 1) sees it, the choice moves up, and the
    # gap resets (probes every 4 calls again), so it climbs to the longest draft within a few calls.
    ks = run_calls(d, 50, accept=[1.0] * K, cost=lambda b, k: 1.0 + 0.3 * k)
    assert ks[:31] == [0] * 31 and ks[31] == 1, ks
    assert ks[-1] == K, ks


def test_call_steps_split_at_the_switch_and_the_mixed_step_is_timed_for_neither():
    choice = Choice(K, 1.0, True, 8, [1.0] * (K + 1), steps=2, rest_k=0)
    call = CallSteps(choice, Spec())
    assert call.record(5.0, False, Spec()) is None  # the prefill: no decode step
    assert call.record(1.0, True, verified(K, 10, [1.0] * K)) is None
    assert call.record(1.1, True, verified(K, 10, [1.0] * K)) == 0  # switch to rest_k 0 before the next step
    assert call.record(9.0, True, verified(K, 10, [1.0] * K)) is None  # verifies K drafts, proposes none
    for _ in range(3):
        assert call.record(0.5, True, verified(0, 10, [1.0] * K)) is None
    assert call.switched and call.seconds == ([1.0, 1.1], [0.5, 0.5, 0.5])
    assert call.spec[0].num_drafts == 30 and call.spec[1].num_drafts == 0  # the mixed step's drafts: the probe's
    whole = CallSteps(Choice(K, 1.0, False, 8, [1.0] * (K + 1)), Spec())
    assert all(whole.record(1.0, True, Spec()) is None for _ in range(20)) and len(whole.seconds[0]) == 20


def test_a_call_of_two_phases_decays_the_counts_once_and_files_each_length_apart():
    d = AdaptiveDrafter({"enabled": True, "prior_weight": 0.0, "ewma": 0.5}, K)
    d.observe_call_acceptance(True, [(K, 100, [50, 25, 10])])
    d.observe_call_acceptance(True, [(1, 100, [100, 0, 0]), (K, 100, [50, 25, 10])])  # k = 1 has no position 2
    assert d._acc["sampled:greedy"].reached == [50 + 200, 25 + 50, 12.5 + 25]  # one halving, then both phases
    assert d._acc["sampled:greedy"].accepted == [25 + 150, 12.5 + 25, 5 + 10]
    call = run_call(d, Choice(1, 1.0, True, 8, [1.0] * (K + 1), steps=4, rest_k=K, ratios=[1.0] * (K + 1)),
                    [1.0] * K, lambda b, k: 1.0 + 0.25 * k, 8, True, 200, 20)
    assert call.seconds == ([1.25] * 4, [1.75] * 15)
    assert d._cost[(8, 1, "greedy")] == 1.25 and d._cost[(8, K, "greedy")] == 1.75


def test_a_new_batch_size_is_drafted_briefly_and_then_plain_so_one_call_times_both():
    """Learnt at batch 8 (drafting pays), a first call of 32 sequences drafts only probe_steps
    steps: its plain step is untimed, and a whole drafting call would bet on batch 8's costs."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000, "probe_steps": 8}, K)
    run_calls(d, 4, accept=[0.9] * K, cost=lambda b, k: 1.0 + 0.1 * k)
    assert d.choose(8, True).rest_k is None
    log: list = []
    run_calls(d, 2, accept=[0.9] * K, cost=lambda b, k: 2.0 + 1.6 * k, batch=32, log=log)
    assert (log[0].k, log[0].steps, log[0].rest_k) == (K, 8, 0) and log[0].probe
    assert d.plain_step_seconds(32) == 2.0 and d.cost_ratio(32, K) == pytest.approx(3.4)
    assert log[1].k == 1 and log[1].rest_k is None  # 1.9 / 1.8 beats 3.44 / 3.4 at batch 32's own costs


def test_a_short_probe_predicts_the_call_by_its_steps():
    c = Choice(2, 0.5, True, 8, [1.0, 1.5, 0.5], steps=8, rest_k=1, ratios=[1.0, 1.2, 2.0])
    # 8 steps at k = 2 (E = 1.0, r = 2.0) and 24 at k = 1 (E = 1.8, r = 1.2): (8 + 43.2) / (16 + 28.8)
    assert c.call_speedup(8, 24) == pytest.approx((8 * 1.0 + 24 * 1.8) / (8 * 2.0 + 24 * 1.2))
    assert Choice(2, 0.5, False, 8, [1.0, 1.5, 0.5]).call_speedup(8, 24) == 0.5


def test_step_costs_are_the_full_batch_steps_not_the_tail_of_finished_answers():
    """A call's tail runs the few answers still going; its length depends on which samples were
    drawn, so only the steps at the call's full batch are its batch size's cost."""
    call = CallSteps(Choice(1, 1.0, False, 8, [1.0, 1.0]), Spec())
    for running, seconds in [(8, 2.0)] * 5 + [(3, 0.8)] * 20 + [(1, 0.5)] * 10:
        call.record(seconds, True, Spec(), running)
    assert call.full_batch_seconds() == ([2.0] * 5, [])
    d = AdaptiveDrafter({"enabled": True}, 1)
    d.observe_call(Choice(1, 1.0, False, 8, [1.0, 1.0]), 8, True, call)
    assert d._cost[(8, 1, "greedy")] == 2.0  # the median of all 35 steps would be 0.8
    short = CallSteps(Choice(1, 1.0, False, 8, [1.0, 1.0]), Spec())
    for running in (8, 7, 6, 5):
        short.record(1.0 + running, True, Spec(), running)
    assert short.full_batch_seconds()[0] == [9.0, 8.0, 7.0, 6.0]  # one full-batch step: all of them


def test_a_calls_step_summary_shows_slow_steps_beside_the_median():
    """What a call's decode steps cost beside the estimate's median (RolloutBatch.draft_steps):
    a short probe's two phases together, the mixed step and the prefill left out."""
    call = CallSteps(Choice(K, 1.0, True, 8, [1.0] * (K + 1), steps=3, rest_k=0), Spec())
    call.record(5.0, False, Spec(), 8)  # the prefill
    for seconds in (1.0, 1.2, 6.0):  # the probe's steps, one of them slow
        call.record(seconds, True, Spec(), 8)
    call.record(9.0, True, Spec(), 8)  # the mixed step: timed for neither
    for running, seconds in [(8, 0.5), (8, 0.5), (2, 0.2)]:
        call.record(seconds, True, Spec(), running)
    summary = call.summary()
    assert summary["decode_steps"] == 6 and summary["full_batch"] == 8 and summary["full_batch_steps"] == 5
    assert summary["median_full_s"] == 1.0 and summary["max_s"] == 6.0
    assert summary["mean_s"] == pytest.approx(9.4 / 6) and summary["seconds"] == pytest.approx(9.4)
    assert CallSteps(None, Spec()).summary()["mean_s"] is None


def simulate(d: AdaptiveDrafter, choice: Choice, steps: list[tuple[int, int, float, float]], sampled: bool = True):
    """One call as the engine runs it, step by step: (running sequences, draft length in force,
    seconds, conditional acceptance of position 1); each decode step verifies one draft per running
    sequence when drafting. Returns what the drafter filed of the call."""
    call = CallSteps(choice, Spec())
    call.record(1.0, False, Spec(), steps[0][0])  # the prefill
    for running, k, seconds, a in steps:
        call.record(seconds, True, Spec(running, [running * a] + [0.0] * (K - 1)) if k else Spec(), running)
    d.observe_call(choice, 8, sampled, call)
    return d.last_call


@pytest.mark.parametrize("tail", [False, True])
def test_whole_calls_that_fall_short_of_the_step_model_scale_it_down(tail):
    """The step model sees the median full-batch step (plain 1.0 s, drafting 1 token 1.2 s, half of
    the drafts accepted: S(1) = 1.25). A whole drafting call whose sequences end at different steps
    runs a tail of nearly full-cost steps for few tokens: its seconds per token against a whole
    plain call's realise 0.70, so the call factor brings S(1) below 1 and the next call runs plain;
    a call without the tail realises the model's 1.25 and drafting goes on. The probe of k = 1
    after the factor fell is a whole call: a short one would never measure the factor again."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 4, "probe_steps": 8, "prior_weight": 0.0}, 1)
    first = d.choose(8, True)
    assert (first.k, first.steps, first.rest_k) == (1, 8, 0)
    assert simulate(d, first, [(8, 1, 1.2, 0.5)] * 9 + [(8, 0, 1.0, 0.0)] * 20) == {}
    assert d._plain_rate == {}  # a short probe's plain rest is not a plain call: it lacks the call's start
    simulate(d, Choice(0, 1.0, False, 8, [1.0, 1.25]), [(8, 0, 1.0, 0.0)] * 20)  # a plain call
    assert d._plain_rate[(8, True)] == pytest.approx(20.0 / 160)
    second = d.choose(8, True)
    assert (second.k, second.rest_k) == (1, None) and second.predicted_speedup == pytest.approx(1.25)
    ended = [(8, 1, 1.2, 0.5)] * 10 + ([(1, 1, 1.2, 0.5)] * 10 if tail else [(8, 1, 1.2, 0.5)] * 10)
    filed = simulate(d, second, ended)
    realised = 0.125 / (24.0 / 135) if tail else 1.25
    assert filed["realised_speedup"] == pytest.approx(realised) and filed["model_speedup"] == pytest.approx(1.25)
    assert d.speedups(8, True)[1] == pytest.approx(realised) and d.model_speedups(8, True)[1] == pytest.approx(1.25)
    third = d.choose(8, True)
    assert third.k == (0 if tail else 1)
    probe = d.choose(8, True)  # call 4
    if tail:
        assert probe.probe and probe.k == 1 and probe.rest_k is None
    simulate(d, probe, [(8, probe.k, 1.2 if probe.k else 1.0, 0.5)] * 20)  # a call the model predicts
    assert d.call_factor(8, 1, True) == pytest.approx(1.0 if not tail else 0.3 * 1.0 + 0.7 * realised / 1.25)
    assert d.call_factor(32, 1, True) == 1.0 and d.call_factor(8, 1, False) == 1.0  # another bucket, kind


def test_without_calibrate_calls_the_factor_is_measured_but_the_step_model_chooses():
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000, "prior_weight": 0.0, "calibrate_calls": False}, 1)
    d.observe_acceptance(True, 1, 100, [50])
    d.observe_steps(0, 8, [1.0])
    d.observe_steps(1, 8, [1.2])
    simulate(d, Choice(0, 1.0, False, 8, [1.0, 1.25]), [(8, 0, 1.0, 0.0)] * 20)
    filed = simulate(d, d.choose(8, True), [(8, 1, 1.2, 0.5)] * 10 + [(1, 1, 1.2, 0.5)] * 10)  # the tail
    assert filed["call_factor"] < 0.6 and d.speedups(8, True)[1] == pytest.approx(1.25)
    assert d.choose(8, True).k == 1


def test_the_call_factor_is_taken_against_the_calls_own_acceptance():
    """A call whose drafts happened to be accepted less than the estimate is not a slow call: the
    acceptance estimate absorbs it, the factor stays 1."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 1000, "prior_weight": 0.0}, 1)
    d.observe_acceptance(True, 1, 100, [80])
    d.observe_steps(0, 8, [1.0])
    d.observe_steps(1, 8, [1.2])
    simulate(d, Choice(0, 1.0, False, 8, [1.0, 1.5]), [(8, 0, 1.0, 0.0)] * 20)
    filed = simulate(d, d.choose(8, True), [(8, 1, 1.2, 0.2)] * 20)  # accepts 0.2, not 0.8
    assert filed["realised_speedup"] == pytest.approx(1.2 / 1.2) and filed["call_factor"] == pytest.approx(1.0)


# ---- the draft method (draft_sample_method: auto) -------------------------------------------------
BOTH = ("probabilistic", "greedy")


@pytest.mark.parametrize("better", BOTH)
def test_auto_measures_both_methods_then_drafts_by_the_one_that_accepts_more(better):
    """A sampled call's first two calls measure each method at the maximum length; then the method
    whose drafts are accepted more is chosen, the other one only probed."""
    worse = next(m for m in BOTH if m != better)
    d = AdaptiveDrafter({"enabled": True, "probe_every": 4}, K, methods=BOTH)
    log: list = []
    run_calls(d, 24, accept={better: [0.8] * K, worse: [0.4] * K}, cost=lambda b, k: 1.0 + 0.1 * k, log=log)
    assert [(c.k, c.method) for c in log[:2]] == [(K, "probabilistic"), (K, "greedy")]
    chosen = [c for c in log[2:] if not c.probe]
    assert chosen and all(c.method == better for c in chosen), [(c.k, c.method, c.probe) for c in log]
    probes = [c for c in log[2:] if c.probe and c.method == worse]
    assert probes and all(c.steps == 0 for c in probes)  # a method probe is a whole call
    assert d.acceptance(True, better)[0] > 0.75 and d.acceptance(True, worse)[0] < 0.45


def test_auto_follows_a_head_whose_better_method_changes():
    """Acceptance moves during RL (the policy sharpens): once the other method accepts more, a probe
    notices and the choice follows."""
    d = AdaptiveDrafter({"enabled": True, "probe_every": 4}, K, methods=BOTH)
    log: list = []
    cost = lambda b, k: 1.0 + 0.1 * k  # noqa: E731
    run_calls(d, 12, accept={"probabilistic": [0.8] * K, "greedy": [0.5] * K}, cost=cost, log=log)
    assert [c.method for c in log[2:] if not c.probe][-1] == "probabilistic"
    log.clear()
    run_calls(d, 40, accept={"probabilistic": [0.5] * K, "greedy": [0.85] * K}, cost=cost, log=log)
    assert all(c.method == "greedy" for c in log[-10:] if not c.probe), [(c.method, c.probe) for c in log]


def test_greedy_calls_ignore_the_draft_method():
    d = AdaptiveDrafter({"enabled": True}, K, methods=BOTH)
    assert d.choose(8, sampled=False).method == "probabilistic"  # the first method; vLLM drafts argmax anyway
    run_calls(d, 6, accept=[0.9] * K, cost=lambda b, k: 1.0, sampled=False)
    assert d._acc["sampled:probabilistic"].reached[0] == 0 and d._acc["sampled:greedy"].reached[0] == 0


def test_a_fixed_length_engine_chooses_only_its_method():
    """adaptive_length False (auto without adaptive_draft.enabled): every call drafts the maximum,
    even when drafting loses, and only the method is chosen."""
    d = AdaptiveDrafter({"enabled": False, "probe_every": 4}, K, methods=BOTH, adaptive_length=False)
    log: list = []
    ks = run_calls(d, 16, accept={"probabilistic": [0.1] * K, "greedy": [0.3] * K},
                   cost=lambda b, k: 1.0 + 2.0 * k, log=log)
    assert ks == [K] * 16 and all(c.steps == 0 for c in log)
    assert all(c.method == "greedy" for c in log[2:] if not c.probe)


def test_step_costs_are_kept_per_method_and_borrowed_until_measured():
    d = AdaptiveDrafter({"enabled": True}, K, methods=BOTH)
    d.observe_steps(0, 8, [1.0])
    d.observe_steps(1, 8, [1.5], "probabilistic")
    assert d.cost_ratio(8, 1, "greedy") == 1.5  # the other method's time at this length
    d.observe_steps(1, 8, [1.2], "greedy")
    assert (d.cost_ratio(8, 1, "greedy"), d.cost_ratio(8, 1, "probabilistic")) == (1.2, 1.5)
    assert d.cost_ratio(8, 2, "greedy") == pytest.approx(1.4)  # linear through greedy's own lengths
    with pytest.raises(ValueError, match="draft methods"):
        AdaptiveDrafter({}, K, methods=("greedy", "greedy"))
