"""Typed configuration of the learner's algorithm: objective, MPO, OCC, optimiser.

`AlgorithmConfig` is what a run spec carries under `algorithm:`; the learner builds its loss and
optimisation step from it alone. Defaults follow the papers (DAPO clip 0.2/0.28; GSPO 3e-4/4e-4;
CTPO log-space clip 0.025/0.05, t^0.5; MPO K=5, MTP share 0.2, γ=0.8; OCC λ₊=1.0, ε=1e-8; the OCC
paper's fixed λ=0.1 for the `ce`/`policy` regimes). Formulas live next to the code that computes
them (`learner/objectives.py`, `learner/mpo.py`, `learner/occ.py`); `/work/shared/DESIGN.md`
("Objectives") is the reference.

Fields left `None` are filled with the algorithm's default at construction (see each field), so a
dumped config always shows the values that ran. Cross-field rules are checked at construction and
name the offending values; rules that need the model (K against the number of MTP modules) are in
`AlgorithmConfig.check_against_model`.

    >>> cfg = AlgorithmConfig(algorithm="dapo", mpo=MPOConfig(k=5))
    >>> cfg.clip_low, cfg.clip_high, cfg.aggregation
    (0.2, 0.28, 'token-mean')
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from learner.device import DeviceChoice, Placement, PrecisionChoice, resolve_placement
from learner.mtp_distill import DistillKind, DistillTopK
from learner.shaping import OverlongCacheLength, OverlongMaxLength, check_overlong_lengths

Algorithm = Literal["ppo", "grpo", "dapo", "gspo", "ctpo", "minpro"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MTPRegime = Literal["none", "detach", "ce", "policy", "occ"]

# (clip_low, clip_high) in ratio space, per algorithm. CTPO clips in log space (see CTPOConfig);
# its ratio-space bounds are unused.
_DEFAULT_CLIP: dict[str, tuple[float, float]] = {
    "ppo": (0.2, 0.2),  # Schulman et al. 2017
    "grpo": (0.2, 0.2),  # Shao et al. 2024
    "dapo": (0.2, 0.28),  # Yu et al. 2025, "clip-higher"
    "gspo": (3e-4, 4e-4),  # Zheng et al. 2025, sequence-level ratio is near 1
    "ctpo": (0.2, 0.2),  # unused: CTPO clips log-ratios, see CTPOConfig
    "minpro": (0.2, 0.2),  # MinPRO weights the PPO term; PPO's clip
}
_DEFAULT_AGG: dict[str, str] = {
    "ppo": "token-mean",
    "grpo": "token-mean",
    "dapo": "token-mean",  # DAPO's token-level loss over the whole group
    "gspo": "seq-mean-token-mean",  # GSPO: per-sequence objective
    "ctpo": "token-mean",
    "minpro": "token-mean",
}


class _Strict(BaseModel):
    # No inf/NaN: no coefficient or bound here means anything at either, and a run spec holding one
    # could not be stored or answered as JSON (the control plane's 422 names the field instead).
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


class AdvantageConfig(_Strict):
    """Group-relative advantages (GRPO), one value per sample broadcast over its tokens."""

    normalize_std: bool = Field(
        True,
        description="Divide by the group's reward std: A_i = (R_i − mean_G R)/(std_G R + eps) "
        "(GRPO, Shao et al. 2024). False = Dr. GRPO (Liu et al. 2025): A_i = R_i − mean_G R, which "
        "removes the bias towards low-variance (too easy / too hard) groups; pair it with "
        "`aggregation='seq-mean-token-sum-norm'` for Dr. GRPO's length-unbiased loss.",
    )
    eps: float = Field(1e-6, gt=0, description="Added to the group std before dividing.")
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="β of a KL penalty to a reference policy, added to the loss with the k3 "
        "estimator (Schulman 2020; GRPO Eq. 4): exp(ref−logp) − (ref−logp) − 1 per token. 0 "
        "disables it (DAPO/Dr. GRPO drop it); > 0 needs `ref_logprobs` in the batch.",
    )


class DAPOConfig(_Strict):
    """DAPO's data-side tricks (Yu et al. 2025, §3.2 dynamic sampling, §3.4 overlong shaping)."""

    dynamic_sampling: bool | None = Field(
        None,
        description="Drop groups whose rewards are all equal (their advantages are all 0: no "
        "gradient, only a diluted denominator). Dropped groups are counted in "
        "`batch/groups_dropped_constant`. None = on for `dapo`, off otherwise.",
    )
    # Bounds from learner.shaping, shared with the math grader's `reward.config.MathConfig.overlong`.
    overlong_max_len: OverlongMaxLength | None = Field(
        None,
        description="L_max of the soft overlong penalty (normally the generation's max new "
        "tokens). None disables the penalty. DAPO used 20480.",
    )
    overlong_cache_len: OverlongCacheLength = Field(
        4096,
        description="L_cache (< overlong_max_len): responses longer than L_max − L_cache get a linear "
        "penalty ((L_max − L_cache) − |y|)/L_cache, reaching −1 at L_max; beyond L_max the penalty is −1.",
    )
    overlong_penalty_factor: float = Field(
        1.0, ge=0, description="Scales the overlong penalty before it is added to the reward."
    )

    @model_validator(mode="after")
    def _overlong_bounds(self) -> DAPOConfig:
        if self.overlong_max_len is not None:
            check_overlong_lengths(self.overlong_max_len, self.overlong_cache_len,
                                   max_name="dapo.overlong_max_len", cache_name="dapo.overlong_cache_len")
        return self


class CTPOConfig(_Strict):
    """CTPO's cumulative-token ratio and position-adaptive log-space clip (horizon-llm/CTPO)."""

    log_clip_low: float = Field(
        0.025, gt=0, description="a: the lower log-space bound at position t is −a·t^p."
    )
    log_clip_high: float = Field(
        0.05, gt=0, description="b: the upper log-space bound at position t is b·t^p."
    )
    log_clip_c: float = Field(
        0.05,
        gt=0,
        description="Dual clip for A<0: the loss is capped at −A·exp(c·t^p) (CTPO reference code).",
    )
    power: float = Field(
        0.5,
        description="p: bound growth with position; 0.5 because Var(Σℓ) grows ∝ t. 0 = uniform clip.",
    )
    token_log_ratio_clamp: float = Field(
        20.0, gt=0, description="Each token's ℓ_t is clamped to ±this before summing."
    )
    max_log_ratio: float = Field(10.0, gt=0, description="Upper clamp of the cumulative L_t.")


class DecoupledConfig(_Strict):
    """Decoupled PPO for stale samples (AReaL, Fu et al. 2025, Eq. 5)."""

    enabled: bool = Field(
        True,
        description="Clip against π_prox (= π_old, recomputed by the learner) and weight each token "
        "by w_t = π_prox/π_behav (vLLM's log-probs). Needs `behav_logprobs` in the batch; a batch "
        "without them falls back to plain PPO (w=1). With π_prox = π_behav this is exactly PPO.",
    )
    behav_weight_cap: float | None = Field(
        5.0,
        gt=1.0,
        description="Tokens with w_t above this cap are masked out of the loss (AReaL's "
        "`behav_imp_weight_cap`); counted in `ratio/behav_capped_frac`. None: no cap.",
    )


class MPOConfig(_Strict):
    """Multi-token block ratio (MPO, Xu et al., Eq. 8–11). See `learner/mpo.py`."""

    k: int = Field(
        5,
        ge=1,
        le=5,
        description="Block size K: the main head plus K−1 MTP heads (needs K−1 ≤ the model's MTP "
        "modules). K=1 is exactly token-level PPO. The paper's best is K=5 on GSM8K.",
    )
    mtp_share: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="s = Σ_{k≥1} w_k, the total weight of MTP heads in the log-ratio (Eq. 10). "
        "Paper: best 0.1–0.2, keep < 0.3. 0 is exactly token-level PPO.",
    )
    decay: float = Field(
        0.8, gt=0.0, le=1.0, description="γ: w_k = w_1·γ^{k−1} for k ≥ 1 (Eq. 10). Paper: 0.8."
    )
    form: Literal["logsum", "product"] = Field(
        "logsum",
        description="`logsum`: log r̃ = Σ_k w_k ℓ⁽ᵏ⁾ (Eq. 9), the paper's method, low variance. "
        "`product`: r = Π_k exp(ℓ⁽ᵏ⁾) (Eq. 8), the naive block ratio; high variance, for study only.",
    )
    grad: Literal["detach", "full", "occ"] | None = Field(
        None,
        description="Where the MTP terms' gradient goes. `detach`: into the MTP modules only, the "
        "backbone sees only the main head's term (MPO App. A; needs mtp_regime none|detach; with "
        "mtp_regime='detach' the shared LM head is attached for that regime's CE, so the MPO "
        "terms reach the head too, but never the decoder layers or embedding lookup). "
        "`full`: also into the backbone (study setting; needs a backbone-gradient regime: "
        "ce|policy|occ). `occ`: into the backbone too, with head k's term scaled by OCC's λ_k "
        "(value unchanged, gradient ×λ_k; needs mtp_regime='occ'). None = match mtp_regime "
        "(detach for none/detach, occ for occ, full for ce/policy).",
    )


class OCCConfig(_Strict):
    """Coefficient of the MTP loss in joint MTP-RL training (OCC, Eq. 13). See `learner/occ.py`."""

    lambda_plus: float = Field(
        1.0,
        description="λ₊, absorbs the unknown smoothness prefactor (1−Lη)/(Lη) of Eq. 11. Paper "
        "default 1.0; the authors' code used 0.1 with its own estimator.",
    )
    eps: float = Field(1e-8, gt=0, description="ε in λ = λ₊·ĉ/(v̂² + ε).")
    estimator: Literal["paper", "authors_code"] = Field(
        "paper",
        description="`paper` (Eq. 13): λ = λ₊·⟨δ_RL, δ_MTP⟩/(‖δ_MTP‖² + ε) over the micro-batch's "
        "masked response tokens, signed. `authors_code` (MarkXCloud/RL-MTP megatron_actor.py): "
        "λ = (λ₊/H)·mean_t[δ_MTP,t·δ_RL,t/(δ_MTP,t² + ε)] per token over the padded response "
        "window (padding counts as 0), H = number of MTP heads; the per-token ratio is bounded, "
        "so λ is smaller and smoother.",
    )
    fixed_lambda: float = Field(
        0.1,
        description="λ of the `ce` and `policy` regimes (OCC paper §4.1: 0.1), and the weight of "
        "the `detach` regime's cross-entropy on the MTP modules.",
    )


#: top_k of `topk_ce` when none is given (SkyRL-style soft CE over the teacher's head of the
#: distribution: at T = 1 a small model's top 16 tokens carry most of its mass).
DEFAULT_DISTILL_TOP_K = 16
#: Head-only distillation steps per micro-batch and update, at most.
MAX_DISTILL_HEAD_STEPS = 32
#: Earlier batches the head steps revisit, at most (each costs a backbone pass per micro-batch).
MAX_DISTILL_REPLAY = 16


class MTPDistillConfig(_Strict):
    """Head distillation (`learner/mtp_distill.py`): an MTP loss term, next to any `mtp_regime`,
    that trains MTP head k towards the main head's *detached* distribution at the target it drafts
    for, with gradient into the MTP modules only (never the backbone, the embedding or the shared
    LM head). Off by default (coef 0)."""

    kind: DistillKind = Field(
        "kl",
        description="`kl`: forward KL(p_main ‖ q_head) over the full vocabulary; its gradient is "
        "the soft cross-entropy's (q − p), mass-covering, and bounds the rejection rate by Pinsker "
        "(TV ≤ √(KL/2)). `topk_ce`: soft cross-entropy to the main head's top-`top_k` "
        "distribution, renormalised (SkyRL's decoupled MTP head training); k = V is CE(p, q). "
        "`tv`: total variation ½‖p − q‖₁ = the rejection probability of probabilistic drafting "
        "(Bebop, arXiv 2606.12370). Both distributions are tempered by `temperature`, as every "
        "learner log-prob.",
    )
    coef: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the term in the loss (Σ over distilled heads, reduced like every "
        "per-token loss by `aggregation`). 0 = off. Its gradient reaches only the MTP modules, so "
        "it does not compete with the policy loss for the backbone; AdamW's per-parameter "
        "normalisation makes the heads' step size set by `lr`, not by coef, once it dominates "
        "their gradient.",
    )
    top_k: DistillTopK | None = Field(
        None,
        description="k of `topk_ce` (1..MAX_DISTILL_TOP_K; more than the vocabulary means all of "
        f"it). None = {DEFAULT_DISTILL_TOP_K} for `topk_ce`; refused with the other kinds, which "
        "read the full distribution.",
    )

    head_steps: int = Field(
        0,
        ge=0,
        le=MAX_DISTILL_HEAD_STEPS,
        description="AdamW steps of this term alone after each update, on each micro-batch of the update's "
        "batch (one backbone pass without gradient per micro-batch serves them all): the heads then follow "
        "the policy they will draft for next (the teacher is the updated main head) without touching "
        "anything else. Why: an RL step gives the heads a few AdamW steps on a few answers, and a head that "
        "lags the sharpening policy accepts less (docs/run-loop.md). 0 = none; needs coef > 0.",
    )

    replay: int = Field(
        0,
        ge=0,
        le=MAX_DISTILL_REPLAY,
        description="Earlier update batches the head steps also run on (the last `replay` ones, oldest first, "
        "then the current one), each under the current policy: the teacher is the updated main head "
        "recomputed on their tokens, so the heads see more of the policy's answers per update without "
        "drafting for a stale teacher. Why: during RL a head sees one batch of answers per update, and a "
        "head warmed up offline on 30× more answers of a fixed policy accepts far more (docs/run-loop.md). "
        "Costs a backbone pass per micro-batch per replayed batch; kept in the learner's checkpoint "
        "(trainer.pt), so a resumed or rolled-back run replays what an uninterrupted one would. "
        "0 = none; needs head_steps > 0.",
    )

    @model_validator(mode="after")
    def _top_k_for_topk_ce(self) -> MTPDistillConfig:
        if self.kind == "topk_ce":
            if self.top_k is None:
                self.top_k = DEFAULT_DISTILL_TOP_K
        elif self.top_k is not None:
            raise ValueError(f"top_k={self.top_k} is only read by kind='topk_ce' (got kind={self.kind!r}, "
                             "which uses the full distribution); drop top_k or use kind='topk_ce'")
        return self

    @model_validator(mode="after")
    def _head_steps_need_the_term(self) -> MTPDistillConfig:
        if self.head_steps and not self.enabled:
            raise ValueError(f"head_steps={self.head_steps} repeats the distillation term, which is off "
                             "(coef 0); set coef > 0 or head_steps 0")
        if self.replay and not self.head_steps:
            raise ValueError(f"replay={self.replay} revisits earlier batches in the head steps, which are off "
                             "(head_steps 0); set head_steps > 0 or replay 0")
        return self

    @property
    def enabled(self) -> bool:
        return self.coef > 0


class MTPConfig(_Strict):
    """MTP loss terms that combine with every `mtp_regime` (the regime itself stays
    `AlgorithmConfig.mtp_regime`)."""

    distill: MTPDistillConfig = Field(
        default_factory=MTPDistillConfig,
        description="Head distillation to the main head's detached distribution (off by default).",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="AdamW learning rate of the MTP modules (their own parameter group); None = "
        "`algorithm.lr`, one group. Why: AdamW's step is set by the learning rate, not by a loss "
        "coefficient, so at an RL learning rate (1e-6..1e-5) no coefficient lets a drafter follow the "
        "policy; warm-ups train the heads at ~1e-3. The shared LM head and embeddings stay at `lr`.",
    )


def default_mpo_grad(mtp_regime: str) -> str:
    """``mpo.grad`` when the spec leaves it out: where ``mtp_regime`` sends the MTP terms' gradient
    (the modules only for ``none``/``detach``, scaled by λ for ``occ``, everywhere otherwise)."""
    return {"none": "detach", "detach": "detach", "occ": "occ"}.get(mtp_regime, "full")


class AlgorithmConfig(_Strict):
    """Everything the learner needs to turn scored groups into updates."""

    algorithm: Algorithm = Field(
        "grpo",
        description="Base surrogate. `ppo`: token ratio, symmetric clip. `grpo`: the same loss with "
        "group-normalised advantages (the default pipeline). `dapo`: asymmetric clip-higher, "
        "token-mean, dynamic sampling, overlong shaping. `gspo`: sequence ratio exp(mean ℓ) with "
        "tiny clip, for long/MoE responses. `ctpo`: cumulative prefix ratio with position-adaptive "
        "log clip, corrects the prefix-state mismatch off-policy. `minpro`: PPO term weighted by the "
        "prefix-minimum ratio, for strongly off-policy data.",
    )
    clip_low: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="ε_low: ratios below 1 − ε_low are clipped. None = algorithm default "
        "(0.2; gspo 3e-4).",
    )
    clip_high: float | None = Field(
        None,
        gt=0.0,
        description="ε_high: ratios above 1 + ε_high are clipped. None = algorithm default "
        "(0.2; dapo 0.28; gspo 4e-4).",
    )
    dual_clip: float | None = Field(
        None,
        gt=1.0,
        description="Dual-clip c for A < 0 (Ye et al. 2020): the token loss is capped at −c·A. "
        "None disables it (PPO family). CTPO always uses its own log-space dual clip.",
    )
    aggregation: Aggregation | None = Field(
        None,
        description="How token losses become one number (see `learner/aggregation.py`). "
        "`token-mean`: Σ loss / Σ tokens over the mini-batch; long responses weigh more (DAPO). "
        "`seq-mean-token-mean`: mean over tokens, then over samples; every sample equal, long "
        "responses' tokens diluted (GRPO paper, GSPO). `seq-mean-token-sum`: Σ over each sample's "
        "tokens, mean over samples; long responses weigh more, by their length. "
        "`seq-mean-token-sum-norm`: Σ over all tokens of the mini-batch divided by a constant (its "
        "longest response), not by token or sample counts (Dr. GRPO); no length bias, scale grows "
        "with the batch. Names and scales are veRL's `loss_agg_mode`s (except L_const: veRL "
        "divides by the padded width). None = algorithm default (gspo: seq-mean-token-mean; "
        "others token-mean).",
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description="Sampling temperature T of the rollouts: the learner's policy is "
        "softmax(logits / T) for every head — π_θ, π_old, the entropy and the MTP heads' log-probs "
        "(OCC, MPO) — so ratios compare the distribution the samples were drawn from with vLLM's "
        "behaviour log-probs (returned after temperature, `logprobs_mode='processed_logprobs'`). "
        "A run spec fills it from `rollout.temperature` (one definition; `services.spec`); set it "
        "by hand only when building a Learner directly. Greedy (T = 0) rollouts have no sampling "
        "distribution and are refused for training. As veRL's actor (`logits.div_(temperature)`). "
        "The reference model of the KL term stays at T = 1.",
    )
    entropy_coef: float = Field(
        0.0, ge=0.0, description="Entropy bonus coefficient (main head); 0 = off (DAPO, OCC)."
    )
    advantage: AdvantageConfig = Field(
        default_factory=AdvantageConfig,
        description="Group-relative advantages (GRPO / Dr. GRPO) and the optional k3 KL penalty.",
    )
    dapo: DAPOConfig = Field(
        default_factory=DAPOConfig,
        description="Dynamic sampling and overlong shaping (DAPO; usable with any algorithm).",
    )
    ctpo: CTPOConfig = Field(
        default_factory=CTPOConfig, description="CTPO's clip parameters (used by algorithm='ctpo')."
    )
    decoupled: DecoupledConfig = Field(
        default_factory=DecoupledConfig,
        description="Off-policy correction of stale samples against vLLM's behaviour log-probs.",
    )
    mpo: MPOConfig | None = Field(
        None,
        description="Multi-token block ratio (MPO). None = token-level ratio. Only with "
        "ppo|grpo|dapo (the block ratio replaces their token ratio).",
    )
    mtp_regime: MTPRegime = Field(
        "occ",
        description="How the MTP modules are trained during RL (OCC paper §3.2). `none`: not "
        "trained by an auxiliary loss (MPO's own terms may still train them); cheapest. `detach`: "
        "cross-entropy on the sampled tokens with detached backbone hidden states and embeddings: "
        "heads follow the policy, decoder layers and embedding lookup untouched; the shared LM "
        "head still gets the CE gradient, as in the OCC authors' veRL code (`detach_encoder`; "
        "with tied embeddings that is the embedding matrix, via its output-layer role). `ce`: "
        "the same CE, gradient into the backbone with λ = occ.fixed_lambda (degrades RL; for comparison). `policy`: the RL "
        "surrogate on the MTP head's log-probs, fixed λ (rise-then-fall). `occ`: the policy loss "
        "with λ_k = λ₊·ĉ_k/(v̂²_k + ε) per step and head, signed (the project default: keeps the "
        "drafter on-policy without hurting the main policy). In `policy` and `occ` λ scales the MTP "
        "surrogate's advantages inside the clip, as the authors' code does, so a negative λ keeps "
        "PPO's trust region (see `learner.occ.occ_mtp_surrogate`).",
    )
    mtp_heads: int | None = Field(
        None,
        ge=1,
        le=4,
        description="How many MTP modules (1..n) the regime trains. None = all the checkpoint has. "
        "vLLM drafts with module 1; modules 2..n matter for MPO.",
    )
    occ: OCCConfig = Field(
        default_factory=OCCConfig,
        description="λ of the MTP loss: OCC's estimator (regime 'occ') and the fixed λ of "
        "'ce'/'policy'/'detach'.",
    )
    mtp: MTPConfig = Field(
        default_factory=MTPConfig,
        description="MTP loss terms usable with every regime: `mtp.distill` (head distillation). "
        "With `occ`, λₜ keeps scaling the coupled policy term that reaches the backbone while the "
        "distillation term keeps the head aligned; with `none` it is the heads' only loss (SkyRL's "
        "decoupled drafter training); with `detach` it adds to the CE on sampled tokens.",
    )

    # --- optimisation ---------------------------------------------------------------------------
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate (OCC/veRL: 1e-6).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (β1, β2).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW ε.")
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this; None = no clipping."
    )
    epochs: int = Field(1, ge=1, description="PPO epochs: passes over the batch per update.")
    mini_batches: int = Field(
        4,
        ge=1,
        description="Optimiser steps per epoch; the batch's samples are split into this many "
        "mini-batches (veRL's default ratio, 1024/256 = 4). 1 = a single fully on-policy step, "
        "where π_θ = π_old throughout, so every ratio is 1 and OCC's λ is 0.",
    )
    micro_batch_size: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Samples per forward/backward; gradients accumulate over micro-batches. Only "
        "memory and speed depend on it, not the loss (see aggregation). 'auto': as many samples as "
        "keep one micro-batch's logits (samples × padded length × vocabulary × heads in the pass) "
        "within `micro_batch_logits`: the vocabulary projection is what a micro-batch's memory "
        "grows with, and fewer, larger micro-batches cost less per token.",
    )
    micro_batch_logits: int = Field(
        1 << 27,
        ge=1,
        description="Logit elements per micro-batch with micro_batch_size 'auto' (2^27 = 512 MiB of "
        "float32 logits; backward holds a few such tensors).",
    )
    seed: int = Field(0, description="Seeds the mini-batch shuffle; the step is deterministic.")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each backbone decoder layer's activations in backward instead of "
        "keeping them (non-reentrant torch.utils.checkpoint): activation memory falls from one "
        "layer's worth per layer to about one layer's in all, for ~1/3 more compute. The loss and "
        "gradients are unchanged. What lets a long-response 7B micro-batch fit (`mtprl plan`).",
    )

    # --- execution (where the step runs; see `learner/device.py`) ---------------------------------
    device: DeviceChoice = Field(
        "auto",
        description="Where the learner trains. `cpu`: float32 on the host (bit-for-bit repeatable). "
        "`cuda`: the first visible GPU (an error if torch sees none). `auto`: cuda when CUDA is "
        "available and the learner actor was given a GPU (`resources.learner_gpus > 0`), else cpu. "
        "One device per learner rank; a run with `resources.learner_workers > 1` shards the model "
        "over its ranks with FSDP2 (docs/scale.md).",
    )
    precision: PrecisionChoice = Field(
        "auto",
        description="`fp32`: float32 throughout. `bf16`: float32 parameters, gradients and AdamW "
        "state, forwards under bf16 autocast (matrix products in bf16, log-probs and losses in "
        "float32); ~2× faster on a GPU, ratios carry bf16 rounding (~1e-3 relative on logits). "
        "Needs cuda. Pure bf16 parameters are not offered: lr·w updates (1e-6) vanish under "
        "bf16 rounding. `auto`: bf16 on cuda, fp32 on cpu.",
    )

    # --- derived (filled at construction) -------------------------------------------------------
    @model_validator(mode="after")
    def _fill_defaults_and_check(self) -> AlgorithmConfig:
        lo, hi = _DEFAULT_CLIP[self.algorithm]
        if self.clip_low is None:
            self.clip_low = lo
        if self.clip_high is None:
            self.clip_high = hi
        if self.aggregation is None:
            self.aggregation = _DEFAULT_AGG[self.algorithm]  # type: ignore[assignment]
        if self.dapo.dynamic_sampling is None:
            self.dapo.dynamic_sampling = self.algorithm == "dapo"
        if self.mpo is not None and self.mpo.grad is None:
            self.mpo.grad = default_mpo_grad(self.mtp_regime)  # type: ignore[assignment]

        if self.mpo is not None:
            if self.algorithm not in ("ppo", "grpo", "dapo"):
                raise ValueError(
                    f"mpo is set with algorithm={self.algorithm!r}: the MPO block ratio replaces a "
                    "token-level ratio, so it combines only with ppo|grpo|dapo"
                )
            grad, regime = self.mpo.grad, self.mtp_regime
            backbone_regime = regime in ("ce", "policy", "occ")
            if grad == "detach" and backbone_regime:
                raise ValueError(
                    f"mpo.grad='detach' with mtp_regime={regime!r}: one backbone forward feeds all "
                    "heads, so MTP hidden states are either detached (mtp_regime none|detach) or "
                    "not; use mpo.grad='full'|'occ' or mtp_regime='none'|'detach'"
                )
            if grad in ("full", "occ") and not backbone_regime:
                raise ValueError(
                    f"mpo.grad={grad!r} sends MTP gradients into the backbone but "
                    f"mtp_regime={regime!r} detaches the backbone states; use mtp_regime "
                    "'ce'|'policy'|'occ' or mpo.grad='detach'"
                )
            if grad == "occ" and regime != "occ":
                raise ValueError(
                    f"mpo.grad='occ' scales MTP gradients by OCC's λ, which only "
                    f"mtp_regime='occ' computes (got mtp_regime={regime!r})"
                )
        if self.mtp_regime == "occ" and self.epochs * self.mini_batches == 1:
            raise ValueError(
                f"mtp_regime='occ' with epochs={self.epochs} and mini_batches={self.mini_batches}: "
                "with one optimiser step per update π_θ = π_old, so δ_RL = 0 and OCC's λ is always "
                "0 (the MTP heads never train); use mini_batches >= 2 or epochs >= 2"
            )
        if self.precision == "bf16" and self.device == "cpu":
            raise ValueError("precision='bf16' with device='cpu': bf16 autocast is a GPU setting "
                             "here; use precision='fp32' (or 'auto') on the CPU")
        if self.algorithm == "gspo" and self.aggregation != "seq-mean-token-mean":
            # GSPO's ratio is per sequence; token-mean would re-weight sequences by length.
            raise ValueError(
                f"algorithm='gspo' needs aggregation='seq-mean-token-mean' (got "
                f"{self.aggregation!r}): GSPO's objective is a mean over sequences"
            )
        return self

    def placement(self, gpu_assigned: bool = False) -> Placement:
        """The resolved device and precision (`learner.device.resolve_placement`); `gpu_assigned`
        says whether the process was given a GPU, which `device='auto'` needs to pick cuda."""
        return resolve_placement(self.device, self.precision, gpu_assigned)

    # --- checks that need the model -------------------------------------------------------------
    @property
    def mpo_k(self) -> int:
        """Block size actually used: 1 (token-level) when MPO is off."""
        return 1 if self.mpo is None else self.mpo.k

    def trained_mtp_heads(self, num_mtp: int) -> int:
        """Number of MTP modules the regime trains for a model with `num_mtp` modules."""
        if self.mtp_regime == "none":
            return 0
        return num_mtp if self.mtp_heads is None else self.mtp_heads

    def distill_heads(self, num_mtp: int) -> int:
        """MTP heads the distillation term trains: 0 when off; else `mtp_heads` (any regime,
        `none` included) or all the model has."""
        if not self.mtp.distill.enabled:
            return 0
        return num_mtp if self.mtp_heads is None else min(self.mtp_heads, num_mtp)

    def heads_needed(self, num_mtp: int) -> int:
        """MTP heads the learner's forward must compute (the `num_mtp` argument of the model)."""
        return max(self.mpo_k - 1, self.trained_mtp_heads(num_mtp), self.distill_heads(num_mtp))

    def check_against_model(self, num_mtp: int) -> None:
        """Raise ValueError if this config needs more MTP modules than the model has."""
        if num_mtp < 0:
            raise ValueError(f"num_mtp={num_mtp} must be >= 0")
        if self.mpo is not None and self.mpo.k - 1 > num_mtp:
            raise ValueError(
                f"mpo.k={self.mpo.k} needs {self.mpo.k - 1} MTP heads but the model has "
                f"num_mtp={num_mtp}; lower mpo.k to at most {num_mtp + 1}"
            )
        if self.mtp_regime != "none" and num_mtp == 0:
            raise ValueError(
                f"mtp_regime={self.mtp_regime!r} trains MTP modules but the model has none "
                "(num_mtp=0); use mtp_regime='none'"
            )
        if self.mtp_heads is not None and self.mtp_regime != "none" and self.mtp_heads > num_mtp:
            raise ValueError(
                f"mtp_heads={self.mtp_heads} is more than the model's num_mtp={num_mtp}"
            )
        if self.mtp.distill.enabled and num_mtp == 0:
            raise ValueError(
                f"mtp.distill.coef={self.mtp.distill.coef} distils MTP heads but the model has none "
                "(num_mtp=0); use mtp.distill.coef=0"
            )
        if self.mtp.lr is not None and num_mtp == 0:
            raise ValueError(f"mtp.lr={self.mtp.lr} is the MTP modules' learning rate but the model has none "
                             "(num_mtp=0); leave it out")
        if self.mtp.distill.enabled and self.mtp_heads is not None and self.mtp_heads > num_mtp:
            raise ValueError(
                f"mtp_heads={self.mtp_heads} (the heads mtp.distill trains) is more than the model's "
                f"num_mtp={num_mtp}"
            )
