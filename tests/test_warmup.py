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


CFG = WarmupConfig(epochs=4, batch_size=8, lr=3e-3, heldout_fraction=0.2, save_every=3)


def test_warmup_lowers_heldout_mtp_ce_and_freezes_backbone():
    m = make_tiny_model(num_mtp=2, seed=0)
    backbone_before = {n: p.clone() for n, p in m.backbone.state_dict().items()}
    res = warmup_mtp(m, _sequences(), CFG, progress=False)
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
