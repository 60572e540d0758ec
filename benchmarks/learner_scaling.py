"""The learner group against one learner, side by side in one run, on SmolLM2 with 2 MTP heads.

    .venv/bin/python benchmarks/learner_scaling.py [--steps 3] [--samples 8] [--response 64]

Three measurements (issue 14), each on real Ray actors and gloo:
- ``max_param_diff``: 2 ranks vs 1 after ``--steps`` updates on the same batches, worst over PPO,
  MPO K=3 (heads trained), OCC and a KL penalty (goal ≤ 1e-5); each objective's own value too.
  OCC runs at lr 1e-5, the others at 1e-4: see docs/scale.md for why OCC's λ amplifies rounding.
- ``state_memory_ratio``: per-rank bytes of parameters + gradients + AdamW state, measured right
  after the first optimiser step (`Learner.state_bytes`), at N = 2 over N = 1 (goal ≤ 0.6).
- ``step_time_ratio``: mean update time of 2 ranks × 1 thread over 1 rank × 2 threads (reported).
- ``floor_by_objective`` (``--floor``): the same difference between two ONE-process runs whose
  micro-batches differ (4 vs 2 samples: the same update, summed in another order): float32's
  own noise floor for that objective, to read ``max_param_diff`` against.

The last line is one JSON object. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OBJECTIVES = {
    "ppo": dict(algorithm="ppo", mtp_regime="none", lr=1e-4),
    "mpo_k3": dict(algorithm="grpo", mtp_regime="detach", mpo={"k": 3}, lr=1e-4),
    "occ": dict(algorithm="grpo", mtp_regime="occ", lr=1e-5),
    "kl": dict(algorithm="dapo", mtp_regime="policy", advantage={"kl_coef": 0.05}, lr=1e-4),
}


def batches(n: int, samples: int, prompt: int, response: int, vocab: int, seed: int = 0):
    from learner.batch import TrainBatch

    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(seed + s)
        t = prompt + response
        ids = torch.randint(10, vocab, (samples, t), generator=g)
        attn = torch.ones(samples, t, dtype=torch.long)
        lengths = torch.randint(response // 4, response + 1, (samples,), generator=g)
        for i, n_resp in enumerate(lengths.tolist()):
            attn[i, prompt + n_resp:] = 0
        resp = torch.zeros(samples, t, dtype=torch.bool)
        resp[:, prompt:] = True
        resp &= attn.bool()
        out.append(TrainBatch(ids, attn, resp, torch.rand(samples, generator=g), torch.arange(samples) // 4,
                              behav_logprobs=-torch.rand(samples, t, generator=g) * 2,
                              policy_versions=torch.zeros(samples, dtype=torch.long)))
    return out


def weights(group) -> dict[str, np.ndarray]:
    import ray

    return {n: np.asarray(t, dtype=np.float32) for n, t in ray.get(group.weights())}


def run(model: Path, algorithm: dict, workers: int, threads: int, data) -> tuple[dict, list[dict]]:
    from services.learner_group import LearnerGroup

    g = LearnerGroup(str(model), algorithm, workers=workers, threads=threads, num_cpus=threads)
    try:
        g.wait_ready()
        metrics = [g.step(b).wait() for b in data]
        return weights(g), metrics
    finally:
        g.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / ".cache" / "models" / "smollm2-mtp2"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--floor", action="store_true", help="also measure the one-process noise floor")
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for every objective "
                    "(default: OCC 1e-5, the others 1e-4)")
    args = ap.parse_args()

    import ray

    model = Path(args.model)
    if not (model / "config.json").is_file():
        from learner.convert import import_smollm2

        print(f"building {model} (SmolLM2 + 2 MTP modules) ...", file=sys.stderr)
        import_smollm2(model, mtp_layers=2)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    data = batches(args.steps, args.samples, args.prompt, args.response, vocab)
    common = dict(mini_batches=2, micro_batch_size=4, grad_clip=1.0)
    from services.local_ray import start_local_ray
    start_local_ray(4)

    diffs: dict[str, float] = {}
    floors: dict[str, float] = {}
    out: dict = {}
    for name in args.objectives.split(","):
        alg = {**common, **OBJECTIVES[name], **({} if args.lr is None else {"lr": args.lr})}
        t0 = time.perf_counter()
        w1, m1 = run(model, alg, 1, 2, data)
        w2, m2 = run(model, alg, 2, 1, data)
        diffs[name] = max(float(np.abs(w1[k] - w2[k]).max()) for k in w1)
        if args.floor:
            wf, _ = run(model, {**alg, "micro_batch_size": 2}, 1, 2, data)
            floors[name] = max(float(np.abs(w1[k] - wf[k]).max()) for k in w1)
            print(f"{name}: one-process floor (micro-batch 4 vs 2) = {floors[name]:.3g}", file=sys.stderr)
        print(f"{name}: max |2 ranks - 1 rank| = {diffs[name]:.3g} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
        if name == "ppo":  # memory and time from the plain objective: 1 rank x 2 threads vs 2 x 1
            s1 = [m["perf/step_s"] for m in m1[1:]] or [m1[0]["perf/step_s"]]
            s2 = [m["perf/step_s"] for m in m2[1:]] or [m2[0]["perf/step_s"]]
            out.update(state_bytes_1=m1[0]["mem/state_bytes"], state_bytes_2=m2[0]["mem/state_bytes"],
                       step_s_1rank_2threads=statistics.mean(s1), step_s_2ranks_1thread=statistics.mean(s2))
    ray.shutdown()
    result = {
        "max_param_diff": max(diffs.values()),
        "param_diff_by_objective": diffs,
        **({"floor_by_objective": floors} if floors else {}),
        **out,
    }
    if "state_bytes_1" in out:
        result["state_memory_ratio"] = out["state_bytes_2"] / out["state_bytes_1"]
        result["step_time_ratio"] = out["step_s_2ranks_1thread"] / out["step_s_1rank_2threads"]
    result.update(model=str(model), lr=args.lr or "occ 1e-5, others 1e-4", steps=args.steps, samples=args.samples, prompt=args.prompt,
                  response=args.response)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
