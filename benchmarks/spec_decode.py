"""Rollout tokens/s with MTP speculative drafting: n = 0, 1, 2 speculative tokens at batch sizes
1, 8 and 32, side by side in one run.

    .venv/bin/python benchmarks/spec_decode.py                       # SmolLM2-135M, warmed-up head
    .venv/bin/python benchmarks/spec_decode.py --model DIR --max-tokens 64 --repeats 1

One process holds three vLLM engines on the same checkpoint (n = 0, 1, 2; n = 2 applies MTP module
1 recursively). Every measurement generates for the same reasoning-gym arithmetic chat prompts
with the same sampling settings (temperature 1.0 as in RL rollouts, fixed ``max_tokens``, EOS
respected, per-request seeds); the configurations are timed round-robin (n = 0, 1, 2 for one batch
size, then again), so a burst of load from other jobs on the shared cores hits them alike, and the
median tokens/s over the repeats is reported. Tokens/s counts generated tokens over the wall time
of the whole `generate` call (prefill included); tokens per CPU-second of the process is reported
next to it (``tokens_per_cpu_s``, ``cpu_speedup``): with one engine thread it is the work per token,
far less sensitive than wall time to other jobs' bursts on shared cores.

Diagnostics printed with the table: acceptance at temperature 0 (greedy) next to temperature 1,
the cost of one engine step with drafting relative to one without
(``step_cost_ratio = tok/s(n=0) · mean_acceptance_length / tok/s(n)``: above 1 the drafter and the
wider verification cost more than the accepted tokens save), and the effect of the engine's torch
thread count (1 vs 2 on the 2-core machine) on n = 0 and n = 1 at batch 8. The engines run with
``--threads`` (default 1, what a Ray engine actor with num_cpus=1 gets): on the shared, loaded
2-core machine two OpenMP threads measured ~3x slower than one.

The last line is a JSON object with ``speedup`` (n=1 over n=0 at batch 8), ``acceptance_rate`` and
``mean_acceptance_length`` (n=1, batch 8) and the whole table.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rollout.engine import RolloutEngine, SpecStats  # noqa: E402

# vLLM's CPU worker replaces torch.set_num_threads with a no-op once an engine starts; keep the real one.
_set_num_threads = torch.set_num_threads


def prompts_for(tokenizer, n: int, seed: int) -> list[str]:
    from reward.datasets import reasoning_gym_items

    return [it.prompt for it in reasoning_gym_items("basic_arithmetic", seed=seed, size=n, tokenizer=tokenizer)]


def run_once(engine: RolloutEngine, prompts, sampling) -> tuple[float, SpecStats, int, float]:
    """Wall-clock tokens/s, spec counters, generated tokens, and tokens per CPU-second of this
    process (the engine runs in-process on --threads threads: CPU time is the work done, which
    other jobs' bursts on the shared cores inflate far less than wall time)."""
    c0 = time.process_time()
    batch = engine.generate(prompts, sampling)
    cpu = time.process_time() - c0
    return batch.tokens_per_s, batch.spec, batch.num_generated_tokens, batch.num_generated_tokens / cpu if cpu > 0 else 0.0


def set_threads(n: int) -> None:
    _set_num_threads(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".cache/models/smollm2-mtp1-warm"))
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--spec-tokens", default="0,1,2")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="engine torch threads (1 = a Ray actor's default)")
    ap.add_argument("--no-diagnostics", action="store_true", help="skip the greedy and thread-count runs")
    args = ap.parse_args()

    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    ns = [int(x) for x in args.spec_tokens.split(",")]
    default_threads = args.threads
    engines: dict[int, RolloutEngine] = {}
    for n in ns:
        engines[n] = RolloutEngine(
            {
                "model": args.model,
                "num_speculative_tokens": n,
                "max_model_len": 768,
                "kv_cache_gib": 0.5,
                "max_num_seqs": max(batch_sizes),
                "seed": args.seed,
                "num_threads": args.threads,
            }
        )
        print(f"engine n={n} up in {engines[n].startup_seconds:.1f}s", flush=True)
    tok = engines[ns[0]].tokenizer
    prompts = prompts_for(tok, max(batch_sizes), args.seed + 1)

    def sampling(b: int, temperature: float = args.temperature) -> dict:
        return {"n": 1, "temperature": temperature, "max_tokens": args.max_tokens, "seed": args.seed + b}

    # Warm-up: one small batch per engine (first-step costs, allocator).
    for e in engines.values():
        e.generate(prompts[:2], sampling(2))

    rates: dict[tuple[int, int], list[float]] = {}
    cpu_rates: dict[tuple[int, int], list[float]] = {}
    spec: dict[tuple[int, int], SpecStats] = {}
    tokens: dict[tuple[int, int], int] = {}
    for b in batch_sizes:
        for r in range(args.repeats):
            for n in ns:
                tps, s, ntok, cps = run_once(engines[n], prompts[:b], sampling(b))
                rates.setdefault((n, b), []).append(tps)
                cpu_rates.setdefault((n, b), []).append(cps)
                spec[(n, b)] = spec[(n, b)] + s if (n, b) in spec else s
                tokens[(n, b)] = tokens.get((n, b), 0) + ntok
                print(f"batch {b:>2} n={n} repeat {r}: {tps:7.1f} tok/s {cps:7.1f} tok/cpu-s  acceptance {s.acceptance_rate:.3f}", flush=True)

    table = []
    for b in batch_sizes:
        base = statistics.median(rates[(0, b)]) if (0, b) in rates else None
        cbase = statistics.median(cpu_rates[(0, b)]) if (0, b) in rates else None
        for n in ns:
            tps = statistics.median(rates[(n, b)])
            cps = statistics.median(cpu_rates[(n, b)])
            s = spec[(n, b)]
            row = {
                "batch": b,
                "n": n,
                "tokens_per_s": round(tps, 1),
                "speedup_vs_n0": round(tps / base, 3) if base else None,
                "tokens_per_cpu_s": round(cps, 1),
                "cpu_speedup_vs_n0": round(cps / cbase, 3) if cbase else None,
                "acceptance_rate": round(s.acceptance_rate, 3),
                "mean_acceptance_length": round(s.mean_acceptance_length, 3),
                "accepted_per_position": [round(a / s.num_drafts, 3) for a in s.accepted_per_pos] if s.num_drafts else [],
                "step_cost_ratio": round(base * s.mean_acceptance_length / tps, 3) if base and n else None,
                "cpu_step_cost_ratio": round(cbase * s.mean_acceptance_length / cps, 3) if cbase and n else None,
                "mean_response_tokens": round(tokens[(n, b)] / (b * args.repeats), 1),
            }
            table.append(row)
            print(json.dumps(row), flush=True)

    diag: dict = {}
    if not args.no_diagnostics and 1 in engines and 8 in batch_sizes:
        greedy = [run_once(engines[1], prompts[:8], sampling(8, 0.0))[1] for _ in range(1)]  # noqa: F841
        g = greedy[0]
        diag["greedy_b8_n1"] = {"acceptance_rate": round(g.acceptance_rate, 3), "mean_acceptance_length": round(g.mean_acceptance_length, 3)}
        threads: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for t in sorted({1, 2, default_threads}):
                set_threads(t)
                for n in (0, 1):
                    if n in engines:
                        threads.setdefault(f"threads{t}_n{n}", []).append(run_once(engines[n], prompts[:8], sampling(8))[0])  # wall
        set_threads(default_threads)
        diag["threads_b8_tokens_per_s"] = {k: round(statistics.median(v), 1) for k, v in threads.items()}
        diag["default_threads"] = default_threads
        print(json.dumps(diag), flush=True)

    def pick(n: int, b: int) -> dict:
        return next(r for r in table if r["n"] == n and r["batch"] == b)

    ref = pick(1, 8) if (1, 8) in rates else table[0]
    result = {
        "speedup": pick(1, 8)["speedup_vs_n0"] if (1, 8) in rates and (0, 8) in rates else None,
        "cpu_speedup": pick(1, 8)["cpu_speedup_vs_n0"] if (1, 8) in rates and (0, 8) in rates else None,
        "acceptance_rate": ref["acceptance_rate"],
        "mean_acceptance_length": ref["mean_acceptance_length"],
        "model": args.model,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "table": table,
        **diag,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"# took {time.perf_counter() - t0:.0f}s", file=sys.stderr)
