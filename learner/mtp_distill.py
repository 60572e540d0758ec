"""Head distillation: the MTP head matches the main head's detached distribution (issue 17, item 1).

Speculative decoding accepts head 1's draft of token x_t against the main head's distribution at
the same prefix x_{<t}: with probabilistic drafting the acceptance probability is
Σ_v min(p(v), q(v)) = 1 − TV(p, q) (Leviathan et al. 2023, Thm 3.5; vLLM's rejection sampler).
So the drafter should match p, the policy itself, not the sampled text: these losses train head k
towards the *detached* main-head distribution at the position it drafts for.

Notation, for one target position t of a response and head k ≥ 1 (target-aligned as everywhere in
the learner, `learner.model.HeadLogProbs`):

    p = softmax(z_main(x_{<t}) / T)              the main head predicting x_t (teacher, detached)
    q = softmax(z_k(x_{≤t−1−k}; x_{t−k..t−1}) / T)   head k predicting x_t, teacher-forced (student)

T is the sampling temperature of the rollouts (`AlgorithmConfig.temperature`), applied as the
learner applies it to every log-prob (logits / T, `learner.model._tempered`), because vLLM drafts
and verifies against the tempered distributions. Both read the same tokens x_{<t}: the teacher is
what the target model computes when it verifies the draft.

Each loss below is a pure function of the student's tempered logits (M, V) and the teacher's
tempered log-probs (M, V), one row per (response token, head) position, returning one value per
row (M,); the caller masks and reduces them (`learner.aggregation.aggregate`). No gradient ever
reaches the teacher (it is detached here too, in case a caller forgets).

Options (`DistillKind`):

- ``kl``: KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), the *forward* KL (teacher first). Why this
  direction: its gradient in the student's logits is q − p, the cross-entropy gradient against soft
  targets, so it is the full-distribution form of the MTP cross-entropy on sampled tokens (whose
  expectation under x_t ~ p is exactly CE(p, q) = KL(p ‖ q) + H(p)); it is mass-covering, so q
  keeps probability wherever p may sample, which is what min(p, q) rewards; and Pinsker's
  inequality bounds the rejection rate by it: TV ≤ √(KL/2). The reverse KL(q ‖ p) would be
  mode-seeking: q may drop tokens p samples often. Source: Hinton et al. 2015 (distillation),
  DistillSpec (Zhou et al. 2024, §4: forward KL among the divergences studied for drafters).
- ``topk_ce``: soft cross-entropy to the teacher's top-k distribution, renormalised:
  p̃_v = p_v / Σ_{u∈top_k(p)} p_u on v ∈ top_k(p), 0 elsewhere; L = −Σ_{v∈top_k(p)} p̃_v log q_v,
  with q the student's *full-vocabulary* softmax. With k = V it is CE(p, q) = KL(p ‖ q) + H(p) (the
  same gradient as ``kl``). Source: SkyRL's decoupled MTP head training (skyrl/backends/
  skyrl_train/mtp/soft_ce.py `draft_soft_ce`: −Σ softmax(teacher) · log_softmax(student), gradient
  softmax(student) − softmax(teacher)); the top-k truncation with renormalisation is the variant the
  issue names (SkyRL's stored code is full-vocabulary; `top_k` = V reproduces it).
- ``tv``: total variation TV(p, q) = ½ Σ_v |p_v − q_v| ∈ [0, 1], i.e. one minus the acceptance
  probability of probabilistic drafting: the loss is exactly the expected rejection rate.
  Source: Bebop (arXiv 2606.12370), which trains MTP drafters with a total-variation loss.

Scope: rows are only the response positions a drafter is asked about (the caller computes logits
there only, `learner.model` ``distill_heads``); memory is one (M, V) float32 tensor per head plus
the teacher's, which the learner's micro-batch budget counts (`Learner.micro_size`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

DistillKind = Literal["kl", "topk_ce", "tv"]
DISTILL_KINDS: tuple[str, ...] = ("kl", "topk_ce", "tv")
#: The one bound of `top_k` (config, warm-up and CLI use this type). vLLM's probabilistic drafting
#: and the draft vocabularies are hundreds to thousands of tokens; beyond 4096 use ``kl`` (k = V).
MAX_DISTILL_TOP_K = 4096
DistillTopK = Annotated[int, Field(ge=1, le=MAX_DISTILL_TOP_K)]


def distill_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per row (forward KL; see the module docstring).

    student_logits (M, V) tempered, with grad; teacher_logp (M, V) tempered log-probs. → (M,)."""
    t = teacher_logp.detach().float()
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # (M, V)
    p = t.exp()
    # p·(log p − log q) with p = 0 contributing 0 (exp(−inf)·(−inf) would be NaN)
    return torch.where(p > 0, p * (t - log_q), torch.zeros_like(p)).sum(-1)  # (M,)


def distill_topk_ce(student_logits: torch.Tensor, teacher_logp: torch.Tensor, top_k: int) -> torch.Tensor:
    """−Σ_{v∈top_k(p)} p̃_v log q_v, p̃ the teacher's top-k probabilities renormalised, q the
    student's full softmax (SkyRL's soft CE restricted to the teacher's top k). k > V means V.

    student_logits (M, V) tempered, with grad; teacher_logp (M, V). → (M,)."""
    t = teacher_logp.detach().float()
    k = min(int(top_k), t.shape[-1])
    top_lp, idx = t.topk(k, dim=-1)  # (M, k)
    p_tilde = torch.softmax(top_lp, dim=-1)  # (M, k) = p_v / Σ_top p: renormalised
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, idx)  # (M, k)
    return -(p_tilde * log_q).sum(-1)  # (M,)


def distill_tv(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = ½ Σ_v |p_v − q_v| ∈ [0, 1] per row: the rejection probability of probabilistic
    drafting (Bebop, arXiv 2606.12370). student_logits (M, V), teacher_logp (M, V). → (M,)."""
    p = teacher_logp.detach().float().exp()
    q = torch.softmax(student_logits.float(), dim=-1)  # (M, V)
    return 0.5 * (p - q).abs().sum(-1)  # (M,)


def distill_token_loss(kind: str, student_logits: torch.Tensor, teacher_logp: torch.Tensor,
                       top_k: int | None = None) -> torch.Tensor:
    """The per-row loss of ``kind`` (one dispatch for the learner and the warm-up). → (M,)."""
    match kind:
        case "kl":
            return distill_kl(student_logits, teacher_logp)
        case "topk_ce":
            if top_k is None:
                raise ValueError("distill kind 'topk_ce' needs top_k")
            return distill_topk_ce(student_logits, teacher_logp, top_k)
        case "tv":
            return distill_tv(student_logits, teacher_logp)
        case _:
            raise ValueError(f"unknown distill kind {kind!r}; expected one of {', '.join(DISTILL_KINDS)}")


@torch.no_grad()
def top1_agreement(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """(M,) bool: the student's argmax equals the teacher's — a greedy drafter's acceptance."""
    return student_logits.argmax(-1) == teacher_logp.argmax(-1)


__all__ = [
    "DISTILL_KINDS",
    "DistillKind",
    "DistillTopK",
    "MAX_DISTILL_TOP_K",
    "distill_kl",
    "distill_token_loss",
    "distill_topk_ce",
    "distill_tv",
    "top1_agreement",
]
