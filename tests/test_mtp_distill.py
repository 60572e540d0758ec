"""Head distillation (`learner/mtp_distill.py`, `algorithm.mtp.distill`): the losses on hand-computed
tensors, the gradient routing on tiny real models (`learner.tiny`), the learner step with the term,
`occ+distill` against `occ`, the config's bounds and the compare rows. All CPU, no engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from learner.batch import TrainBatch
from learner.config import DEFAULT_DISTILL_TOP_K, AlgorithmConfig, MTPDistillConfig
from learner.mtp_distill import (
    MAX_DISTILL_TOP_K,
    distill_kl,
    distill_token_loss,
    distill_topk_ce,
    distill_tv,
    top1_agreement,
)
from learner.step import Learner
from learner.tiny import make_tiny_model


# ---- the losses on small tensors ------------------------------------------------------------------
def test_kl_is_zero_for_equal_distributions_and_matches_the_hand_value():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(distill_kl(z, F.log_softmax(z, -1)), torch.zeros(2), atol=1e-7)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.6, 0.3, 0.1]])
    want = torch.tensor(0.5 * math.log(0.5 / 0.6) + 0.25 * math.log(0.25 / 0.3) + 0.25 * math.log(0.25 / 0.1))
    got = distill_kl(q.log(), p.log())
    assert torch.allclose(got, want.view(1), atol=1e-6)
    # forward KL: teacher first (KL(q ‖ p) is another number here)
    assert not torch.allclose(got, distill_kl(p.log(), q.log()))


def test_kl_ignores_tokens_the_teacher_never_samples():
    p_log = torch.tensor([[0.0, float("-inf"), float("-inf")]])  # p = one-hot
    q = torch.tensor([[0.5, 0.25, 0.25]])
    assert torch.allclose(distill_kl(q.log(), p_log), -torch.log(torch.tensor([0.5])), atol=1e-6)


def test_tv_is_half_the_l1_distance_and_lies_in_0_1():
    p = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5], [0.0, 0.0, 1.0]])
    got = distill_tv(q.log(), p.log())
    assert torch.allclose(got, torch.tensor([0.25, 1.0]), atol=1e-6)
    z = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 4
    t = F.log_softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(1)) * 4, -1)
    tv = distill_tv(z, t)
    assert (tv >= 0).all() and (tv <= 1).all()
    assert torch.allclose(distill_tv(z, F.log_softmax(z, -1)), torch.zeros(64), atol=1e-6)


def test_topk_ce_with_k_equal_to_the_vocabulary_is_the_full_soft_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(8, 20, generator=g), F.log_softmax(torch.randn(8, 20, generator=g), -1)
    full = -(t.exp() * F.log_softmax(z, -1)).sum(-1)  # CE(p, q) = KL(p ‖ q) + H(p)
    assert torch.allclose(distill_topk_ce(z, t, 20), full, atol=1e-6)
    assert torch.allclose(distill_topk_ce(z, t, 10_000), full, atol=1e-6)  # k > V means V
    entropy = -(t.exp() * t).sum(-1)
    assert torch.allclose(full - entropy, distill_kl(z, t), atol=1e-5)


def test_topk_ce_renormalises_the_teachers_top_k():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.2, 0.3, 0.5]])
    want = -(0.5 / 0.8 * torch.log(torch.tensor(0.2)) + 0.3 / 0.8 * torch.log(torch.tensor(0.3)))
    assert torch.allclose(distill_topk_ce(q.log(), p.log(), 2), want.view(1), atol=1e-6)


def test_losses_never_send_gradient_into_the_teacher_and_dispatch_by_kind():
    z = torch.randn(4, 7, requires_grad=True)
    t = torch.randn(4, 7, requires_grad=True)
    for kind in ("kl", "topk_ce", "tv"):
        loss = distill_token_loss(kind, z, F.log_softmax(t, -1), top_k=3).sum()
        gz, gt = torch.autograd.grad(loss, [z, t], allow_unused=True)
        assert gz is not None and gz.abs().sum() > 0 and gt is None
    with pytest.raises(ValueError, match="unknown distill kind"):
        distill_token_loss("js", z, t)
    assert top1_agreement(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 2.0]])).all()


# ---- gradient routing on a tiny model -------------------------------------------------------------
def _tiny(tied=True):
    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32, tie_word_embeddings=tied)
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (4, 12))
    resp = torch.zeros(4, 12, dtype=torch.bool)
    resp[:, 5:] = True
    return model, ids, resp


def _distill_only(model, ids, resp, kind, backbone_grad, temperature=1.0):
    out = model.token_logprobs(ids, torch.ones_like(ids), num_mtp=2, mtp_backbone_grad=backbone_grad,
                               needed=resp, temperature=temperature, distill_heads=2)
    return sum(distill_token_loss(kind, r.student_logits, r.teacher_logp, 4).mean() for r in out.distill), out


@pytest.mark.parametrize("backbone_grad", [False, True])  # the detach and the occ forward
@pytest.mark.parametrize("tied", [True, False])
def test_the_term_alone_moves_only_the_mtp_modules(backbone_grad, tied):
    """With only the distillation term, every backbone parameter — decoder layers, final norm,
    embedding and the (shared) LM head — gets exactly zero gradient, whichever way the regime's
    forward routes the MTP log-probs; the MTP modules get some."""
    model, ids, resp = _tiny(tied)
    loss, _ = _distill_only(model, ids, resp, "kl", backbone_grad)
    loss.backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is None or not p.grad.any(), name
    assert all(p.grad is not None for p in model.mtp.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.mtp.parameters()) > 0


def test_rows_are_head_k_at_the_target_it_drafts_and_the_tempered_main_head():
    """Head k's rows are the response targets t ≥ k+1; the teacher is the main head predicting x_t
    from x_{<t}, tempered as the learner tempers log-probs (its gather is the main head's log-prob)."""
    model, ids, resp = _tiny()
    with torch.no_grad():
        _, out = _distill_only(model, ids, resp, "kl", False, temperature=0.7)
        ref = model.token_logprobs(ids, torch.ones_like(ids), num_mtp=2, needed=resp, temperature=0.7)
    for k, r in enumerate(out.distill, start=1):
        rows, cols = r.index
        assert torch.equal((out.valid[k] & resp).nonzero(as_tuple=True)[0], rows)
        main = r.teacher_logp.gather(-1, ids[rows, cols].unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(main, ref.logprobs[0][rows, cols], atol=1e-5)
        head = F.log_softmax(r.student_logits, -1).gather(-1, ids[rows, cols].unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(head, ref.logprobs[k][rows, cols], atol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "topk_ce", "tv"])
def test_the_heads_kl_to_the_main_head_falls_while_the_backbone_stays_put(kind):
    model, ids, resp = _tiny()
    before = copy.deepcopy(model.backbone.state_dict())
    opt = torch.optim.Adam(model.mtp.parameters(), lr=1e-2)

    def kl() -> float:
        with torch.no_grad():
            return float(_distill_only(model, ids, resp, "kl", False)[0])

    start = kl()
    for _ in range(6):
        opt.zero_grad()
        _distill_only(model, ids, resp, kind, False)[0].backward()
        opt.step()
    assert kl() < 0.7 * start
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- the learner step ----------------------------------------------------------------------------
def _batch(seed=0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    b, t = 8, 14
    ids = torch.randint(3, 64, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[::3, 11:] = 0  # ragged rows
    resp = torch.zeros(b, t, dtype=torch.bool)
    resp[:, 5:] = True
    resp &= attn.bool()
    return TrainBatch(ids, attn, resp, torch.rand(b, generator=g), torch.arange(b) // 4)


def _cfg(regime, coef, **over):
    return AlgorithmConfig(algorithm="grpo", mtp_regime=regime, lr=1e-3, mini_batches=2, grad_clip=None,
                           weight_decay=0.0, mtp={"distill": {"kind": "kl", "coef": coef}}, **over)


def test_learner_step_with_distill_under_none_trains_only_the_heads_and_logs_per_head():
    """Regime `none` with advantages 0 (every reward equal): the distillation term is the only
    gradient the heads get, and the backbone (weight decay 0) does not move at all."""
    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
    b = _batch()
    b.rewards = torch.ones(8)
    before = copy.deepcopy(model.backbone.state_dict())
    learner = Learner(model, _cfg("none", 1.0))
    first = learner.step(b)
    for _ in range(2):
        last = learner.step(b)
    for k in (1, 2):
        assert last[f"mtp/distill_loss/head{k}"] < first[f"mtp/distill_loss/head{k}"]
        assert 0.0 <= last[f"mtp/distill_top1/head{k}"] <= 1.0
        assert 0.0 <= last[f"mtp/distill_accept/head{k}"] <= 1.0
        assert f"loss/mtp_distill/head{k}" in last
    assert last["mtp/distill_accept/head1"] > first["mtp/distill_accept/head1"]
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("regime", ["occ", "detach"])
def test_head_steps_train_only_the_heads_after_the_update(regime):
    """mtp.distill.head_steps: after the update, AdamW steps of the term alone on each micro-batch
    (this batch is one). The backbone (and the shared LM head) end exactly where the update without
    them left it; the heads move on and their distillation loss on the batch falls over those steps."""
    def run(head_steps):
        model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
        mtp = {"distill": {"kind": "kl", "coef": 1.0, "head_steps": head_steps}, "lr": 1e-2}
        learner = Learner(model, AlgorithmConfig(algorithm="grpo", mtp_regime=regime, lr=1e-3, mini_batches=2,
                                                 weight_decay=0.01, mtp=mtp))
        metrics = learner.step(_batch())
        return {n: p.detach().clone() for n, p in model.named_parameters()}, metrics

    plain, m0 = run(0)
    more, m4 = run(4)
    assert "optim/head_steps" not in m0 and m4["optim/head_steps"] == 4.0
    assert m4["loss/mtp_head_steps_last"] < m4["loss/mtp_head_steps_first"]
    for name in plain:
        if name.startswith("backbone."):
            assert torch.equal(plain[name], more[name]), name  # bit for bit
    assert all(not torch.equal(plain[n], more[n]) for n in plain if n.startswith("mtp.") and "norm" not in n)
    assert m4["optim/steps"] == m0["optim/steps"] and m4["loss/total"] == m0["loss/total"]  # the update itself


def test_distill_heads_gives_the_rows_token_logprobs_gives():
    """The head-only path (distill_backbone + distill_heads) computes the same DistillRows as the
    update's forward, and its gradient reaches the MTP modules only."""
    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
    b = _batch()
    resp = b.response_mask.bool()
    ref = model.token_logprobs(b.input_ids, b.attention_mask, num_mtp=2, mtp_backbone_grad=False,
                               needed=resp, temperature=0.7, distill_heads=2)
    h, emb, main = model.distill_backbone(b.input_ids)
    rows, valid = model.distill_heads(h, emb, main, b.input_ids, b.attention_mask, resp, 2, temperature=0.7)
    assert torch.equal(valid, ref.valid[1:3])
    for r, q in zip(rows, ref.distill):
        assert torch.equal(r.index[0], q.index[0]) and torch.equal(r.index[1], q.index[1])
        assert torch.allclose(r.student_logits, q.student_logits, atol=1e-6)
        assert torch.allclose(r.teacher_logp, q.teacher_logp, atol=1e-6)
    sum(distill_kl(r.student_logits, r.teacher_logp).sum() for r in rows).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("mtp.") for n in grads), grads


def test_replay_runs_the_head_steps_on_the_last_batches_too_and_touches_only_the_heads():
    """mtp.distill.replay: the head steps also run on the last `replay` update batches (oldest
    first; here each batch is one micro-batch), which the learner keeps as host token rows. The
    backbone still ends where the update left it, and replaying moves the heads elsewhere than
    the current batch alone does."""
    def run(replay):
        model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
        mtp = {"distill": {"kind": "kl", "coef": 1.0, "head_steps": 2, "replay": replay}, "lr": 1e-2}
        learner = Learner(model, AlgorithmConfig(algorithm="grpo", mtp_regime="detach", lr=1e-3, mini_batches=2,
                                                 weight_decay=0.01, mtp=mtp))
        metrics = [learner.step(_batch(seed)) for seed in range(4)]
        return learner, {n: p.detach().clone() for n, p in model.named_parameters()}, metrics

    plain, w0, m0 = run(0)
    kept, w2, m2 = run(2)
    assert [m["mtp/distill_replayed_batches"] for m in m2] == [0, 1, 2, 2]
    assert [m["optim/head_steps"] for m in m2] == [2, 4, 6, 6]
    assert [m["optim/head_steps"] for m in m0] == [2, 2, 2, 2] and len(plain.distill_replay) == 0
    assert [torch.equal(b.input_ids, _batch(seed).input_ids) for b, seed in zip(kept.distill_replay, (2, 3))] \
        == [True, True]  # the last two, oldest first, on the host
    assert all(b.input_ids.device.type == "cpu" for b in kept.distill_replay)
    # the first update is the same in both; from then on the heads differ and the backbone follows
    # its own update (the heads feed only their own loss under detach)
    assert m0[0]["loss/total"] == m2[0]["loss/total"]
    assert any(not torch.equal(w0[n], w2[n]) for n in w0 if n.startswith("mtp."))


def test_replay_needs_head_steps_and_is_bounded():
    from pydantic import ValidationError

    from learner.config import MAX_DISTILL_REPLAY

    assert MTPDistillConfig(coef=1.0, head_steps=1, replay=MAX_DISTILL_REPLAY).replay == MAX_DISTILL_REPLAY
    with pytest.raises(ValidationError, match="replay"):
        MTPDistillConfig(coef=1.0, replay=2)
    with pytest.raises(ValidationError, match="replay"):
        MTPDistillConfig(coef=1.0, head_steps=1, replay=MAX_DISTILL_REPLAY + 1)


def test_a_resumed_learner_replays_what_an_uninterrupted_one_would(tmp_path, tiny_ckpt):
    """The replayed batches are part of the learner's checkpoint (trainer.pt): restored into a new
    worker, the next step trains bit for bit as the uninterrupted worker's does; a worker restored
    without them (the older layout) would not."""
    from services.learner_worker import TRAINER_STATE, LearnerWorker

    alg = {"algorithm": "grpo", "mtp_regime": "detach", "lr": 1e-3, "mini_batches": 2,
           "mtp": {"distill": {"kind": "kl", "coef": 1.0, "head_steps": 1, "replay": 2}, "lr": 1e-2}}
    batch = _batch  # token ids below 64: inside the tiny checkpoint's vocabulary

    def weights(w):
        return {n: p.detach().clone() for n, p in w.model.named_parameters()}

    a = LearnerWorker(str(tiny_ckpt), alg)
    for seed in range(3):
        a.step(batch(seed))
    a.save(str(tmp_path / "ck"))
    b = LearnerWorker(str(tiny_ckpt), alg)
    b.restore(str(tmp_path / "ck"))
    assert [torch.equal(x.input_ids, y.input_ids) for x, y in zip(a.learner.distill_replay, b.learner.distill_replay)] \
        == [True, True]
    a.step(batch(3))
    b.step(batch(3))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)

    state = torch.load(tmp_path / "ck" / TRAINER_STATE, weights_only=False)
    del state["distill_replay"]  # what a checkpoint without the replayed batches restores to
    torch.save(state, tmp_path / "ck" / TRAINER_STATE)
    c = LearnerWorker(str(tiny_ckpt), alg)
    c.restore(str(tmp_path / "ck"))
    assert len(c.learner.distill_replay) == 0
    c.step(batch(3))
    wc = weights(c)
    assert any(not torch.equal(wa[n], wc[n]) for n in wa if n.startswith("mtp."))


def test_head_steps_need_the_term_and_are_bounded():
    from pydantic import ValidationError

    from learner.config import MAX_DISTILL_HEAD_STEPS

    assert MTPDistillConfig(coef=1.0, head_steps=MAX_DISTILL_HEAD_STEPS).head_steps == MAX_DISTILL_HEAD_STEPS
    with pytest.raises(ValidationError, match="head_steps"):
        MTPDistillConfig(coef=0.0, head_steps=2)
    with pytest.raises(ValidationError, match="head_steps"):
        MTPDistillConfig(coef=1.0, head_steps=MAX_DISTILL_HEAD_STEPS + 1)


def _micro_grads(regime, coef):
    """Gradients of one micro-batch's loss away from θ_old (π_old shifted, so OCC's λ ≠ 0)."""
    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
    learner = Learner(model, _cfg(regime, coef))
    kept, adv, _ = learner.prepare(_batch())
    from learner.aggregation import Normaliser
    from learner.step import _Stats

    old, _ = learner._old_logprobs(kept)
    g = torch.Generator().manual_seed(5)
    old = old + 0.05 * torch.randn(old.shape, generator=g)  # θ ≠ θ_old, as on a later mini-batch
    st, parts = _Stats(), {}
    loss = learner._micro_loss(kept, adv, old, Normaliser.of(kept.response_mask.bool()), st, parts)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return grads, st.result(), parts


def test_occ_plus_distill_gives_the_backbone_exactly_the_occ_gradient():
    occ, st_occ, _ = _micro_grads("occ", 0.0)
    both, st_both, parts = _micro_grads("occ", 1.0)
    assert abs(st_occ["mtp/lambda/head1"]) > 0 and st_occ["mtp/lambda/head1"] == st_both["mtp/lambda/head1"]
    assert parts["loss/mtp_distill"] > 0
    for name in occ:
        if name.startswith("backbone."):
            assert torch.equal(occ[name], both[name]), name  # bit for bit
    mtp_diff = sum(float((both[n] - occ[n]).abs().sum()) for n in occ if n.startswith("mtp."))
    assert mtp_diff > 0  # the term does train the heads


def test_detach_plus_distill_leaves_the_backbone_gradient_of_detach():
    det, _, _ = _micro_grads("detach", 0.0)
    both, _, _ = _micro_grads("detach", 1.0)
    for name in det:
        if name.startswith("backbone."):
            assert torch.equal(det[name], both[name]), name


# ---- the MTP modules' own learning rate (algorithm.mtp.lr) -----------------------------------------
def _after_one_update(lr, mtp_lr=None):
    """Parameters after one optimiser step of `detach` + distillation (one mini-batch, weight decay on)."""
    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
    mtp = {"distill": {"kind": "kl", "coef": 1.0}} | ({} if mtp_lr is None else {"lr": mtp_lr})
    learner = Learner(model, AlgorithmConfig(algorithm="grpo", mtp_regime="detach", lr=lr, mini_batches=1,
                                             grad_clip=None, weight_decay=0.01, mtp=mtp))
    metrics = learner.step(_batch())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, metrics, learner


def test_mtp_lr_is_the_heads_rate_and_leaves_the_backbones_update_alone():
    """One update with lr = 1e-3 and mtp.lr = 1e-1: the backbone (LM head and embedding included)
    moves exactly as with lr = 1e-3 alone, the MTP modules exactly as with lr = 1e-1 for everything
    (the first update's gradients do not depend on the rates; AdamW's step and decoupled decay
    scale with the group's rate)."""
    start = {n: p.detach().clone() for n, p in make_tiny_model(num_mtp=2, seed=0, vocab_size=64,
                                                               hidden_size=32).named_parameters()}
    both, m_both, learner = _after_one_update(1e-3, 1e-1)
    slow, m_slow, _ = _after_one_update(1e-3)
    fast, _, _ = _after_one_update(1e-1)
    assert [len(g["params"]) for g in learner.opt.param_groups] == [
        sum(1 for n in start if not n.startswith("mtp.")), sum(1 for n in start if n.startswith("mtp."))]
    for n in start:
        ref = fast[n] if n.startswith("mtp.") else slow[n]
        torch.testing.assert_close(both[n], ref, rtol=1e-6, atol=1e-8, msg=n)
    moved = {k: sum(float((d[n] - start[n]).abs().sum()) for n in start if n.startswith("mtp."))
             for k, d in (("both", both), ("slow", slow))}
    assert moved["both"] > 20 * moved["slow"]
    assert m_both["optim/lr"] == 1e-3 and m_both["optim/lr_mtp"] == 1e-1 and "optim/lr_mtp" not in m_slow


def test_mtp_lr_is_bounded_and_needs_mtp_modules():
    assert AlgorithmConfig().mtp.lr is None
    for bad in (0.0, -1e-3, "fast"):
        with pytest.raises(ValueError):
            AlgorithmConfig(mtp={"lr": bad})
    with pytest.raises(ValueError, match="mtp.lr=0.001 is the MTP modules' learning rate but the model has none"):
        AlgorithmConfig(mtp_regime="none", mtp={"lr": 1e-3}).check_against_model(0)


# ---- config ---------------------------------------------------------------------------------------
def test_config_defaults_off_and_fills_top_k_for_topk_ce_only():
    cfg = AlgorithmConfig()
    assert not cfg.mtp.distill.enabled and cfg.distill_heads(2) == 0
    assert MTPDistillConfig(kind="topk_ce").top_k == DEFAULT_DISTILL_TOP_K
    with pytest.raises(ValueError, match="only read by kind='topk_ce'"):
        MTPDistillConfig(kind="kl", top_k=4)
    for bad in ({"coef": -0.1}, {"kind": "js"}, {"kind": "topk_ce", "top_k": 0},
                {"kind": "topk_ce", "top_k": MAX_DISTILL_TOP_K + 1}, {"coef": float("inf")}, {"extra": 1}):
        with pytest.raises(ValueError):
            MTPDistillConfig(**bad)
    on = AlgorithmConfig(mtp_regime="none", mtp={"distill": {"coef": 0.5}})
    assert on.distill_heads(2) == 2 and on.heads_needed(2) == 2
    assert AlgorithmConfig(mtp_heads=1, mtp={"distill": {"coef": 0.5}}).distill_heads(2) == 1
    with pytest.raises(ValueError, match="distils MTP heads but the model has none"):
        AlgorithmConfig(mtp_regime="none", mtp={"distill": {"coef": 0.5}}).check_against_model(0)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from api_client import api_test_client

    with api_test_client(tmp_path_factory.mktemp("api"), mtp_layers=0) as c:
        yield c


def test_an_mtp_lr_for_a_model_without_mtp_modules_is_422(client):
    spec = {"model": {"path": client.model_dir}, "data": {"dataset": "human_eval"},
            "rollout": {"max_model_len": 512, "max_tokens": 64, "num_speculative_tokens": 0},
            "algorithm": {"mtp_regime": "none", "mtp": {"lr": 1e-3}}}
    r = client.post("/v1/runs", headers={"Authorization": "Bearer t"}, json=spec)
    assert r.status_code == 422, r.text
    assert ["body", "algorithm", "mtp", "lr"] in [e["loc"] for e in r.json()["detail"]], r.text


@pytest.mark.parametrize(("distill", "loc"), [
    ({"coef": -1}, ["body", "algorithm", "mtp", "distill", "coef"]),
    ({"kind": "js"}, ["body", "algorithm", "mtp", "distill", "kind"]),
    ({"kind": "topk_ce", "top_k": MAX_DISTILL_TOP_K + 1}, ["body", "algorithm", "mtp", "distill", "top_k"]),
    ({"kind": "tv", "top_k": 3}, ["body", "algorithm", "mtp", "distill"]),
    ({"head_steps": 2}, ["body", "algorithm", "mtp", "distill"]),  # the term is off
    ({"coef": 1.0, "head_steps": -1}, ["body", "algorithm", "mtp", "distill", "head_steps"]),
    ({"coef": 1.0, "replay": 2}, ["body", "algorithm", "mtp", "distill"]),  # no head steps to replay in
    ({"coef": 0.5}, ["body", "algorithm", "mtp", "distill", "coef"]),  # this model has no MTP module
])
def test_bad_distill_values_are_422_naming_the_field(client, distill, loc):
    spec = {"model": {"path": client.model_dir}, "data": {"dataset": "human_eval"},
            "rollout": {"max_model_len": 512, "max_tokens": 64, "num_speculative_tokens": 0},
            "algorithm": {"mtp_regime": "none", "mtp": {"distill": distill}}}
    r = client.post("/v1/runs", headers={"Authorization": "Bearer t"}, json=spec)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]], r.text


# ---- compare rows ---------------------------------------------------------------------------------
def test_compare_has_distill_rows_that_change_only_regime_and_distill(tmp_path):
    from learner.tiny import write_tiny_checkpoint
    from services.compare import DISTILL_ROWS, ROWS, regime_specs
    from services.spec import RunSpec

    assert {"occ+distill", "detach+distill"} <= set(ROWS) and set(DISTILL_ROWS) <= set(ROWS)
    ckpt = write_tiny_checkpoint(tmp_path / "m", num_mtp=1)
    base = RunSpec.model_validate({"name": "cmp", "model": {"path": str(ckpt)}, "data": {"dataset": "human_eval"},
                                   "rollout": {"max_model_len": 256, "max_tokens": 16},
                                   "algorithm": {"mini_batches": 2, "mtp_regime": "occ"}})
    specs = regime_specs(base, ["occ", "occ+distill", "detach+distill"])
    assert specs["occ"].algorithm.mtp.distill.coef == 0
    for row, regime in (("occ+distill", "occ"), ("detach+distill", "detach")):
        s = specs[row]
        assert s.algorithm.mtp_regime == regime and s.algorithm.mtp.distill.enabled
        assert s.name == f"cmp-{row}"
    # a base that sets its own distillation keeps it in the distill rows, and it is off elsewhere
    mine = base.model_copy(update={"algorithm": base.algorithm.model_copy(
        update={"mtp": base.algorithm.mtp.model_validate(
            {"distill": {"kind": "tv", "coef": 0.3, "head_steps": 2, "replay": 3}})})})
    specs = regime_specs(mine, ["detach", "detach+distill"])
    on, off = specs["detach+distill"].algorithm.mtp.distill, specs["detach"].algorithm.mtp.distill
    assert (on.kind, on.coef, on.head_steps, on.replay) == ("tv", 0.3, 2, 3)
    assert (off.coef, off.head_steps, off.replay) == (0, 0, 0)


def test_the_cli_default_runs_every_row():
    import inspect

    from services.cli_compare import compare
    from services.compare import ROWS

    default = inspect.signature(compare).parameters["regimes"].default
    assert tuple(default.split(",")) == ROWS


# ---- warm-up recipe -------------------------------------------------------------------------------
def _head_main_kl(model, seqs) -> float:
    from learner.warmup import mtp_head_distill_loss

    ids = torch.tensor(seqs)
    with torch.no_grad():
        h = model.backbone_hidden(ids)
        return float(mtp_head_distill_loss(model, h, ids, torch.ones_like(ids, dtype=torch.bool), "kl"))


@pytest.mark.parametrize("kind", ["kl", "tv"])
def test_warmup_with_head_distillation_aligns_the_head_and_freezes_the_backbone(kind):
    from learner.warmup import WarmupConfig, warmup_mtp

    model = make_tiny_model(num_mtp=1, seed=0, vocab_size=64, hidden_size=32)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(3, 64, (24, 12), generator=g).tolist()
    before = copy.deepcopy(model.backbone.state_dict())
    kl0 = _head_main_kl(model, seqs)
    res = warmup_mtp(model, seqs, WarmupConfig(loss=kind, epochs=6, batch_size=8, lr=3e-3), progress=False)
    assert res.steps > 0 and _head_main_kl(model, seqs) < 0.7 * kl0
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_warmup_cli_refuses_bad_distill_options_and_keeps_the_default_recipe(tmp_path):
    from typer.testing import CliRunner

    from learner.warmup import WarmupConfig
    from services.cli import _mount, app
    from services.self_distill import SelfDistillConfig

    if not app.registered_groups:  # the CLI mounts its subcommands lazily (once per process)
        _mount()
    runner = CliRunner()
    assert runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "t"), "--mtp-layers", "1"]).exit_code == 0
    base = ["model", "warmup", "--model", str(tmp_path / "t"), "--out", str(tmp_path / "w")]
    res = runner.invoke(app, base + ["--distill", "js"])
    assert res.exit_code == 2 and "--distill must be one of kl, topk_ce, tv" in res.output
    res = runner.invoke(app, base + ["--distill", "kl", "--top-k", "4"])
    assert res.exit_code == 2 and "--top-k" in res.output
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="only read by loss='topk_ce'"):
        WarmupConfig(loss="kl", top_k=3)
    cfg = SelfDistillConfig()  # the demo's recipe: feature regression on T = 0.7 answers
    assert cfg.warmup.loss == "distill" and cfg.warmup.top_k is None and cfg.temperature == 0.7
