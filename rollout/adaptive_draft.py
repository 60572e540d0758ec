"""Adaptive drafting: how many tokens an engine drafts on each generation call, 0 included, chosen
online to maximise expected tokens per second (pure: no vLLM here; `rollout.engine` feeds it).

Model. A step that verifies k drafted tokens emits the verified token plus the accepted prefix of
the draft. With conditional acceptance a_i = P(position i accepted | positions < i accepted)
(i = 1..k), the expected tokens per step are

    E(k) = 1 + Σ_{j=1..k} Π_{i=1..j} a_i                                   (E(0) = 1)

(Leviathan et al. 2023 §3.1 give the i.i.d. case (1 − a^{k+1})/(1 − a); the product form keeps a
per-position a_i, which is what vLLM counts). A step's time at batch size b is T(b, k), so the
expected speed-up over not drafting is

    S(k) = E(k) · T(b, 0) / T(b, k)                                        (S(0) = 1)

and the engine drafts argmax_k S(k) (ties: the smaller k) among the lengths with S(k) ≥ 1 +
``min_gain``, else nothing.

Estimates. a_i: from vLLM's per-position accepted counts (``num_accepted_tokens_per_pos[i]`` =
drafts whose position i was accepted): a_1 = acc[0] / drafts, a_i = acc[i−1] / acc[i−2], as
exponentially decayed counts (``ewma``) over calls, kept apart for greedy and sampled calls
(acceptance differs by temperature), with a prior of ``prior_weight`` pseudo-drafts at
``prior_acceptance``. T(b, k): exponentially averaged median seconds of a call's full-batch
decode steps (no prompt tokens, as many sequences as the call's most: `CallSteps`) per bucket
(powers of two) of the call's batch size, and k; the
ratio T(b, k) / T(b, 0) is taken from the nearest bucket with a plain and a drafting time (a k
not timed there: linear in k through the timed ones), else from the prior 1 +
``prior_draft_cost``·k; it is held ≥ 1 and non-decreasing in k (drafting only adds work: a lower
ratio is noise), so S(k) ≤ E(k). The median full-batch step misses what a whole call pays beyond
it — the ragged tail once drafted answers end at different steps, slow steps — so S(k) is also
multiplied by a call factor where below 1: the EWMA of whole drafting calls' realised speed-up
(seconds per emitted token of whole plain calls of the bucket over theirs, all decode steps) over
the step model's for the call's own acceptance (`AdaptiveDrafter._calibrate`).

Exploration. The first call of each kind (greedy, sampled) drafts the maximum, measuring every
position. An estimate is only refreshed for the k that runs, so calls *probe* another k: 0 (the
plain step's time, the cheapest call) and the neighbours best ± 1, in turn. The first probe comes
after ``probe_every`` calls; a probe after which the choice stays doubles the gap to the next (up
to ``PROBE_BACKOFF``·probe_every), one that changes it resets the gap — so exploring costs little
once the choice is stable (a useless head probes k = 1 every 8, 16, 32, 64 calls), and a head
that became good is noticed while k = 0, the plain step timed while drafting.

Short probes. A probe of k > 0 drafts its length for the call's first ``probe_steps`` decode
steps only; then the engine rewrites vLLM's table between two steps and the call goes on at the
choice (`Choice.steps`, `Choice.rest_k`). A probe of a length that loses then costs
``probe_steps`` steps, not a whole call: at batch 1 a whole-call probe was a third of a 3-call
measurement, at batch 32 one call is ~30 s on this CPU (docs/benchmarks.md). A probe of k = 0
stays a whole call: it is never slower than not drafting, and a switch from 0 to drafting would
draft from a drafter KV cache the plain steps did not fill (`rollout.engine._skip_drafter_at_zero`).
The step after the switch verifies drafts of the old length and proposes at the new one, so it
is timed for neither (`CallSteps`). Likewise the first drafting call at a batch-size bucket with
no plain step timed yet drafts ``probe_steps`` steps and runs the rest plain, so one call times
both, where a whole drafting call would be a bet on the prior cost. A probe of a length whose call
factor is below 1 is a whole call, so the factor is measured again (short phases do not run to a
call's end).

Draft method (``draft_sample_method: auto``). At temperature > 0 a draft is either the head's
argmax, accepted with p(argmax q), or a sample of the head's q, accepted with min(1, p/q) — in
expectation 1 − TV(p, q). Neither dominates: a head distilled to a spread-out policy is about as
wide as p and the sample wins; once RL has sharpened p the head stays wider than p and its argmax
wins (docs/benchmarks.md, session 17: 0.42 vs 0.34 at RL start, 0.72 vs 0.75 after 30 steps). An
``auto`` engine keeps sampled calls' acceptance per method and chooses the (method, k) of the
largest S; its first sampled call of each method measures it at the maximum k, and the probes
include the other method at the chosen length (at least 1), second in turn after k = 0: a whole
call, since the engine sets the method between calls — short only from k = 0, where the method
of the rest is moot. Step costs are kept per method too (a
probabilistic draft adds a softmax over the drafter's vocabulary and a probability lookup in the
rejection sampler); a method not yet timed at a length borrows the other method's time there.
Greedy (temperature 0) calls draft the argmax whatever the method.

Between probes the choice is greedy: a head that never accepts stops drafting on the call after
its first measured call (its a_1 drops to prior_weight·prior_acceptance / (prior_weight +
drafts)); a head that always accepts keeps the maximum as long as a drafted token costs less
than the token it adds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

#: Calls between probes, at most (a larger gap leaves a changed head or cost unnoticed too long).
MAX_PROBE_EVERY = 1000
#: A probe that confirms the choice doubles the gap to the next one, up to this many probe_every.
PROBE_BACKOFF = 8
#: Decode steps of a short probe, at most (a longer one is a whole call: probe_steps 0).
MAX_PROBE_STEPS = 4096
#: Timed decode steps a phase needs before its seconds per token calibrate the model.
MIN_RATE_STEPS = 4


class AdaptiveDraftConfig(BaseModel):
    """``rollout.adaptive_draft``: choose the draft length per generation call (see module doc).
    The engine is built with ``num_speculative_tokens`` as the maximum K."""

    # A typo'd setting is an error, not silently the default (the run spec embeds this model).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(
        False,
        description="Choose 0..num_speculative_tokens per call from measured cost and acceptance. Off by "
        "default: on GPU vLLM then runs target verification under piecewise (not full) CUDA graphs, and "
        "the speed-up it predicts is not yet measured on an idle machine (docs/benchmarks.md).")
    probe_every: int = Field(
        8, ge=2, le=MAX_PROBE_EVERY,
        description="Every N-th call drafts another length than the best (exploration; 1/N of calls).")
    probe_steps: int = Field(
        8, ge=0, le=MAX_PROBE_STEPS,
        description="A probe drafts its length for the call's first N decode steps, then the call goes on "
        "at the choice (a losing probe costs N steps, not a call); 0: a probe is a whole call.")
    ewma: float = Field(
        0.3, gt=0, le=1, description="Weight of the newest call in the acceptance counts and step times.")
    prior_acceptance: float = Field(
        0.6, ge=0, le=1, description="Conditional acceptance assumed at a position not yet measured.")
    prior_weight: float = Field(
        4.0, ge=0, description="Pseudo-drafts behind prior_acceptance (how fast measurements override it).")
    min_gain: float = Field(
        0.03, ge=0, le=1,
        description="Draft only when the predicted speed-up is at least 1 + min_gain (hysteresis: measured "
        "step times are noisy, and a head that gains less than this is not worth the risk).")
    prior_draft_cost: float = Field(
        0.15, ge=0,
        description="Assumed extra step time per drafted token, relative to a plain step, until measured.")
    calibrate_calls: bool = Field(
        True,
        description="Scale the step model's speed-up by what whole drafting calls realised against whole plain "
        "calls, where they fell short (the call factor; module doc). Off: the factor is still measured and "
        "reported (rollout/draft_realised_speedup) but the choice follows the step model and the priors alone.")


def expected_tokens(acceptance: list[float], k: int) -> float:
    """E(k) = 1 + Σ_{j≤k} Π_{i≤j} a_i: tokens per step with k drafts (conditional acceptance a_i)."""
    total, run = 1.0, 1.0
    for a in acceptance[:k]:
        run *= a
        total += run
    return total


def bucket(batch_size: int) -> int:
    """The batch-size bucket of step costs: the smallest power of two ≥ batch_size."""
    return 1 << max(0, math.ceil(math.log2(max(1, batch_size))))


#: The draft methods of a sampled call (vLLM speculative_config.draft_sample_method).
DRAFT_METHODS = ("probabilistic", "greedy")


@dataclass
class Choice:
    """What a call drafts, and why."""

    k: int
    predicted_speedup: float  # S(k) of the chosen k under the current estimates
    probe: bool  # exploration call (not the best k)
    batch_bucket: int
    speedups: list[float] = field(default_factory=list)  # S(0..K)
    # A short probe: k for the call's first ``steps`` decode steps, then ``rest_k`` (steps 0: k throughout).
    steps: int = 0
    rest_k: int | None = None
    ratios: list[float] = field(default_factory=list)  # T(b, k) / T(b, 0) for k = 0..K, as S used them
    method: str = "greedy"  # how a sampled call drafts (DRAFT_METHODS); greedy calls draft the argmax anyway

    def call_speedup(self, steps_at_k: int, steps_at_rest: int) -> float:
        """The predicted speed-up of the call as it ran: tokens over time of its two phases,
        Σ n·E / Σ n·r (E = S·r), so a short probe weighs by its steps, not as the whole call."""
        if self.rest_k is None or not self.ratios or steps_at_k + steps_at_rest == 0:
            return self.predicted_speedup
        phases = [(steps_at_k, self.k), (steps_at_rest, self.rest_k)]
        spent = sum(n * self.ratios[k] for n, k in phases)
        return sum(n * self.speedups[k] * self.ratios[k] for n, k in phases) / spent if spent else 1.0


class CallSteps:
    """One call's decode steps as the engine runs them, split at a short probe's switch: the
    seconds of each decode step (steps without prompt tokens) and the spec counters, per phase.

    vLLM verifies a step's drafts in the next step, so the step after the switch verifies drafts
    of the probe's length while proposing at the new one: its counters go to the probe, its time
    to neither (a mixed step is neither length's cost)."""

    def __init__(self, choice: Choice | None, zero):
        self.switch_after = choice.steps if choice is not None and choice.rest_k is not None else 0
        self.rest_k = choice.rest_k if self.switch_after else None
        self.seconds: tuple[list[float], list[float]] = ([], [])
        self.running: tuple[list[int], list[int]] = ([], [])  # sequences in each decode step
        self.tokens: tuple[list[float], list[float]] = ([], [])  # tokens each decode step emitted
        self.spec = [zero, zero]  # SpecStats (rollout.engine) of each phase
        self.decode_steps = 0
        self.switched = False
        self._boundary = False

    def record(self, seconds: float, decode: bool, spec, running: int = 0) -> int | None:
        """One engine step (``running``: its sequences); the draft length the engine must switch to
        before the next step, if it must now."""
        phase = 1 if self.switched and not self._boundary else 0
        self.spec[phase] = self.spec[phase] + spec
        if self._boundary:
            self._boundary = False  # the mixed step: untimed
            return None
        if decode:
            self.seconds[phase].append(seconds)
            self.running[phase].append(running)
            # A step emits one token per running sequence plus the drafts it verified and accepted.
            self.tokens[phase].append(running + sum(spec.accepted_per_pos))
            self.decode_steps += 1
        if self.switch_after and not self.switched and self.decode_steps >= self.switch_after:
            self.switched = self._boundary = True
            return self.rest_k
        return None

    def summary(self) -> dict:
        """What the call's decode steps cost, beside what the estimates keep (the median of its
        full-batch steps per phase): every decode step's count, mean and largest seconds, and the
        full-batch steps' count and median — where a call's realised speed-up differs from the one
        predicted, these say whether slow steps beside the median or the call's tail made it."""
        every = [t for sec in self.seconds for t in sec]
        full, phases = self._at_full_batch()
        at_full = [t for kept in phases for t in kept]
        return {"decode_steps": len(every), "full_batch": full, "full_batch_steps": len(at_full),
                "median_full_s": statistics.median(at_full) if at_full else None,
                "mean_s": statistics.fmean(every) if every else None,
                "max_s": max(every, default=None), "seconds": sum(every)}

    def full_batch_seconds(self) -> tuple[list[float], list[float]]:
        """Each phase's decode-step seconds at the call's full batch (the most sequences any of its
        steps ran): what a step costs at the call's batch size. A call's tail, once answers ended,
        runs few sequences, and how long it is depends on which samples were drawn — at T = 1
        drafting draws other samples than not drafting (measured: mean answers of 29 and 43
        tokens in one batch-8 comparison), so medians over all steps compared tails, not lengths.
        A phase with fewer than 2 full-batch steps keeps all its steps."""
        _, phases = self._at_full_batch()
        out = [kept if len(kept) >= 2 else list(sec) for kept, sec in zip(phases, self.seconds)]
        return out[0], out[1]

    def seconds_per_token(self) -> float | None:
        """A whole call's seconds per emitted token over all its decode steps, the tail included
        (None for a short probe, whose phases each miss part of a call, or a call of fewer than
        MIN_RATE_STEPS timed steps)."""
        sec, tok = sum(self.seconds[0]), sum(self.tokens[0])
        if self.switched or len(self.seconds[0]) < MIN_RATE_STEPS or sec <= 0 or tok <= 0:
            return None
        return sec / tok

    def _at_full_batch(self) -> tuple[int, list[list[float]]]:
        """The call's full batch (the most sequences any of its decode steps ran) and each phase's
        seconds of the steps that ran it."""
        full = max((n for r in self.running for n in r), default=0)
        return full, [[t for t, n in zip(sec, run) if n == full] for sec, run in zip(self.seconds, self.running)]


@dataclass
class _Acceptance:
    accepted: list[float]  # decayed accepted counts per position
    reached: list[float]  # decayed drafts that reached the position


class AdaptiveDrafter:
    """Per-engine online estimates and the choice of k (state only; not thread-safe: the engine
    calls it under its generation lock)."""

    def __init__(self, config: AdaptiveDraftConfig | dict, max_k: int, methods: tuple[str, ...] = ("greedy",),
                 adaptive_length: bool = True):
        """``methods``: the draft methods sampled calls choose among (one: fixed; the first is tried
        first); ``adaptive_length``: choose k in 0..max_k, else always max_k (an engine that only
        chooses its method)."""
        if max_k < 1:
            raise ValueError(f"adaptive drafting needs num_speculative_tokens >= 1 as its maximum, got {max_k}")
        if not methods or set(methods) - set(DRAFT_METHODS) or len(set(methods)) != len(methods):
            raise ValueError(f"draft methods must be distinct ones of {DRAFT_METHODS}, got {methods}")
        self.config = AdaptiveDraftConfig.model_validate(config)
        self.max_k = max_k
        self.methods = tuple(methods)
        self.adaptive_length = adaptive_length
        self.calls = 0
        self._probe_next = 0  # cursor over the probe lengths
        self._gap = self.config.probe_every  # calls from this probe to the next
        self._next_probe = self.config.probe_every  # call number of the next probe
        self._best_at_probe: int | None = None  # the choice a probe was made against
        # Acceptance of greedy calls, and of sampled calls per draft method (`_kind`).
        self._acc = {kind: _Acceptance([0.0] * max_k, [0.0] * max_k)
                     for kind in ("greedy", *(f"sampled:{m}" for m in self.methods))}
        # (bucket, k, method) -> EWMA seconds per decode step; method "" at k = 0 (a plain step).
        self._cost: dict[tuple[int, int, str], float] = {}
        # (bucket, sampled) -> EWMA seconds per token of calls run plain to their end; (bucket, k,
        # kind) -> EWMA of drafting calls' realised speed-up over the step model's (`_calibrate`).
        self._plain_rate: dict[tuple[int, bool], float] = {}
        self._call_factor: dict[tuple[int, int, str], float] = {}
        self.last_call: dict[str, float] = {}  # the last call's calibration (rollout.engine reports it)

    def _kind(self, sampled: bool, method: str | None) -> str:
        return f"sampled:{self._method(method)}" if sampled else "greedy"

    def _method(self, method: str | None) -> str:
        return method or self.methods[0]

    # ---- estimates -------------------------------------------------------------------------------
    def acceptance(self, sampled: bool, method: str | None = None) -> list[float]:
        """Conditional acceptance a_1..a_K (of sampled calls drafting by ``method``, default the
        first), the prior blended with the decayed counts."""
        c, s = self.config, self._acc[self._kind(sampled, method)]
        return [(acc + c.prior_weight * c.prior_acceptance) / (n + c.prior_weight) if n + c.prior_weight > 0
                else c.prior_acceptance for acc, n in zip(s.accepted, s.reached)]

    def cost_ratio(self, batch_size: int, k: int, method: str | None = None) -> float:
        """T(b, k) / T(b, 0) of drafting by ``method`` in the nearest bucket with a plain and a drafting
        time: measured for this k and method, else this k's time of the other method, else linear in
        k through the method's measured lengths there (1 + c·k, c their mean (ratio − 1)/k), else
        through every measured length; without such a bucket the prior 1 + prior_draft_cost·k."""
        if k == 0:
            return 1.0
        method = self._method(method)
        b = bucket(batch_size)
        both = {bb for (bb, kk, _) in self._cost if kk > 0 and (bb, 0, "") in self._cost}
        if not both:
            return 1.0 + self.config.prior_draft_cost * k
        near = min(both, key=lambda bb: (abs(math.log2(bb) - math.log2(b)), bb))
        plain = self._cost[(near, 0, "")]
        drafting = {(kk, m): t for (bb, kk, m), t in self._cost.items() if bb == near and kk > 0}
        same_k = [t for (kk, m), t in sorted(drafting.items(), key=lambda x: x[0][1] != method) if kk == k]
        if same_k:
            return same_k[0] / plain
        own = [(kk, t) for (kk, m), t in drafting.items() if m == method] or [(kk, t) for (kk, _), t in drafting.items()]
        per_token = [(t / plain - 1.0) / kk for kk, t in own]
        return 1.0 + max(0.0, sum(per_token) / len(per_token)) * k

    def speedups(self, batch_size: int, sampled: bool, method: str | None = None) -> list[float]:
        """S(k) for k = 0..K (drafting by ``method``): the step model's (`model_speedups`) times
        what whole drafting calls realised against it (`call_factor`), where they fell short."""
        model = self.model_speedups(batch_size, sampled, method)
        if not self.config.calibrate_calls:
            return model
        return [s * min(1.0, self.call_factor(batch_size, k, sampled, method)) if k else s for k, s in enumerate(model)]

    def model_speedups(self, batch_size: int, sampled: bool, method: str | None = None) -> list[float]:
        """S(k) = E(k) / r(k) of the step model, for k = 0..K (drafting by ``method``). The cost
        ratios are taken as at least 1 and non-decreasing in k: drafting more only adds work, so a
        ratio below that is timing noise (another process slowing the plain steps) — and it must
        never switch on a head that accepts nothing."""
        a = self.acceptance(sampled, method)
        return [e / r for e, r in zip((expected_tokens(a, k) for k in range(self.max_k + 1)),
                                      self.cost_ratios(batch_size, method))]

    def call_factor(self, batch_size: int, k: int, sampled: bool, method: str | None = None) -> float:
        """Realised over modelled speed-up of whole drafting calls of this bucket and kind: at this
        k if measured, else the lowest measured at another k (a residual the step model cannot see:
        the call's tail, slow steps beside the median), else 1."""
        b, kind = bucket(batch_size), self._kind(sampled, method)
        if (b, k, kind) in self._call_factor:
            return self._call_factor[(b, k, kind)]
        return min((f for (bb, _, kk), f in self._call_factor.items() if bb == b and kk == kind), default=1.0)

    def cost_ratios(self, batch_size: int, method: str | None = None) -> list[float]:
        """T(b, k) / T(b, 0) for k = 0..K as `speedups` uses them: at least 1, non-decreasing in k."""
        out, ratio = [], 1.0
        for k in range(self.max_k + 1):
            ratio = max(ratio, self.cost_ratio(batch_size, k, method))
            out.append(ratio)
        return out

    def plain_step_seconds(self, batch_size: int) -> float | None:
        """T(b, 0) of the bucket, if measured."""
        return self._cost.get((bucket(batch_size), 0, ""))

    # ---- decisions -------------------------------------------------------------------------------
    def choose(self, batch_size: int, sampled: bool) -> Choice:
        """The draft length (and, for a sampled call, method) of the next call of ``batch_size``
        sequences."""
        self.calls += 1
        methods = self.methods if sampled else self.methods[:1]
        s = {m: self.speedups(batch_size, sampled, m) for m in methods}
        lengths = range(self.max_k + 1) if self.adaptive_length else [self.max_k]

        def score(km: tuple[int, str]) -> tuple:
            k, m = km
            # Drafting must beat not drafting by min_gain (timing noise must not flip a useless
            # head on); ties go to the smaller k, then to the first method.
            gain = s[m][k] if k == 0 or s[m][k] >= 1.0 + self.config.min_gain or not self.adaptive_length else 0.0
            return gain, -k, -methods.index(m)

        best, best_m = max(((k, m) for k in lengths for m in methods), key=score)
        k, method, probe = best, best_m, False
        unmeasured = [m for m in methods if self._acc[self._kind(sampled, m)].reached[0] == 0]
        if unmeasured:
            # Nothing measured yet for this kind of call and method: measure every position.
            k, method, probe = self.max_k, unmeasured[0], True
        elif self.calls >= self._next_probe:
            # Probe k = 0 (times the plain step: the cheapest call), then the other draft method at
            # the chosen length (at least 1), then the neighbours of the choice, in turn.
            near = [(j, best_m) for j in dict.fromkeys((0, best + 1, best - 1)) if j in lengths and j != best]
            others = near[:1] + [(max(best, 1), m) for m in methods if m != best_m] + near[1:]
            if others:
                k, method = others[self._probe_next % len(others)]
                probe = True
                self._probe_next += 1
                self._best_at_probe = (best, best_m)
                self._next_probe = self.calls + self._gap
        elif self._best_at_probe is not None:  # the first choice after a probe
            confirmed = (best, best_m) == self._best_at_probe
            self._gap = min(2 * self._gap, PROBE_BACKOFF * self.config.probe_every) if confirmed else self.config.probe_every
            self._next_probe = self.calls - 1 + self._gap
            self._best_at_probe = None
        rest, steps = None, 0
        if self.config.probe_steps and k and self.adaptive_length:
            if self.plain_step_seconds(batch_size) is None:
                # Drafting at a batch size whose plain step is untimed: a short draft, the rest plain.
                rest, steps, probe = 0, self.config.probe_steps, True
            elif (probe and k != best and (method == best_m or best == 0)
                  and (not self.config.calibrate_calls
                       or self._call_factor.get((bucket(batch_size), k, self._kind(sampled, method)), 1.0) >= 1.0)):
                # (the method is set per call; at k = 0 it is moot, so a method probe from 0 is short too;
                # a length whose whole calls fell short of the model probes a whole call: `_calibrate`)
                rest, steps = best, self.config.probe_steps
        return Choice(k, s[method][k], probe, bucket(batch_size), s[method], steps, rest,
                      self.cost_ratios(batch_size, method), method)

    # ---- measurements ----------------------------------------------------------------------------
    def observe_acceptance(self, sampled: bool, k: int, num_drafts: int, accepted_per_pos: list[int],
                           method: str | None = None) -> None:
        """One call's drafts of length ``k`` and vLLM's per-position accepted counts."""
        self.observe_call_acceptance(sampled, [(k, num_drafts, accepted_per_pos)], method)

    def observe_call_acceptance(self, sampled: bool, phases: list[tuple[int, int, list[int]]],
                                method: str | None = None) -> None:
        """One call's drafts (by ``method``), per phase (draft length, drafts, per-position accepted
        counts): the counts decay once per call, however many phases it had."""
        phases = [(k, n, acc) for k, n, acc in phases if k and n]
        if not phases:
            return
        d = 1.0 - self.config.ewma
        s = self._acc[self._kind(sampled, method)]
        for i in range(self.max_k):
            s.accepted[i] *= d
            s.reached[i] *= d
        for k, num_drafts, accepted_per_pos in phases:
            acc = list(accepted_per_pos) + [0] * self.max_k
            for i in range(min(k, self.max_k)):
                s.accepted[i] += acc[i]
                s.reached[i] += num_drafts if i == 0 else acc[i - 1]

    def observe_steps(self, k: int, batch_size: int, seconds: list[float], method: str | None = None) -> None:
        """One call's decode-step times (steps without prompt tokens), all under draft length ``k``
        (and ``method``), for a call of ``batch_size`` sequences: their median (robust to a step slowed by another
        process) enters the bucket of the *call's* batch size as one observation. Keyed by the call,
        not by each step's running count, because the choice is made per call: the tail steps of a
        larger call, once some of its sequences have finished, carry that call's scheduling and
        KV-cache state, not what a call of that many sequences costs, so a smaller call's bucket
        took times that were not its own. Which buckets it touched depends on where answers end: at
        T = 1 with 64 tokens every sequence of a batch-8 or -32 call ran to the limit (running
        counts 4-8 and 20-32, no 1-sequence steps), so it reached buckets 2-4 and 16; greedy
        answers end at different lengths and reach bucket 1 (docs/benchmarks.md, adaptive drafting)."""
        if not seconds:
            return
        mid = statistics.median(seconds)
        key = (bucket(batch_size), k, self._method(method) if k else "")
        old = self._cost.get(key)
        self._cost[key] = mid if old is None else old + self.config.ewma * (mid - old)

    def measured_speedup(self, batch_size: int, phases: list[tuple[list[float], float]]) -> float | None:
        """A call's realised speed-up: its tokens per step L over its decode-step time, against the
        plain step time T(b, 0) of the call's bucket, Σ n·L · T(b, 0) / Σ seconds over its phases
        (each: its decode-step seconds and L; None until a plain step was timed there)."""
        plain = self.plain_step_seconds(batch_size)
        spent = sum(sum(sec) for sec, _ in phases)
        if plain is None or spent <= 0:
            return None
        return sum(len(sec) * length for sec, length in phases) * plain / spent

    def observe_call(self, choice: Choice, batch_size: int, sampled: bool, steps: CallSteps) -> float | None:
        """Feed one call's phases to the estimates; returns its measured speed-up."""
        ks = [choice.k, choice.rest_k if steps.switched else choice.k]
        timed = steps.full_batch_seconds()
        for k, sec in zip(ks, timed):
            self.observe_steps(k, batch_size, sec, choice.method)
        self.observe_call_acceptance(sampled, [(k, s.num_drafts, s.accepted_per_pos) for k, s in zip(ks, steps.spec)],
                                     choice.method)
        self.last_call = self._calibrate(batch_size, sampled, choice.method, choice.k, steps)
        return self.measured_speedup(batch_size, [(sec, s.mean_acceptance_length) for sec, s in zip(timed, steps.spec) if sec])

    def _calibrate(self, batch_size: int, sampled: bool, method: str, k: int, steps: CallSteps) -> dict:
        """Compare a whole call with plain calls of the same bucket and kind: seconds per emitted
        token over all its decode steps, the tail and slow steps included — what the call's tokens
        per second are made of, where the step model keeps the median full-batch step. A plain
        call updates the plain rate; a drafting one files its realised speed-up R = plain rate /
        its rate against the step model's for the call's own acceptance, L / r(k) (so the factor
        holds what the step times miss, not the call's luck with its drafts), as the EWMA factor
        `speedups` applies where it is below 1 (measured: a batch-32 call at T = 1 whose median
        steps predicted 0.97 of plain ran at 0.76; docs/benchmarks.md, session 22). Short probes
        file nothing: their rest misses the call's first steps, so its share of tail is larger
        (measured: a greedy batch-8 probe's plain rest read 1.5× slower per token than plain calls).
        A factor is refreshed only by a whole drafting call, so a probe of a length whose factor is
        below 1 is a whole call (`choose`): else one slow call (another process beside it) would
        keep drafting off at that bucket until the model alone cleared (1 + min_gain) / factor."""
        rate = steps.seconds_per_token()
        if rate is None:
            return {}
        b = bucket(batch_size)
        plain = self._plain_rate.get((b, sampled))
        if k == 0:
            self._plain_rate[(b, sampled)] = rate if plain is None else plain + self.config.ewma * (rate - plain)
            return {}
        if plain is None:
            return {}
        realised = plain / rate
        model = steps.spec[0].mean_acceptance_length / self.cost_ratios(batch_size, method)[k]
        key = (b, k, self._kind(sampled, method))
        old = self._call_factor.get(key)
        self._call_factor[key] = realised / model if old is None else old + self.config.ewma * (realised / model - old)
        return {"realised_speedup": realised, "model_speedup": model, "call_factor": self._call_factor[key]}
