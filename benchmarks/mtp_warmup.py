"""Compare MTP warm-up recipes on SmolLM2 by the acceptance they buy in vLLM.

One engine (MTP drafting, n = 1) answers reasoning-gym prompts to make self-distillation text once
(cached with --data-cache), then each recipe trains a fresh copy of the heads on the same text, the
heads are loaded live into the same engine, and greedy acceptance is measured on the same held-out
prompts. Prints one JSON object as its last line.

    .venv/bin/python benchmarks/mtp_warmup.py --model .cache/models/smollm2-mtp1 --data-cache /tmp/sd_data.json

Which head-distillation kind accepts most at T = 1 (issue 17): the three kinds of
``algorithm.mtp.distill`` as warm-up recipes on the model's own T = 1 answers, acceptance measured
with probabilistic drafting on T = 1 samples of the held-out prompts (``--eval-samples`` each,
seeded, so every recipe meets the same draws of the main head up to where its drafts change them):

    .venv/bin/python benchmarks/mtp_warmup.py --model .cache/models/smollm2-mtp1 --temperature 1 \
        --eval-temperature 1 --draft-method probabilistic --recipes kl,topk_ce,tv --data-cache /tmp/t1.json
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
    # head distillation (learner/mtp_distill.py), the RL term as a warm-up: full-vocabulary logits per
    # token, so fewer epochs than the feature regression above
    "kl": {"loss": "kl", "epochs": 4, "lr": 3e-3},
    "topk_ce": {"loss": "topk_ce", "top_k": 16, "epochs": 4, "lr": 3e-3},
    "tv": {"loss": "tv", "epochs": 4, "lr": 3e-3},
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
    ap.add_argument("--recipes", default="ce_96,distill_96,distill+ce0.1_96")
    ap.add_argument("--temperature", type=float, default=0.7, help="Temperature of the training answers.")
    ap.add_argument("--eval-temperature", type=float, default=0.0, help="Held-out decoding (0 = greedy).")
    ap.add_argument("--eval-samples", type=int, default=4, help="Held-out samples per prompt when sampling.")
    ap.add_argument("--draft-method", choices=["greedy", "probabilistic"], default="greedy")
    args = ap.parse_args()
    unknown = set(args.recipes.split(",")) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipes {sorted(unknown)}; known: {sorted(RECIPES)}")

    engine = RolloutEngine({"model": args.model, "num_speculative_tokens": 1, "kv_cache_gib": 1.0,
                            "max_model_len": 768, "max_num_seqs": 64, "draft_sample_method": args.draft_method})
    held = task_prompts("basic_arithmetic", args.heldout_prompts, HELDOUT_SEED_OFFSET, engine.tokenizer)
    if args.data_cache and os.path.exists(args.data_cache):
        seqs = json.load(open(args.data_cache))
    else:
        train = task_prompts("basic_arithmetic", args.train_prompts, 0, engine.tokenizer)
        data = engine.generate(train, SamplingConfig(n=1, temperature=args.temperature, max_tokens=160, seed=0))
        seqs = [s.prompt_token_ids + s.token_ids for s in data.samples]
        if args.data_cache:
            json.dump(seqs, open(args.data_cache, "w"))
    if args.eval_temperature > 0:
        evaluation = SamplingConfig(n=args.eval_samples, temperature=args.eval_temperature, max_tokens=96, seed=1)
    else:
        evaluation = SamplingConfig(n=1, temperature=0.0, max_tokens=96)
    print(f"{len(seqs)} training answers (T = {args.temperature}); held-out: {len(held)} prompts at "
          f"T = {args.eval_temperature}, {args.draft_method} drafts", flush=True)
    base = engine.generate(held, evaluation)
    result = {"sequences": len(seqs), "tokens": sum(map(len, seqs)), "acceptance_initial": base.spec.acceptance_rate,
              "temperature": args.temperature, "eval_temperature": args.eval_temperature,
              "draft_method": args.draft_method}
    for name in args.recipes.split(","):
        policy = load_policy(args.model)
        t0 = time.perf_counter()
        res = warmup_mtp(policy, seqs, WarmupConfig(batch_size=8, **RECIPES[name]), pad_id=2, progress=False)
        seconds = time.perf_counter() - t0
        engine.update_weights(1, iter_export_tensors(policy, mtp_only=True))
        out = engine.generate(held, evaluation)
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
