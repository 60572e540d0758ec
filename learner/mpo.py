"""MPO: the multi-token block importance ratio (Xu et al., "Beyond Token-Level Policy Gradients",
§4.2, Eq. 8–11), built from the MTP heads' log-probs.

At response position t, head k (k = 0 the main head) predicts o_{t+k} conditioned on the prefix
before t, teacher-forced on o_t..o_{t+k−1}; ℓ⁽ᵏ⁾_t = log π_θ⁽ᵏ⁾(o_{t+k}) − log π_old⁽ᵏ⁾(o_{t+k}).

- product form (Eq. 8):  log r^K_t = Σ_{k<K} ℓ⁽ᵏ⁾_t                 (high variance; study only)
- log-sum form (Eq. 9):  log r̃^K_t = Σ_{k<K} w_k ℓ⁽ᵏ⁾_t,  w_k ≥ 0, Σ w_k = 1
- weights (Eq. 10):      w_k = w_1 γ^{k−1} (k ≥ 1),  s = Σ_{k≥1} w_k,  w_0 = 1 − s
- surrogate (Eq. 11):    the PPO clip on r̃^K_t with the token-t advantage.

Near the end of a response the heads whose target o_{t+k} lies past the response's last token
are dropped and the remaining weights renormalised (they again sum to 1). K = 1 or s = 0 gives
w = (1, 0, …), so log r̃ = ℓ⁽⁰⁾: exactly token-level PPO.

The model returns head log-probs aligned by *target* token (`HeadLogProbs.logprobs[k, b, t]` is
head k's log-prob of x[b, t]); the block view needs them aligned by the *main head's* position,
so head k is shifted left by k (`block_view`). All operations are vectorised over (K, B, T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mpo_weights(k: int, share: float, decay: float) -> torch.Tensor:
    """Eq. 10 weights (K,): w_0 = 1 − s, w_k = s·γ^{k−1}/Σ_{j=1}^{K−1} γ^{j−1} for k ≥ 1."""
    if k < 1:
        raise ValueError(f"MPO block size k={k} must be >= 1")
    if not 0.0 <= share < 1.0:
        raise ValueError(f"MPO mtp_share={share} must be in [0, 1)")
    if k == 1:
        return torch.ones(1)
    g = torch.tensor([decay ** (j - 1) for j in range(1, k)], dtype=torch.float64)
    w = torch.cat([torch.tensor([1.0 - share], dtype=torch.float64), share * g / g.sum()])
    return w.to(torch.float32)  # (K,)


def block_view(
    head_values: torch.Tensor, head_valid: torch.Tensor, response_mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift head j of target-aligned values (H, B, T) left by j, for j < k.

    Returns (values (K, B, T), ok (K, B, T)): values[j, b, t] is head j's entry for token t + j;
    ok[j, b, t] says that entry exists: the head predicts it, and both o_t and o_{t+j} are
    response tokens.
    """
    if head_values.shape[0] < k:
        raise ValueError(
            f"MPO k={k} needs {k} heads (main + {k - 1} MTP) but got {head_values.shape[0]}"
        )
    t_len = head_values.shape[-1]
    vals, oks = [], []
    for j in range(k):  # over heads (K ≤ 5), not tokens
        ok_j = head_valid[j] & response_mask  # (B, T) target-aligned
        if j >= t_len:
            vals.append(torch.zeros_like(head_values[j]))
            oks.append(torch.zeros_like(ok_j))
            continue
        vals.append(F.pad(head_values[j, :, j:], (0, j)))  # (B, T) position-aligned
        oks.append(F.pad(ok_j[:, j:], (0, j), value=False))
    ok = torch.stack(oks)  # (K, B, T)
    # a block exists only where the main head's token o_t is itself a response token
    return torch.stack(vals), ok & ok[:1]


def renormalised_weights(w: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Per-position weights (K, B, T): w_k over the heads available there, summing to 1.

    Positions where no head is available (not a response token) get all-zero weights.
    """
    wk = w.view(-1, 1, 1).to(ok.device) * ok.to(w.dtype)  # (K, B, T)
    total = wk.sum(0, keepdim=True)  # (1, B, T)
    return torch.where(total > 0, wk / total.clamp(min=torch.finfo(w.dtype).tiny), wk)


def block_log_ratio(
    cur: torch.Tensor,
    old: torch.Tensor,
    ok: torch.Tensor,
    w: torch.Tensor,
    form: str = "logsum",
) -> torch.Tensor:
    """Block log-ratio (B, T) from position-aligned head log-probs `cur`, `old` (K, B, T).

    `logsum` (Eq. 9): Σ_k w̃_k,t ℓ⁽ᵏ⁾_t with renormalised w̃. `product` (Eq. 8): Σ_k ℓ⁽ᵏ⁾_t over
    the available heads.
    """
    if not (cur.shape == old.shape == ok.shape):
        raise ValueError(f"shapes differ: cur {tuple(cur.shape)}, old {tuple(old.shape)}, "
                         f"ok {tuple(ok.shape)}")
    ell = torch.where(ok, cur - old, torch.zeros_like(cur))  # (K, B, T)
    match form:
        case "logsum":
            return (renormalised_weights(w, ok) * ell).sum(0)
        case "product":
            return ell.sum(0)
        case _:
            raise ValueError(f"unknown MPO form {form!r}; expected 'logsum' or 'product'")


def scale_grad(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same value as x, gradient multiplied by `scale` (broadcast): s·x + (1 − s)·sg(x).

    Used by `mpo.grad='occ'` to scale head k's term by OCC's λ_k.
    """
    return scale * x + (1.0 - scale) * x.detach()
