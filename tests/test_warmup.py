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


def _reference_ce(m, ids, mask):
    """The MTP heads' CE from the learner's own log-prob path (`heads_from_hidden`), full masks."""
    with torch.no_grad():
        out = m.heads_from_hidden(m.backbone_hidden(ids), ids, mask, m.num_mtp, mtp_backbone_grad=False)
    return torch.stack([-(out.logprobs[k] * out.valid[k]).sum() / out.valid[k].sum() for k in range(1, m.num_mtp + 1)]).mean()


def test_token_ce_matches_the_learners_log_probs_and_prunes_exactly():
    from learner.warmup import _pad, mtp_token_cross_entropy

    m = make_tiny_model(num_mtp=2, seed=1)
    ids, mask = _pad(_sequences(n=6, seed=5), 0)
    with torch.no_grad():
        h = m.backbone_hidden(ids)
        full = mtp_token_cross_entropy(m, h, ids, mask)
        assert torch.allclose(full, _reference_ce(m, ids, mask), atol=1e-5)
        # every token kept: the same loss; a subset: the softmax over the subset, other targets skipped
        V = m.backbone.lm_head.weight.shape[0]
        assert torch.allclose(mtp_token_cross_entropy(m, h, ids, mask, torch.arange(V)), full, atol=1e-5)
        sub = torch.tensor(sorted(set(ids[mask].tolist()))[::2])
        h1 = m.mtp_hidden(h, ids, 1, mtp_backbone_grad=False)[0]
        logits = m.backbone.lm_head(h1[:, :-2])[..., sub]  # head 1 at p over the subset, predicts x_{p+2}
        tgt = ids[:, 2:]
        keep = mask[:, 2:] & torch.isin(tgt, sub)
        pos = torch.searchsorted(sub, tgt.clamp(max=int(sub.max())))
        want = -(logits.log_softmax(-1).gather(-1, pos.unsqueeze(-1)).squeeze(-1))[keep].mean()
        m1 = make_tiny_model(num_mtp=1, seed=1)  # same backbone and first head: one head, one term
        m1.mtp[0].load_state_dict(m.mtp[0].state_dict())
        assert torch.allclose(mtp_token_cross_entropy(m1, h, ids, mask, sub), want, atol=1e-5)


def test_answer_only_trains_only_answer_positions():
    """With prompt lengths the loss covers exactly the positions a drafter is asked about while the
    policy answers (input token x_{p+1} in the answer), checked against a sum written by hand."""
    from learner.warmup import _pad, mtp_token_cross_entropy

    m = make_tiny_model(num_mtp=1, seed=2)
    seqs = _sequences(n=4, seed=7)
    starts = [5, 6, 7, 8]
    ids, mask = _pad(seqs, 0, starts)
    assert mask.sum() == sum(len(s) - st for s, st in zip(seqs, starts))
    with torch.no_grad():
        h = m.backbone_hidden(ids)
        loss = mtp_token_cross_entropy(m, h, ids, mask)
        # by hand: head 1 at p predicts x_{p+2}; trained when x_{p+1} is an answer token
        h1 = m.mtp_hidden(h, ids, 1, mtp_backbone_grad=False)[0]
        lp = m.backbone.lm_head(h1).log_softmax(-1)
        terms = [-lp[i, p, ids[i, p + 2]] for i, (s, st) in enumerate(zip(seqs, starts)) for p in range(st - 1, len(s) - 2)]
        assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    with pytest.raises(ValueError, match="prompt_lens"):
        warmup_mtp(m, seqs, CFG.model_copy(update={"answer_only": True}), progress=False)


def test_answer_only_pruned_ce_warmup_raises_top1_agreement():
    m = make_tiny_model(num_mtp=1, seed=4)
    prompt = [7, 8, 9, 10, 11]  # a shared "system prompt"
    seqs = [prompt + s for s in _sequences(n=64, seed=11)]
    vocab = sorted({t for s in seqs for t in s[len(prompt):]})
    cfg = CFG.model_copy(update={"loss": "distill", "ce_weight": 1.0, "answer_only": True, "epochs": 6, "lr": 1e-2})
    res = warmup_mtp(m, seqs, cfg, progress=False, prompt_lens=[len(prompt)] * len(seqs), ce_vocab=vocab)
    assert res.heldout_top1_after > res.heldout_top1_before + 0.1, res
    assert res.heldout_ce_after < res.heldout_ce_before, res


def test_warmup_refuses_to_resume_another_recipes_state(tmp_path):
    first = warmup_mtp(make_tiny_model(num_mtp=1, seed=3), _sequences(), CFG, state_dir=tmp_path, progress=False, max_steps=3)
    assert first.steps == 3
    for other_cfg, other_text in ((CFG.model_copy(update={"lr": 1e-2}), _sequences()), (CFG, _sequences(seed=1))):
        with pytest.raises(ValueError, match="different warm-up"):
            warmup_mtp(make_tiny_model(num_mtp=1, seed=3), other_text, other_cfg, state_dir=tmp_path, progress=False)
    # the same recipe still resumes
    assert warmup_mtp(make_tiny_model(num_mtp=1, seed=3), _sequences(), CFG, state_dir=tmp_path, progress=False).steps == CFG.epochs * 5
