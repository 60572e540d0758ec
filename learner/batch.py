"""`TrainBatch`: the scored samples the learner consumes, with validation.

Layout: one row per sample, prompt + response concatenated and right-padded to a common width T.
Every per-token tensor is aligned by *target token* like the model's `HeadLogProbs`: entry
[b, t] refers to token x[b, t] (predicted from position t − 1). So `response_mask[b, t]` is True
where x[b, t] is a response token that the loss counts, and `behav_logprobs[b, t]` is vLLM's
log π_behav(x[b, t]) there (anything elsewhere). Position 0 has no prediction and can never be a
response token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, T) long: prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T) bool/long: 1 on real tokens
    response_mask: torch.Tensor  # (B, T) bool: x[b, t] is a response token counted by the loss
    rewards: torch.Tensor  # (B,) float: scalar reward per sample (before overlong shaping)
    group_ids: torch.Tensor  # (B,) long: samples of one prompt share an id
    behav_logprobs: torch.Tensor | None = None  # (B, T) float: log π_behav(x[b, t]) (vLLM)
    policy_versions: torch.Tensor | None = None  # (B,) long: weights version that sampled it
    ref_logprobs: torch.Tensor | None = None  # (B, T) float: reference policy, for the KL term
    correct: torch.Tensor | None = None  # (B,) bool: verifier said correct (accuracy metric)
    advantages: torch.Tensor | None = None  # (B,) or (B, T): precomputed; None = GRPO from rewards

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,)

    def validate(self) -> None:
        """Raise ValueError naming the offending field and shapes on malformed input."""
        ids = self.input_ids
        if ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be (B, T) int64, got {tuple(ids.shape)} {ids.dtype}")
        b, t = ids.shape
        if b == 0:
            raise ValueError("empty batch: input_ids has 0 rows")
        for name in ("attention_mask", "response_mask", "behav_logprobs", "ref_logprobs"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (b, t):
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {(b, t)} like input_ids")
        for name in ("rewards", "group_ids", "policy_versions", "correct"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (b,):
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({b},)")
        if self.advantages is not None and tuple(self.advantages.shape) not in ((b,), (b, t)):
            raise ValueError(f"advantages has shape {tuple(self.advantages.shape)}, expected "
                             f"({b},) or {(b, t)}")
        resp = self.response_mask.bool()
        attn = self.attention_mask.bool()
        if (resp & ~attn).any():
            rows = torch.nonzero((resp & ~attn).any(-1)).flatten().tolist()
            raise ValueError(f"response_mask marks padding (attention_mask=0) in rows {rows[:8]}")
        if (attn[:, 1:] & ~attn[:, :-1]).any():
            rows = torch.nonzero((attn[:, 1:] & ~attn[:, :-1]).any(-1)).flatten().tolist()
            raise ValueError(f"attention_mask is not right-padded (a token follows padding) in rows "
                             f"{rows[:8]}")
        if resp[:, 0].any():
            raise ValueError("response_mask[:, 0] is set: token 0 has no prediction (needs a prompt)")
        if not torch.isfinite(self.rewards).all():
            raise ValueError(f"non-finite rewards at rows "
                             f"{torch.nonzero(~torch.isfinite(self.rewards)).flatten().tolist()[:8]}")
        for name in ("behav_logprobs", "ref_logprobs"):
            x = getattr(self, name)
            if x is not None and not torch.isfinite(torch.where(resp, x, 0.0)).all():
                raise ValueError(f"{name} is non-finite on response tokens")
        if self.advantages is not None and not torch.isfinite(self.advantages).all():
            raise ValueError("advantages are non-finite")

    def to(self, device: torch.device | str) -> TrainBatch:
        """Every tensor on `device` (the batch arrives from rollout on the host; the learner
        trains on its own device). Tensors already there are kept, not copied."""
        return replace(self, **{f.name: (None if getattr(self, f.name) is None
                                         else getattr(self, f.name).to(device)) for f in fields(self)})

    def select(self, idx: torch.Tensor) -> TrainBatch:
        """Rows `idx` of every tensor."""
        return replace(self, **{f.name: (None if getattr(self, f.name) is None
                                         else getattr(self, f.name)[idx]) for f in fields(self)})
