"""MTP warm-up (MPO App. A.1): train only the MTP modules with cross-entropy, backbone frozen.

Sequences are the task's prompts with the model's own answers (self-distillation: the drafter learns
to predict what the policy itself writes, which is what speculative decoding needs). The backbone's
hidden states are computed once per sequence and cached, so each epoch costs only the MTP blocks and
the shared LM head. Progress is shown with tqdm; the trainer checkpoints its state every
``save_every`` steps and resumes from it when run again with the same ``state_dir``.

Scope: the held-out cross-entropy reported is the mean over MTP heads and valid tokens of
``-log p⁽ᵏ⁾(x)``; the backbone, embedding and LM head are never updated here.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from typing import Literal

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from learner.model import PolicyModel

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
    loss: Literal["ce", "distill"] = Field(
        "distill",
        description=(
            "'ce': cross-entropy of head k on the text's token x_{p+k+1} (needs the full-vocabulary LM head "
            "per token, the dominant cost for a small model with a big vocabulary). 'distill': regress head k's "
            "output onto the backbone's final-normed hidden state at p+k, the one from which the main head "
            "predicts that same token; with the LM head shared this matches the policy's own next-token "
            "distribution (what a drafter must guess) without touching the vocabulary (EAGLE-style feature "
            "regression), plus `ce_weight` × CE."
        ),
    )
    ce_weight: float = Field(0.0, ge=0, description="Weight of the CE term added to the 'distill' loss.")


@dataclass
class WarmupResult:
    heldout_ce_before: float
    heldout_ce_after: float
    steps: int
    train_losses: list[float] = field(default_factory=list)


def _pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


def mtp_cross_entropy(model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over MTP heads of the token-mean cross-entropy ``-log p⁽ᵏ⁾(x_t)`` on valid tokens."""
    out = model.heads_from_hidden(h, ids, mask, model.num_mtp, mtp_backbone_grad=False)
    losses = []
    for k in range(1, model.num_mtp + 1):
        v = out.valid[k]
        losses.append(-(out.logprobs[k] * v).sum() / v.sum().clamp(min=1))
    return torch.stack(losses).mean()


def mtp_distill_loss(model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over MTP heads of ``‖h⁽ᵏ⁾ₚ − FinalNorm(h⁽⁰⁾_{p+k})‖² / H`` over positions with p+k < length."""
    target = model.backbone.model.norm(h).detach()  # (B, T, H)
    losses = []
    for k, hk in enumerate(model.mtp_hidden(h, ids, model.num_mtp, mtp_backbone_grad=False), start=1):
        valid = mask[:, k:].unsqueeze(-1)  # (B, T-k, 1): the target position p+k is a real token
        err = ((hk[:, :-k] - target[:, k:]) ** 2).mean(-1, keepdim=True)  # (B, T-k, 1)
        losses.append((err * valid).sum() / valid.sum().clamp(min=1))
    return torch.stack(losses).mean()


def warmup_loss(model: PolicyModel, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, cfg: WarmupConfig) -> torch.Tensor:
    if cfg.loss == "ce":
        return mtp_cross_entropy(model, h, ids, mask)
    loss = mtp_distill_loss(model, h, ids, mask)
    if cfg.ce_weight > 0:
        loss = loss + cfg.ce_weight * mtp_cross_entropy(model, h, ids, mask)
    return loss


Cached = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (hidden, ids, mask) per batch


def _hidden_cache(model: PolicyModel, batches: list[list[list[int]]], pad_id: int, desc: str, progress: bool) -> Cached:
    """Backbone hidden states of each batch, computed once (the backbone is frozen)."""
    items = []
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids, mask = _pad(b, pad_id)
            items.append((model.backbone_hidden(ids), ids, mask))
    return items


@torch.no_grad()
def heldout_ce(model: PolicyModel, cache: Cached) -> float:
    if not cache:
        return float("nan")
    total, n = 0.0, 0
    for h, ids, mask in cache:
        total += mtp_cross_entropy(model, h, ids, mask).item() * len(ids)
        n += len(ids)
    return total / n


def warmup_mtp(
    model: PolicyModel,
    sequences: list[list[int]],
    config: WarmupConfig | None = None,
    pad_id: int = 0,
    state_dir: str | Path | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> WarmupResult:
    """Train ``model.mtp`` in place on ``sequences`` (token ids). Returns held-out CE before/after.

    ``max_steps`` stops this call early (the state is saved, so a later call with the same
    ``state_dir`` resumes where it stopped and ends with the same weights as an uninterrupted run)."""
    cfg = config or WarmupConfig()
    seqs = [s[: cfg.max_len] for s in sequences if len(s) >= 3]
    if len(seqs) < 2:
        raise ValueError(f"MTP warm-up needs at least 2 sequences of ≥ 3 tokens, got {len(seqs)}")
    rng = random.Random(cfg.seed)
    rng.shuffle(seqs)
    n_held = max(1, int(len(seqs) * cfg.heldout_fraction)) if cfg.heldout_fraction > 0 else 0
    held, train = seqs[:n_held], seqs[n_held:]
    # Sort by length inside each batch-sized window so padding stays small.
    train.sort(key=len)
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
    step, losses = 0, []
    state_path = Path(state_dir) / STATE_FILE if state_dir else None
    if state_path and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.mtp.load_state_dict(state["mtp"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses, before = state["step"], state["losses"], state["heldout_ce_before"]
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
            loss = warmup_loss(model, h, ids, mask, cfg)
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
                _save_state(state_path, model, opt, sched, step, losses, before)
    finally:
        bar.close()
    model.mtp.eval()
    after = heldout_ce(model, held_cache)
    return WarmupResult(before, after, step, losses)


def _save_state(path: Path, model, opt, sched, step, losses, before) -> None:
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
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)
