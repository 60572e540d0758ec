"""Decode-only cost of one engine step with MTP drafting (n = 1) relative to one without, and the
speed-up ceiling it implies.

    .venv/bin/python benchmarks/spec_step_cost.py --model runs/compare-smollm2/policy/checkpoints/step-000012/policy

`spec_decode.py` times whole `generate` calls, prefill included, so with short answers its
step-cost ratio mixes prefill into the decode steps. Here each engine generates the same prompts
(the demo's task by default, ``--task-config`` as in `spec_decode.py`; batch ``--batch``) greedily with ``ignore_eos`` to two lengths, 8 and 72 tokens;
the difference of the two wall times over the difference of their engine steps is the time of
one decode step (steps: 1 per token without drafting, one per draft round with it, from the
engine's own counters). An n = 1 step yields at most 2 tokens, so ``max_speedup`` = 2 / cost is
the speed-up at acceptance 1.0, and ``acceptance_for_1.3x`` = 1.3 · cost − 1 the acceptance the
1.3× goal needs. An n = 1 engine whose drafter scores only the ``--draft-vocab`` most frequent
tokens is timed too (the model's ``draft_vocab.json``, else a ranking counted from the plain
engine's answers to other prompts of the task; 0 = skip). Configurations run round-robin, medians of
``--repeats``. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

LENGTHS = (8, 72)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=1024)
    ap.add_argument("--task-config", default="demo",
                    help="basic_arithmetic options as JSON, 'demo' (the demo's task) or '{}' (reasoning-gym's defaults)")
    args = ap.parse_args()

    import spec_decode as sd

    from rollout.engine import RolloutEngine

    sd.use_task_config(args.task_config)
    base = {"model": args.model, "max_model_len": 768, "kv_cache_gib": 0.5, "max_num_seqs": max(32, args.batch),
            "seed": 0, "num_threads": 1}
    configs = {"n0": {"num_speculative_tokens": 0}, "n1": {"num_speculative_tokens": 1}}
    engines = {k: RolloutEngine({**base, **v}) for k, v in configs.items()}
    prompts = sd.prompts_for(engines["n0"].tokenizer, args.batch, 1)
    if args.draft_vocab:
        ranking = sd.draft_vocab_ranking(args.model, engines["n0"], sd.prompts_for(engines["n0"].tokenizer, 128, 1000),
                                         {"n": 1, "temperature": 1.0, "max_tokens": 48, "seed": 7},
                                         "spec_step_cost.py n0 answers")
        label = f"n1-dv{args.draft_vocab}"
        configs[label] = {"num_speculative_tokens": 1, "draft_vocab_size": args.draft_vocab,
                          "draft_vocab_path": str(ranking)}
        engines[label] = RolloutEngine({**base, **configs[label]})
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for label, engine in engines.items():
            for length in LENGTHS:
                t0 = time.perf_counter()
                batch = engine.generate(prompts, {"n": 1, "temperature": 0.0, "max_tokens": length, "ignore_eos": True})
                seconds = time.perf_counter() - t0
                steps = length if label == "n0" else batch.spec.num_drafts / args.batch
                runs.setdefault((label, length), []).append((seconds, steps))
    out: dict = {"model": args.model, "task_config": sd.TASK_CONFIG, "batch": args.batch, "lengths": LENGTHS, "repeats": args.repeats,
                 "load_average": [round(x, 1) for x in os.getloadavg()]}
    per_step = {}
    for label in engines:
        (t_a, s_a), (t_b, s_b) = [(statistics.median(x[0] for x in runs[(label, n)]),
                                   statistics.median(x[1] for x in runs[(label, n)])) for n in LENGTHS]
        per_step[label] = (t_b - t_a) / (s_b - s_a)
    for label, s in per_step.items():
        row = {"seconds_per_step": round(s, 4), "cost_vs_n0": round(s / per_step["n0"], 3)}
        if label != "n0":
            row["max_speedup"] = round(2 / row["cost_vs_n0"], 3)
            row["acceptance_for_1.3x"] = round(1.3 * row["cost_vs_n0"] - 1, 3)
        out[label] = row
        print(label, row, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
