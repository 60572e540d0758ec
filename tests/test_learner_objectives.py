"""Surrogates, aggregation and advantages as specifications (hand computations on small tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.advantages import constant_groups, grpo_advantages, kl_k3, overlong_penalty
from learner.aggregation import Normaliser, aggregate
from learner.config import AlgorithmConfig
from learner.objectives import (
    SURROGATES,
    clipped_surrogate,
    decoupled_weights,
    get_surrogate,
    policy_loss,
    prefix_min_ratio,
)


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- PPO clip
def test_ppo_clip_hand_computation_and_clip_fraction():
    # ratios 0.5, 1.0, 1.1, 1.5 with A = +1, -1, +1, +1 and ε = 0.2
    ratio = _t([0.5, 1.0, 1.1, 1.5])
    adv = _t([1.0, -1.0, 1.0, 1.0])
    tl = clipped_surrogate(ratio.log(), adv, 0.2, 0.2)
    # A>0, ρ=0.5: −min(0.5, 0.8) = −0.5 (unclipped); A<0, ρ=1: 1; ρ=1.1: −1.1; ρ=1.5: −min(1.5,1.2)=−1.2
    assert torch.allclose(tl.loss, _t([-0.5, 1.0, -1.1, -1.2]))
    assert tl.clipped.tolist() == [[False, False, False, True]]
    mask = torch.ones_like(adv, dtype=torch.bool)
    assert tl.clipped[mask].float().mean().item() == pytest.approx(0.25)


def test_ppo_clip_gradient_is_zero_on_clipped_tokens():
    lr = torch.log(_t([1.5, 0.9])).requires_grad_()
    clipped_surrogate(lr, _t([1.0, 1.0]), 0.2, 0.2).loss.sum().backward()
    assert lr.grad[0, 0] == 0 and lr.grad[0, 1] == pytest.approx(-0.9)


def test_dapo_asymmetric_clip_uses_clip_higher():
    cfg = AlgorithmConfig(algorithm="dapo", mtp_regime="none")
    ratio = _t([1.25, 1.35, 0.75])
    adv = _t([1.0, 1.0, -1.0])
    tl = get_surrogate("dapo")(ratio.log(), adv, torch.ones(1, 3, dtype=torch.bool), cfg)
    assert torch.allclose(tl.loss, _t([-1.25, -1.28, 0.8]))
    assert tl.clipped.tolist() == [[False, True, True]]


def test_dual_clip_caps_negative_advantage_loss():
    tl = clipped_surrogate(torch.log(_t([10.0])), _t([-1.0]), 0.2, 0.2, dual_clip=3.0)
    assert tl.loss.item() == pytest.approx(3.0) and tl.clipped.item()


def test_registry_has_every_algorithm_and_rejects_unknown():
    assert {"ppo", "grpo", "dapo", "gspo", "ctpo", "minpro"} <= set(SURROGATES)
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_surrogate("trpo")


# ---------------------------------------------------------------------------- GSPO / CTPO / MinPRO
def test_gspo_on_single_token_responses_equals_token_ppo():
    torch.manual_seed(0)
    lr = (0.3 * torch.randn(4, 1)).requires_grad_()
    adv = torch.randn(4, 1)
    mask = torch.ones(4, 1, dtype=torch.bool)
    cfg = AlgorithmConfig(algorithm="gspo", mtp_regime="none")
    g, _ = policy_loss(lr, adv, mask, cfg)
    (gg,) = torch.autograd.grad(g, lr)
    p = aggregate(clipped_surrogate(lr, adv, cfg.clip_low, cfg.clip_high).loss, mask,
                  "seq-mean-token-mean")
    (gp,) = torch.autograd.grad(p, lr)
    assert torch.equal(g, p) and torch.equal(gg, gp)


def test_gspo_ratio_is_the_length_normalised_sequence_ratio():
    lr = _t([0.1, 0.3, 9.0])  # third token is padding
    mask = torch.tensor([[True, True, False]])
    cfg = AlgorithmConfig(algorithm="gspo", mtp_regime="none")
    tl = get_surrogate("gspo")(lr, torch.ones(1, 3), mask, cfg)
    assert torch.allclose(tl.ratio[0, :2], torch.full((2,), math.exp(0.2)))


def test_ctpo_at_first_token_equals_its_log_space_clip():
    cfg = AlgorithmConfig(algorithm="ctpo", mtp_regime="none")
    c = cfg.ctpo
    lr = _t([0.3, -0.2, 0.01, -0.3])
    adv = _t([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(1, 4, dtype=torch.bool)
    for j in range(4):  # position t=1 of four one-token responses
        one = get_surrogate("ctpo")(lr[:, j : j + 1], adv[:, j : j + 1], mask[:, :1], cfg)
        ref = clipped_surrogate(lr[:, j : j + 1], adv[:, j : j + 1], 1 - math.exp(-c.log_clip_low),
                                math.exp(c.log_clip_high) - 1, dual_clip=math.exp(c.log_clip_c))
        assert torch.allclose(one.loss, ref.loss), j


def test_ctpo_uses_cumulative_prefix_ratio_and_widening_bounds():
    cfg = AlgorithmConfig(algorithm="ctpo", mtp_regime="none")
    lr = _t([0.02, 0.02, 0.02, 0.02])
    tl = get_surrogate("ctpo")(lr, torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), cfg)
    assert torch.allclose(tl.ratio, torch.exp(_t([0.02, 0.04, 0.06, 0.08])))
    # bound b·t^0.5 = 0.05, 0.0707, 0.0866, 0.1: only position 1 of 4 is inside; t=1 inside too
    assert tl.clipped.tolist() == [[False, False, False, False]]
    tl2 = get_surrogate("ctpo")(_t([0.06, 0.06]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), cfg)
    assert tl2.clipped.tolist() == [[True, True]]  # 0.06 > 0.05; 0.12 > 0.0707


def test_minpro_weight_is_prefix_minimum_of_preceding_ratios():
    lr = torch.log(_t([1.2, 0.5, 0.9, 0.7]))
    w = prefix_min_ratio(lr, torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(w, _t([1.0, 1.2, 0.5, 0.5]))
    cfg = AlgorithmConfig(algorithm="minpro", mtp_regime="none")
    tl = get_surrogate("minpro")(lr, torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), cfg)
    base = clipped_surrogate(lr, torch.ones(1, 4), 0.2, 0.2)
    assert torch.allclose(tl.loss, w * base.loss)


# ---------------------------------------------------------------------------- decoupled PPO
def test_decoupled_with_proximal_equal_behaviour_is_ppo():
    torch.manual_seed(1)
    logp = torch.randn(3, 5).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(3, 5)
    adv = torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    cfg = AlgorithmConfig(algorithm="grpo", mtp_regime="none")
    w, keep = decoupled_weights(old, old.clone(), mask, cfg.decoupled.behav_weight_cap)
    d, _ = policy_loss(logp - old, adv, mask, cfg, w, keep)
    p, _ = policy_loss(logp - old, adv, mask, cfg)
    assert torch.equal(d, p)
    assert torch.equal(torch.autograd.grad(d, logp)[0], torch.autograd.grad(p, logp)[0])


def test_decoupled_weight_scales_and_cap_masks_tokens():
    prox = torch.log(_t([0.5, 0.5, 0.5]))
    behav = torch.log(_t([0.25, 0.05, 0.5]))  # w = 2, 10, 1
    w, keep = decoupled_weights(prox, behav, torch.ones(1, 3, dtype=torch.bool), cap=5.0)
    assert torch.allclose(w, _t([2.0, 10.0, 1.0])) and keep.tolist() == [[True, False, True]]
    cfg = AlgorithmConfig(mtp_regime="none")
    loss, _ = policy_loss(torch.zeros(1, 3), _t([1.0, 1.0, 1.0]), torch.ones(1, 3, dtype=torch.bool),
                          cfg, w, keep)
    assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2)


# ---------------------------------------------------------------------------- aggregation
def test_aggregation_modes_by_hand():
    loss = _t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # veRL's agg_loss: sum over each sequence's tokens, mean over sequences...
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    # ...and its Dr. GRPO mode: the batch's token sum over a constant (here the longest response, 3).
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 + 4) / 3)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(loss, mask, "sum")


def test_sequence_modes_skip_all_masked_samples_by_hand():
    """An empty sample (all tokens masked) is no sequence: N' = 2, not 3 (veRL's seq_mask)."""
    loss = _t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx((3 + 4) / 5)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((3 / 2 + 4 / 3) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((3 + 4) / 3)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregation_with_batch_normaliser_is_independent_of_the_split(mode):
    torch.manual_seed(0)
    loss = torch.randn(6, 7)
    mask = torch.rand(6, 7) > 0.4
    mask[3] = False  # an all-masked sample contributes nothing
    full = aggregate(loss, mask, mode)
    norm = Normaliser.of(mask)
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode, norm) for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_masked_nan_does_not_leak_into_the_loss():
    loss = _t([1.0, float("nan")])
    assert aggregate(loss, torch.tensor([[True, False]]), "token-mean").item() == 1.0


# ---------------------------------------------------------------------------- advantages
def test_grpo_advantages_with_and_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 7.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    a = grpo_advantages(r, g, normalize_std=True, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(a[:4], (r[:4] - 0.5) / std)
    assert a[4:].tolist() == [0.0, 0.0, 0.0]  # constant group, singleton group
    assert torch.allclose(grpo_advantages(r, g, normalize_std=False)[:4], r[:4] - 0.5)


def test_dynamic_sampling_flags_constant_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    assert constant_groups(r, g).tolist() == [True, True, False, False, True, True]


def test_overlong_penalty_piecewise():
    pen = overlong_penalty(torch.tensor([10, 16, 18, 20, 21]), max_len=20, cache_len=4)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    lp = torch.log(_t([0.5, 0.2]))
    assert torch.allclose(kl_k3(lp, lp), torch.zeros(1, 2))
    ref = torch.log(_t([0.25, 0.4]))
    d = ref - lp
    assert torch.allclose(kl_k3(lp, ref), d.exp() - d - 1) and (kl_k3(lp, ref) > 0).all()
