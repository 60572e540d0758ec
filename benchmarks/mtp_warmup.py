"""Compare MTP warm-up recipes on SmolLM2 by the acceptance they buy in vLLM.

One engine (MTP drafting, n = 1) answers reasoning-gym prompts to make self-distillation text once
(cached with --data-cache), then each recipe trains a fresh copy of the heads on the same text, the
heads are loaded live into the same engine, and greedy acceptance is measured on the same held-out
prompts. Prints one JSON object as its last line.

    .venv/bin/python benchmarks/mtp_warmup.py --model .cache/models/smollm2-mtp1 --data-cache /tmp/sd_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

RECIPES = {
    "ce_96": {"loss": "ce", "epochs": 12, "lr": 3e-3},
    "distill_96": {"loss": "distill", "epochs": 12, "lr": 3e-3},
    "distill+ce0.1_96": {"loss": "distill", "ce_weight": 0.1, "epochs": 12, "lr": 3e-3},
}


def main() -> None:
    from learner.checkpoint import iter_export_tensors, load_policy
    from learner.warmup import WarmupConfig, warmup_mtp
    from rollout.config import SamplingConfig
    from rollout.engine import RolloutEngine
    from services.self_distill import HELDOUT_SEED_OFFSET, task_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/models/smollm2-mtp1")
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--heldout-prompts", type=int, default=8)
    ap.add_argument("--data-cache", default=None, help="JSON file of token sequences to reuse/write.")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    args = ap.parse_args()

    engine = RolloutEngine({"model": args.model, "num_speculative_tokens": 1, "kv_cache_gib": 1.0,
                            "max_model_len": 768, "max_num_seqs": 64})
    held = task_prompts("basic_arithmetic", args.heldout_prompts, HELDOUT_SEED_OFFSET, engine.tokenizer)
    if args.data_cache and os.path.exists(args.data_cache):
        seqs = json.load(open(args.data_cache))
    else:
        train = task_prompts("basic_arithmetic", args.train_prompts, 0, engine.tokenizer)
        data = engine.generate(train, SamplingConfig(n=1, temperature=0.7, max_tokens=160, seed=0))
        seqs = [s.prompt_token_ids + s.token_ids for s in data.samples]
        if args.data_cache:
            json.dump(seqs, open(args.data_cache, "w"))
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=96)
    base = engine.generate(held, greedy)
    result = {"sequences": len(seqs), "tokens": sum(map(len, seqs)), "acceptance_initial": base.spec.acceptance_rate}
    for name in args.recipes.split(","):
        policy = load_policy(args.model)
        t0 = time.perf_counter()
        res = warmup_mtp(policy, seqs, WarmupConfig(batch_size=8, **RECIPES[name]), pad_id=2, progress=False)
        seconds = time.perf_counter() - t0
        engine.update_weights(1, iter_export_tensors(policy, mtp_only=True))
        out = engine.generate(held, greedy)
        result[name] = {
            "steps": res.steps,
            "warmup_seconds": round(seconds, 1),
            "heldout_ce": [round(res.heldout_ce_before, 3), round(res.heldout_ce_after, 3)],
            "acceptance": round(out.spec.acceptance_rate, 4),
            "mean_acceptance_length": round(out.spec.mean_acceptance_length, 3),
        }
        print(name, result[name], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
