"""MTP warm-up (MPO App. A.1): train only the MTP modules with cross-entropy, backbone frozen.

Sequences are the task's prompts with the model's own answers (self-distillation: the drafter learns
to predict what the policy itself writes, which is what speculative decoding needs). The backbone's
hidden states are computed once per sequence and cached, so each epoch costs only the MTP blocks and
the shared LM head. Progress is shown with tqdm; the trainer checkpoints its state every
``save_every`` steps and resumes from it when run again with the same ``state_dir`` (and refuses a
state written for other settings or other text).

With the prompt lengths and ``answer_only`` the loss covers only the positions a drafter is asked
about while the policy answers (its input token x_{p+1} is an answer token); otherwise every
position of the text, the prompt's included. The CE term can score a pruned vocabulary (``ce_vocab``:
the drafter's, `rollout.draft_vocab`), which makes it about V/N times cheaper.

Scope: the held-out cross-entropy reported is the mean over MTP heads and trained positions of
``-log p⁽ᵏ⁾(x)`` over the full vocabulary, and the held-out top-1 agreement is head 1's argmax
against the text's token (on greedy text, what a greedy drafter's acceptance rate estimates); the
backbone, embedding and LM head are never updated here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from tqdm.auto import tqdm

from learner.model import PolicyModel
from learner.mtp_distill import DISTILL_KINDS, DistillTopK, distill_token_loss

STATE_FILE = "warmup_state.pt"


class WarmupConfig(BaseModel):
    """MTP warm-up settings."""

    epochs: int = Field(3, gt=0, description="Passes over the training sequences.")
    batch_size: int = Field(8, gt=0, description="Sequences per optimiser step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the MTP parameters.")
    weight_decay: float = Field(0.0, ge=0)
    max_len: int = Field(384, gt=2, description="Sequences are cut to this many tokens.")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of sequences kept out for evaluation.")
    seed: int = Field(0)
    save_every: int = Field(50, gt=0, description="Optimiser steps between resumable state saves.")
    loss: Literal["ce", "distill", "kl", "topk_ce", "tv"] = Field(
        "distill",
        description=(
            "'ce': cross-entropy of head k on the text's token x_{p+k+1} (needs the full-vocabulary LM head "
            "per token, the dominant cost for a small model with a big vocabulary). 'distill': regress head k's "
            "output onto the backbone's final-normed hidden state at p+k, the one from which the main head "
            "predicts that same token; with the LM head shared this matches the policy's own next-token "
            "distribution (what a drafter must guess) without touching the vocabulary (EAGLE-style feature "
            "regression), plus `ce_weight` × CE. 'kl' | 'topk_ce' | 'tv': head distillation, the RL term "
            "`algorithm.mtp.distill` (learner/mtp_distill.py): head k's full-vocabulary distribution against the "
            "main head's (detached) at the token it predicts, so a run starts with a head aligned by the loss it "
            "is trained with during RL (`mtprl model warmup --distill KIND`, on T = 1 answers); plus `ce_weight` × CE."
        ),
    )
    top_k: DistillTopK | None = Field(
        None, description="k of loss='topk_ce' (None = learner.config.DEFAULT_DISTILL_TOP_K); refused otherwise.")

    @model_validator(mode="after")
    def _top_k_for_topk_ce(self) -> WarmupConfig:
        if self.top_k is not None and self.loss != "topk_ce":
            raise ValueError(f"top_k={self.top_k} is only read by loss='topk_ce' (got loss={self.loss!r})")
        return self
    ce_weight: float = Field(0.0, ge=0, description="Weight of the CE term added to the 'distill' loss.")
    answer_only: bool = Field(
        False,
        description=(
            "Train only positions whose input token x_{p+1} is an answer token (needs the prompt lengths): "
            "the drafter is only asked about those; a shared system prompt otherwise fills much of the loss."
        ),
    )


@dataclass
class WarmupResult:
    heldout_ce_before: float
    heldout_ce_after: float
    steps: int
    train_losses: list[float] = field(default_factory=list)
    heldout_top1_before: float = float("nan")
    heldout_top1_after: float = float("nan")


def _pad(batch: list[list[int]], pad_id: int, starts: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask of the tokens to train on: all real tokens, or from each
    sequence's ``starts`` entry (its prompt length) on."""
    T = max(len(s) for s in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, (starts[i] if starts else 0) : len(s)] = True
    return ids, mask


def mtp_token_cross_entropy(
    model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over MTP heads of the token-mean ``-log p⁽ᵏ⁾(x_{p+k+1})`` over positions whose input
    x_{p+1} and target lie in ``mask`` (B, T; right-padded, one contiguous run per row). With
    ``vocab`` (sorted token ids) the softmax runs over those tokens only and targets outside it
    are skipped: FR-Spec's pruned drafter head, trained as it drafts."""
    W = model.backbone.lm_head.weight  # (V, H)
    remap = None
    if vocab is not None:
        remap = torch.full((W.shape[0],), -1, dtype=torch.long, device=W.device)
        remap[vocab] = torch.arange(len(vocab), device=W.device)
        W = W[vocab]  # (N, H)
    T = ids.shape[1]
    losses = []
    for k, hk in enumerate(model.mtp_hidden(h, ids, model.num_mtp, mtp_backbone_grad=False), start=1):
        n = T - k - 1  # positions whose target x_{p+k+1} lies inside the row
        valid = mask[:, 1 : 1 + n] & mask[:, k + 1 :]  # (B, n)
        y = ids[:, k + 1 :][valid]  # (M,)
        if remap is not None:
            y = remap[y]
        logits = F.linear(hk[:, :n][valid], W).float()  # (M, V or N)
        losses.append(F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / (y >= 0).sum().clamp(min=1))
    return torch.stack(losses).mean()


@torch.no_grad()
def mtp_top1_agreement(model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(hits, positions): head 1's full-vocabulary argmax at p against the text's x_{p+2}, over the
    positions `mtp_token_cross_entropy` trains. On the policy's greedy text the target's choice is
    that token, so this is the acceptance rate a greedy one-token drafter would see."""
    n = ids.shape[1] - 2
    h1 = model.mtp_hidden(h, ids, 1, mtp_backbone_grad=False)[0]  # (B, T, H)
    valid = mask[:, 1 : 1 + n] & mask[:, 2:]  # (B, n)
    pred = F.linear(h1[:, :n][valid], model.backbone.lm_head.weight).argmax(-1)  # (M,)
    return int((pred == ids[:, 2:][valid]).sum()), int(valid.sum())


def mtp_distill_loss(model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over MTP heads of ``‖h⁽ᵏ⁾ₚ − FinalNorm(h⁽⁰⁾_{p+k})‖² / H`` over positions whose input
    x_{p+1} and regression target p+k lie in ``mask`` (B, T; one contiguous run per row)."""
    target = model.backbone.model.norm(h).detach()  # (B, T, H)
    T = ids.shape[1]
    losses = []
    for k, hk in enumerate(model.mtp_hidden(h, ids, model.num_mtp, mtp_backbone_grad=False), start=1):
        valid = (mask[:, 1 : T - k + 1] & mask[:, k:]).unsqueeze(-1)  # (B, T-k, 1)
        err = ((hk[:, :-k] - target[:, k:]) ** 2).mean(-1, keepdim=True)  # (B, T-k, 1)
        losses.append((err * valid).sum() / valid.sum().clamp(min=1))
    return torch.stack(losses).mean()


def mtp_head_distill_loss(model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, kind: str,
                          top_k: int | None = None) -> torch.Tensor:
    """Mean over MTP heads of the token-mean head-distillation loss ``kind`` (`learner.mtp_distill`,
    T = 1) between head k at p and the main head at p+k, both predicting x_{p+k+1}, over the positions
    `mtp_token_cross_entropy` trains. The teacher and the shared LM head are detached: only the MTP
    modules learn (the warm-up's backbone is frozen anyway)."""
    W = model.backbone.lm_head.weight.detach()  # (V, H)
    main = model.backbone.model.norm(h).detach()  # (B, T, H): the main head's input
    T = ids.shape[1]
    losses = []
    for k, hk in enumerate(model.mtp_hidden(h, ids, model.num_mtp, mtp_backbone_grad=False), start=1):
        n = T - k - 1  # positions whose target x_{p+k+1} lies inside the row
        valid = mask[:, 1 : 1 + n] & mask[:, k + 1 :]  # (B, n)
        student = F.linear(hk[:, :n][valid], W).float()  # (M, V)
        with torch.no_grad():
            teacher = F.log_softmax(F.linear(main[:, k : k + n][valid], W).float(), dim=-1)  # (M, V)
        tok = distill_token_loss(kind, student, teacher, top_k)  # (M,)
        losses.append(tok.sum() / max(tok.numel(), 1))
    return torch.stack(losses).mean()


def warmup_loss(model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, cfg: WarmupConfig,
                vocab: torch.Tensor | None = None) -> torch.Tensor:
    if cfg.loss == "ce":
        return mtp_token_cross_entropy(model, h, ids, mask, vocab)
    if cfg.loss in DISTILL_KINDS:
        from learner.config import DEFAULT_DISTILL_TOP_K

        top_k = cfg.top_k or DEFAULT_DISTILL_TOP_K
        loss = mtp_head_distill_loss(model, h, ids, mask, cfg.loss, top_k)
        if cfg.ce_weight > 0:
            loss = loss + cfg.ce_weight * mtp_token_cross_entropy(model, h, ids, mask, vocab)
        return loss
    loss = mtp_distill_loss(model, h, ids, mask)
    if cfg.ce_weight > 0:
        loss = loss + cfg.ce_weight * mtp_token_cross_entropy(model, h, ids, mask, vocab)
    return loss


Cached = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (hidden, ids, trained-token mask) per batch


def _hidden_cache(model: PolicyModel, batches: list[list[tuple[list[int], int]]], pad_id: int, desc: str,
                  progress: bool) -> Cached:
    """Backbone hidden states of each batch of (sequence, first trained token), computed once (the
    backbone is frozen)."""
    items = []
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids, mask = _pad([s for s, _ in b], pad_id, [start for _, start in b])
            items.append((model.backbone_hidden(ids), ids, mask))
    return items


@torch.no_grad()
def heldout_ce(model: PolicyModel, cache: Cached) -> float:
    if not cache:
        return float("nan")
    total, n = 0.0, 0
    for h, ids, mask in cache:
        total += mtp_token_cross_entropy(model, h, ids, mask).item() * len(ids)
        n += len(ids)
    return total / n


def heldout_top1(model: PolicyModel, cache: Cached) -> float:
    hits = total = 0
    for h, ids, mask in cache:
        a, b = mtp_top1_agreement(model, h, ids, mask)
        hits, total = hits + a, total + b
    return hits / total if total else float("nan")


def warmup_mtp(
    model: PolicyModel,
    sequences: list[list[int]],
    config: WarmupConfig | None = None,
    pad_id: int = 0,
    state_dir: str | Path | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    prompt_lens: Sequence[int] | None = None,
    ce_vocab: Sequence[int] | None = None,
) -> WarmupResult:
    """Train ``model.mtp`` in place on ``sequences`` (token ids). Returns held-out CE and top-1
    agreement before/after.

    ``prompt_lens`` (one per sequence) with ``answer_only`` restricts training to answers;
    ``ce_vocab`` (token ids) restricts the CE term's softmax to those tokens. ``max_steps`` stops
    this call early (the state is saved, so a later call with the same ``state_dir`` resumes where
    it stopped and ends with the same weights as an uninterrupted run)."""
    cfg = config or WarmupConfig()
    if cfg.answer_only and prompt_lens is None:
        raise ValueError("answer_only needs prompt_lens: the prompt length of each sequence")
    if prompt_lens is not None and len(prompt_lens) != len(sequences):
        raise ValueError(f"prompt_lens has {len(prompt_lens)} entries for {len(sequences)} sequences")
    starts = prompt_lens if cfg.answer_only else [0] * len(sequences)
    # An answer must keep at least two tokens after the cut for one trained position.
    seqs = [(s[: cfg.max_len], start) for s, start in zip(sequences, starts) if min(len(s), cfg.max_len) >= start + 3]
    if len(seqs) < 2:
        what = "answers of ≥ 3 tokens within max_len" if cfg.answer_only else "sequences of ≥ 3 tokens"
        raise ValueError(f"MTP warm-up needs at least 2 {what}, got {len(seqs)}")
    vocab = torch.tensor(sorted(set(ce_vocab))) if ce_vocab is not None else None
    rng = random.Random(cfg.seed)
    rng.shuffle(seqs)
    n_held = max(1, int(len(seqs) * cfg.heldout_fraction)) if cfg.heldout_fraction > 0 else 0
    held, train = seqs[:n_held], seqs[n_held:]
    # Sort by length inside each batch-sized window so padding stays small.
    train.sort(key=lambda x: len(x[0]))
    batches = [train[i : i + cfg.batch_size] for i in range(0, len(train), cfg.batch_size)]
    held_batches = [held[i : i + cfg.batch_size] for i in range(0, len(held), cfg.batch_size)]

    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.mtp.train()
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))

    held_cache = _hidden_cache(model, held_batches, pad_id, "hidden states (held-out)", progress)
    before = heldout_ce(model, held_cache)
    top1_before = heldout_top1(model, held_cache)
    step, losses = 0, []
    state_path = Path(state_dir) / STATE_FILE if state_dir else None
    fingerprint = _fingerprint(cfg, seqs, vocab)
    if state_path and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        # Resuming another recipe's optimiser and step count would silently train the wrong thing.
        if state.get("fingerprint", fingerprint) != fingerprint:
            raise ValueError(
                f"{state_path} holds the state of a different warm-up (other options or other text); "
                f"delete {state_path.parent} to start this one afresh, or rerun with the same options")
        model.mtp.load_state_dict(state["mtp"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses, before = state["step"], state["losses"], state["heldout_ce_before"]
        top1_before = state.get("heldout_top1_before", top1_before)
        torch.set_rng_state(state["torch_rng"])

    train_cache = _hidden_cache(model, batches, pad_id, "hidden states (train)", progress)
    order_rng = random.Random(cfg.seed + 1)
    orders = []
    for _ in range(cfg.epochs):
        o = list(range(len(batches)))
        order_rng.shuffle(o)
        orders += o
    bar = tqdm(total=total_steps, initial=step, desc="MTP warm-up", disable=not progress)
    try:
        stop_at = total_steps if max_steps is None else min(total_steps, step + max_steps)
        while step < stop_at:
            h, ids, mask = train_cache[orders[step]]
            loss = warmup_loss(model, h, ids, mask, cfg, vocab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.mtp.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if state_path and (step % cfg.save_every == 0 or step == stop_at):
                _save_state(state_path, model, opt, sched, step, losses, before, top1_before, fingerprint)
    finally:
        bar.close()
    model.mtp.eval()
    after = heldout_ce(model, held_cache)
    return WarmupResult(before, after, step, losses, top1_before, heldout_top1(model, held_cache))


def _fingerprint(cfg: WarmupConfig, seqs: list[tuple[list[int], int]], vocab: torch.Tensor | None) -> str:
    """What a resumable state belongs to: the settings, the text and the CE vocabulary."""
    h = hashlib.sha256(cfg.model_dump_json(exclude={"save_every"}).encode())
    h.update(json.dumps(seqs).encode())
    h.update(json.dumps(None if vocab is None else vocab.tolist()).encode())
    return h.hexdigest()


def _save_state(path: Path, model, opt, sched, step, losses, before, top1_before, fingerprint) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "mtp": model.mtp.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "losses": losses,
            "heldout_ce_before": before,
            "heldout_top1_before": top1_before,
            "fingerprint": fingerprint,
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)
