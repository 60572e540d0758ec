"""Advantages and reward shaping: GRPO group normalisation, Dr. GRPO, DAPO's overlong penalty
and dynamic-sampling filter, the k3 KL estimator.

All functions are pure and work on whole batches (no Python loops over samples). Groups are
given by integer `group_ids` (B,): samples of the same prompt share an id.
"""

from __future__ import annotations

import torch

from learner.shaping import OverlongShaping


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be (B,), got shape {tuple(group_ids.shape)}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.numel() else 0


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample group mean, unbiased group std and group size, each (B,)."""
    if rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} differ"
        )
    idx, g = _group_index(group_ids)
    r = rewards.to(torch.float64)
    size = torch.zeros(g, dtype=r.dtype).index_add_(0, idx, torch.ones_like(r))  # (G,)
    mean = torch.zeros(g, dtype=r.dtype).index_add_(0, idx, r) / size  # (G,)
    sq = torch.zeros(g, dtype=r.dtype).index_add_(0, idx, (r - mean[idx]) ** 2)  # (G,)
    std = (sq / (size - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std in GRPO code
    return mean[idx], std[idx], size[idx]


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, §4.1.2), one per sample (B,).

        A_i = (R_i − mean_G R) / (std_G R + eps)     normalize_std=True  (GRPO)
        A_i =  R_i − mean_G R                         normalize_std=False (Dr. GRPO, Liu et al. 2025)

    A group of one sample has no baseline: its advantage is 0.
    """
    mean, std, size = group_stats(rewards, group_ids)
    adv = rewards.to(torch.float64) - mean
    if normalize_std:  # a constant group has adv = 0 exactly; keep it 0 even when eps = 0
        adv = torch.where(adv == 0, adv, adv / (std + eps))
    adv = torch.where(size > 1, adv, torch.zeros_like(adv))
    return adv.to(torch.float32)


def constant_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the sample's group has all-equal rewards (DAPO §3.2 dynamic sampling drops
    these: all their advantages are 0, so they only dilute the token-mean)."""
    idx, g = _group_index(group_ids)
    r = rewards.to(torch.float64)
    lo = torch.full((g,), float("inf"), dtype=r.dtype).scatter_reduce(0, idx, r, "amin")
    hi = torch.full((g,), float("-inf"), dtype=r.dtype).scatter_reduce(0, idx, r, "amax")
    return (hi - lo <= 0)[idx]


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, Eq. 13), (B,) added to the reward:

        0                                 if |y| ≤ L_max − L_cache
        ((L_max − L_cache) − |y|)/L_cache if L_max − L_cache < |y| ≤ L_max
        −1                                if |y| > L_max
    """
    OverlongShaping(max_length=max_len, cache_length=cache_len)  # the one check of the bounds
    y = lengths.to(torch.float32)
    soft = max_len - cache_len
    pen = torch.where(y <= soft, torch.zeros_like(y), (soft - y) / cache_len)
    return torch.where(y > max_len, torch.full_like(y, -1.0), pen)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) per token (Schulman 2020; GRPO Eq. 4):

        k3 = exp(ref − logp) − (ref − logp) − 1 ≥ 0, unbiased, low variance.

    The log difference is clamped to ±20 so exp cannot overflow.
    """
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0
