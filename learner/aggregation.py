"""The one reduction from token losses to a scalar, shared by every loss in the learner.

Three modes (config `aggregation`), for a mini-batch of N samples with mask m and n_i = Σ_t m_it:

- `token-mean`           L = Σ_i Σ_t m_it ℓ_it / Σ_i n_i            (DAPO Eq. 8; veRL default)
- `seq-mean-token-mean`  L = (1/N') Σ_i (Σ_t m_it ℓ_it / n_i)      (GRPO Eq. 3, GSPO)
- `seq-mean-token-sum`   L = (1/N') Σ_i Σ_t m_it ℓ_it / L_const    (Dr. GRPO, Liu et al. 2025)

N' counts samples with at least one token (an all-masked sample contributes nothing anywhere).

Why a `Normaliser`: the step splits a mini-batch into micro-batches and accumulates gradients.
If each micro-batch divided by its *own* token or sample count, the summed loss would depend on
how the batch was split (a micro-batch of short responses would weigh as much as one of long
ones). So the denominators (Σ n_i, N', L_const) are computed once over the whole mini-batch and
every micro-batch divides by them: Σ over micro-batches of `aggregate(...)` then equals the
mini-batch loss exactly, for any split. `L_const` is the mini-batch's longest response (Dr. GRPO
uses the generation budget; any constant keeps the estimator unbiased; the mini-batch's longest
keeps the loss scale comparable to token-mean's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


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
            return masked.sum() / (norm.num_seqs * norm.const_len)
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
