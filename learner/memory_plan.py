"""Memory arithmetic of a run: parameter counts, a learner rank's bytes, an engine's bytes.

Pure functions of a model's shape (`ModelShape`, read from a ``config.json``) and a few sizes; the
run-level planner (`services.plan`, `mtprl plan SPEC`) maps a run spec and the cluster onto them.
Every function's docstring gives its formula. Sizes are bytes unless a name says otherwise.

What is covered: the policy's parameters, gradients and AdamW state under FSDP2 full sharding
(docs/scale.md), the unsharded compute copy of the largest FSDP unit, the activations a Qwen2
decoder layer keeps for backward (with and without activation checkpointing), the logits of a
micro-batch, the KL reference model; an engine's weights, KV cache and MTP drafter.
What is not: allocator fragmentation and NCCL buffers beyond a fixed per-process reserve
(`RUNTIME_RESERVE_GIB`), the host memory of a checkpoint gather on rank 0, vLLM's CUDA graphs and
sampler workspace beyond that reserve, and the short-lived tensors of the optimiser step.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

GIB = 1 << 30

#: Allowance per GPU process for the CUDA context, the caching allocator's slack, NCCL and (for
#: vLLM) CUDA graphs and the sampler's workspace; not derived, a round number on the safe side of
#: what a CUDA context plus a few hundred MB of workspace take.
RUNTIME_RESERVE_GIB = 2.0


class ModelShape(BaseModel):
    """The sizes of a Qwen2-layout policy with MiMo MTP modules (what the counts need)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(..., gt=0)
    hidden_size: int = Field(..., gt=0)
    intermediate_size: int = Field(..., gt=0)
    num_hidden_layers: int = Field(..., gt=0)
    num_attention_heads: int = Field(..., gt=0)
    num_key_value_heads: int = Field(..., gt=0)
    head_dim: int = Field(..., gt=0)
    tie_word_embeddings: bool = Field(..., description="The LM head is the embedding matrix.")
    attention_bias: bool = Field(True, description="q/k/v projections carry biases (Qwen2 always does).")
    num_mtp: int = Field(0, ge=0, description="MTP modules (num_nextn_predict_layers).")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        """From a Hugging Face ``config.json`` dict (Qwen2/MiMo fields); ``head_dim`` defaults to
        hidden/heads and ``num_key_value_heads`` to the heads, as transformers does."""
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config has no {', '.join(missing)}: not a Qwen2/MiMo config.json")
        heads = int(cfg["num_attention_heads"])
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", True)),
            num_mtp=int(cfg.get("num_nextn_predict_layers", 0) or 0),
        )

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


# ---- the models the planner knows without a config.json --------------------------------------------
#: Real config.json values (the fields the counts read), for runs whose model is not on this machine.
#: MiMo-7B-RL: XiaomiMiMo/MiMo-7B-RL (Qwen2 + 1 MTP module; 36 layers, hidden 4096, 32 heads, 8 KV
#: heads, head_dim 128, intermediate 11008, vocab 151680, rope_theta 640000, untied head, q/k/v
#: biases), as xLLM's MiMo loader tests and public model cards give them.
#: DeepSeek-R1-Distill-Qwen-1.5B: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (28 layers, hidden 1536,
#: 12 heads, 2 KV heads, intermediate 8960, vocab 151936, untied head); no MTP modules of its own.
#: SmolLM2-135M-Instruct: HuggingFaceTB/SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads, 3 KV
#: heads, intermediate 1536, vocab 49152, tied head: 134.5M parameters, DESIGN.md), as
#: `learner.convert` imports it (Qwen2 layout with zero q/k/v biases).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "MiMo-7B-RL": {
        "model_type": "mimo", "vocab_size": 151680, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": False, "attention_bias": True, "max_position_embeddings": 32768,
        "rope_theta": 640000, "num_nextn_predict_layers": 1,
    },
    "DeepSeek-R1-Distill-Qwen-1.5B": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "head_dim": 128,
        "tie_word_embeddings": False, "attention_bias": True, "max_position_embeddings": 131072,
        "rope_theta": 10000, "num_nextn_predict_layers": 0,
    },
    "SmolLM2-135M-Instruct": {
        "model_type": "qwen2", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "tie_word_embeddings": True, "attention_bias": True, "max_position_embeddings": 8192,
        "rope_theta": 100000, "num_nextn_predict_layers": 0,
    },
}
#: Directory names of prepared checkpoints (examples/README.md) → (known model, MTP modules added).
ALIASES: dict[str, tuple[str, int]] = {
    "mimo-7b-rl": ("MiMo-7B-RL", 1),
    "r1-distill-1.5b-mtp4": ("DeepSeek-R1-Distill-Qwen-1.5B", 4),
    "deepseek-r1-distill-qwen-1.5b": ("DeepSeek-R1-Distill-Qwen-1.5B", 0),
    "smollm2-mtp1-warm": ("SmolLM2-135M-Instruct", 1),
    "smollm2-demo-t1": ("SmolLM2-135M-Instruct", 1),
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct", 0),
}


def known_config(name: str) -> dict[str, Any] | None:
    """The built-in config of a model named ``name`` (a known name, a Hugging Face id ending in one,
    or a prepared directory's name from `ALIASES`, case-insensitive), or None."""
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for known, cfg in KNOWN_MODELS.items():
        if key == known.lower():
            return dict(cfg)
    if key in ALIASES:
        known, num_mtp = ALIASES[key]
        return {**KNOWN_MODELS[known], "num_nextn_predict_layers": num_mtp}
    return None


# ---- parameter counts ----------------------------------------------------------------------------
def layer_params(m: ModelShape) -> int:
    """One Qwen2 decoder layer: q (h·q_dim + q_dim), k and v (h·kv_dim + kv_dim each; biases when
    ``attention_bias``), o (q_dim·h), the SwiGLU MLP (3·h·I) and two RMSNorm weights (2·h)."""
    h, q, kv, inter = m.hidden_size, m.q_dim, m.kv_dim, m.intermediate_size
    bias = (q + 2 * kv) if m.attention_bias else 0
    return h * q + 2 * h * kv + bias + q * h + 3 * h * inter + 2 * h


def mtp_params(m: ModelShape) -> int:
    """One MiMo MTP module: a decoder layer, ``input_proj`` (2h → h, no bias: 2·h²) and three
    RMSNorms (token, hidden, final: 3·h). The embedding and LM head are shared with the backbone."""
    h = m.hidden_size
    return layer_params(m) + 2 * h * h + 3 * h


def root_params(m: ModelShape) -> int:
    """The FSDP root unit (`PolicyModel` outside its layers and MTP modules): the embedding (V·h),
    the LM head (V·h more when untied) and the final norm (h)."""
    emb = m.vocab_size * m.hidden_size
    return emb * (1 if m.tie_word_embeddings else 2) + m.hidden_size


def param_count(m: ModelShape) -> int:
    """All parameters: root + L·layer + num_mtp·MTP module (tied weights counted once, as
    ``sum(p.numel() for p in model.parameters())`` counts them)."""
    return root_params(m) + m.num_hidden_layers * layer_params(m) + m.num_mtp * mtp_params(m)


def largest_unit_params(m: ModelShape) -> int:
    """The largest FSDP unit (`fully_shard` per decoder layer, per MTP module, then the root)."""
    return max(root_params(m), layer_params(m), mtp_params(m) if m.num_mtp else 0)


# ---- activations ---------------------------------------------------------------------------------
def layer_activation_bytes(m: ModelShape, tokens: int, e: int) -> int:
    """Bytes one Qwen2 decoder layer keeps for backward over ``tokens`` (= micro-batch × length),
    compute-dtype element size ``e`` (2 bf16, 4 fp32):

        tokens · [ 2·(4 + e)·h      two RMSNorms: the fp32 upcast input and the normalised input
                                    before the weight (HF's Qwen2RMSNorm computes in fp32)
                 + 2·e·h            the inputs of the q/k/v and gate/up projections
                 + e·(2·q_dim + 2·kv_dim)   q, k, v after RoPE and the attention output (o_proj input)
                 + 4·e·I ]          SwiGLU: gate output (SiLU input), SiLU output, up output, product

    This is Korthikanti et al. (2022)'s per-layer count (34·s·b·h + 5·a·s²·b bytes for GPT in
    bf16) redone for Qwen2's GQA, SwiGLU and fp32 norms, without its dropout masks (Qwen2 trains
    with attention_dropout 0) and **without the 5·a·s²·b attention-score term**: the learner runs
    transformers' default ``sdpa`` attention, whose flash / memory-efficient kernels keep only
    the output and a per-row log-sum-exp, not the s×s scores."""
    h, inter = m.hidden_size, m.intermediate_size
    per_token = 2 * (4 + e) * h + 2 * e * h + e * (2 * m.q_dim + 2 * m.kv_dim) + 4 * e * inter
    return tokens * per_token


def mtp_activation_bytes(m: ModelShape, tokens: int, e: int) -> int:
    """One MTP module in the training forward: its decoder layer (`layer_activation_bytes`) plus
    the two input norms (2·(4 + e)·h), the concatenation fed to ``input_proj`` (2·e·h) and the final
    norm ((4 + e)·h), per token. MTP modules are not activation-checkpointed."""
    h = m.hidden_size
    return layer_activation_bytes(m, tokens, e) + tokens * (3 * (4 + e) * h + 2 * e * h)


def backbone_activation_bytes(m: ModelShape, tokens: int, e: int, checkpointing: bool) -> int:
    """The backbone's decoder layers: L · `layer_activation_bytes` without checkpointing; with it
    (one ``checkpoint`` per layer) each layer keeps only its input (e·h per token) and backward
    recomputes one layer at a time: L·tokens·e·h + one layer's activations."""
    layer = layer_activation_bytes(m, tokens, e)
    if not checkpointing:
        return m.num_hidden_layers * layer
    return m.num_hidden_layers * tokens * e * m.hidden_size + layer


def logits_bytes(m: ModelShape, logit_rows: int, e: int) -> int:
    """The vocabulary projection of ``logit_rows`` rows (response tokens × heads in the forward: the
    learner projects only where a log-prob is used): rows·V·(4 + 4 + e) — the fp32 logits that
    log-softmax keeps for backward, their fp32 gradient in backward, and the matmul's output in the
    compute dtype (cast to fp32, and the fp32 gradient cast back for the matmul's backward)."""
    return logit_rows * m.vocab_size * (8 + e)


def auto_micro_batch(logits_budget: int, width: int, vocab_size: int, heads: int) -> int:
    """`Learner.micro_size` with ``micro_batch_size: auto``: max(1, budget // (width · V · heads))
    samples per rank (the learner's batch is at least that large in the planner's worst case)."""
    return max(1, logits_budget // (width * vocab_size * max(heads, 1)))


# ---- a learner rank --------------------------------------------------------------------------------
class LearnerSizing(BaseModel):
    """What one learner rank's memory depends on, beyond the model."""

    model_config = ConfigDict(extra="forbid")

    ranks: int = Field(1, ge=1, description="N: FSDP2 ranks sharding parameters, grads and AdamW state.")
    compute_bytes: int = Field(4, description="Element size of the forward: 2 (bf16) or 4 (fp32).")
    micro_batch: int = Field(1, ge=1, description="Samples this rank forwards at once.")
    seq_len: int = Field(..., ge=1, description="Padded length of a sample (prompt + response).")
    response_len: int = Field(..., ge=1, description="Response tokens of a sample (where logits are taken).")
    train_heads: int = Field(1, ge=1, description="Heads in the training forward: main + MTP heads.")
    activation_checkpointing: bool = False
    kl_reference: bool = Field(False, description="A frozen reference copy of the policy (kl_coef > 0).")
    autocast: bool = Field(False, description="bf16 autocast over fp32 weights without FSDP (N = 1 on a "
                                              "GPU): autocast caches a bf16 copy of every weight in the forward.")


def learner_rank_bytes(m: ModelShape, s: LearnerSizing) -> dict[str, int]:
    """One learner rank's memory by part (bytes; the sum is what the rank needs):

    - ``weights`` 4P/N fp32 master weights, ``grads`` 4P/N, ``adam`` 8P/N (exp_avg, exp_avg_sq):
      FSDP2 full sharding of every parameter over N ranks (N = 1: the whole model);
    - ``unsharded_units`` (N > 1): 2 · largest unit · e — the all-gathered compute copy of the unit
      running plus the next one prefetched; ``reduce_buffer`` (N > 1): largest unit · 4, its
      unsharded gradient in the fp32 reduce dtype before the reduce-scatter;
    - ``autocast_cache`` (N = 1 with bf16): 2P — autocast's bf16 copies of the weights;
    - ``activations``: `backbone_activation_bytes` + (train_heads − 1) · `mtp_activation_bytes` of
      micro_batch · seq_len tokens;
    - ``logits``: `logits_bytes` of micro_batch · response_len · train_heads rows;
    - ``reference`` (kl_coef > 0): the frozen reference policy, P·e/N (sharded the same way; no
      grads, no optimiser), plus its unsharded unit (N > 1);
    - ``runtime_reserve``: `RUNTIME_RESERVE_GIB`."""
    p, n, e = param_count(m), s.ranks, s.compute_bytes
    unit = largest_unit_params(m)
    tokens = s.micro_batch * s.seq_len
    out = {
        "weights": math.ceil(4 * p / n),
        "grads": math.ceil(4 * p / n),
        "adam": math.ceil(8 * p / n),
        "unsharded_units": 2 * unit * e if n > 1 else 0,
        "reduce_buffer": 4 * unit if n > 1 else 0,
        "autocast_cache": 2 * p if s.autocast and n == 1 else 0,
        "activations": backbone_activation_bytes(m, tokens, e, s.activation_checkpointing)
        + (s.train_heads - 1) * mtp_activation_bytes(m, tokens, e),
        "logits": logits_bytes(m, s.micro_batch * s.response_len * s.train_heads, e),
        "reference": (math.ceil(p * e / n) + (unit * e if n > 1 else 0)) if s.kl_reference else 0,
        "runtime_reserve": int(RUNTIME_RESERVE_GIB * GIB),
    }
    return out


# ---- an engine -------------------------------------------------------------------------------------
def kv_bytes_per_token(m: ModelShape, e: int, draft_layers: int = 0) -> int:
    """KV cache per token: 2 (K and V) · kv_dim · e per attention layer, over the L backbone layers
    plus the drafter's ``draft_layers`` (vLLM keeps the MTP layer's KV in the same pool)."""
    return 2 * m.kv_dim * e * (m.num_hidden_layers + draft_layers)


def engine_bytes(m: ModelShape, e: int, tensor_parallel: int, kv_cache_bytes: int,
                 drafter: bool) -> dict[str, int]:
    """One engine GPU's memory (a tensor-parallel group splits weights and KV over its GPUs):

    - ``weights``: (P − num_mtp · MTP module) · e / TP — the target model in the engine dtype;
    - ``drafter``: one MTP module · e / TP when drafting (vLLM's MTP proposer shares the target's
      embedding and LM head: vllm/v1/spec_decode/llm_base_proposer.py `_maybe_share_embeddings`);
    - ``kv_cache``: ``kv_cache_bytes`` / TP (the spec's ``kv_cache_gib``, given to vLLM as
      ``kv_cache_memory_bytes``, is the engine's whole pool);
    - ``runtime_reserve``: `RUNTIME_RESERVE_GIB`."""
    target = param_count(m) - m.num_mtp * mtp_params(m)
    return {
        "weights": math.ceil(target * e / tensor_parallel),
        "drafter": math.ceil(mtp_params(m) * e / tensor_parallel) if drafter and m.num_mtp else 0,
        "kv_cache": math.ceil(kv_cache_bytes / tensor_parallel),
        "runtime_reserve": int(RUNTIME_RESERVE_GIB * GIB),
    }


def gib(x: float) -> float:
    """Bytes → GiB, rounded to 0.01."""
    return round(x / GIB, 2)
