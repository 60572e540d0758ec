"""Behaviour log-prob parity: vLLM's sampled-token log-probs against the learner's, at a temperature.

    .venv/bin/python benchmarks/logprob_parity.py --temperature 0.7     # SmolLM2-135M + 1 MTP head, CPU

The claim (docs/benchmarks.md): the behaviour log-probs a rollout engine returns are those of the
distribution it sampled from, softmax(logits / T) (vLLM ``logprobs_mode='processed_logprobs'``,
`rollout.engine`), and equal the learner's log-probs of the same tokens at the same T
(`PolicyModel.token_logprobs(temperature=T)`, what `learner.step` uses with
``AlgorithmConfig.temperature``) to float32 rounding — so decoupled-PPO weights and ratios start at
1 on fresh samples. One engine with MTP drafting (``--spec-tokens``, default 1: accepted draft
tokens and bonus tokens both carry log-probs) samples ``--samples`` answers to each of a few chat
questions at ``--temperature``; both sides run float32 on the CPU.

Keys: ``max_abs_diff`` / ``mean_abs_diff`` over every sampled token (goal ≤ 1e-3);
``max_abs_diff_vs_T1``: the same tokens against the learner's *untempered* (T = 1) log-probs — what
the comparison was before the fix (raw log-probs on one side or the other); ``tokens``, ``samples``,
``temperature``, ``spec_acceptance_rate``. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.checkpoint import load_policy  # noqa: E402
from rollout.engine import RolloutEngine  # noqa: E402

QUESTIONS = ["Calculate 17 + 25.", "What is 6 times 7?", "Calculate ( 56 + -33 ) - 84.", "Name a prime number.",
             "Solve 3x + 4 = 19 for x.", "What is 144 divided by 12?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path(os.environ.get("MTPRL_MODELS_DIR", REPO / ".cache/models"))
                                           / "smollm2-mtp1"),
                    help="MiMo-layout checkpoint (default: SmolLM2 with 1 MTP module; built if missing)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--samples", type=int, default=2, help="samples per question")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--spec-tokens", type=int, default=1, help="MTP draft tokens per step (0 = no drafting)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = Path(args.model)
    if not (model / "model.safetensors").is_file():
        from learner.convert import import_smollm2

        import_smollm2(model, mtp_layers=1)
    engine = RolloutEngine({"model": str(model), "num_speculative_tokens": args.spec_tokens, "max_model_len": 512,
                            "kv_cache_gib": 0.3, "num_threads": args.threads})
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    batch = engine.generate(chats, {"n": args.samples, "temperature": args.temperature,
                                    "max_tokens": args.max_tokens, "seed": args.seed})
    policy = load_policy(model).eval()
    t = args.temperature if args.temperature > 0 else 1.0  # greedy samples carry T = 1 log-probs
    diffs, diffs_t1 = [], []
    for s in batch.samples:
        if not s.token_ids:
            continue
        ids = torch.tensor([s.prompt_token_ids + s.token_ids])
        n = len(s.prompt_token_ids)
        with torch.no_grad():
            ours = policy.token_logprobs(ids, num_mtp=0, temperature=t).logprobs[0, 0, n:]
            raw = policy.token_logprobs(ids, num_mtp=0).logprobs[0, 0, n:]
        theirs = torch.tensor(s.logprobs)
        diffs.append((ours - theirs).abs())
        diffs_t1.append((raw - theirs).abs())
    d, d1 = torch.cat(diffs), torch.cat(diffs_t1)
    out = {
        "benchmark": "logprob_parity",
        "model": model.name,
        "temperature": args.temperature,
        "samples": len(diffs),
        "tokens": int(d.numel()),
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "max_abs_diff_vs_T1": float(d1.max()),
        "goal_max_abs_diff": 1e-3,
        "spec_tokens": args.spec_tokens,
        "spec_acceptance_rate": round(batch.spec.acceptance_rate, 4),
        "dtype": "float32",
    }
    print(f"vLLM vs learner at T={args.temperature}: max |Δlogprob| {out['max_abs_diff']:.2e} over "
          f"{out['tokens']} tokens (vs the T=1 learner: {out['max_abs_diff_vs_T1']:.2e})", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
