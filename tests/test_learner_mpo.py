"""MPO block ratio (Eq. 8–11): weights, renormalisation, hand computations, K=1/s=0 ≡ PPO."""

from __future__ import annotations

import pytest
import torch

from learner.config import AlgorithmConfig, MPOConfig
from learner.mpo import block_log_ratio, block_view, mpo_weights, renormalised_weights, scale_grad
from learner.objectives import policy_loss

torch.set_num_threads(1)  # tiny tensors; avoid oversubscribing shared cores


def test_weights_follow_eq10_and_sum_to_one():
    w = mpo_weights(5, 0.2, 0.8)
    g = torch.tensor([1.0, 0.8, 0.64, 0.512])
    assert w[0].item() == pytest.approx(0.8)
    assert torch.allclose(w[1:], 0.2 * g / g.sum())
    assert w.sum().item() == pytest.approx(1.0)
    assert (w[2:] / w[1:-1]).allclose(torch.full((3,), 0.8))
    assert mpo_weights(1, 0.2, 0.8).tolist() == [1.0]
    assert mpo_weights(3, 0.0, 0.8).tolist() == [1.0, 0.0, 0.0]


def test_renormalised_weights_drop_heads_past_the_end_and_sum_to_one():
    w = mpo_weights(3, 0.3, 0.5)  # (0.7, 0.2, 0.1)
    ok = torch.tensor([[[1, 1, 1, 0]], [[1, 1, 0, 0]], [[1, 0, 0, 0]]], dtype=torch.bool)  # (3,1,4)
    rw = renormalised_weights(w, ok)
    assert torch.allclose(rw[:, 0, 0], w)
    assert torch.allclose(rw[:, 0, 1], torch.tensor([0.7, 0.2, 0.0]) / 0.9)
    assert torch.allclose(rw[:, 0, 2], torch.tensor([1.0, 0.0, 0.0]))
    assert rw[:, 0, 3].tolist() == [0.0, 0.0, 0.0]  # not a response token
    assert torch.allclose(rw.sum(0)[0, :3], torch.ones(3))


def test_block_view_shifts_head_k_left_by_k_and_masks_past_the_response():
    # target-aligned head values: head k's entry at t is 10*k + t
    t = torch.arange(6.0)
    vals = torch.stack([10 * k + t for k in range(3)]).unsqueeze(1)  # (3, 1, 6)
    valid = torch.ones(3, 1, 6, dtype=torch.bool)
    for k in range(3):
        valid[k, :, : k + 1] = False
    resp = torch.tensor([[False, False, True, True, True, False]])  # response = tokens 2..4
    v, ok = block_view(vals, valid, resp, 3)
    assert v[1, 0, 2].item() == 13 and v[2, 0, 2].item() == 24  # head k at position t → token t+k
    assert ok[0, 0].tolist() == [False, False, True, True, True, False]
    assert ok[1, 0].tolist() == [False, False, True, True, False, False]
    assert ok[2, 0].tolist() == [False, False, True, False, False, False]
    with pytest.raises(ValueError, match="needs 4 heads"):
        block_view(vals, valid, resp, 4)


def test_weighted_log_sum_matches_hand_computation():
    w = mpo_weights(3, 0.2, 0.5)  # w = (0.8, 0.2/1.5, 0.1/1.5)
    cur = torch.tensor([[[-1.0, -2.0]], [[-3.0, -1.0]], [[-2.0, -4.0]]])  # (3, 1, 2)
    old = torch.tensor([[[-1.5, -2.5]], [[-2.0, -1.0]], [[-2.5, -4.0]]])
    ok = torch.tensor([[[True, True]], [[True, True]], [[True, False]]])
    got = block_log_ratio(cur, old, ok, w, "logsum")
    t0 = 0.8 * 0.5 + (0.2 / 1.5) * (-1.0) + (0.1 / 1.5) * 0.5
    t1 = (0.8 * 0.5 + (0.2 / 1.5) * 0.0) / (0.8 + 0.2 / 1.5)
    assert got[0].tolist() == pytest.approx([t0, t1], rel=1e-6)
    prod = block_log_ratio(cur, old, ok, w, "product")  # Eq. 8: Σ ℓ over available heads
    assert prod[0].tolist() == pytest.approx([0.5 - 1.0 + 0.5, 0.5 + 0.0])


@pytest.mark.parametrize("k,share", [(1, 0.2), (5, 0.0)])
def test_mpo_k1_or_share0_equals_ppo_in_loss_and_gradients(k, share):
    torch.manual_seed(0)
    heads = (torch.randn(5, 3, 8) - 2).requires_grad_()  # target-aligned (H, B, T)
    old = heads.detach() + 0.2 * torch.randn(5, 3, 8)
    valid = torch.ones(5, 3, 8, dtype=torch.bool)
    for j in range(5):
        valid[j, :, : j + 1] = False
    resp = torch.zeros(3, 8, dtype=torch.bool)
    resp[:, 3:] = True
    resp[2, 6:] = False
    adv = torch.randn(3, 1).expand(3, 8)
    cfg = AlgorithmConfig(algorithm="grpo", mtp_regime="none", mpo=MPOConfig(k=max(k, 1),
                                                                              mtp_share=share))
    w = mpo_weights(k, share, 0.8)
    cur_b, ok = block_view(heads, valid, resp, k if k > 1 else 1)
    old_b, _ = block_view(old, valid, resp, k if k > 1 else 1)
    kk = w.numel()
    mpo_loss, _ = policy_loss(block_log_ratio(cur_b[:kk], old_b[:kk], ok[:kk], w), adv, resp, cfg)
    (g_mpo,) = torch.autograd.grad(mpo_loss, heads)
    ppo_loss, _ = policy_loss(heads[0] - old[0], adv, resp, cfg)
    (g_ppo,) = torch.autograd.grad(ppo_loss, heads)
    assert torch.equal(mpo_loss, ppo_loss)
    assert torch.equal(g_mpo, g_ppo)
    assert g_mpo[1:].abs().sum() == 0  # no gradient reaches the MTP heads


def test_mtp_terms_change_the_ratio_with_positive_share():
    heads = torch.zeros(2, 1, 4)
    old = torch.zeros(2, 1, 4)
    old[1] = -1.0  # head 1's log-ratio is +1 everywhere
    valid = torch.ones(2, 1, 4, dtype=torch.bool)
    resp = torch.tensor([[False, True, True, True]])
    cur_b, ok = block_view(heads, valid, resp, 2)
    old_b, _ = block_view(old, valid, resp, 2)
    lr = block_log_ratio(cur_b, old_b, ok, mpo_weights(2, 0.2, 0.8))
    assert lr[0].tolist() == pytest.approx([0.0, 0.2, 0.2, 0.0])  # last token: head 1 past the end


def test_scale_grad_keeps_value_and_scales_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_grad(x, torch.tensor([0.5, -2.0]))
    assert torch.allclose(y, x)
    y.sum().backward()
    assert x.grad.tolist() == [0.5, -2.0]


@pytest.mark.parametrize("grad", ["detach", "full"])
def test_mpo_grad_route_decides_whether_mtp_terms_reach_the_backbone(grad):
    """Real tiny model: under `detach` (with mtp_regime none) the block ratio's MTP terms give the
    backbone — LM head included — exactly the gradient of a loss whose MTP log-probs are
    constants (MPO App. A trains only the MTP modules); under `full` they add to it."""
    from learner.tiny import make_tiny_model

    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (3, 10))
    attn = torch.ones_like(ids)
    resp = torch.zeros(3, 10, dtype=torch.bool)
    resp[:, 4:] = True
    adv = torch.tensor([[1.0], [-0.5], [0.3]]).expand(3, 10)
    cfg = AlgorithmConfig(mtp_regime="none", mpo=MPOConfig(k=3))
    w = mpo_weights(3, 0.2, 0.8)
    with torch.no_grad():
        old = model.token_logprobs(ids, attn, num_mtp=2).logprobs - 0.1

    def backbone_grad(mtp_backbone_grad: bool, freeze_mtp_terms: bool):
        out = model.token_logprobs(ids, attn, num_mtp=2, mtp_backbone_grad=mtp_backbone_grad,
                                   mtp_lm_head_grad=mtp_backbone_grad)
        cur = out.logprobs
        if freeze_mtp_terms:
            cur = torch.cat([cur[:1], cur[1:].detach()])
        cb, ok = block_view(cur, out.valid, resp, 3)
        ob, _ = block_view(old, out.valid, resp, 3)
        loss, _ = policy_loss(block_log_ratio(cb, ob, ok, w), adv, resp, cfg)
        return torch.autograd.grad(loss, list(model.backbone.parameters()), allow_unused=True)

    if grad == "detach":  # the learner's routes for this config: nothing into the backbone
        from learner.step import Learner

        lrn = Learner(model, cfg)
        assert (lrn.backbone_grad, lrn.lm_head_grad) == (False, False)
    ref = backbone_grad(True, freeze_mtp_terms=True)
    got = backbone_grad(grad == "full", freeze_mtp_terms=False)
    same = all((a is None and b is None) or torch.allclose(a, b, atol=1e-7)
               for a, b in zip(ref, got))
    assert same == (grad == "detach")
