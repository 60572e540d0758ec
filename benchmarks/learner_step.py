"""Learner step time: PPO vs MPO (K=3, K=5) vs the MTP regimes `detach` and `occ`, side by side.

    .venv/bin/python benchmarks/learner_step.py                      # SmolLM2-135M + 4 MTP, CPU
    .venv/bin/python benchmarks/learner_step.py --tiny --repeats 3   # quick check on a tiny model
    python benchmarks/learner_step.py --device cuda --shape qwen2-1.5b --batch 16 --prompt 128 \
        --response 384                                                # a random 1.5B model on a GPU

One run, one fixed batch (seeded; B samples of prompt P + response R tokens), the same model
weights for every configuration. Each configuration is one `Learner.step` (π_old recompute +
`--mini-batches` AdamW steps, GRPO surrogate); configurations are timed round-robin (so a burst
of load from other jobs on shared cores hits them alike) and medians of wall and CPU time are
reported; with one torch thread (the default) the ratios use CPU time, which other jobs on the
same cores do not inflate. Peak memory
is measured per configuration in a fresh subprocess (Linux VmHWM after resetting it once the
model and batch are loaded).

`mpo_k5_flop_ratio` is the floor: the arithmetic of an MPO K=5 step over a PPO step, counted
analytically from the model config (see `step_flops`): MPO needs the K−1 MTP heads in the π_old
pass and the training pass (each a 2H→H projection, a decoder block and a full-vocabulary LM
head), and their backward (the MTP blocks' weight and input gradients, the LM head's input
gradient: with `mpo.grad='detach'` and no MTP regime the shared LM head weight gets no MTP
gradient). The same count gives `occ_flop_ratio` (occ over detach): 1.0, since `detach` follows the
OCC authors' code — hidden states and embeddings detached, the shared LM head not — so both
compute the head's weight gradient from every trained head; occ only adds the trunk's share of
the MTP gradient, an add into the backbone's last hidden state (the embedding lookup is shared
with the main head's, so its backward runs once either way). The last line is a JSON object.

Model: `--model DIR` (a MiMo-layout checkpoint from `mtprl model import-smollm2`). If it has fewer
than 4 MTP modules, fresh ones are attached with `PolicyModel.from_backbone` — timing does not
depend on their values. `--shape NAME` builds a random model of a known shape instead (no
checkpoint needed, e.g. on a GPU machine without the GGUF): `smollm2-135m`, or `qwen2-1.5b`
(R1-Distill-Qwen-1.5B's config, the MPO paper's model: hidden 1536, 28 layers, vocabulary 151936,
untied head), each with 4 MTP modules.

GPU (`--device cuda`, bf16 autocast by default; `--precision fp32` for float32): the model is
built on the GPU, every step is bracketed by `torch.cuda.synchronize()` (the learner also
synchronises before reading its own clocks), ratios use wall time, peak memory is
`torch.cuda.max_memory_allocated` over each configuration's steps (reset before each; the
weights, gradients and AdamW state shared by all configurations are included), and
`achieved_tflops` divides the counted FLOPs (`step_flops` × tokens) by the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner.batch import TrainBatch  # noqa: E402
from learner.config import AlgorithmConfig, MPOConfig  # noqa: E402

CONFIGS = {
    "ppo": dict(mtp_regime="none"),
    "mpo_k3": dict(mtp_regime="none", mpo=MPOConfig(k=3)),
    "mpo_k5": dict(mtp_regime="none", mpo=MPOConfig(k=5)),
    "detach": dict(mtp_regime="detach"),
    "occ": dict(mtp_regime="occ"),
    # the OCC paper's setting: one trained MTP module (the drafter vLLM uses)
    "detach_h1": dict(mtp_regime="detach", mtp_heads=1),
    "occ_h1": dict(mtp_regime="occ", mtp_heads=1),
}


#: Random-model shapes (`--shape`): Hugging Face config fields of the named models.
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2 architecture), the MPO paper's policy
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=131072),
}


def build_shape(name: str, device: torch.device):
    """A random `PolicyModel` of shape `name` + 4 MTP modules, built directly on `device` (a 2B
    model is initialised on a GPU in seconds, on one CPU core in minutes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.model import PolicyModel

    torch.manual_seed(0)
    with device:
        backbone = Qwen2ForCausalLM(Qwen2Config(**SHAPES[name]))
        return PolicyModel.from_backbone(backbone, 4)


def load_model(args):
    if args.shape:
        return build_shape(args.shape, args.placement.device)
    if args.tiny:
        from learner.tiny import make_tiny_model

        return make_tiny_model(num_mtp=4, seed=0, vocab_size=2048, hidden_size=128, num_layers=4)
    from learner.checkpoint import load_policy
    from learner.model import PolicyModel

    path = Path(args.model)
    if not path.is_dir():
        alt = sorted(Path(args.model).parent.glob("smollm2-mtp*"))
        if not alt:
            raise SystemExit(f"no checkpoint at {path}; run `mtprl model import-smollm2 --out {path} "
                             "--mtp-layers 4`")
        path = alt[0]
    model = load_policy(path)
    if model.num_mtp < 4:
        model = PolicyModel.from_backbone(model.backbone, 4)
    return model


def make_batch(vocab: int, b: int, p: int, r: int) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, p + r), generator=g)
    resp = torch.zeros(b, p + r, dtype=torch.bool)
    resp[:, p:] = True
    rewards = torch.rand(b, generator=g)
    return TrainBatch(ids, torch.ones_like(ids), resp, rewards, torch.arange(b) // max(b // 2, 1))


def make_cfg(name: str, args) -> AlgorithmConfig:
    return AlgorithmConfig(algorithm="grpo", lr=1e-6, micro_batch_size=args.micro_batch,
                           mini_batches=args.mini_batches, device=args.device,
                           precision=args.precision, **CONFIGS[name])


def step_flops(cfg, t: int, name: str, response_fraction: float = 1.0) -> float:
    """Forward+backward FLOPs per token of one update in configuration `name` (see docstring).
    The learner projects onto the vocabulary only at response tokens (`token_logprobs(needed=)`),
    so the LM head's share counts ``response_fraction`` of the ``t`` tokens."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // nh
    q, kv = nh * hd, nkv * hd
    ctx = (t + 1) / 2  # mean causal context
    layer = 2 * (h * q + 2 * h * kv + q * h) + 2 * 3 * h * i + 2 * 2 * q * ctx
    bb = cfg.num_hidden_layers * layer  # backbone forward
    head = 2 * h * v * response_fraction  # LM head forward, per token of the sequence
    mtp = 2 * (2 * h) * h + layer  # MTP module forward (projection + block)
    main = 4 * (bb + head)  # π_old forward + training forward + backward (2×)
    spec = CONFIGS[name]
    k = spec["mpo"].k if "mpo" in spec else 1
    n = spec.get("mtp_heads", 4) if spec["mtp_regime"] != "none" else 0
    if k > 1:  # π_old + train forwards: 2(M + head); backward: 2M (weights+inputs) + head (input)
        return main + (k - 1) * (4 * mtp + 3 * head)
    if spec["mtp_regime"] in ("detach", "occ"):  # train forward only; LM head input + weight grad
        return main + n * (3 * mtp + 3 * head)
    return main


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_memory(name: str, args) -> None:
    """Child process: peak RSS of one configuration's steps."""
    from learner.step import Learner

    model = load_model(args)
    batch = make_batch(model.config.vocab_size, args.batch, args.prompt, args.response)
    lrn = Learner(model, make_cfg(name, args))
    base = _rss_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    for _ in range(2):  # the second step includes AdamW state
        lrn.step(batch)
    print(json.dumps({"peak_mb": _rss_kb("VmHWM") / 1024, "base_mb": base / 1024}))


def profile_step(lrn, batch, args) -> None:
    """One step under torch.profiler; the table of the most expensive device kernels (and the
    host's ops) goes to `args.profile`, for finding where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    args.placement.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        lrn.step(batch)
        args.placement.synchronize()
    wall = time.perf_counter() - t0
    avg = prof.key_averages()
    with open(args.profile, "w") as f:
        f.write(f"{args.profile_config}: one profiled step, {wall:.3f} s wall\n")
        keys = ("self_device_time_total", "self_cuda_time_total") if torch.cuda.is_available() else ()
        for key in (*keys, "self_cpu_time_total"):
            try:
                f.write(avg.table(sort_by=key, row_limit=30) + "\n")
                break
            except (AttributeError, KeyError, ValueError):
                continue
        f.write(avg.table(sort_by="cpu_time_total", row_limit=20) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".cache/models/smollm2-mtp")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (development)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="random model of this shape (+4 MTP) instead of --model")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                    help="where the learner runs (auto: cuda if available)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on cuda, fp32 on cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--mini-batches", type=int, default=2,
                    help="2: OCC's λ is nonzero on the second mini-batch (0 on the first)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch default). 1 by default: on shared, oversubscribed "
                    "cores, multi-threaded CPU kernels stall badly and time mostly noise")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="what the ratios use: the step's CPU time (one thread) or wall time")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="after timing, profile one step of --profile-config (torch.profiler) and "
                    "write its kernel table to FILE")
    ap.add_argument("--profile-config", choices=sorted(CONFIGS), default="ppo")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from learner.device import resolve_placement

    args.placement = resolve_placement(args.device, args.precision, gpu_assigned=True)
    args.device, args.precision = args.placement.device.type, args.placement.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        measure_memory(args.memory_child, args)
        return

    from learner.step import Learner

    model = load_model(args)
    batch = make_batch(model.config.vocab_size, args.batch, args.prompt, args.response)
    learners = {n: Learner(model, make_cfg(n, args)) for n in CONFIGS}
    shared_opt = learners["ppo"].opt  # one AdamW state for the shared weights, not five
    for lrn in learners.values():
        lrn.opt = shared_opt
    on_gpu = args.placement.device.type == "cuda"
    for n, lrn in learners.items():  # warm-up (allocator, AdamW state, kernel selection)
        lrn.step(batch)
    times: dict[str, list[float]] = {n: [] for n in CONFIGS}
    cpu: dict[str, list[float]] = {n: [] for n in CONFIGS}
    cpu_model: dict[str, list[float]] = {n: [] for n in CONFIGS}  # CPU time less clip + AdamW
    gpu_peak: dict[str, int] = {n: 0 for n in CONFIGS}
    phases: dict[str, dict[str, list[float]]] = {n: {"old_logprob_s": [], "optim_s": []} for n in CONFIGS}
    for rep in range(args.repeats):
        for n, lrn in learners.items():
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            m = lrn.step(batch)
            args.placement.synchronize()
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
            cpu_model[n].append(cpu[n][-1] - m["perf/optim_cpu_s"])
            for k in phases[n]:
                phases[n][k].append(m["perf/" + k])
            if on_gpu:
                gpu_peak[n] = max(gpu_peak[n], torch.cuda.max_memory_allocated())
        print(f"round {rep + 1}/{args.repeats}: " +
              ", ".join(f"{n} {times[n][-1]:.2f}s/{cpu[n][-1]:.2f}cpu" for n in CONFIGS),
              file=sys.stderr, flush=True)
    wall = {n: statistics.median(v) for n, v in times.items()}
    cpu_med = {n: statistics.median(v) for n, v in cpu.items()}
    # Ratios use the step's CPU time when torch runs one thread: on shared cores, wall time also
    # counts the time other jobs hold the core. `--clock wall` uses wall time instead.
    med = cpu_med if (args.clock == "cpu" and torch.get_num_threads() == 1 and not on_gpu) else wall
    model_med = {n: statistics.median(v) for n, v in cpu_model.items()}

    mem: dict[str, dict] = {}
    if not args.no_memory and not on_gpu:
        child = [sys.executable, __file__, *sys.argv[1:]]
        for n in CONFIGS:
            out = subprocess.run(child + ["--memory-child", n], capture_output=True, text=True,
                                 env={**os.environ}, check=True)
            mem[n] = json.loads(out.stdout.strip().splitlines()[-1])

    t = args.prompt + args.response
    flops = {n: step_flops(model.config, t, n, args.response / t) for n in CONFIGS}
    result = {
        "model": args.shape or ("tiny" if args.tiny else "SmolLM2-135M+4MTP"),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "precision": args.precision,
        "torch": torch.__version__,
        "shape": {"batch": args.batch, "prompt": args.prompt, "response": args.response,
                  "micro_batch": args.micro_batch, "mini_batches": args.mini_batches},
        "threads": torch.get_num_threads(),
        "clock": "cpu" if med is cpu_med else "wall",
        "median_step_s": {n: round(v, 4) for n, v in wall.items()},
        "median_step_cpu_s": {n: round(v, 4) for n, v in cpu_med.items()},
        "mpo_k3_over_ppo": round(med["mpo_k3"] / med["ppo"], 3),
        "mpo_k5_over_ppo": round(med["mpo_k5"] / med["ppo"], 3),
        "mpo_k3_flop_ratio": round(flops["mpo_k3"] / flops["ppo"], 3),
        "mpo_k5_flop_ratio": round(flops["mpo_k5"] / flops["ppo"], 3),
        "mpo_k5_over_floor": round(med["mpo_k5"] / med["ppo"] / (flops["mpo_k5"] / flops["ppo"]), 3),
        "median_step_cpu_s_without_optimizer": {n: round(v, 4) for n, v in model_med.items()},
        "mpo_k5_over_ppo_without_optimizer": round(model_med["mpo_k5"] / model_med["ppo"], 3),
        "occ_over_detach": round(med["occ"] / med["detach"], 3),
        "occ_flop_ratio": round(flops["occ"] / flops["detach"], 3),
        "occ_h1_over_detach_h1": round(med["occ_h1"] / med["detach_h1"], 3),
        "occ_h1_flop_ratio": round(flops["occ_h1"] / flops["detach_h1"], 3),
        # π_old pass and clip+AdamW, medians (the learner's own perf/ metrics; synchronised on GPU)
        "median_phase_s": {n: {k: round(statistics.median(v), 4) for k, v in ph.items()}
                           for n, ph in phases.items()},
    }
    if on_gpu:
        tokens = args.batch * t
        result["achieved_tflops"] = {n: round(flops[n] * tokens / wall[n] / 1e12, 1) for n in CONFIGS}
        result["gpu_peak_gib"] = {n: round(v / 2**30, 2) for n, v in gpu_peak.items()}
        result["peak_mem_ratio_mpo_k5_over_ppo"] = round(gpu_peak["mpo_k5"] / gpu_peak["ppo"], 3)
        result["peak_mem_ratio_occ_over_detach"] = round(gpu_peak["occ"] / gpu_peak["detach"], 3)
        # > 0: the caching allocator ran out and freed its cache to retry (slow, a sign of memory
        # pressure from the configurations' different peaks)
        result["cuda_alloc_retries"] = int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
    if args.profile:
        profile_step(learners[args.profile_config], batch, args)
    if mem:
        result["peak_mb"] = {n: round(m["peak_mb"], 1) for n, m in mem.items()}
        result["peak_mem_ratio_mpo_k5_over_ppo"] = round(mem["mpo_k5"]["peak_mb"] /
                                                         mem["ppo"]["peak_mb"], 3)
        result["peak_mem_ratio_occ_over_detach"] = round(mem["occ"]["peak_mb"] /
                                                         mem["detach"]["peak_mb"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
