"""Policy surrogates as small pure functions, chosen by one registry.

Every surrogate takes the *token log-ratio* ℓ (B, T) against π_old (π_prox), carrying the
gradient, the per-token advantage A (B, T) and the response mask (B, T), and returns token
losses (B, T) plus the detached ratio and clip indicators for diagnostics. The ratio a surrogate
clips may be built from ℓ (GSPO: sequence mean; CTPO: prefix sum; MPO passes its block
log-ratio as ℓ). Reduction to a scalar is `learner.aggregation.aggregate`, the same for all.
Decoupled PPO (staleness) wraps any surrogate: `policy_loss`.

Add an objective: write `f(log_ratio, adv, mask, cfg) -> TokenLoss` and decorate it with
`@register_surrogate("name")`; `learner.step` looks it up by `cfg.algorithm`.

Departures from the papers, stated:
- MinPRO: only the abstract is available. Assumed form: the token-t PPO clip term is multiplied
  by w_t = sg(min_{j<t} r_j), the minimum token ratio over the *strictly preceding* response
  tokens (w_1 = 1: empty prefix), replacing the cumulative prefix ratio Π_{j<t} r_j.
- CTPO follows its reference code (horizon-llm/CTPO `cum-token-cumprod-la`): ℓ clamped to ±20,
  L_t clamped above at 10, dual clip for A<0 at exp(c·t^p).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.aggregation import Normaliser, aggregate
from learner.config import AlgorithmConfig

_LOG_RATIO_CLAMP = 20.0  # exp(±20) keeps ratios finite in float32


@dataclass
class TokenLoss:
    """Token losses of one surrogate, with what the diagnostics need."""

    loss: torch.Tensor  # (B, T) carries the gradient; masked positions are arbitrary
    ratio: torch.Tensor  # (B, T) detached: the importance ratio that was clipped
    clipped: torch.Tensor  # (B, T) bool: the clipped branch is active (no gradient via ratio)


SurrogateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AlgorithmConfig], TokenLoss]
SURROGATES: dict[str, SurrogateFn] = {}


def register_surrogate(*names: str) -> Callable[[SurrogateFn], SurrogateFn]:
    def deco(fn: SurrogateFn) -> SurrogateFn:
        for n in names:
            SURROGATES[n] = fn
        return fn

    return deco


def get_surrogate(name: str) -> SurrogateFn:
    try:
        return SURROGATES[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {sorted(SURROGATES)}") from None


def clipped_surrogate(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> TokenLoss:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss per token:

        ℓ_t^CLIP = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t),   ρ_t = exp(log_ratio_t)

    Asymmetric bounds are DAPO's clip-higher (Yu et al. 2025, Eq. 10). With `dual_clip` c > 1
    (Ye et al. 2020, Eq. 5) the loss of a token with A_t < 0 is further capped at −c·A_t.
    """
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))  # (B, T)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual = (adv < 0) & (loss > pg3)
        loss = torch.where(adv < 0, torch.minimum(loss, pg3), loss)
        clipped = clipped | dual
    return TokenLoss(loss=loss, ratio=ratio.detach(), clipped=clipped.detach())


@register_surrogate("ppo", "grpo", "dapo")
def ppo_surrogate(log_ratio, adv, mask, cfg: AlgorithmConfig) -> TokenLoss:
    """PPO / GRPO / DAPO token surrogate: `clipped_surrogate` on ρ_t = π_θ(o_t)/π_old(o_t).

    GRPO (Shao et al. 2024, Eq. 3) and DAPO (Yu et al. 2025, Eq. 8) differ from PPO only in the
    advantages, clip bounds and aggregation, which come from the config.
    """
    return clipped_surrogate(log_ratio, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)


@register_surrogate("gspo")
def gspo_surrogate(log_ratio, adv, mask, cfg: AlgorithmConfig) -> TokenLoss:
    """GSPO (Zheng et al. 2025, Eq. 5–7 and the GSPO-token form, Eq. 13):

        log s_i     = (1/|y_i|) Σ_t ℓ_{i,t}                     (length-normalised sequence ratio)
        log s_{i,t} = sg(log s_i) + ℓ_{i,t} − sg(ℓ_{i,t})        (value s_i, token gradients)

    then the clipped surrogate on s_{i,t} (ε ≈ 3e-4 / 4e-4). A one-token response is token PPO.
    """
    m = mask.to(log_ratio.dtype)
    seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    log_s = seq.detach() + log_ratio - log_ratio.detach()  # (B, T)
    return clipped_surrogate(log_s, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)


@register_surrogate("ctpo")
def ctpo_surrogate(log_ratio, adv, mask, cfg: AlgorithmConfig) -> TokenLoss:
    """CTPO (cumulative token ratio, position-adaptive log-space clip; horizon-llm/CTPO):

        L_t = sg(Σ_{j≤t} clamp(ℓ_j, ±20)) + ℓ_t − sg(ℓ_t),   L_t ≤ 10
        ℓ_t^CTPO = −min(e^{L_t} A_t, e^{clip(L_t, −a·t^p, b·t^p)} A_t)
        for A_t < 0 additionally capped at −A_t·e^{c·t^p}                (dual clip)

    t is the 1-based position among the response's tokens; a = 0.025, b = 0.05, c = 0.05, p = 0.5.
    At t = 1 this is PPO's clip with bounds [e^{−a}, e^{b}] and dual clip e^{c}.
    """
    c = cfg.ctpo
    m = mask.to(log_ratio.dtype)
    lr_clamped = log_ratio.clamp(-c.token_log_ratio_clamp, c.token_log_ratio_clamp)
    cum = torch.cumsum(lr_clamped.detach() * m, dim=-1)  # (B, T) Σ_{j≤t} ℓ_j
    big_l = (cum + log_ratio - log_ratio.detach()).clamp(max=c.max_log_ratio)  # (B, T)
    t = torch.cumsum(m, dim=-1).clamp(min=1.0)  # (B, T) 1-based response position
    scale = t.pow(c.power)
    ratio = torch.exp(big_l)
    clipped_ratio = torch.exp(torch.maximum(torch.minimum(big_l, c.log_clip_high * scale),
                                            -c.log_clip_low * scale))
    pg1 = -adv * ratio
    pg2 = -adv * clipped_ratio
    loss = torch.maximum(pg1, pg2)
    pg3 = -adv * torch.exp(c.log_clip_c * scale)
    dual = (adv < 0) & (loss > pg3)
    clipped = (pg2 > pg1) | dual
    loss = torch.where(adv < 0, torch.minimum(loss, pg3), loss)
    return TokenLoss(loss=loss, ratio=ratio.detach(), clipped=clipped.detach())


def prefix_min_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w_t = min_{j<t, m_j} r_j over strictly preceding response tokens; 1 for the first. (B, T)"""
    inf = torch.full_like(log_ratio, float("inf"))
    lr = torch.where(mask, log_ratio.detach(), inf)  # (B, T)
    incl = torch.cummin(lr, dim=-1).values  # min over j ≤ t
    excl = torch.cat([inf[:, :1], incl[:, :-1]], dim=-1)  # min over j < t
    return torch.exp(excl.clamp(max=_LOG_RATIO_CLAMP).clamp(min=-_LOG_RATIO_CLAMP)).where(
        torch.isfinite(excl), torch.ones_like(excl)
    )


@register_surrogate("minpro")
def minpro_surrogate(log_ratio, adv, mask, cfg: AlgorithmConfig) -> TokenLoss:
    """MinPRO (Minimum Prefix Ratio; arXiv abstract only — assumed form, see module docstring):

        ℓ_t^MinPRO = sg(min_{j<t} r_j) · ℓ_t^CLIP
    """
    base = clipped_surrogate(log_ratio, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    w = prefix_min_ratio(log_ratio, mask)  # (B, T), no gradient
    return TokenLoss(loss=w * base.loss, ratio=base.ratio, clipped=base.clipped)


def decoupled_weights(
    prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, cap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Behaviour weight of decoupled PPO (AReaL, Fu et al. 2025, Eq. 5):

        w_t = π_prox(o_t) / π_behav(o_t),   tokens with w_t > cap leave the loss

    Returns (w (B, T), kept mask (B, T)). No gradient: both policies are fixed.
    """
    w = torch.exp((prox_logp - behav_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)).detach()
    keep = mask if cap is None else mask & (w <= cap)
    return w, keep


def policy_loss(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgorithmConfig,
    behav_weight: torch.Tensor | None = None,
    behav_keep: torch.Tensor | None = None,
    norm: Normaliser | None = None,
) -> tuple[torch.Tensor, TokenLoss]:
    """Scalar policy loss: registered surrogate × decoupled behaviour weight, aggregated.

        L = agg_t( w_t · ℓ_t^{surrogate}(ρ_t = π_θ/π_prox) )  over kept tokens

    With `behav_weight` None (or π_prox = π_behav, so w = 1) this is the plain surrogate.
    """
    if not (log_ratio.shape == adv.shape == mask.shape):
        raise ValueError(
            f"shape mismatch: log_ratio {tuple(log_ratio.shape)}, adv {tuple(adv.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    tl = get_surrogate(cfg.algorithm)(log_ratio, adv, mask, cfg)
    loss = tl.loss
    keep = mask
    if behav_weight is not None:
        loss = loss * behav_weight
        keep = mask if behav_keep is None else behav_keep
    return aggregate(loss, keep, cfg.aggregation, norm), tl
