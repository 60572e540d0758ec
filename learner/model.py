"""The policy: a Qwen2-layout backbone plus N multi-token-prediction (MTP) modules.

One backbone forward yields the log-probs of the given tokens under the main head and every MTP
head, aligned by target token (see `HeadLogProbs`). The MTP modules follow vLLM's
`vllm/model_executor/models/mimo_mtp.py` exactly, so that the learner's MTP log-probs equal the
speculative drafter's:

    h⁽ᵏ⁾ₚ = FinalNorm_k( Block_k( W_k [ HiddenNorm_k(h⁽ᵏ⁻¹⁾ₚ) ; TokenNorm_k(Emb(x_{p+k})) ] ) )
    P⁽ᵏ⁾(x_{p+k+1} | x_{≤p+k}) = softmax(LMHead(h⁽ᵏ⁾ₚ))

where h⁽⁰⁾ₚ is the backbone's last residual stream at position p *before* the final norm (vLLM's
MiMo target hands the drafter its pre-norm hidden state and applies the norm only in
``compute_logits``; the main head reads FinalNorm(h⁽⁰⁾ₚ)), the embedding is zeroed at position 0 (as
vLLM does), and Block_k is a full Qwen2 decoder layer attending causally over the same positions.
The embedding and LM head are shared with the backbone.

Gradient routes of the MTP log-probs (``token_logprobs`` flags), as in the OCC authors' veRL code
(MarkXCloud/RL-MTP ``mtp_patch.py``, ``detach_encoder``: the MTP layer's hidden-state and embedding
inputs are detached, the shared output layer is not):

- ``mtp_backbone_grad`` — into the backbone *trunk*: its decoder layers (through h⁽⁰⁾) and the
  embedding lookup (through Emb(x_{p+k})). False is the ``detach`` regime.
- ``mtp_lm_head_grad`` — into the shared LM head weight. True by default, also under detach (the
  authors' semantics: MTP cross-entropy trains the shared output layer). With tied embeddings
  (SmolLM2) the LM head *is* the embedding matrix, so it then receives the MTP loss's gradient
  through its output-layer role — exactly what Megatron's shared embedding/output weight gets in
  the authors' code — but never through the lookup. False detaches the head too (MPO App. A:
  "we do not backpropagate gradients to the backbone"; MPO's heads are per-module copies).

All heads share one LM-head matmul: the main head's and the MTP modules' hidden states are
concatenated and projected to the vocabulary once (one weight gradient in the backward, not one
per head); when the MTP rows must not reach the head weight, they take a second matmul against the
detached weight.

Scope: right-padded batches (every row is tokens then padding); left padding would shift positions
and is rejected. Packed sequences are not supported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm

MAX_MTP_LAYERS = 4


@dataclass
class HeadLogProbs:
    """Log-probs of the given tokens under the main head (index 0) and MTP heads 1..H-1.

    Aligned by target token: ``logprobs[k, b, t]`` is head k's log-prob of ``input_ids[b, t]``,
    predicted from hidden position ``t-1-k`` (head k sees the prefix up to ``t-1-k`` plus the
    teacher-forced tokens up to ``t-1``). Entries with ``t < k+1`` or on padding are 0 and invalid.
    """

    logprobs: torch.Tensor  # (H, B, T) float32
    valid: torch.Tensor  # (H, B, T) bool
    entropy: torch.Tensor | None = None  # (B, T) main-head entropy, aligned like logprobs[0]
    distill: list[DistillRows] | None = None  # per MTP head 1..n, with ``distill_heads=n``


@dataclass
class DistillRows:
    """What head distillation (`learner.mtp_distill`) reads for MTP head k, at the M_k needed
    target positions (b, t) where head k predicts x_t: its tempered logits, whose gradient reaches
    the MTP modules only (computed from detached backbone states and embeddings, against the
    detached shared LM head), and the main head's tempered log-probs at the same target (predicting
    x_t from x_{<t}, the distribution that verifies the draft), detached."""

    student_logits: torch.Tensor  # (M_k, V) float32, logits / T
    teacher_logp: torch.Tensor  # (M_k, V) float32, log_softmax(logits / T), no grad
    index: tuple[torch.Tensor, torch.Tensor]  # (rows, cols), each (M_k,): target-aligned (b, t)


class MTPModule(Qwen2DecoderLayer):
    """One MiMo MTP module: the decoder block's weights sit directly under the module (as in the
    MiMo checkpoint: ``model.mtp_layers.{i}.self_attn.*``), plus the two input norms, the 2H→H
    projection and the final norm."""

    def __init__(self, config: Qwen2Config):
        # layer_idx only names a KV-cache slot (unused: the learner runs without a cache) and must
        # index config.layer_types, so borrow the last backbone layer's.
        super().__init__(config, layer_idx=config.num_hidden_layers - 1)
        hidden = config.hidden_size
        self.token_layernorm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.hidden_layernorm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.final_layernorm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)

    def mtp_forward(
        self,
        prev_hidden: torch.Tensor,  # (B, T, H): h⁽ᵏ⁻¹⁾
        token_embeds: torch.Tensor,  # (B, T, H): Emb(x_{p+k}) at position p
        position_ids: torch.Tensor,  # (1, T)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # vLLM masks the token input at position 0 ("not needed by MTP"); match it for parity.
        at_start = (position_ids == 0).unsqueeze(-1)  # (1, T, 1)
        token_embeds = token_embeds.masked_fill(at_start, 0.0)
        x = self.input_proj(
            torch.cat([self.hidden_layernorm(prev_hidden), self.token_layernorm(token_embeds)], dim=-1)
        )  # (B, T, H)
        x = super().forward(
            x,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
        )
        return self.final_layernorm(x)  # (B, T, H)


def _head_targets(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) bool: the target positions t that head k (0 = main) predicts, target-aligned: tokens
    from t = k+1 on; the main head also needs its input position t−1 to be a token."""
    vk = torch.zeros_like(mask)
    vk[:, k + 1 :] = mask[:, k + 1 :]
    if k == 0:
        vk[:, 1:] &= mask[:, :-1]
    return vk


def _token_logprobs_from_hidden(
    hidden: torch.Tensor,  # (N, T, H): N = heads × B rows, stacked head-major
    head_weight: torch.Tensor,  # (V, H)
    targets: torch.Tensor,  # (N, T)
    entropy_rows: int = 0,
    entropy_grad: bool = False,
    keep: torch.Tensor | None = None,  # (N, T) bool: positions whose log-prob is used
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets`` (N, T) from one vocabulary projection, and the entropy (R, T) of
    the first ``entropy_rows`` rows (the main head's), or None. With ``keep`` the projection runs
    only at the kept positions (the rest come out 0): a (tokens × vocabulary) matmul and its
    log-softmax are the largest per-token cost of a small model with a large vocabulary, and in RL
    only response tokens need them (a prompt is often most of the sequence).

    ``temperature`` T: log-probs (and entropy) of softmax(logits / T), the distribution a sampler
    at temperature T draws from (vLLM divides the float32 logits by T, as here)."""
    if keep is not None:
        rows, cols = keep.nonzero(as_tuple=True)  # (M,) each
        logits = _tempered(F.linear(hidden[rows, cols], head_weight).float(), temperature)  # (M, V)
        lse = torch.logsumexp(logits, dim=-1)  # (M,)
        lp = logits.gather(-1, targets[rows, cols].unsqueeze(-1)).squeeze(-1) - lse  # (M,)
        logp = lp.new_zeros(targets.shape).index_put((rows, cols), lp)  # (N, T)
        entropy = None
        if entropy_rows:
            main = rows < entropy_rows
            ent = _entropy(logits[main], lse[main], entropy_grad)  # (R·kept,)
            entropy = ent.new_zeros((entropy_rows, targets.shape[1])).index_put((rows[main], cols[main]), ent)
        return logp, entropy
    logits = _tempered(F.linear(hidden, head_weight).float(), temperature)  # (N, T, V)
    lse = torch.logsumexp(logits, dim=-1)  # (N, T)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (N, T)
    entropy = _entropy(logits[:entropy_rows], lse[:entropy_rows], entropy_grad) if entropy_rows else None  # (R, T)
    return logp, entropy


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T; T = 1 returns the logits themselves (bit for bit today's path)."""
    if temperature == 1.0:
        return logits
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (0 is greedy: no sampling distribution), got {temperature}")
    return logits / temperature


def _entropy(logits: torch.Tensor, lse: torch.Tensor, grad: bool) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, given its logsumexp ``lse``. A metric unless
    ``grad``: keeping the softmax for backward costs a (rows × vocabulary) tensor."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


class PolicyModel(nn.Module):
    """Backbone (Hugging Face ``Qwen2ForCausalLM``) plus ``num_mtp`` MTP modules."""

    def __init__(self, backbone: Qwen2ForCausalLM, mtp: nn.ModuleList):
        super().__init__()
        if not 1 <= len(mtp) <= MAX_MTP_LAYERS:
            raise ValueError(f"a policy needs 1..{MAX_MTP_LAYERS} MTP modules, got {len(mtp)}")
        self.backbone = backbone
        self.mtp = mtp

    @property
    def config(self) -> Qwen2Config:
        return self.backbone.config

    @property
    def num_mtp(self) -> int:
        return len(self.mtp)

    @classmethod
    def from_backbone(cls, backbone: Qwen2ForCausalLM, num_mtp: int, proj_init: str = "token") -> PolicyModel:
        """Attach fresh MTP modules initialised as in MPO App. A.1: each block and its norms are deep
        copies of the backbone's last decoder layer and final norm. ``proj_init="token"`` sets the
        input projection to ``[0 | I]`` (the block first sees the next token's embedding only);
        ``"random"`` uses a small random init."""
        if not 1 <= num_mtp <= MAX_MTP_LAYERS:
            raise ValueError(f"--mtp-layers must be in 1..{MAX_MTP_LAYERS}, got {num_mtp}")
        config = backbone.config
        last = backbone.model.layers[-1]
        modules = nn.ModuleList()
        for i in range(num_mtp):
            m = MTPModule(config)
            m.load_state_dict(copy.deepcopy(last.state_dict()), strict=False)
            for norm in (m.token_layernorm, m.hidden_layernorm, m.final_layernorm):
                norm.weight.data.copy_(backbone.model.norm.weight.data)
            hidden = config.hidden_size
            with torch.no_grad():
                if proj_init == "token":
                    m.input_proj.weight.zero_()
                    m.input_proj.weight[:, hidden:].copy_(torch.eye(hidden))
                elif proj_init == "random":
                    nn.init.normal_(m.input_proj.weight, std=config.initializer_range)
                else:
                    raise ValueError(f"proj_init must be 'token' or 'random', got {proj_init!r}")
            modules.append(m)
        config.num_nextn_predict_layers = num_mtp
        ref = next(backbone.parameters())  # the new modules join the backbone's device and dtype
        return cls(backbone, modules.to(device=ref.device, dtype=ref.dtype))

    def backbone_parameters(self):
        return self.backbone.parameters()

    def mtp_parameters(self):
        return self.mtp.parameters()

    def token_logprobs(
        self,
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: torch.Tensor | None = None,  # (B, T), right-padded
        num_mtp: int | None = None,
        mtp_backbone_grad: bool = True,
        with_entropy: bool = False,
        entropy_grad: bool = False,
        mtp_lm_head_grad: bool = True,
        needed: torch.Tensor | None = None,  # (B, T) bool, target-aligned
        temperature: float = 1.0,
        distill_heads: int = 0,
    ) -> HeadLogProbs:
        """Log-probs of ``input_ids`` under the main head and the first ``num_mtp`` MTP heads, from
        one backbone forward and one shared LM-head matmul.

        ``distill_heads`` n > 0 (≤ ``num_mtp``) also returns, in ``distill``, the full-vocabulary
        inputs of head distillation for MTP heads 1..n at the ``needed`` positions (`DistillRows`,
        `_distill_rows`): a gradient-isolated path that never moves the backbone or the LM head.

        ``temperature`` T > 0: every head's log-probs (and the entropy) are those of
        softmax(logits / T), the policy a sampler at temperature T draws from — the main head's
        for vLLM's behaviour log-probs, the MTP heads' because the drafter proposes for that
        tempered target (vLLM's probabilistic drafting divides the drafter's logits by the same T).
        1 = the untempered policy.

        ``needed`` (e.g. the response mask) limits the LM-head projection to the tokens whose
        log-probs are used: every head's log-prob of ``input_ids[b, t]`` is computed where
        ``needed[b, t]`` (and is valid), and is 0 elsewhere; the main-head entropy likewise
        (entropy at t is that of the distribution predicting x_t). None = every position.

        Gradient routes of the MTP log-probs (the main head's always reaches everything):
        ``mtp_backbone_grad=False`` detaches what the MTP modules read from the backbone trunk
        (hidden states h⁽⁰⁾ and the token embeddings), so MTP losses put no gradient on the
        decoder layers, the final norm or the embedding lookup — the ``detach`` regime.
        ``mtp_lm_head_grad`` (default True, the OCC authors' semantics, also under detach) lets
        them reach the shared LM head weight; with tied embeddings that weight is the embedding
        matrix (see the module docstring). ``entropy_grad`` keeps the main-head entropy
        differentiable (for an entropy bonus); otherwise it is a metric without gradient."""
        num_mtp = self.num_mtp if num_mtp is None else num_mtp
        if not 0 <= num_mtp <= self.num_mtp:
            raise ValueError(f"asked for {num_mtp} MTP heads but the model has {self.num_mtp}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        mask = attention_mask.bool()
        # Right padding only: a row may never have a token after padding.
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded (tokens first, then padding)")

        h, embeds = self._backbone_forward(input_ids)  # (B, T, H) each
        return self.heads_from_hidden(
            h, input_ids, mask, num_mtp, mtp_backbone_grad, with_entropy, entropy_grad,
            mtp_lm_head_grad=mtp_lm_head_grad, embeds=embeds, needed=needed, temperature=temperature,
            distill_heads=distill_heads,
        )

    @torch.no_grad()
    def distill_backbone(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, Emb(x), FinalNorm(h)) without autograd, for head-only distillation steps
        (``algorithm.mtp.distill.head_steps``): the term never reaches the backbone, so one pass
        serves every step on these rows; FinalNorm(h) is the teacher's (main head's) input."""
        h, embeds = self._backbone_forward(input_ids)
        return h, embeds, self.backbone.model.norm(h)

    def distill_heads(
        self,
        h: torch.Tensor,  # (B, T, H) from distill_backbone
        embeds: torch.Tensor,  # (B, T, H)
        main_hidden: torch.Tensor,  # (B, T, H)
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: torch.Tensor,  # (B, T), right-padded
        needed: torch.Tensor,  # (B, T) bool, target-aligned
        distill_heads: int,
        temperature: float = 1.0,
    ) -> tuple[list[DistillRows], torch.Tensor]:
        """The `DistillRows` of MTP heads 1..n from a `distill_backbone` pass — the same rows
        `token_logprobs(distill_heads=n)` returns, without the log-probs of every head (which the
        term does not read: two vocabulary projections fewer a step) — and the heads' valid
        target positions (n, B, T). Only the MTP modules carry gradient."""
        if not 1 <= distill_heads <= self.num_mtp:
            raise ValueError(f"distill_heads={distill_heads} must be in 1..{self.num_mtp}")
        mask = attention_mask.bool()
        valid = torch.stack([_head_targets(mask, k) for k in range(1, distill_heads + 1)])
        students = self.mtp_hidden(h, input_ids, distill_heads, False, embeds)
        return self._distill_rows(main_hidden, students, valid[0] & needed.bool(), temperature), valid

    def _backbone_forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, Emb(x)): the last residual stream before the final norm and the embedding lookup,
        both (B, T, H). The MTP modules reuse this lookup, so with MTP gradient into the backbone
        the embedding backward (a vocabulary-sized dense gradient) runs once, not twice."""
        T = input_ids.shape[1]
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        inner = self.backbone.model
        hidden: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        hooks = [
            inner.norm.register_forward_pre_hook(lambda _m, args: hidden.append(args[0])),
            inner.embed_tokens.register_forward_hook(lambda _m, _a, out: embeds.append(out)),
        ]
        try:
            inner(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
        finally:
            for hook in hooks:
                hook.remove()
        return hidden[0], embeds[0]

    def backbone_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The backbone's last residual stream before the final norm (B, T, H): MTP module 1 reads
        it as is, the main head after the final norm. Causal attention only: with right padding,
        real positions never see padding."""
        return self._backbone_forward(input_ids)[0]

    def mtp_hidden(
        self,
        h: torch.Tensor,  # (B, T, H) pre-norm, from backbone_hidden
        input_ids: torch.Tensor,  # (B, T)
        num_mtp: int,
        mtp_backbone_grad: bool = True,
        embeds: torch.Tensor | None = None,  # (B, T, H) Emb(input_ids), if already looked up
    ) -> list[torch.Tensor]:
        """Each MTP module's output h⁽ᵏ⁾ₚ (B, T, H), k = 1..num_mtp, aligned by position p: the
        hidden state from which head k predicts x_{p+k+1}. Position p reads Emb(x_{p+k}); positions
        past the end are fed zeros and their outputs are meaningless (causal attention keeps them
        from leaking back). ``mtp_backbone_grad=False`` detaches h and the embeddings."""
        T = input_ids.shape[1]
        inner = self.backbone.model
        if embeds is None:
            embeds = inner.embed_tokens(input_ids)  # (B, T, H)
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        causal = create_causal_mask(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        pos_emb = inner.rotary_emb(h, position_ids)
        prev = h if mtp_backbone_grad else h.detach()
        tok_emb = embeds if mtp_backbone_grad else embeds.detach()
        outs = []
        for k in range(1, num_mtp + 1):
            shifted_emb = F.pad(tok_emb[:, k:], (0, 0, 0, k))  # (B, T, H)
            prev = self.mtp[k - 1].mtp_forward(prev, shifted_emb, position_ids, pos_emb, causal)
            outs.append(prev)
        return outs

    def heads_from_hidden(
        self,
        h: torch.Tensor,  # (B, T, H) pre-norm, from backbone_hidden
        input_ids: torch.Tensor,  # (B, T)
        mask: torch.Tensor,  # (B, T) bool, right-padded
        num_mtp: int,
        mtp_backbone_grad: bool = True,
        with_entropy: bool = False,
        entropy_grad: bool = False,
        mtp_lm_head_grad: bool = True,
        embeds: torch.Tensor | None = None,  # (B, T, H) the backbone's lookup, to reuse
        needed: torch.Tensor | None = None,  # (B, T) bool, target-aligned: log-probs used here
        temperature: float = 1.0,
        distill_heads: int = 0,
    ) -> HeadLogProbs:
        """Main-head and MTP-head log-probs from precomputed backbone hidden states (the MTP
        warm-up caches ``h`` once and trains the heads over several epochs). Gradient flags,
        ``needed``, ``temperature`` and ``distill_heads`` as in `token_logprobs`."""
        B, T = input_ids.shape
        if not 0 <= distill_heads <= num_mtp:
            raise ValueError(f"distill_heads={distill_heads} must be in 0..num_mtp={num_mtp}")
        head_w = self.backbone.lm_head.weight  # (V, H)
        mask = mask.bool()

        # Row block k of the stacked heads: its hidden state at position p predicts token p+k+1.
        hiddens = [self.backbone.model.norm(h)]  # main head reads the final norm
        hiddens += self.mtp_hidden(h, input_ids, num_mtp, mtp_backbone_grad, embeds)
        targets = torch.zeros(num_mtp + 1, B, T, dtype=input_ids.dtype, device=input_ids.device)
        # position p of head k is needed when its target p+k+1 is
        keep = None if needed is None else torch.zeros(num_mtp + 1, B, T, dtype=torch.bool, device=input_ids.device)
        for k in range(num_mtp + 1):  # over heads (≤ 5), never tokens
            n = max(T - k - 1, 0)  # positions whose target lies inside the sequence
            targets[k, :, :n] = input_ids[:, T - n :]
            if keep is not None:
                keep[k, :, :n] = needed[:, T - n :].bool()
        targets = targets.flatten(0, 1)  # ((K+1)·B, T)
        keep = None if keep is None else keep.flatten(0, 1)  # ((K+1)·B, T)

        # One vocabulary projection for all heads, unless the MTP rows must not reach the head
        # weight while the main rows do: then a second matmul against the detached weight.
        split = (
            num_mtp > 0 and not mtp_lm_head_grad and torch.is_grad_enabled() and head_w.requires_grad
        )
        n_ent = B if with_entropy else 0
        if split:
            lp_main, ent = _token_logprobs_from_hidden(hiddens[0], head_w, targets[:B], n_ent, entropy_grad,
                                                       None if keep is None else keep[:B], temperature)
            lp_mtp, _ = _token_logprobs_from_hidden(torch.cat(hiddens[1:]), head_w.detach(), targets[B:],
                                                    keep=None if keep is None else keep[B:],
                                                    temperature=temperature)
            lp_all = torch.cat([lp_main, lp_mtp])  # ((K+1)·B, T)
        else:
            lp_all, ent = _token_logprobs_from_hidden(torch.cat(hiddens), head_w, targets, n_ent, entropy_grad, keep,
                                                      temperature)
        lp_all = lp_all.view(num_mtp + 1, B, T)  # (K+1, B, T) at position p

        logprobs, valid = [], []
        for k in range(num_mtp + 1):  # re-align each head by target token: t = p + k + 1
            n = max(T - k - 1, 0)
            logprobs.append(F.pad(lp_all[k, :, :n], (T - n, 0)))  # (B, T)
            valid.append(_head_targets(mask, k))
        entropy = F.pad(ent[:, :-1], (1, 0)) if ent is not None else None
        lp = torch.stack(logprobs)  # (H, B, T)
        vd = torch.stack(valid)  # (H, B, T)
        distill = None
        if distill_heads:
            pos = vd[1] if needed is None else vd[1] & needed.bool()  # (B, T) head 1's targets
            # Detached MTP inputs: reuse this forward's MTP states when they already are (detach
            # regimes), else run the n modules again on detached inputs (one decoder block each),
            # so the distillation gradient stops at the MTP modules.
            students = (hiddens[1 : 1 + distill_heads] if not mtp_backbone_grad
                        else self.mtp_hidden(h, input_ids, distill_heads, mtp_backbone_grad=False, embeds=embeds))
            distill = self._distill_rows(hiddens[0], students, pos, temperature)
        return HeadLogProbs(logprobs=lp.masked_fill(~vd, 0.0), valid=vd, entropy=entropy, distill=distill)

    def _distill_rows(
        self,
        main_hidden: torch.Tensor,  # (B, T, H): FinalNorm(h⁽⁰⁾), the main head's input
        students: list[torch.Tensor],  # n × (B, T, H): h⁽ᵏ⁾ on detached backbone inputs
        pos: torch.Tensor,  # (B, T) bool: target positions t of head 1 to distill (t ≥ 2)
        temperature: float,
    ) -> list[DistillRows]:
        """`DistillRows` of heads 1..n: head k at target t reads its state at p = t−1−k, the
        teacher (the main head) its state at t−1; only the positions in ``pos`` (head k: those
        with t ≥ k+1) are projected to the vocabulary. Both use the *detached* shared LM head, so
        with tied embeddings (SmolLM2) the embedding matrix gets nothing from this term either."""
        head_w = self.backbone.lm_head.weight.detach()  # (V, H)
        rows, cols = pos.nonzero(as_tuple=True)  # (M,) each
        with torch.no_grad():
            teacher = F.log_softmax(
                _tempered(F.linear(main_hidden.detach()[rows, cols - 1], head_w).float(), temperature), dim=-1
            )  # (M, V)
        out = []
        for k, hk in enumerate(students, start=1):
            sel = cols >= k + 1  # head k has a state for target t from t = k+1 on
            r, c = rows[sel], cols[sel]  # (M_k,)
            logits = _tempered(F.linear(hk[r, c - 1 - k], head_w).float(), temperature)  # (M_k, V)
            out.append(DistillRows(logits, teacher if k == 1 else teacher[sel], (r, c)))
        return out
