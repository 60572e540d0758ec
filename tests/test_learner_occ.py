"""OCC's coefficient (Eq. 13 and the authors' estimator) and the MTP regimes' gradient routes,
checked with autograd on the real tiny policy model (`learner.tiny`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.config import AlgorithmConfig
from learner.occ import (
    mtp_backbone_grad,
    mtp_lm_head_grad,
    mtp_regime_loss,
    occ_lambda_authors,
    occ_lambda_paper,
    response_window,
)
from learner.tiny import make_tiny_model

torch.set_num_threads(1)


def test_lambda_matches_hand_computation():
    d_rl = torch.tensor([[0.1, -0.2, 0.3, 9.0]])  # last token masked out
    d_mtp = torch.tensor([[[0.2, 0.1, -0.1, 9.0]], [[-0.4, 0.0, 0.0, 1.0]]])  # (2, 1, 4)
    mask = torch.tensor([[[True, True, True, False]]]).expand(2, 1, 4)
    st = occ_lambda_paper(d_rl, d_mtp, mask, lambda_plus=1.0, eps=1e-8)
    c1 = (0.1 * 0.2 - 0.2 * 0.1 - 0.3 * 0.1) / 3
    v1 = (0.04 + 0.01 + 0.01) / 3
    c2, v2 = (0.1 * -0.4) / 3, 0.16 / 3
    assert st.c_hat.tolist() == pytest.approx([c1, c2], rel=1e-5)
    assert st.v2_hat.tolist() == pytest.approx([v1, v2], rel=1e-5)
    assert st.lam.tolist() == pytest.approx([c1 / (v1 + 1e-8), c2 / (v2 + 1e-8)], rel=1e-5)
    half = occ_lambda_paper(d_rl, d_mtp, mask, lambda_plus=0.5)
    assert half.lam.tolist() == pytest.approx((0.5 * st.lam).tolist())


def test_lambda_sign_follows_the_inner_product():
    torch.manual_seed(0)
    d_rl = torch.randn(2, 6)
    mask = torch.ones(3, 2, 6, dtype=torch.bool)
    d_mtp = torch.stack([d_rl * 0.5 + 0.01, -d_rl, torch.randn(2, 6)])
    st = occ_lambda_paper(d_rl, d_mtp, mask)
    assert st.lam[0] > 0 and st.lam[1] < 0
    assert torch.sign(st.lam[2]) == torch.sign((d_rl * d_mtp[2]).sum())
    assert st.lam[1].item() == pytest.approx(-1.0, rel=1e-5)  # δ_MTP = −δ_RL ⇒ λ = −λ₊


def test_lambda_is_zero_when_main_policy_has_not_moved():
    d_mtp = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    zero = torch.zeros(3, 5)
    assert occ_lambda_paper(zero, d_mtp, mask).lam.tolist() == [0.0, 0.0]
    win = torch.ones(3, 5, dtype=torch.bool)
    assert occ_lambda_authors(zero, d_mtp, mask, win).lam.tolist() == [0.0, 0.0]


def test_authors_estimator_matches_hand_computation_with_padding_in_the_denominator():
    d_rl = torch.tensor([[0.2, 0.1, 0.0]])
    d_mtp = torch.tensor([[[0.1, -0.3, 0.0]]])  # one head
    mask = torch.tensor([[[True, True, False]]])
    win = torch.tensor([[True, True, True]])  # padded window of width 3
    st = occ_lambda_authors(d_rl, d_mtp, mask, win, lambda_plus=0.1, eps=1e-8)
    q = 0.1 * 0.2 / (0.01 + 1e-8) + (-0.3 * 0.1) / (0.09 + 1e-8)
    assert st.lam.item() == pytest.approx(0.1 / 1 * q / 3, rel=1e-5)


def test_response_window_spans_each_rows_response_start_to_the_widest_response():
    resp = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert response_window(resp).int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]]


# ---------------------------------------------------------------------------- gradient routes
def _setup(tied=True):
    def make(tie):
        return make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32,
                               tie_word_embeddings=tie)

    model = make(tied)
    if not tied:  # the same values as the tied model, with a separate head and embedding
        model.load_state_dict(make(True).state_dict())
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (4, 12))
    attn = torch.ones_like(ids)
    resp = torch.zeros(4, 12, dtype=torch.bool)
    resp[:, 5:] = True
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1).expand(4, 12)
    with torch.no_grad():
        old = model.token_logprobs(ids, attn, num_mtp=0).logprobs[0] - 0.05
    return model, ids, attn, resp, adv, old


def _regime_grads(regime, tied):
    """|grad| of the regime's MTP loss alone, summed per group: trunk (decoder layers + final
    norm), embedding table, LM head weight, MTP modules."""
    model, ids, attn, resp, adv, old = _setup(tied)
    cfg = AlgorithmConfig(algorithm="grpo", mtp_regime=regime)
    out = model.token_logprobs(ids, attn, num_mtp=2, mtp_backbone_grad=mtp_backbone_grad(regime),
                               mtp_lm_head_grad=mtp_lm_head_grad(regime))
    mask = out.valid[1:] & resp
    lam = torch.tensor([0.3, -0.2])  # a nonzero OCC λ, as on a later mini-batch
    loss = mtp_regime_loss(cfg, out.logprobs[1:], mask, old, adv, lam).loss
    bb = model.backbone
    groups = {
        "layers": [p for n, p in bb.named_parameters() if n.startswith("model.layers.") or
                   n.startswith("model.norm.")],
        "embed": [bb.model.embed_tokens.weight],
        "lm_head": [bb.lm_head.weight],
        "mtp": list(model.mtp.parameters()),
    }
    out = {}
    for name, ps in groups.items():
        gs = torch.autograd.grad(loss, ps, allow_unused=True, retain_graph=True)
        out[name] = sum(float(g.abs().sum()) for g in gs if g is not None)
    return out


@pytest.mark.parametrize("regime", ["detach", "ce", "policy", "occ"])
def test_mtp_loss_reaches_the_backbone_trunk_only_outside_detach(regime):
    """Untied head: under `detach` the MTP loss puts zero gradient on the decoder layers and the
    embeddings, and trains the MTP modules and the shared LM head (the OCC authors' semantics:
    hidden states and embeddings detached, output layer not); under ce/policy/occ it reaches all."""
    g = _regime_grads(regime, tied=False)
    assert g["mtp"] > 0 and g["lm_head"] > 0
    if regime == "detach":
        assert g["layers"] == 0.0 and g["embed"] == 0.0
    else:
        assert g["layers"] > 0.0 and g["embed"] > 0.0


def test_detach_with_tied_embeddings_reaches_the_shared_matrix_only_as_lm_head():
    """Tied head (SmolLM2): under `detach` the decoder layers get nothing; the shared embedding/LM
    matrix gets the MTP loss's output-layer gradient, exactly what the untied model's head gets."""
    tied, untied = _regime_grads("detach", tied=True), _regime_grads("detach", tied=False)
    assert tied["layers"] == 0.0
    assert tied["embed"] == tied["lm_head"] == pytest.approx(untied["lm_head"], rel=1e-5)
    assert untied["embed"] == 0.0


def test_occ_with_zero_lambda_puts_no_gradient_anywhere():
    model, ids, attn, resp, adv, old = _setup()
    cfg = AlgorithmConfig(algorithm="grpo", mtp_regime="occ")
    out = model.token_logprobs(ids, attn, num_mtp=2)
    loss = mtp_regime_loss(cfg, out.logprobs[1:], out.valid[1:] & resp, old, adv,
                           torch.zeros(2)).loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_ce_regime_is_fixed_lambda_times_nll():
    model, ids, attn, resp, adv, old = _setup()
    cfg = AlgorithmConfig(algorithm="grpo", mtp_regime="ce")
    out = model.token_logprobs(ids, attn, num_mtp=2)
    mask = out.valid[1:] & resp
    ml = mtp_regime_loss(cfg, out.logprobs[1:], mask, old, adv, None)
    ml.loss = ml.loss.detach()
    nll = [-(out.logprobs[1 + k][mask[k]]).mean() for k in range(2)]
    # token-mean with the main head's token count as denominator; all response tokens valid here
    assert ml.loss.item() == pytest.approx(0.1 * float((nll[0] + nll[1]).detach()), rel=1e-5)


# ---------------------------------------------------------------------------- negative λ
# OCC keeps λ's sign (paper App. E). The authors' code applies λ to the MTP surrogate's advantages,
# inside the clip; a factor on the clipped loss instead lets a negative λ drive the MTP ratio
# without bound (a real tiny-model run: loss/mtp 0.16 → −26 000).


@settings(max_examples=60, deadline=None)
@given(lam=st.floats(-2.0, 2.0), scale=st.floats(0.0, 15.0), seed=st.integers(0, 2**16),
       algorithm=st.sampled_from(["grpo", "dapo", "gspo"]))
def test_occ_mtp_loss_is_bounded_below_whatever_the_ratio_and_the_sign_of_lambda(lam, scale, seed,
                                                                                algorithm):
    """Per token −min(ρ λA, clip(ρ) λA) ≥ −(1+ε_high)|λ||A| for every ρ, so no parameter setting
    makes the λ-weighted MTP loss unboundedly good (the old λ·loss reached −|λ|ρ|A|, ρ → ∞)."""
    g = torch.Generator().manual_seed(seed)
    cfg = AlgorithmConfig(algorithm=algorithm, mtp_regime="occ")
    mtp_logp = scale * torch.randn(2, 3, 6, generator=g)  # (H, B, T) any ratio, huge ones included
    old = torch.zeros(3, 6)
    adv = torch.randn(3, 1, generator=g).expand(3, 6)
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    lam_t = torch.tensor([lam, -abs(lam)])
    loss = mtp_regime_loss(cfg, mtp_logp, mask, old, adv, lam_t).loss
    bound = -(1 + cfg.clip_high) * float(lam_t.abs().sum()) * float(adv.abs().max())
    assert float(loss) >= bound - 1e-5


@pytest.mark.parametrize("estimator", ["paper", "authors_code"])
def test_repeated_steps_with_negative_lambda_stop_at_the_clip_boundary(estimator):
    """Forced ĉ < 0 (λ = −0.5) for 300 SGD steps on free MTP log-probs starting at ρ = 1: the
    λ-flipped push moves each ratio to the clip boundary and no further (the old λ·loss drove the
    negative-advantage ratios to e^20), so the MTP head's own surrogate stays bounded."""
    cfg = AlgorithmConfig(algorithm="grpo", mtp_regime="occ", occ={"estimator": estimator})
    old = torch.zeros(4, 8)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1).expand(4, 8)
    mask = torch.ones(1, 4, 8, dtype=torch.bool)
    logp = torch.zeros(1, 4, 8, requires_grad=True)
    opt = torch.optim.SGD([logp], lr=2.0)  # ≤ 0.04 per step in log ρ: a step past the bound
    for _ in range(300):
        opt.zero_grad()
        ml = mtp_regime_loss(cfg, logp, mask, old, adv, torch.tensor([-0.5]))
        ml.loss.backward()
        opt.step()
    ratio = logp.detach().exp()
    assert ratio.max() <= 1 + cfg.clip_high + 0.05 and ratio.min() >= 1 - cfg.clip_low - 0.05
    assert float(ml.per_head[0]) <= (1 + cfg.clip_high + 0.05) * float(adv.abs().max())


def test_lambda_scales_every_gradient_of_the_mtp_term_with_its_sign():
    """Inside the trust region (ρ⁽ᵏ⁾ = 1) the λ-weighted MTP term's gradient is exactly λ times the
    plain surrogate's, for either sign of λ, on the MTP module, the LM head and the backbone trunk:
    a negative ĉ still flips the MTP direction into the backbone, as OCC intends."""
    model, ids, attn, resp, adv, _ = _setup(tied=False)
    cfg = AlgorithmConfig(algorithm="grpo", mtp_regime="occ")
    params = [p for n, p in model.named_parameters() if p.requires_grad]

    def grads(lam):
        out = model.token_logprobs(ids, attn, num_mtp=1)
        mask = out.valid[1:] & resp
        old = out.logprobs[1].detach()  # ρ⁽¹⁾ = 1 on every token
        loss = mtp_regime_loss(cfg, out.logprobs[1:], mask, old, adv, torch.tensor([lam])).loss
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(gs, params)])

    g1 = grads(1.0)
    groups = {name: [n.startswith(prefix) for n, p in model.named_parameters() if p.requires_grad]
              for name, prefix in [("trunk", "backbone.model.layers."), ("mtp", "mtp."),
                                   ("lm_head", "backbone.lm_head.")]}
    sizes = torch.tensor([p.numel() for p in params])
    for name, sel in groups.items():  # every route carries a gradient to compare
        idx = torch.repeat_interleave(torch.tensor(sel), sizes)
        assert g1[idx].abs().sum() > 0, name
    for lam in (0.3, -0.3, -1.7):  # float32 rounding only: relative to the gradient's norm
        assert float((grads(lam) - lam * g1).norm()) <= 1e-5 * abs(lam) * float(g1.norm())


@pytest.mark.parametrize("estimator", ["paper", "authors_code"])
def test_lambda_from_summed_shares_equals_the_whole_micro_batch(estimator):
    """A learner group's ranks each hold some rows of a micro-batch and sum OCC's statistics over
    the ranks before λ is formed (``reduce``): the λ, ĉ and v̂² are the whole micro-batch's."""
    g = torch.Generator().manual_seed(0)
    d_rl = torch.randn(6, 9, generator=g) * 1e-2
    d_mtp = torch.randn(3, 6, 9, generator=g) * 1e-2
    resp = torch.zeros(6, 9, dtype=torch.bool)
    for row, (a, b) in enumerate([(2, 9), (3, 6), (2, 4), (5, 9), (1, 8), (4, 5)]):
        resp[row, a:b] = True
    mask = resp.unsqueeze(0).expand(3, 6, 9)

    def lam(rows, reduce=None, width=None):
        if estimator == "paper":
            return occ_lambda_paper(d_rl[rows], d_mtp[:, rows], mask[:, rows], 1.0, 1e-8, reduce)
        window = response_window(resp[rows], width)
        return occ_lambda_authors(d_rl[rows], d_mtp[:, rows], mask[:, rows], window, 1.0, 1e-8, reduce)

    whole = lam(torch.arange(6))
    shares = [torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])]
    partial: list[torch.Tensor] = []

    def collect(t):  # one pass per share records its sums; the second pass sees their total
        partial.append(t.clone())
        return t

    for rows in shares:
        lam(rows, collect, width=int(resp.sum(-1).max()))
    n = len(partial) // 2  # the authors' estimator also calls the paper one: two sums per share
    totals = [partial[i] + partial[i + n] for i in range(n)] if n else []
    it = iter(totals)
    got = lam(shares[0], lambda t: next(it), width=int(resp.sum(-1).max()))
    for a, b in ((got.lam, whole.lam), (got.c_hat, whole.c_hat), (got.v2_hat, whole.v2_hat)):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    # and a rank-local λ (no reduce) is not the micro-batch's
    assert not torch.allclose(lam(shares[0], width=int(resp.sum(-1).max())).lam, whole.lam, rtol=1e-3)
