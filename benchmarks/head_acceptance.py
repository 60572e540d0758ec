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
- the main head's entropy H(p), to bucket both by how predictable the token was;
- ``sharpened_acceptance`` (``--draft-temperatures``): Σ_v min(p_v, q^τ_v) with q^τ ∝ q^(1/τ), the
  expected acceptance of a draft sampled from the head's distribution sharpened by τ < 1 (and
  verified against that q^τ, so still lossless): between the sample (τ = 1) and the argmax (τ → 0),
  for a head that stays wider than a policy RL has sharpened;
- ``engine_acceptance_k1``: what a one-token drafting engine's counter (accepted / drafted) reads
  on these samples. It drafts only the positions that are not a bonus token: after an accepted
  draft at t, x_{t+1} comes from the verifier for free and the next draft is for t + 2. Given the
  sampled x_t, a draft was accepted with probability c_t = min(1, q(x_t) / p(x_t)) (E c_t = 1 − TV),
  and `k1_draft_counts` takes the expectation over which positions were drafted. Easy tokens come
  in runs: in one, every other token is a bonus token, in a run of hard tokens each is drafted; so
  easy tokens are fewer among the drafts than among the positions, and the counter reads below the
  mean of 1 − TV over all positions (which the learner's ``mtp/distill_accept/head1`` is).

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


def k1_draft_counts(cond: list[float]) -> tuple[float, float]:
    """Expected (accepted, drafted) drafts of a one-token drafter over one answer, where ``cond[t]``
    is the probability that a draft of the answer's t-th drafted-for position, if one was made, was
    accepted. ``cond[0]`` is the answer's second token: the first is sampled by the prefill step,
    which drafts the second. Position 0 is thus always drafted; t is drafted iff t − 1 was drafted
    and rejected, or t − 1 was the bonus token after an accepted draft of t − 2:
    d_t = d_{t−1} (1 − c_{t−1}) + d_{t−2} c_{t−2}."""
    drafted = accepted = 0.0
    d_prev2, d_prev, c_prev2, c_prev = 0.0, 0.0, 0.0, 0.0
    for t, c in enumerate(cond):
        d = 1.0 if t == 0 else d_prev * (1.0 - c_prev) + d_prev2 * c_prev2
        drafted += d
        accepted += d * c
        d_prev2, c_prev2, d_prev, c_prev = d_prev, c_prev, d, c
    return accepted, drafted


def per_token(model, prompt: list[int], response: list[int], temperature: float,
              misses: list | None = None, taus: tuple[float, ...] = ()) -> list[tuple]:
    """(response position, 1 − TV, p(argmax q), H(p), (1 − TV(p, q^τ) for τ in taus), c) for every
    response token head 1 drafts, c = min(1, q(x) / p(x)) at the sampled token x (`k1_draft_counts`).
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
    full = prompt + response
    cols = rows.index[1].tolist()
    x = torch.tensor([full[c] for c in cols]).unsqueeze(-1)
    q = torch.softmax(rows.student_logits.float(), -1)
    cond = (q.gather(-1, x) / p.gather(-1, x).clamp_min(torch.finfo(p.dtype).tiny)).clamp(max=1.0).squeeze(-1)
    sharpened = [(1.0 - distill_tv(rows.student_logits / tau, rows.teacher_logp)).tolist() for tau in taus]
    if misses is not None:
        sure = (p.max(-1).values > 0.95) & (accept < 0.5)
        misses += [(full[c - 2 : c], full[c], d) for c, d, s in
                   zip(cols, draft.tolist(), sure.tolist()) if s]
    return [(c - len(prompt), a, g, h, tuple(col[i] for col in sharpened), k)
            for i, (c, a, g, h, k) in enumerate(zip(cols, accept.tolist(), greedy.tolist(), entropy.tolist(),
                                                    cond.tolist()))]


def summarise(rows: list[tuple], taus: tuple[float, ...] = ()) -> dict:
    def stats(sel):
        n = len(sel)
        out = {"share": round(n / len(rows), 3), "tokens": n,
               "prob_acceptance": round(sum(r[1] for r in sel) / n, 4) if n else None,
               "greedy_acceptance": round(sum(r[2] for r in sel) / n, 4) if n else None}
        if taus:
            out["sharpened_acceptance"] = {str(t): round(sum(r[4][i] for r in sel) / n, 4) if n else None
                                           for i, t in enumerate(taus)}
        return out

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
    ap.add_argument("--draft-temperatures", default="", metavar="TAU,...",
                    help="also the acceptance of drafts sampled from the head sharpened by each τ (e.g. 0.5,0.7)")
    args = ap.parse_args()
    taus = tuple(float(t) for t in args.draft_temperatures.split(",") if t.strip())
    if any(t <= 0 for t in taus):
        raise SystemExit("--draft-temperatures must all be > 0 (the argmax is greedy_acceptance)")
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
    rows: list[tuple] = []
    accepted = drafted = 0.0
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
                answer = per_token(model, prompt, response, args.temperature, misses, taus)
                a, d = k1_draft_counts([r[5] for r in answer if r[0] >= 1])
                accepted, drafted, rows = accepted + a, drafted + d, rows + answer
            print(f"prompt {i + 1}/{len(items)}: {len(rows)} tokens", file=sys.stderr, flush=True)
    common = Counter((tok.decode(ctx), tok.decode([t]), tok.decode([d])) for ctx, t, d in misses)
    result = {"model": str(args.model), "temperature": args.temperature, "prompts": args.prompts,
              "samples": args.samples, **summarise(rows, taus),
              "engine_acceptance_k1": round(accepted / drafted, 4), "sure_misses": len(misses),
              "top_misses": [{"before": b, "target": t, "head": d, "count": n}
                             for (b, t, d), n in common.most_common(args.misses)]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
