"""Engine settings from the run spec reach vLLM: `rollout.engine.vllm_args` renders the `LLM(...)`
keyword arguments of the spec's engine config (pure function, no vLLM started, no GPU needed), with
each device's defaults; settings a device cannot run are refused at the spec field (the 422 of
`POST /v1/runs`), so nothing accepted fails at engine start."""

from __future__ import annotations

import pytest

from rollout.config import CPU_CHUNKED_PREFILL_BUG, DEVICE_DEFAULTS, MAX_GPU_MEMORY_UTILIZATION, EngineConfig
from rollout.engine import vllm_args
from services.spec import SKIP_FILE_CHECKS, RunSpec, component_problems

COMMON = {"model": "/models/m", "max_model_len": 1024, "seed": 0, "disable_log_stats": False,
          "logprobs_mode": "processed_logprobs",
          "speculative_config": {"method": "mtp", "num_speculative_tokens": 1, "draft_sample_method": "greedy"}}


def _spec(rollout: dict | None = None, resources: dict | None = None) -> RunSpec:
    raw = {"model": {"path": "/models/m"}, "data": {"dataset": "human_eval"},
           "rollout": {"max_model_len": 1024, "max_tokens": 256, **(rollout or {})}, "resources": resources or {}}
    return RunSpec.model_validate(raw, context={SKIP_FILE_CHECKS: True})


def test_a_cpu_spec_renders_todays_arguments():
    assert vllm_args(_spec().engine_config()) == {
        **COMMON, "dtype": "float32", "enforce_eager": True, "max_num_seqs": 64, "enable_chunked_prefill": False,
        "tensor_parallel_size": 1, "kv_cache_memory_bytes": 1 << 29}


def test_a_gpu_spec_renders_bf16_cuda_graphs_and_the_memory_fraction():
    spec = _spec(resources={"gpus_per_engine": 1, "tensor_parallel": 2})
    assert vllm_args(spec.engine_config()) == {
        **COMMON, "dtype": "bfloat16", "enforce_eager": False, "max_num_seqs": 256, "enable_chunked_prefill": True,
        "tensor_parallel_size": 2, "gpu_memory_utilization": DEVICE_DEFAULTS["cuda"]["gpu_memory_utilization"],
        "distributed_executor_backend": "mp"}
    assert spec.resources.engine_gpus == 2  # the engine's bundle and actor hold both ranks' GPUs


def test_gpu_settings_given_in_the_spec_win_over_the_defaults():
    spec = _spec(rollout={"dtype": "float32", "enforce_eager": True, "max_num_seqs": 32, "chunked_prefill": False,
                          "kv_cache_gib": 8}, resources={"gpus_per_engine": 1})
    args = vllm_args(spec.engine_config())
    assert (args["dtype"], args["enforce_eager"], args["max_num_seqs"], args["enable_chunked_prefill"]) == \
        ("float32", True, 32, False)
    # an explicit KV cache replaces the memory fraction (vLLM would ignore the fraction anyway)
    assert args["kv_cache_memory_bytes"] == 8 << 30 and "gpu_memory_utilization" not in args
    assert "distributed_executor_backend" not in args
    frac = vllm_args(_spec(rollout={"gpu_memory_utilization": 0.6}, resources={"gpus_per_engine": 1}).engine_config())
    assert frac["gpu_memory_utilization"] == 0.6 and "kv_cache_memory_bytes" not in frac


@pytest.mark.parametrize("rollout, resources, loc, words", [
    ({"chunked_prefill": True}, {}, ("rollout", "chunked_prefill"), CPU_CHUNKED_PREFILL_BUG),
    ({}, {"tensor_parallel": 2}, ("resources", "tensor_parallel"), "CPU engines run one process"),
    ({"gpu_memory_utilization": 0.5}, {}, ("rollout", "gpu_memory_utilization"), "GPU engines only"),
    ({"gpu_memory_utilization": 0.5, "kv_cache_gib": 4}, {"gpus_per_engine": 1}, ("rollout", "kv_cache_gib"),
     "not both"),
])
def test_settings_the_device_cannot_run_are_refused_at_their_field(rollout, resources, loc, words):
    problems = component_problems(_spec(rollout, resources))
    assert [p["loc"] for p in problems] == [loc], problems
    assert words in problems[0]["msg"]


def test_spec_bounds_are_the_engine_configs():
    with pytest.raises(ValueError, match="less than or equal"):
        _spec(rollout={"gpu_memory_utilization": MAX_GPU_MEMORY_UTILIZATION + 0.01}, resources={"gpus_per_engine": 1})
    with pytest.raises(ValueError, match="GPUs per tensor-parallel rank"):
        _spec(resources={"gpus_per_engine": 2})
    with pytest.raises(ValueError, match="less than or equal"):
        EngineConfig(model="m", device="cuda", gpu_memory_utilization=MAX_GPU_MEMORY_UTILIZATION + 0.01)


def test_the_resolved_config_survives_the_trip_to_the_engine_actor():
    """The controller sends the config as a dict; re-validating it must not change or refuse it."""
    for spec in (_spec(), _spec(resources={"gpus_per_engine": 1, "tensor_parallel": 4}),
                 _spec(rollout={"kv_cache_gib": 2}, resources={"gpus_per_engine": 1})):
        cfg = spec.engine_config()
        assert EngineConfig.model_validate(cfg.model_dump()) == cfg
