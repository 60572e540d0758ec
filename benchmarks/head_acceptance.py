"""Where does MTP head 1 lose acceptance at a temperature? Offline, from the learner's own tensors.

    .venv/bin/python benchmarks/head_acceptance.py --model runs/<id>/checkpoints/step-000030/policy

The policy answers ``--prompts`` held-out problems of the demo's task (``--samples`` each, sampled
at ``--temperature`` with Hugging Face ``generate`` on the backbone, to the end-of-turn token or
``--max-tokens``); then one learner forward (`PolicyModel.token_logprobs(distill_heads=1)`, the
rows head distillation trains on) gives, at every response token x_t, the main head's tempered
distribution p (what verifies a draft of x_t) and head 1's q (what drafts it). Per token:

- ``prob_acceptance`` = 1 − TV(p, q) = Σ_v min(p_v, q_v): the expected acceptance of a
  *probabilistic* draft (vLLM's rejection sampler; `learner.mtp_distill.distill_tv`);
- ``greedy_acceptance`` = p(argmax q): the expected acceptance of a *greedy* draft verified
  against the same sampled target (vLLM accepts a draft token d with probability p(d) when the
  drafter hands it no probabilities);
- the main head's entropy H(p), to bucket both by how predictable the token was.

No engine and no timing: this is the expectation the engine's counters estimate, split by cause.
The last line is a JSON object: ``prob_acceptance``, ``greedy_acceptance``, ``mean_entropy``,
``tokens``, ``by_entropy`` and ``by_position`` (each bucket: share of tokens and both acceptances),
``sure_misses`` (tokens the main head is sure of, max p > 0.95, that head 1 accepts less than half)
and ``top_misses`` (the commonest of them: the two tokens before, the target, head 1's argmax).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENTROPY_BUCKETS = [(0.0, 0.1), (0.1, 0.5), (0.5, 1.5), (1.5, float("inf"))]
POSITION_BUCKETS = [(0, 8), (8, 16), (16, 32), (32, 10**9)]


def per_token(model, prompt: list[int], response: list[int], temperature: float,
              misses: list | None = None) -> list[tuple[int, float, float, float]]:
    """(response position, 1 − TV, p(argmax q), H(p)) for every response token head 1 drafts.
    ``misses`` collects (two tokens before, target, head's argmax) where the main head is sure
    (max p > 0.95) and head 1 accepts less than half."""
    from learner.mtp_distill import distill_tv

    ids = torch.tensor([prompt + response])
    needed = torch.zeros_like(ids, dtype=torch.bool)
    needed[0, len(prompt):] = True
    rows = model.token_logprobs(ids, num_mtp=1, needed=needed, temperature=temperature, distill_heads=1).distill[0]
    accept = 1.0 - distill_tv(rows.student_logits, rows.teacher_logp)
    p = rows.teacher_logp.exp()
    draft = rows.student_logits.argmax(-1)  # (M,) head 1's greedy draft
    greedy = p.gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    entropy = -(p * rows.teacher_logp.clamp_min(torch.finfo(p.dtype).min)).sum(-1)
    cols = rows.index[1].tolist()
    if misses is not None:
        full = prompt + response
        sure = (p.max(-1).values > 0.95) & (accept < 0.5)
        misses += [(full[c - 2 : c], full[c], d) for c, d, s in
                   zip(cols, draft.tolist(), sure.tolist()) if s]
    return [(c - len(prompt), a, g, h) for c, a, g, h in zip(cols, accept.tolist(), greedy.tolist(), entropy.tolist())]


def summarise(rows: list[tuple[int, float, float, float]]) -> dict:
    def stats(sel):
        n = len(sel)
        return {"share": round(n / len(rows), 3), "tokens": n,
                "prob_acceptance": round(sum(r[1] for r in sel) / n, 4) if n else None,
                "greedy_acceptance": round(sum(r[2] for r in sel) / n, 4) if n else None}

    return {
        **{k: v for k, v in stats(rows).items() if k != "share"},
        "mean_entropy": round(sum(r[3] for r in rows) / len(rows), 4),
        "by_entropy": {f"{lo}-{hi}": stats([r for r in rows if lo <= r[3] < hi]) for lo, hi in ENTROPY_BUCKETS},
        "by_position": {f"{lo}-{hi}": stats([r for r in rows if lo <= r[0] < hi]) for lo, hi in POSITION_BUCKETS},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="a policy directory (MiMo layout with an MTP head)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=20_000, help="problem seed (the demo trains on seed 0's split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--misses", type=int, default=20,
                    help="list the N commonest tokens the main head is sure of (p > 0.95) and head 1 misses (1 - TV < 0.5)")
    args = ap.parse_args()
    if args.temperature <= 0:
        raise SystemExit("--temperature must be > 0: greedy decoding has no distribution to draft for")

    from transformers import AutoTokenizer

    from learner.checkpoint import load_policy
    from reward.datasets import reasoning_gym_items
    from services.cli_demo import DEMO_TASK

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = load_policy(args.model).eval()
    if model.num_mtp < 1:
        raise SystemExit(f"{args.model} has no MTP head to measure")
    items = reasoning_gym_items("basic_arithmetic", seed=args.seed, size=args.prompts, tokenizer=tok, **DEMO_TASK)
    eos = tok.eos_token_id
    rows: list[tuple[int, float, float, float]] = []
    misses: list = []
    with torch.no_grad():
        for i, item in enumerate(items):
            prompt = tok(item.prompt, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt] * args.samples)
            out = model.backbone.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                          temperature=args.temperature, top_k=0, top_p=1.0,
                                          max_new_tokens=args.max_tokens, pad_token_id=tok.pad_token_id or 0)
            for seq in out.tolist():
                response = seq[len(prompt):]
                if eos in response:
                    response = response[: response.index(eos) + 1]
                rows += per_token(model, prompt, response, args.temperature, misses)
            print(f"prompt {i + 1}/{len(items)}: {len(rows)} tokens", file=sys.stderr, flush=True)
    common = Counter((tok.decode(ctx), tok.decode([t]), tok.decode([d])) for ctx, t, d in misses)
    result = {"model": str(args.model), "temperature": args.temperature, "prompts": args.prompts,
              "samples": args.samples, **summarise(rows), "sure_misses": len(misses),
              "top_misses": [{"before": b, "target": t, "head": d, "count": n}
                             for (b, t, d), n in common.most_common(args.misses)]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
