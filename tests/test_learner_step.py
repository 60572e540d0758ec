"""The optimisation step on the real tiny policy model (`learner.tiny`): exactness against PPO,
determinism, split invariance, the NaN guard, bad input, metrics, and learning a toy reward."""

from __future__ import annotations

import math

import pytest
import torch

from learner.aggregation import AGGREGATIONS
from learner.batch import TrainBatch
from learner.config import AlgorithmConfig, MPOConfig
from learner.step import Learner, _Stats
from learner.tiny import make_tiny_model

torch.set_num_threads(1)
V, P, R = 64, 5, 8  # vocab, prompt length, response length


def _model(seed=0, num_mtp=4):
    return make_tiny_model(num_mtp=num_mtp, seed=seed, vocab_size=V, hidden_size=32)


def _batch(b=8, seed=0, ragged=True) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    t = P + R
    ids = torch.randint(3, V, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    if ragged:
        attn[1, -3:] = 0
        attn[2, -1:] = 0
    resp = torch.zeros(b, t, dtype=torch.bool)
    resp[:, P:] = True
    resp &= attn.bool()
    rewards = torch.rand(b, generator=g)
    return TrainBatch(ids, attn, resp, rewards, torch.arange(b) // 4,
                      policy_versions=torch.zeros(b, dtype=torch.long))


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mpo", [MPOConfig(k=1), MPOConfig(k=5, mtp_share=0.0)])
def test_mpo_k1_or_share0_step_equals_ppo_step(mpo):
    b = _batch()
    ppo, m1 = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="none")), None
    m1 = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="none", mpo=mpo))
    ppo.step(b)
    m1.step(b)
    assert _same(_params(ppo.model), _params(m1.model))
    # and a real block ratio does change the update (the comparison can fail)
    m3 = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="none", mpo=MPOConfig(k=3),
                                           mini_batches=2))
    ppo2 = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="none", mini_batches=2))
    m3.step(b)
    ppo2.step(b)
    assert not _same(_params(ppo2.model.backbone), _params(m3.model.backbone))


@pytest.mark.parametrize("regime,mpo,routes", [
    ("none", None, (False, False)),
    ("none", MPOConfig(k=3), (False, False)),  # MPO App. A: MTP terms train the MTP modules only
    ("detach", None, (False, True)),  # OCC authors' detach: shared LM head attached, trunk not
    ("detach", MPOConfig(k=3), (False, True)),
    ("ce", None, (True, True)),
    ("occ", MPOConfig(k=3), (True, True)),
])
def test_mtp_gradient_routes_of_the_training_forward(regime, mpo, routes):
    """(into the backbone trunk, into the shared LM head) for the training forward's MTP heads."""
    lrn = Learner(_model(), AlgorithmConfig(mtp_regime=regime, mpo=mpo))
    assert (lrn.backbone_grad, lrn.lm_head_grad) == routes


def test_step_is_deterministic_under_a_seed():
    cfg = AlgorithmConfig(lr=1e-2, mtp_regime="occ", mpo=MPOConfig(k=3), epochs=2, mini_batches=2,
                          micro_batch_size=3, seed=7)
    runs = []
    for _ in range(2):
        lrn = Learner(_model(), cfg)
        ms = [lrn.step(_batch(seed=s)) for s in range(2)]
        runs.append((_params(lrn.model), [{k: v for k, v in m.items() if not k.startswith("perf")}
                                          for m in ms]))
    assert _same(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_auto_micro_batch_fits_the_logits_budget():
    """'auto' takes as many samples as keep samples × width × vocabulary × heads within the budget."""
    b = _batch()
    vocab, width = _model().config.vocab_size, Learner._trim(b.input_ids, b.attention_mask)
    lrn = Learner(_model(), AlgorithmConfig(mtp_regime="occ"))
    assert lrn.micro_size(b, 3) == b.size  # a tiny vocabulary: the whole batch at once
    tight = Learner(_model(), AlgorithmConfig(mtp_regime="occ", micro_batch_logits=2 * width * vocab * 3))
    assert tight.micro_size(b, 3) == 2 and tight.micro_size(b, 6) == 1  # never below one sample
    assert tight.step(b)["perf/micro_batch_size"] == 1  # occ trains main + 2 MTP heads: 3 heads
    assert Learner(_model(), AlgorithmConfig(micro_batch_size=3)).micro_size(b, 3) == 3


def test_micro_batch_split_does_not_change_the_update():
    b = _batch()
    outs = []
    for mbs in (1, 3, 8, "auto"):
        for agg in AGGREGATIONS:
            lrn = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="detach",
                                                    micro_batch_size=mbs, aggregation=agg))
            m = lrn.step(b)
            outs.append((agg, m["loss/total"], m["optim/grad_norm"], _params(lrn.model)))
    for agg in AGGREGATIONS:
        ref = [o for o in outs if o[0] == agg]
        for o in ref[1:]:
            assert o[1] == pytest.approx(ref[0][1], rel=1e-5)
            # the gradient's scale (Adam's first step is scale-free, so check the norm too)
            assert o[2] == pytest.approx(ref[0][2], rel=1e-5)
            assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(o[3], ref[0][3]))


class _NaNOnTrain(torch.nn.Module):
    """Wraps a model; poisons the log-probs of grad-enabled (training) forwards."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_mtp, self.config = inner, inner.num_mtp, inner.config

    def token_logprobs(self, *a, **kw):
        out = self.inner.token_logprobs(*a, **kw)
        if torch.is_grad_enabled():
            out.logprobs = out.logprobs * float("nan")
        return out


def test_nonfinite_step_is_skipped_and_counted():
    model = _NaNOnTrain(_model())
    lrn = Learner(model, AlgorithmConfig(lr=1e-2, mtp_regime="none", mini_batches=2))
    before = _params(model)
    m = lrn.step(_batch())
    assert m["optim/skipped_nonfinite"] == 2 and m["optim/steps"] == 0
    assert _same(before, _params(model))
    assert m["optim/skipped_nonfinite_total"] == 2


def test_metrics_cover_the_design_list_and_are_finite():
    cfg = AlgorithmConfig(lr=1e-2, mtp_regime="occ", mpo=MPOConfig(k=3), mini_batches=2,
                          advantage={"kl_coef": 0.01})
    b = _batch()
    b.ref_logprobs = torch.full(b.input_ids.shape, -4.0)
    b.behav_logprobs = torch.full(b.input_ids.shape, -4.2)
    b.correct = b.rewards > 0.5
    m = Learner(_model(), cfg).step(b)
    expected = [
        "loss/total", "loss/policy", "loss/mtp", "loss/mtp/head1", "loss/kl",
        "ratio/clip_frac", "ratio/token_mean", "ratio/token_var", "ratio/block_mean",
        "ratio/block_var", "ratio/approx_kl", "ratio/behav_weight_mean", "ratio/behav_capped_frac",
        "mtp/lambda/head1", "mtp/c_hat/head1", "mtp/v2_hat/head1", "mtp/lambda/head4",
        "mtp/clip_frac/head1", "mtp/nll/head1", "optim/grad_norm", "policy/entropy",
        "policy/kl_ref", "batch/reward_mean", "batch/accuracy", "batch/response_len_mean",
        "batch/staleness_mean", "perf/tokens_per_s", "perf/step_s",
    ]
    missing = [k for k in expected if k not in m]
    assert not missing, missing
    assert all(math.isfinite(v) for v in m.values())


def test_on_policy_single_step_has_unit_ratio_and_no_clipping():
    m = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="detach", mini_batches=1)).step(_batch())
    assert m["ratio/token_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["ratio/token_var"] == pytest.approx(0.0, abs=1e-10)
    assert m["ratio/clip_frac"] == 0.0


def test_the_learner_trains_the_tempered_policy():
    """AlgorithmConfig.temperature: π_old (every head MPO needs) and π_θ are softmax(logits / T), so
    behaviour log-probs sampled at T (vLLM's, after temperature) give decoupled weights of exactly 1
    on an on-policy batch; judged against the T = 1 policy they would not."""
    cfg = AlgorithmConfig(lr=1e-2, mtp_regime="occ", mini_batches=2, temperature=0.7, mpo=MPOConfig(k=3))
    model, b = _model(), _batch()
    learner = Learner(model, cfg)
    old, _ = learner.old_logprobs(b)
    with torch.no_grad():
        want = model.token_logprobs(b.input_ids, b.attention_mask, num_mtp=2, temperature=0.7).logprobs
        raw = model.token_logprobs(b.input_ids, b.attention_mask, num_mtp=2).logprobs
    resp = b.response_mask
    assert torch.allclose(old[:, resp], want[:3, resp], atol=1e-5)
    assert (old[0, resp] - raw[0, resp]).abs().max() > 1e-2
    b.behav_logprobs = torch.where(resp, want[0], 0.0)
    m = learner.step(b)
    assert m["ratio/behav_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(m["loss/total"]) and "mtp/lambda/head1" in m


def test_later_mini_batches_see_moved_ratios_and_nonzero_lambda():
    m = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="occ", mini_batches=4)).step(_batch())
    assert m["ratio/token_var"] > 0 and m["ratio/approx_kl"] > 0
    assert abs(m["mtp/lambda/head1"]) > 1e-4


def test_occ_lambda_is_exactly_zero_until_the_first_optimiser_step(monkeypatch):
    """θ = θ_old until the update's first AdamW step: λ must be 0 exactly there, not the float noise
    of a recomputed log-ratio (micro-batches that differ from the π_old pass's give ~1e-7), which
    AdamW would amplify into learning-rate-sized steps of the heads."""
    import learner.step as step_mod

    seen = []
    real = step_mod.occ_lambda_paper

    def spy(d_rl, *a, **kw):
        out = real(d_rl, *a, **kw)
        seen.append(out.lam.clone())
        return out

    monkeypatch.setattr(step_mod, "occ_lambda_paper", spy)
    real_old = Learner._old_logprobs

    def noisy_old(self, batch):  # the recompute noise seen on CUDA (bit-exact on this CPU)
        old, entropy = real_old(self, batch)
        return old + 1e-6 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1)), entropy

    monkeypatch.setattr(Learner, "_old_logprobs", noisy_old)
    cfg = AlgorithmConfig(lr=1e-2, mtp_regime="occ", mini_batches=2, micro_batch_size=3)
    Learner(_model(), cfg).step(_batch())
    n_micro = math.ceil(4 / 3)  # micro-batches of the first mini-batch (8 samples / 2)
    assert all(torch.equal(lam, torch.zeros_like(lam)) for lam in seen[:n_micro])
    assert any(bool((lam != 0).any()) for lam in seen[n_micro:])


def test_stats_mean_and_variance_on_constructed_inputs():
    st = _Stats()
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    st.add_masked("r", x, torch.tensor([[True, True, True, False]]))
    st.add_masked("r", torch.tensor([[4.0]]), torch.tensor([[True]]))
    out = st.result()
    assert out["r_mean"] == pytest.approx(2.5) and out["r_var"] == pytest.approx(1.25)


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    lrn = Learner(_model(), AlgorithmConfig(mtp_regime="none"))
    b = _batch()
    b.rewards = b.rewards[:5]
    with pytest.raises(ValueError, match="rewards has shape"):
        lrn.step(b)
    b = _batch()
    b.response_mask = b.response_mask[:, :-1]
    with pytest.raises(ValueError, match="response_mask has shape"):
        lrn.step(b)
    b = _batch()
    b.response_mask[1, -1] = True  # row 1 is padded there
    with pytest.raises(ValueError, match="marks padding"):
        lrn.step(b)
    b = _batch()
    b.attention_mask[3, 2] = 0  # a hole: left/middle padding is not supported
    b.response_mask &= b.attention_mask.bool()
    with pytest.raises(ValueError, match="not right-padded"):
        lrn.step(b)
    b = _batch()
    b.rewards[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite rewards"):
        lrn.step(b)
    with pytest.raises(ValueError, match="mpo.k=5 needs 4 MTP heads"):
        Learner(_model(num_mtp=2), AlgorithmConfig(mpo=MPOConfig(k=5), mtp_regime="none"))


def test_all_masked_samples_are_dropped_and_counted_without_nan():
    b = _batch()
    b.response_mask[0] = False
    b.response_mask[5] = False
    m = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="occ",
                                          aggregation="seq-mean-token-mean")).step(b)
    assert m["batch/samples_dropped_empty"] == 2 and m["batch/samples"] == 6
    assert m["optim/steps"] == 4 and all(math.isfinite(v) for v in m.values())


def test_batch_with_nothing_to_learn_is_skipped_and_counted():
    b = _batch()
    b.rewards = torch.ones(b.size)  # every group constant → DAPO drops all
    lrn = Learner(_model(), AlgorithmConfig(algorithm="dapo", mtp_regime="none"))
    before = _params(lrn.model)
    m = lrn.step(b)
    assert m["optim/skipped_empty_batch"] == 1 and m["batch/groups_dropped_constant"] == 2
    assert _same(before, _params(lrn.model)) and lrn.version == 0


# ---------------------------------------------------------------------------- learning
TARGET = torch.arange(3, 11)  # reward = fraction of response tokens in this set (8 of 64)


@torch.no_grad()
def _sample(model, prompts, gen):
    ids = prompts
    for _ in range(R):
        logits = model.backbone(input_ids=ids).logits[:, -1].float()  # (B, V)
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], 1)
    return ids


def _toy_batch(model, gen, n_prompts=4, group=8):
    prompts = torch.randint(11, V, (n_prompts, P), generator=gen).repeat_interleave(group, 0)
    ids = _sample(model, prompts, gen)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, P:] = True
    reward = torch.isin(ids[:, P:], TARGET).float().mean(-1)
    return TrainBatch(ids, torch.ones_like(ids), resp, reward,
                      torch.arange(ids.shape[0]) // group)


@pytest.mark.parametrize("name,cfg", [
    ("ppo", AlgorithmConfig(algorithm="ppo", lr=3e-3, mtp_regime="none")),
    ("mpo", AlgorithmConfig(algorithm="grpo", lr=3e-3, mtp_regime="detach", mpo=MPOConfig(k=3))),
    ("occ", AlgorithmConfig(algorithm="grpo", lr=3e-3, mtp_regime="occ", mini_batches=2)),
])
def test_thirty_updates_raise_a_toy_reward(name, cfg):
    model = _model(seed=1, num_mtp=2)
    lrn = Learner(model, cfg)
    gen = torch.Generator().manual_seed(0)
    rewards = []
    for _ in range(30):
        b = _toy_batch(model, gen)
        rewards.append(float(b.rewards.mean()))
        m = lrn.step(b)
        assert m["optim/steps"] >= 1
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(name, first, last)
    assert last > first + 0.2, (name, first, last)


def test_entropy_bonus_raises_entropy_when_rewards_carry_no_signal():
    """With equal rewards the advantages vanish, so only the bonus −c_H·H moves the policy."""
    b = _batch(ragged=False)
    b = TrainBatch(b.input_ids, b.attention_mask, b.response_mask, torch.ones(len(b.rewards)), b.group_ids,
                   policy_versions=b.policy_versions)
    learner = Learner(_model(), AlgorithmConfig(lr=1e-2, mtp_regime="none", entropy_coef=1.0))
    first = learner.step(b)["policy/entropy"]
    for _ in range(4):
        last = learner.step(b)["policy/entropy"]
    assert last > first + 1e-3, (first, last)


@pytest.mark.parametrize("forced", [False, True])
def test_occ_with_negative_lambda_does_not_run_away(forced, monkeypatch):
    """Regression (tiny GRPO run, mtp_regime occ, lr 3e-3, 2 mini-batches): ĉ < 0 gave λ < 0, and
    λ times the clipped MTP loss pushed the MTP ratio up without bound (loss/mtp 0.16 → −26 000,
    grad norm 16 000). With λ inside the advantages the term stays within its trust region.
    Here 15 updates on one batch; the old arithmetic reached loss/mtp −3.9 (natural λ ≈ −0.01)
    and −34 (λ forced to −0.05)."""
    import learner.step as step_mod
    from learner.occ import OCCStats

    if forced:
        paper = step_mod.occ_lambda_paper

        def negative(*a, **kw):
            s = paper(*a, **kw)
            return OCCStats(lam=torch.full_like(s.lam, -0.05), c_hat=s.c_hat, v2_hat=s.v2_hat)

        monkeypatch.setattr(step_mod, "occ_lambda_paper", negative)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (8, 12), generator=g)
    resp = torch.zeros(8, 12, dtype=torch.bool)
    resp[:, 4:] = True
    b = TrainBatch(ids, torch.ones_like(ids), resp, torch.rand(8, generator=g), torch.arange(8) // 4)
    lrn = Learner(_model(seed=1, num_mtp=1),
                  AlgorithmConfig(algorithm="grpo", lr=3e-3, mtp_regime="occ", mini_batches=2))
    hist = [lrn.step(b) for _ in range(15)]
    assert min(m["mtp/lambda/head1"] for m in hist) < 0  # the regime under test
    assert max(abs(m["loss/mtp"]) for m in hist) < 0.5
    assert max(m["optim/grad_norm_max"] for m in hist) < 10


@pytest.mark.parametrize("mini_batches,epochs,rows", [(2, 1, 4), (1, 1, 0), (4, 1, 6), (2, 2, 8)])
def test_the_first_mini_batch_forward_is_pi_old(mini_batches, epochs, rows, monkeypatch):
    """With one epoch the separate π_old pass covers the mini-batches after the first only (the
    first one's training forward runs at θ_old); the update is bit for bit the one with a full pass
    (the recomputation is bit-exact on this CPU: see the λ test above)."""
    regime = "occ" if mini_batches * epochs > 1 else "detach"  # OCC needs a second step (its validator)
    cfg = AlgorithmConfig(lr=1e-2, mtp_regime=regime, mpo=MPOConfig(k=3), mini_batches=mini_batches,
                          epochs=epochs, micro_batch_size=3)
    seen: list[int] = []
    real_old = Learner._old_logprobs

    def counted(self, batch):
        seen.append(batch.size)
        return real_old(self, batch)

    monkeypatch.setattr(Learner, "_old_logprobs", counted)
    reused = Learner(_model(), cfg)
    m = reused.step(_batch())
    assert sum(seen) == rows
    monkeypatch.setattr(Learner, "_first_forward_is_old", lambda self: False)
    full = Learner(_model(), cfg)
    ref = full.step(_batch())
    assert sum(seen) == rows + 8  # the reference computed π_old for every row
    assert _same(_params(reused.model), _params(full.model))
    assert m.keys() - {"perf/old_logprob_s"} == ref.keys() - {"perf/old_logprob_s"}
    for k in ("policy/entropy", "ratio/token_mean", "ratio/approx_kl", "loss/total", "mtp/lambda/head1"):
        if regime == "occ" or k != "mtp/lambda/head1":
            assert m[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), k
