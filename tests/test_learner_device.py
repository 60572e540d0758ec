"""The learner's device choice (`learner.device`): resolution and the CPU path run everywhere; the
same step on CUDA (fp32 equal to the CPU within rounding, MPO K=1 still PPO, bf16 close, exports on
the host) runs only where a GPU is (`cuda` mark: CI has none)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from learner.batch import TrainBatch
from learner.checkpoint import WEIGHTS_NAME, iter_export_tensors, load_policy, save_policy
from learner.config import AlgorithmConfig, MPOConfig
from learner.device import CPU_FP32, Placement, resolve_placement
from learner.step import Learner
from learner.tiny import make_tiny_model
from services.learner_worker import LearnerWorker

torch.set_num_threads(1)
V, P, R = 64, 5, 8  # vocab, prompt length, response length
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIGS = {  # one per gradient route: token PPO, MPO's block ratio, OCC's λ on a later mini-batch
    "ppo": dict(mtp_regime="none"),
    "mpo_k3": dict(mtp_regime="none", mpo=MPOConfig(k=3)),
    "occ": dict(mtp_regime="occ"),
}


def _model(seed=0):
    return make_tiny_model(num_mtp=4, seed=seed, vocab_size=V, hidden_size=32)


def _batch(b=8, seed=0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, P + R), generator=g)
    attn = torch.ones(b, P + R, dtype=torch.long)
    attn[1, -3:] = 0
    resp = torch.zeros(b, P + R, dtype=torch.bool)
    resp[:, P:] = True
    resp &= attn.bool()
    behav = torch.randn(b, P + R, generator=g) * 0.1 - 2.0
    return TrainBatch(ids, attn, resp, torch.rand(b, generator=g), torch.arange(b) // 4,
                      behav_logprobs=behav, policy_versions=torch.zeros(b, dtype=torch.long))


def _cfg(name: str, **kw) -> AlgorithmConfig:
    return AlgorithmConfig(lr=1e-3, mini_batches=2, micro_batch_size=3, **CONFIGS[name], **kw)


def _numbers(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


# On OCC's first mini-batch π_θ = π_old, so λ is float noise (~1e-7) whose sign depends on the
# device's rounding; it decides which side of the clip the MTP tokens fall (their clip fraction)
# and, through AdamW's g/(|g|+ε), the direction of the MTP modules' first update. Only the
# backbone's update and the other metrics are comparable across devices there.
_DEVICE_NOISE = ("mtp/clip_frac/",)


# ---------------------------------------------------------------- resolution (everywhere)
def test_auto_stays_on_the_cpu_unless_a_gpu_is_assigned_and_present(monkeypatch):
    assert resolve_placement() == CPU_FP32
    assert AlgorithmConfig().placement() == CPU_FP32  # a test on a GPU box stays on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement("auto", "auto", gpu_assigned=True) == CPU_FP32


def test_auto_with_an_assigned_gpu_is_cuda_with_bf16_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    p = resolve_placement("auto", "auto", gpu_assigned=True)
    assert p == Placement(torch.device("cuda", 0), torch.bfloat16) and p.precision == "bf16"
    assert resolve_placement("cuda", "fp32").autocast_dtype is None


def test_impossible_choices_are_rejected_with_the_values(monkeypatch):
    with pytest.raises(ValidationError, match="precision='bf16' with device='cpu'"):
        AlgorithmConfig(device="cpu", precision="bf16")
    with pytest.raises(ValidationError):
        AlgorithmConfig(device="tpu")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        resolve_placement("auto", "bf16")  # auto resolved to cpu here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA"):
        resolve_placement("cuda")


def test_batch_to_moves_every_tensor_and_keeps_absent_ones_absent():
    b = _batch()
    moved = b.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.behav_logprobs.device.type == "meta"
    assert moved.ref_logprobs is None and moved.advantages is None
    assert b.to("cpu").input_ids is b.input_ids  # already there: no copy


# ---------------------------------------------------------------- the CPU path (everywhere)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_explicit_cpu_step_is_bit_identical_to_the_default(name):
    default, explicit = Learner(_model(), _cfg(name)), Learner(_model(), _cfg(name, device="cpu",
                                                                              precision="fp32"))
    assert explicit.placement == default.placement == CPU_FP32
    m_default, m_explicit = default.step(_batch()), explicit.step(_batch())
    assert _numbers(m_default) == _numbers(m_explicit)
    assert all(torch.equal(x, y) for x, y in zip(default.model.parameters(), explicit.model.parameters()))


def test_worker_on_the_cpu_steps_saves_and_restores(tiny_ckpt, tmp_path):
    w = LearnerWorker(str(tiny_ckpt), {"mtp_regime": "occ", "mini_batches": 2, "device": "auto"})
    assert w.learner.device.type == "cpu"  # auto, and no GPU assigned
    m = w.step(_batch())  # V < the tiny tokenizer's vocabulary
    assert all(isinstance(v, float) for v in m.values()) and m["optim/steps"] == 2.0
    w.save(str(tmp_path / "ck"))
    assert w.restore(str(tmp_path / "ck")) == 1


def test_worker_with_a_kl_penalty_uses_its_starting_model_as_the_reference(tiny_ckpt):
    """kl_coef > 0: `step` fills the batch's ref_logprobs from a frozen copy of the starting model
    (the run controller sends none), so the run reports policy/kl_ref instead of failing."""
    w = LearnerWorker(str(tiny_ckpt), {"mtp_regime": "none", "mini_batches": 1, "lr": 1e-2,
                                       "advantage": {"kl_coef": 0.1}})
    b = _batch()
    resp = b.response_mask
    ref0 = w.ref_logprobs(b)
    assert ref0.shape == b.input_ids.shape and ref0.device.type == "cpu"
    old, _ = w.learner.old_logprobs(b)  # π_θ before any update is the reference
    assert torch.allclose(ref0[resp], old[0][resp], atol=1e-5)
    first = w.step(_batch())
    assert "policy/kl_ref" in first and "loss/kl" in first
    assert abs(first["policy/kl_ref"]) < 1e-6  # measured before the step's only update
    later = w.step(_batch(seed=1))
    assert later["policy/kl_ref"] > 1e-4  # the update moved the policy away from the reference
    assert torch.equal(w.ref_logprobs(b), ref0)  # the reference itself stays frozen
    w.restore(None)  # a rollback to the start: the reference is still the starting model
    assert torch.equal(w.ref_logprobs(b), ref0)
    old, _ = w.learner.old_logprobs(b)
    assert torch.allclose(ref0[resp], old[0][resp], atol=1e-5)

# ---------------------------------------------------------------- on a GPU (skipped without one)
@cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_fp32_step_matches_the_cpu_step(name):
    cpu, gpu = Learner(_model(), _cfg(name)), Learner(_model(), _cfg(name, device="cuda",
                                                                       precision="fp32"))
    assert next(gpu.model.parameters()).is_cuda
    before = [p.detach().clone() for p in cpu.model.parameters()]
    m_cpu, m_gpu = _numbers(cpu.step(_batch())), _numbers(gpu.step(_batch()))
    assert m_cpu.keys() == m_gpu.keys()
    for k in m_cpu:
        if name == "occ" and k.startswith(_DEVICE_NOISE):
            continue
        assert math.isclose(m_cpu[k], m_gpu[k], rel_tol=1e-3, abs_tol=1e-5), (k, m_cpu[k], m_gpu[k])
    n = sum(1 for _ in cpu.model.backbone.parameters()) if name == "occ" else len(before)
    d_cpu = torch.cat([(p.detach() - b).flatten() for p, b in zip(cpu.model.parameters(), before[:n])])
    d_gpu = torch.cat([(p.detach().cpu() - b).flatten()
                       for p, b in zip(gpu.model.parameters(), before[:n])])
    assert (d_gpu - d_cpu).norm() <= 1e-2 * d_cpu.norm()  # the same update, to rounding


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mpo_k1_equals_ppo_on_cuda(precision):
    kw = dict(lr=1e-2, mtp_regime="none", device="cuda", precision=precision)
    ppo = Learner(_model(), AlgorithmConfig(**kw))
    k1 = Learner(_model(), AlgorithmConfig(**kw, mpo=MPOConfig(k=1)))
    m_ppo, m_k1 = _numbers(ppo.step(_batch())), _numbers(k1.step(_batch()))
    for k in ("loss/total", "loss/policy", "policy/entropy", "ratio/token_mean"):
        assert math.isclose(m_ppo[k], m_k1[k], rel_tol=1e-5, abs_tol=1e-6), k
    for a, b in zip(ppo.model.parameters(), k1.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@cuda
def test_bf16_autocast_step_tracks_the_fp32_step():
    fp32 = Learner(_model(), _cfg("occ", device="cuda", precision="fp32"))
    bf16 = Learner(_model(), _cfg("occ", device="cuda", precision="bf16"))
    m32, m16 = fp32.step(_batch()), bf16.step(_batch())
    assert next(bf16.model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert all(math.isfinite(v) for v in m16.values())
    assert math.isclose(m32["policy/entropy"], m16["policy/entropy"], rel_tol=2e-2)
    assert math.isclose(m32["ratio/token_mean"], m16["ratio/token_mean"], abs_tol=2e-2)


@cuda
def test_exports_and_old_logprobs_of_a_cuda_policy_are_host_tensors(tmp_path):
    lrn = Learner(_model(), _cfg("occ", device="cuda"))
    lrn.step(_batch())
    old, ent = lrn.old_logprobs(_batch())
    assert old.device.type == ent.device.type == "cpu"
    exported = list(iter_export_tensors(lrn.model))
    assert all(t.device.type == "cpu" for _, t in exported)
    save_policy(lrn.model, tmp_path / "p")
    on_disk = load_file(str(tmp_path / "p" / WEIGHTS_NAME))
    for name, t in exported:
        assert torch.equal(on_disk[name], t), name
    reloaded = load_policy(tmp_path / "p")
    for a, b in zip(reloaded.parameters(), lrn.model.parameters()):
        assert torch.equal(a, b.detach().cpu())


@cuda
def test_worker_given_a_gpu_trains_there_and_round_trips_a_checkpoint(tiny_ckpt, tmp_path):
    w = LearnerWorker(str(tiny_ckpt), {"mtp_regime": "occ", "mini_batches": 2}, gpus=1)
    assert w.learner.device.type == "cuda" and w.learner.placement.precision == "bf16"
    m = w.step(_batch())  # V < the tiny tokenizer's vocabulary
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    w.save(str(tmp_path / "ck"))
    trained = [p.detach().cpu().clone() for p in w.model.parameters()]
    cpu = LearnerWorker(str(tiny_ckpt), {"mtp_regime": "occ", "mini_batches": 2, "device": "cpu"})
    assert cpu.restore(str(tmp_path / "ck")) == 1  # a GPU checkpoint loads on a CPU learner
    assert all(torch.equal(a, b) for a, b in zip(cpu.model.parameters(), trained))
    assert w.restore(str(tmp_path / "ck")) == 1 and next(w.model.parameters()).is_cuda
