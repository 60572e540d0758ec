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


def _token_logprobs_from_hidden(
    hidden: torch.Tensor,  # (B, T, H)
    head_weight: torch.Tensor,  # (V, H)
    targets: torch.Tensor,  # (B, T)
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = F.linear(hidden, head_weight).float()  # (B, T, V)
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (B, T)
    entropy = None
    if with_entropy:
        # A metric by default: keeping the softmax for backward costs a (B, T, V) tensor.
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            probs = torch.softmax(logits, dim=-1)
            entropy = lse - (probs * logits).sum(-1)  # (B, T)
    return logp, entropy


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
        return cls(backbone, modules.to(next(backbone.parameters()).dtype))

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
    ) -> HeadLogProbs:
        """Log-probs of ``input_ids`` under the main head and the first ``num_mtp`` MTP heads, from
        one backbone forward. ``mtp_backbone_grad=False`` detaches what the MTP modules read from
        the backbone (hidden states, embedding table, LM head), so MTP losses leave the backbone's
        gradients untouched (the "detach" regime). ``entropy_grad`` keeps the main-head entropy
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

        h = self.backbone_hidden(input_ids)  # (B, T, H)
        return self.heads_from_hidden(h, input_ids, mask, num_mtp, mtp_backbone_grad, with_entropy, entropy_grad)

    def backbone_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The backbone's last residual stream before the final norm (B, T, H): MTP module 1 reads
        it as is, the main head after the final norm. Causal attention only: with right padding,
        real positions never see padding."""
        T = input_ids.shape[1]
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        inner = self.backbone.model
        captured: list[torch.Tensor] = []
        hook = inner.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            inner(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
        finally:
            hook.remove()
        return captured[0]

    def mtp_hidden(
        self,
        h: torch.Tensor,  # (B, T, H) pre-norm, from backbone_hidden
        input_ids: torch.Tensor,  # (B, T)
        num_mtp: int,
        mtp_backbone_grad: bool = True,
    ) -> list[torch.Tensor]:
        """Each MTP module's output h⁽ᵏ⁾ₚ (B, T, H), k = 1..num_mtp, aligned by position p: the
        hidden state from which head k predicts x_{p+k+1}. Position p reads Emb(x_{p+k}); positions
        past the end are fed zeros and their outputs are meaningless (causal attention keeps them
        from leaking back)."""
        T = input_ids.shape[1]
        inner = self.backbone.model
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
    ) -> HeadLogProbs:
        """Main-head and MTP-head log-probs from precomputed backbone hidden states (the MTP
        warm-up caches ``h`` once and trains the heads over several epochs)."""
        T = input_ids.shape[1]
        head_w = self.backbone.lm_head.weight  # (V, H)
        mask = mask.bool()

        # Target token t is predicted from position t-1 by the main head.
        targets = torch.zeros_like(input_ids)
        targets[:, :-1] = input_ids[:, 1:]
        lp0, ent = _token_logprobs_from_hidden(self.backbone.model.norm(h), head_w, targets, with_entropy, entropy_grad)
        logprobs = [F.pad(lp0[:, :-1], (1, 0))]  # (B, T) aligned by target
        valid = [F.pad(mask[:, 1:] & mask[:, :-1], (1, 0), value=False)]
        entropy = F.pad(ent[:, :-1], (1, 0)) if ent is not None else None

        mtp_head_w = head_w if mtp_backbone_grad else head_w.detach()
        for k, hk in enumerate(self.mtp_hidden(h, input_ids, num_mtp, mtp_backbone_grad), start=1):
            n = max(T - k - 1, 0)  # positions whose target lies inside the sequence
            tgt = torch.zeros_like(input_ids)
            tgt[:, :n] = input_ids[:, T - n :]
            lpk, _ = _token_logprobs_from_hidden(hk, mtp_head_w, tgt)  # (B, T) at position p
            logprobs.append(F.pad(lpk[:, :n], (T - n, 0)))
            vk = torch.zeros_like(mask)
            vk[:, k + 1 :] = mask[:, k + 1 :]
            valid.append(vk)
        lp = torch.stack(logprobs)  # (H, B, T)
        vd = torch.stack(valid)  # (H, B, T)
        return HeadLogProbs(logprobs=lp.masked_fill(~vd, 0.0), valid=vd, entropy=entropy)
