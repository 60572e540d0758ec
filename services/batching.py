"""Scored prompt groups → the learner's `TrainBatch`; the data order of a run.

A `ScoredGroup` is one prompt's G samples with their verdicts; `to_train_batch` lays them out
one row per sample (prompt + response, right-padded) with the behaviour log-probs vLLM returned,
aligned by target token as `learner.batch` documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from learner.batch import TrainBatch
from rollout.config import SEED_STRIDE


@dataclass
class ScoredGroup:
    """One prompt group on its way from rollout to the learner."""

    cursor: int  # position in the run's data order: the group's identity for accounting
    prompt_ids: list[int]
    responses: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # behaviour policy version per sample
    finish_reasons: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    @property
    def behaviour_version(self) -> int:
        """The oldest policy that produced any of its samples (staleness is judged by it)."""
        return min(self.versions) if self.versions else 0

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    def constant_reward(self) -> bool:
        return len(set(self.rewards)) <= 1

    def drop_samples(self, failed: Sequence[bool]) -> list[str]:
        """Remove the samples marked ``failed`` (a grader failure, not a reward) from every per-sample
        list; returns their outcomes. What is left is the group the learner sees: its GRPO statistics
        are over these valid members only."""
        if len(failed) != len(self.responses):
            raise ValueError(f"group {self.cursor}: {len(failed)} flags for {len(self.responses)} samples")
        gone = [o for o, f in zip(self.outcomes, failed) if f]
        for name in ("responses", "logprobs", "versions", "finish_reasons", "texts", "rewards", "outcomes"):
            values = getattr(self, name)
            if values:
                setattr(self, name, [v for v, f in zip(values, failed) if not f])
        return gone


def to_train_batch(groups: Sequence[ScoredGroup], pad_id: int = 0) -> TrainBatch:
    """Rows: every sample of every group, prompt + response, right-padded to the longest."""
    rows: list[tuple[ScoredGroup, int]] = [(g, j) for g in groups for j in range(len(g.responses))]
    if not rows:
        raise ValueError("no samples to train on")
    width = max(len(g.prompt_ids) + len(g.responses[j]) for g, j in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.bool)
    resp = torch.zeros((b, width), dtype=torch.bool)
    behav = torch.zeros((b, width), dtype=torch.float32)
    for r, (g, j) in enumerate(rows):
        p, y = g.prompt_ids, g.responses[j]
        if len(g.logprobs[j]) != len(y):
            raise ValueError(f"group {g.cursor} sample {j}: {len(g.logprobs[j])} log-probs for {len(y)} tokens")
        n = len(p) + len(y)
        ids[r, :n] = torch.tensor(p + y, dtype=torch.long)
        attn[r, :n] = True
        resp[r, len(p):n] = True
        behav[r, len(p):n] = torch.tensor(g.logprobs[j], dtype=torch.float32)
    return TrainBatch(
        input_ids=ids,
        attention_mask=attn,
        response_mask=resp,
        rewards=torch.tensor([g.rewards[j] for g, j in rows], dtype=torch.float32),
        group_ids=torch.tensor([g.cursor for g, _ in rows], dtype=torch.long),
        behav_logprobs=behav,
        policy_versions=torch.tensor([g.versions[j] for g, j in rows], dtype=torch.long),
        correct=torch.tensor([g.outcomes[j] == "ok" for g, j in rows], dtype=torch.bool),
    )


def data_index(cursor: int, num_items: int, seed: int) -> int:
    """Which item the group at ``cursor`` uses: the items in a seeded shuffle, reshuffled (with the
    next seed) each pass. Pure in (cursor, num_items, seed), so a resumed run sees the same order."""
    epoch, pos = divmod(cursor, num_items)
    order = list(range(num_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos]


def group_seed(run_seed: int, cursor: int) -> int:
    """Sampling seed of a prompt group: its samples depend on the run seed and the group only."""
    return (run_seed * 1_000_003 + cursor * SEED_STRIDE + 1) % (2**31 - 1)


def reward_items(group: ScoredGroup, item: Any) -> list[dict[str, Any]]:
    """The reward actor's input for a group's samples (`reward.actors.RewardScorer.score_group`)."""
    gold = item.gold if isinstance(item.gold, str) else item.gold.model_dump()
    extra = {"prompt_code": item.meta["prompt_code"]} if item.meta.get("prompt_code") else {}
    return [{"kind": item.kind, "gold": gold, "completion": text, "length": len(ids), **extra}
            for text, ids in zip(group.texts, group.responses)]
