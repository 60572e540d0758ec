"""The one reduction from token losses to a scalar, shared by every loss in the learner.

Four modes (config `aggregation`), named and scaled as veRL's `agg_loss` modes
(`verl/trainer/ppo/core_algos.py`, `loss_agg_mode`), for a mini-batch of N samples with mask m
and n_i = Σ_t m_it:

- `token-mean`               L = Σ_i Σ_t m_it ℓ_it / Σ_i n_i          (DAPO Eq. 8; veRL default)
- `seq-mean-token-mean`      L = (1/N') Σ_i (Σ_t m_it ℓ_it / n_i)    (GRPO Eq. 3, GSPO)
- `seq-mean-token-sum`       L = (1/N') Σ_i Σ_t m_it ℓ_it            (sum per sequence, mean over sequences)
- `seq-mean-token-sum-norm`  L = Σ_i Σ_t m_it ℓ_it / L_const          (veRL's Dr. GRPO mode, Liu et al. 2025)

N' counts samples with at least one token (an all-masked sample contributes nothing anywhere;
veRL's `seq_mask` does the same). `seq-mean-token-sum` grows with response length (a sequence's
loss is its tokens' sum); `seq-mean-token-sum-norm` divides the batch's token sum by a constant
instead of by token or sample counts, so no sample's weight depends on its length (Dr. GRPO's
"no length bias"). Like veRL's it does not divide by N': its scale grows with the batch, which
matters for gradient clipping, not for AdamW's direction.

Departure from veRL: `L_const` is the mini-batch's longest response (veRL: `loss_scale_factor`,
by default the padded response width `loss_mask.shape[-1]` of its micro-batch; Dr. GRPO uses the
generation budget). Any constant keeps the estimator unbiased; the longest response is the width
the mini-batch pads to, and it is the same for every micro-batch of the mini-batch.

Until 2026-12 this project's `seq-mean-token-sum` meant (1/N') Σ_i Σ_t m_it ℓ_it / L_const —
veRL's name with another scale (1/L_const of veRL's `seq-mean-token-sum`, 1/N' of its
`seq-mean-token-sum-norm`). No algorithm defaulted to it; a spec that named it now gets veRL's
scale, L_const times the old one.

Why a `Normaliser`: the step splits a mini-batch into micro-batches and accumulates gradients.
If each micro-batch divided by its *own* token or sample count, the summed loss would depend on
how the batch was split (a micro-batch of short responses would weigh as much as one of long
ones). So the denominators (Σ n_i, N', L_const) are computed once over the whole mini-batch and
every micro-batch divides by them: Σ over micro-batches of `aggregate(...)` then equals the
mini-batch loss exactly, for any split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class Normaliser:
    """Denominators of one mini-batch (see module docstring)."""

    num_tokens: float  # Σ_i n_i
    num_seqs: float  # N': samples with n_i > 0
    const_len: float  # L_const: max_i n_i

    @staticmethod
    def of(mask: torch.Tensor) -> Normaliser:
        """Denominators of the samples in `mask` (B, T)."""
        n = mask.sum(dim=-1)  # (B,)
        return Normaliser(
            num_tokens=float(n.sum().clamp(min=1)),
            num_seqs=float((n > 0).sum().clamp(min=1)),
            const_len=float(n.max().clamp(min=1)) if n.numel() else 1.0,
        )


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, mode: str, norm: Normaliser | None = None
) -> torch.Tensor:
    """Reduce token losses `loss` (B, T) under `mask` (B, T) to a scalar.

    `norm` holds the mini-batch's denominators; None = this tensor is the whole mini-batch.
    """
    if loss.shape != mask.shape:
        raise ValueError(f"loss shape {tuple(loss.shape)} != mask shape {tuple(mask.shape)}")
    if norm is None:
        norm = Normaliser.of(mask)
    m = mask.to(loss.dtype)
    # where(), not multiplication: a NaN/inf in a masked position must not leak into the sum.
    masked = torch.where(mask, loss, torch.zeros_like(loss))  # (B, T)
    match mode:
        case "token-mean":
            return masked.sum() / norm.num_tokens
        case "seq-mean-token-mean":
            per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
            return per_seq.sum() / norm.num_seqs
        case "seq-mean-token-sum":
            return masked.sum() / norm.num_seqs  # Σ_i (Σ_t ℓ_it) / N'
        case "seq-mean-token-sum-norm":
            return masked.sum() / norm.const_len  # no 1/N', as veRL's
        case _:
            raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty); for diagnostics."""
    m = mask.to(x.dtype)
    return torch.where(mask, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of x over mask (0 when the mask is empty); for diagnostics."""
    mu = masked_mean(x, mask)
    return masked_mean((x - mu) ** 2, mask)
