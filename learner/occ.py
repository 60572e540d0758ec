"""OCC: the coefficient of the MTP loss in joint MTP-RL training (Optimal Coefficient
Calibration, OCC paper §3.4, Eq. 13), and the regimes it is compared with (§3.2).

Joint loss:  L = L_RL(main) + Σ_k λ_k · L_MTP,k

- `detach`: L_MTP,k = cross-entropy −log π⁽ᵏ⁾(o_t) on the sampled response tokens, computed from
  *detached* backbone hidden states and token embeddings (the model's `mtp_backbone_grad=False`),
  λ = `occ.fixed_lambda`: the heads follow the policy, the backbone's decoder layers and embedding
  lookup get no MTP gradient. The shared LM head stays attached (`mtp_lm_head_grad=True`), as in
  the authors' veRL code (`mtp_patch.py`, `detach_encoder` detaches only the MTP layer's hidden
  state and embedding inputs; the output layer's weight gets the MTP cross-entropy's gradient).
  With tied embeddings (SmolLM2) that weight is the embedding matrix, so it moves under `detach`
  too — through its output-layer role only, as Megatron's shared embedding/output weight does in
  the authors' code. So `detach` and `occ` do the same arithmetic; they differ in which loss
  the MTP heads optimise and whether its gradient continues into the trunk.
- `ce`: the same cross-entropy with gradient into the backbone, λ = `occ.fixed_lambda` (0.1).
- `policy`: L_MTP,k = the RL surrogate with head k's log-prob of the token in place of the main
  head's, the ratio taken against the main head's *old* log-prob (as in the authors' code), and
  the same advantages; λ = `occ.fixed_lambda` (0.1).
- `occ`: the policy loss with λ_k chosen each micro-batch under no_grad from log-prob proxies
  of the gradients (§3.4):

      δ_RL,t   = log π_θ(o_t)     − log π_old(o_t)          (main head)
      δ_MTP,k,t = log π_θ⁽ᵏ⁾(o_t) − log π_old(o_t)          (head k, same token)
      ĉ_k = mean_t δ_RL,t δ_MTP,k,t,   v̂²_k = mean_t δ_MTP,k,t²       over masked response tokens
      paper (Eq. 13):  λ_k = λ₊ · ĉ_k / (v̂²_k + ε)         signed, not clipped
      authors' code:   λ_k = (λ₊/H) · mean_t[δ_MTP δ_RL / (δ_MTP² + ε)] over the padded
                       response window (padding counts as 0).

  Either λ_k enters the loss as the authors' code applies it: as a scale of the MTP surrogate's
  *advantages*, inside the clip (`occ_mtp_surrogate`), not as a factor on the clipped loss. The two
  agree for λ ≥ 0. For λ < 0 (ĉ < 0, which the paper keeps: App. E, "OCC-NoClip") a factor on the
  loss turns PPO's pessimistic min into an unbounded max: a negative-advantage token's term
  λ·ρ⁽ᵏ⁾|A| falls without limit as the MTP head's ratio ρ⁽ᵏ⁾ = π⁽ᵏ⁾_θ/π_old grows, so the MTP
  modules and the shared LM head ran away (a tiny-model GRPO run: loss/mtp 0.16 → −26 000, v̂² 10 →
  280, grad norm 16 000). Scaled advantages keep the trust region: the λ-flipped push on ρ⁽ᵏ⁾
  stops at the clip boundary, while every unclipped token's gradient — into the MTP modules and
  the backbone alike — is still λ_k times the plain surrogate's, with ĉ's sign.

  Means rather than sums: ĉ/v̂² is the same either way; means make the logged values comparable
  across batch sizes. On the first micro-batch of an on-policy update π_θ = π_old, so δ_RL = 0 and
  λ = 0: OCC only acts from the second mini-batch or epoch on.

Log-probs here are target-aligned (`HeadLogProbs`): head k's entry at t is its log-prob of o_t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.aggregation import Normaliser, aggregate, masked_mean
from learner.config import AlgorithmConfig
from learner.objectives import TokenLoss, policy_loss


@dataclass
class OCCStats:
    """Per MTP head (H,) each, detached."""

    lam: torch.Tensor
    c_hat: torch.Tensor
    v2_hat: torch.Tensor


@torch.no_grad()
def occ_lambda_paper(
    delta_rl: torch.Tensor,
    delta_mtp: torch.Tensor,
    mask: torch.Tensor,
    lambda_plus: float = 1.0,
    eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> OCCStats:
    """OCC Eq. 13: λ_k = λ₊·ĉ_k/(v̂²_k + ε), ĉ_k = ⟨δ_RL, δ_MTP,k⟩/n_k, v̂²_k = ‖δ_MTP,k‖²/n_k.

    delta_rl (B, T); delta_mtp (H, B, T); mask (H, B, T) — head k's masked response tokens.
    ``reduce`` sums a tensor over the learner group's ranks (each holds a share of the
    micro-batch's rows), so the sums and counts, and hence λ, are the whole micro-batch's.
    """
    if delta_mtp.shape != mask.shape or delta_mtp.shape[1:] != delta_rl.shape:
        raise ValueError(
            f"OCC shapes: delta_rl {tuple(delta_rl.shape)}, delta_mtp {tuple(delta_mtp.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    m = mask.to(delta_mtp.dtype)  # (H, B, T)
    dm = torch.where(mask, delta_mtp, torch.zeros_like(delta_mtp))
    dr = torch.where(mask, delta_rl.unsqueeze(0).expand_as(delta_mtp), torch.zeros_like(dm))
    sums = torch.stack([(dr * dm).sum(dim=(1, 2)), (dm * dm).sum(dim=(1, 2)), m.sum(dim=(1, 2))])  # (3, H)
    if reduce is not None:
        sums = reduce(sums)
    dot, sq, n = sums[0], sums[1], sums[2].clamp(min=1)  # (H,) each
    c_hat, v2_hat = dot / n, sq / n
    return OCCStats(lam=lambda_plus * c_hat / (v2_hat + eps), c_hat=c_hat, v2_hat=v2_hat)


@torch.no_grad()
def occ_lambda_authors(
    delta_rl: torch.Tensor,
    delta_mtp: torch.Tensor,
    mask: torch.Tensor,
    window: torch.Tensor,
    lambda_plus: float = 1.0,
    eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> OCCStats:
    """The authors' estimator (MarkXCloud/RL-MTP, megatron_actor.py): per token, unmasked:

        λ_k = (λ₊/H) · mean_{t ∈ window} [δ_MTP,k,t δ_RL,t / (δ_MTP,k,t² + ε)]

    `window` (B, T) is the padded response window (the denominator counts its padding, whose
    terms are 0 here). ĉ and v̂² are returned as in the paper estimator, for the dashboards.
    ``reduce``: as in `occ_lambda_paper` (the window must then span the whole micro-batch's
    widest response, `response_window`'s ``width``).
    """
    h = delta_mtp.shape[0]
    dm = torch.where(mask, delta_mtp, torch.zeros_like(delta_mtp))  # (H, B, T)
    dr = torch.where(mask, delta_rl.unsqueeze(0).expand_as(dm), torch.zeros_like(dm))
    q = dm * dr / (dm * dm + eps)  # (H, B, T); 0 where masked
    sums = torch.cat([q.sum(dim=(1, 2)), window.to(dm.dtype).sum().reshape(1)])  # (H + 1,)
    if reduce is not None:
        sums = reduce(sums)
    lam = (lambda_plus / h) * sums[:h] / sums[h].clamp(min=1)
    paper = occ_lambda_paper(delta_rl, delta_mtp, mask, 1.0, eps, reduce)
    return OCCStats(lam=lam, c_hat=paper.c_hat, v2_hat=paper.v2_hat)


def response_width(response_mask: torch.Tensor) -> int:
    """The widest response of the rows (0 if none): the authors' padded response length."""
    return int(response_mask.sum(-1).max()) if response_mask.numel() else 0


def response_window(response_mask: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """(B, T) bool: from each row's first response token to the micro-batch's widest response
    end, i.e. veRL's right-padded `responses` tensor laid over our prompt+response rows.
    ``width``: that widest response when these rows are one rank's share of the micro-batch."""
    b, t = response_mask.shape
    pos = torch.arange(t, device=response_mask.device).expand(b, t)
    has = response_mask.any(-1)
    first = torch.where(response_mask, pos, torch.full_like(pos, t)).min(-1).values  # (B,)
    width = response_width(response_mask) if width is None else width
    return (pos >= first.unsqueeze(1)) & (pos < first.unsqueeze(1) + width) & has.unsqueeze(1)


def occ_mtp_surrogate(
    ell: torch.Tensor,
    adv: torch.Tensor,
    lam: torch.Tensor | float,
    mask: torch.Tensor,
    cfg: AlgorithmConfig,
    behav_weight: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    norm: Normaliser | None = None,
) -> tuple[torch.Tensor, TokenLoss]:
    """Head k's λ-weighted MTP policy loss, λ applied to the advantages inside the clip:

        L_MTP,k = agg_t −min(ρ⁽ᵏ⁾_t λ_k A_t, clip(ρ⁽ᵏ⁾_t, 1 − ε_low, 1 + ε_high) λ_k A_t),
        ρ⁽ᵏ⁾_t = π⁽ᵏ⁾_θ(o_t) / π_old(o_t)                 (π_old: the main head's old log-prob)

    (with `cfg.algorithm`'s surrogate and the decoupled behaviour weight, as the main head's term).
    Source: MarkXCloud/RL-MTP `verl/verl/workers/actor/megatron_actor.py`, which builds
    `scaling = mtp_loss_scaling_factor / num_mtp_heads * (gradient_dot / (gradient_norm+1e-8)).mean()`
    under no_grad and calls `policy_loss_fn(..., log_prob=aligned_mtp_log_prob_resp,
    advantages=advantages*scaling, ...)`, then `policy_loss = policy_loss + mtp_pg_loss_k`.
    Equal to λ_k · L_RL(mtp_k) (OCC Eq. 2's `λ∇J_MTP`) when λ_k ≥ 0; for λ_k < 0 it is the clipped
    surrogate of the advantage λ_k A, so its push on ρ⁽ᵏ⁾ stops at the clip boundary instead of
    growing without bound (see the module docstring). ell (B, T) = log π⁽ᵏ⁾_θ − log π_old with
    grad; adv (B, T); lam a scalar (0-d tensor or float), detached.
    """
    lam = lam.detach() if isinstance(lam, torch.Tensor) else lam
    return policy_loss(ell, adv * lam, mask, cfg, behav_weight, keep, norm)


@dataclass
class MTPLoss:
    loss: torch.Tensor  # scalar, already weighted by λ
    per_head: list[torch.Tensor]  # unweighted loss per head (λ = 1; detached scalars)
    token_losses: list[TokenLoss | None]  # per head (policy-type regimes, λ applied), clip stats


def mtp_regime_loss(
    cfg: AlgorithmConfig,
    mtp_logp: torch.Tensor,
    mtp_mask: torch.Tensor,
    old_main: torch.Tensor,
    adv: torch.Tensor,
    lam: torch.Tensor | None,
    behav_weight: torch.Tensor | None = None,
    behav_keep: torch.Tensor | None = None,
    norm: Normaliser | None = None,
) -> MTPLoss:
    """The MTP auxiliary loss Σ_k λ_k·L_MTP,k of `cfg.mtp_regime` (see module docstring).

    mtp_logp (H, B, T) target-aligned MTP log-probs (with grad); mtp_mask (H, B, T) head k's
    response tokens; old_main (B, T) main-head π_old; adv (B, T); lam (H,) the OCC λ (regime
    `occ`), ignored otherwise.
    """
    regime = cfg.mtp_regime
    h = mtp_logp.shape[0]
    total = mtp_logp.new_zeros(())
    per_head: list[torch.Tensor] = []
    tls: list[TokenLoss | None] = []
    for k in range(h):  # over heads (≤ 4), each a (B, T) vectorised loss
        mk = mtp_mask[k]
        match regime:
            case "detach" | "ce":
                lk = aggregate(-mtp_logp[k], mk, cfg.aggregation, norm)
                total = total + cfg.occ.fixed_lambda * lk
                tls.append(None)
            case "policy" | "occ":
                coef = cfg.occ.fixed_lambda if regime == "policy" else lam[k]
                keep = mk if behav_keep is None else (behav_keep & mk)
                ell = mtp_logp[k] - old_main  # (B, T) ratio against the main head's old log-prob
                weighted, tl = occ_mtp_surrogate(ell, adv, coef, mk, cfg, behav_weight, keep, norm)
                total = total + weighted
                with torch.no_grad():  # the head's own surrogate (λ = 1), for the metrics
                    lk, _ = policy_loss(ell.detach(), adv, mk, cfg, behav_weight, keep, norm)
                tls.append(tl)
            case _:
                raise ValueError(f"mtp_regime {regime!r} has no MTP loss")
        per_head.append(lk.detach())
    return MTPLoss(loss=total, per_head=per_head, token_losses=tls)


def mtp_backbone_grad(regime: str) -> bool:
    """Whether the regime's MTP gradient reaches the backbone trunk — decoder layers and embedding
    lookup (the model's `mtp_backbone_grad` flag)."""
    return regime in ("ce", "policy", "occ")


def mtp_lm_head_grad(regime: str) -> bool:
    """Whether the regime's MTP gradient reaches the shared LM head weight (the model's
    `mtp_lm_head_grad` flag): for every regime with an MTP loss, `detach` included (the authors'
    semantics, see the module docstring); not for `none`."""
    return regime in ("detach", "ce", "policy", "occ")


__all__ = [
    "OCCStats",
    "occ_lambda_paper",
    "occ_lambda_authors",
    "response_window",
    "occ_mtp_surrogate",
    "mtp_regime_loss",
    "mtp_backbone_grad",
    "mtp_lm_head_grad",
    "masked_mean",
]
