"""MTP warm-up on a tiny model: it lowers held-out MTP cross-entropy, never touches the backbone, and
resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import random

import pytest
import torch

from learner.tiny import make_tiny_model
from learner.warmup import WarmupConfig, warmup_mtp


def _sequences(n=48, seed=0):
    """A learnable toy language: arithmetic progressions of token ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, step, length = rng.randrange(3, 200), rng.randrange(1, 4), rng.randrange(12, 24)
        out.append([start + step * i for i in range(length)])
    return out


CFG = WarmupConfig(epochs=4, batch_size=8, lr=3e-3, heldout_fraction=0.2, save_every=3, loss="ce")


def test_ce_warmup_lowers_heldout_mtp_ce_and_freezes_backbone():
    m = make_tiny_model(num_mtp=2, seed=0)
    backbone_before = {n: p.clone() for n, p in m.backbone.state_dict().items()}
    res = warmup_mtp(m, _sequences(), CFG.model_copy(update={"loss": "ce"}), progress=False)
    assert res.steps == CFG.epochs * 5
    assert res.heldout_ce_after < res.heldout_ce_before - 0.5, res
    for n, p in m.backbone.state_dict().items():
        assert torch.equal(p, backbone_before[n]), n


def test_warmup_resumes_to_the_same_weights(tmp_path):
    full = make_tiny_model(num_mtp=1, seed=3)
    warmup_mtp(full, _sequences(), CFG, progress=False)

    part = make_tiny_model(num_mtp=1, seed=3)
    first = warmup_mtp(part, _sequences(), CFG, state_dir=tmp_path, progress=False, max_steps=7)
    assert first.steps == 7 and (tmp_path / "warmup_state.pt").is_file()
    resumed = make_tiny_model(num_mtp=1, seed=3)  # a fresh process would start like this
    res = warmup_mtp(resumed, _sequences(), CFG, state_dir=tmp_path, progress=False)
    assert res.steps == CFG.epochs * 5
    for (n, a), (_, b) in zip(full.mtp.state_dict().items(), resumed.mtp.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_warmup_rejects_too_little_data():
    with pytest.raises(ValueError, match="at least 2 sequences"):
        warmup_mtp(make_tiny_model(num_mtp=1), [[1, 2]], CFG, progress=False)


def test_distill_warmup_pulls_heads_onto_the_policys_own_predictions():
    """The distillation loss regresses head k onto the backbone's hidden state at p+k; afterwards
    the head's top-1 token agrees with the main head's prediction of the same token more often (on a
    random tiny backbone only slightly: its hidden states carry little structure; the SmolLM2
    acceptance numbers in docs/benchmarks.md are the real measure)."""
    from learner.warmup import _pad, mtp_distill_loss

    m = make_tiny_model(num_mtp=1, seed=0)
    held_ids, held_mask = _pad(_sequences(n=8, seed=99), 0)

    def agreement() -> float:
        with torch.no_grad():
            h = m.backbone_hidden(held_ids)
            main = m.backbone.lm_head(m.backbone.model.norm(h)).argmax(-1)  # predicts x_{p+1}
            head = m.backbone.lm_head(m.mtp_hidden(h, held_ids, 1)[0]).argmax(-1)  # predicts x_{p+2}
            valid = held_mask[:, 1:]
            return ((head[:, :-1] == main[:, 1:]) & valid).sum().item() / valid.sum().item()

    with torch.no_grad():
        loss_before = mtp_distill_loss(m, m.backbone_hidden(held_ids), held_ids, held_mask).item()
    agree_before = agreement()
    warmup_mtp(m, _sequences(n=96), CFG.model_copy(update={"loss": "distill", "epochs": 6, "lr": 1e-2}), progress=False)
    with torch.no_grad():
        loss_after = mtp_distill_loss(m, m.backbone_hidden(held_ids), held_ids, held_mask).item()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert agreement() > agree_before, (agree_before, agreement())
