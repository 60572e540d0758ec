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

With ``--probabilistic`` the run adds an n = 1 engine whose drafter samples its token from its own
distribution and is accepted with min(1, p/q) (``draft_sample_method: probabilistic``, label
``n1-prob``) instead of drafting its argmax; at temperature 1 this accepts up to Σ min(p, q) rather
than p(argmax q).

With ``--draft-vocab N[,M]`` the run adds an n = 1 engine per size whose drafter scores only the N
most frequent tokens (`rollout.draft_vocab`; label ``n1-dvN``). The ranking is the model's
``draft_vocab.json`` when it has one, else it is counted here from the n = 0 engine's answers to
other prompts of the task (``--draft-vocab-prompts``, not the measured ones); the coverage of the
measured n = 0 answers by each subset is printed.

With ``--adaptive K`` the run adds an engine with adaptive drafting (`rollout.adaptive_draft`,
label ``adaptive``): it may draft 0..K tokens and chooses per call from the step costs and
per-position acceptance it measures. It is timed in the same round robin as the others, after
``--adaptive-warmup`` untimed calls per batch size (its estimates start from a prior); its probes
(every ``--adaptive-probe-every``-th call drafts another length, the gap doubling while probes
confirm the choice) fall in timed calls too. Its rows add the lengths it chose (``draft_k``) and
its predicted and measured speed-ups; the JSON gains ``adaptive_ratio`` (adaptive / n0 tokens/s
per batch size) and ``adaptive_min_ratio`` (the lowest: ≥ 1 means it never lost to not drafting).
These ratios are of whole-run throughput, the tokens of all timed calls over their wall time
(``tokens_per_s_total``), so a probe counts at the frequency it runs at; the median per-call
ratio, which a probe in a minority of calls does not move, is ``adaptive_ratio_median``. A probe is
one call in 8-64, so the verdict needs many timed calls where they are cheap:
``--repeats-by-batch 1:16,8:8,32:4`` times each batch size its own number of times (calls at
batch 1 take ~4 s, at 32 ~30 s). Run it at ``--temperature 0`` and ``1`` for both regimes.

The last line is a JSON object with ``speedup`` (n=1 over n=0 at batch 8), ``acceptance_rate`` and
``mean_acceptance_length`` (n=1, batch 8), ``speedup_draft_vocab``/``acceptance_draft_vocab`` (per
size, batch 8) and the whole table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
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


TASK_CONFIG: dict = {}  # reasoning-gym basic_arithmetic options (--task-config)


def use_task_config(value: str) -> None:
    """Set TASK_CONFIG from a --task-config value: basic_arithmetic options as JSON, or 'demo' for
    the demo's task ('' leaves reasoning-gym's defaults)."""
    from services.cli_demo import task_options

    TASK_CONFIG.update(task_options(value))


def prompts_for(tokenizer, n: int, seed: int) -> list[str]:
    from reward.datasets import reasoning_gym_items

    return [it.prompt for it in reasoning_gym_items("basic_arithmetic", seed=seed, size=n, tokenizer=tokenizer,
                                                    **TASK_CONFIG)]


def draft_vocab_ranking(model: str, engine: RolloutEngine, prompts: list[str], sampling: dict, source: str) -> Path:
    """The model's ``draft_vocab.json``, else a ranking counted from ``engine``'s answers to
    ``prompts`` (other prompts than the measured ones), written to a temporary directory."""
    from rollout.draft_vocab import DRAFT_VOCAB_FILE, write_draft_vocab

    ranking = Path(model) / DRAFT_VOCAB_FILE
    if ranking.is_file():
        return ranking
    answers = engine.generate(prompts, sampling).samples
    return write_draft_vocab(Path(tempfile.mkdtemp(prefix="draft-vocab-")), [a.token_ids for a in answers],
                             source=source)


def run_once(engine: RolloutEngine, prompts, sampling, keep: list | None = None) -> tuple[float, SpecStats, int, float]:
    """Wall-clock tokens/s, spec counters, generated tokens, and tokens per CPU-second of this
    process (the engine runs in-process on --threads threads: CPU time is the work done, which
    other jobs' bursts on the shared cores inflate far less than wall time). ``keep`` collects the batch."""
    c0 = time.process_time()
    batch = engine.generate(prompts, sampling)
    cpu = time.process_time() - c0
    if keep is not None:
        keep.append(batch)
    return batch.tokens_per_s, batch.spec, batch.num_generated_tokens, batch.num_generated_tokens / cpu if cpu > 0 else 0.0


#: Seed distance between timed repeats (more than any batch size, so no two calls share a seed).
SEED_STEP = 1009


def parse_repeats(spec: str, batch_sizes: list[int], default: int) -> dict[int, int]:
    """Timed calls per batch size from ``--repeats-by-batch`` (``B:R,...``), ``default`` elsewhere."""
    out = dict.fromkeys(batch_sizes, default)
    for part in filter(None, (x.strip() for x in spec.split(","))):
        b, sep, r = part.partition(":")
        if not sep or not b.isdigit() or not r.isdigit() or int(r) < 1:
            raise SystemExit(f"--repeats-by-batch: {part!r} is not BATCH:REPEATS with REPEATS >= 1")
        if int(b) not in out:
            raise SystemExit(f"--repeats-by-batch: batch {b} is not in --batch-sizes {batch_sizes}")
        out[int(b)] = int(r)
    return out


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
    ap.add_argument("--repeats-by-batch", default="", metavar="B:R,...",
                    help="timed calls per batch size, e.g. 1:16,8:8,32:4 (others: --repeats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh-seeds", action=argparse.BooleanOptionalAction, default=True,
                    help="seed each timed repeat differently (the same seeds for every configuration of a repeat)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every answer runs to --max-tokens: equal work for every configuration at T = 1, where "
                    "drafting changes which samples are drawn (and so their lengths); acceptance then includes "
                    "tokens past the answer's end")
    ap.add_argument("--threads", type=int, default=1, help="engine torch threads (1 = a Ray actor's default)")
    ap.add_argument("--no-diagnostics", action="store_true", help="skip the greedy and thread-count runs")
    ap.add_argument("--draft-vocab", default="", help="comma-separated pruned drafter vocabulary sizes (n=1 engines)")
    ap.add_argument("--draft-vocab-prompts", type=int, default=128,
                    help="prompts answered by n=0 to rank tokens when the model has no draft_vocab.json")
    ap.add_argument("--probabilistic", action="store_true",
                    help="add an n = 1 engine drafting probabilistically (label n1-prob; draft_sample_method)")
    ap.add_argument("--adaptive", type=int, default=0, metavar="K",
                    help="add an adaptive-drafting engine drafting 0..K tokens per call (label adaptive)")
    ap.add_argument("--adaptive-method", default="greedy", choices=("greedy", "probabilistic", "auto"),
                    help="draft_sample_method of the adaptive engine (auto: chosen per call, draft_method in its rows)")
    ap.add_argument("--adaptive-warmup", type=int, default=4, help="untimed adaptive calls per batch size")
    ap.add_argument("--adaptive-probe-every", type=int, default=8)
    ap.add_argument("--adaptive-probe-steps", type=int, default=8,
                    help="decode steps of a short probe (rollout.adaptive_draft.probe_steps; 0: whole-call probes)")
    ap.add_argument("--adaptive-draft-vocab", type=int, default=0, metavar="N",
                    help="the adaptive engine's pruned drafter vocabulary (draft_vocab_size; 0: the full one)")
    ap.add_argument("--task-config", default="", help="basic_arithmetic options as JSON; 'demo' = the demo's task "
                    "(acceptance is only meaningful on the policy's own prompt distribution)")
    args = ap.parse_args()
    use_task_config(args.task_config)

    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    repeats = parse_repeats(args.repeats_by_batch, batch_sizes, args.repeats)
    base_cfg = {"model": args.model, "max_model_len": 768, "kv_cache_gib": 0.5, "max_num_seqs": max(batch_sizes),
                "seed": args.seed, "num_threads": args.threads}
    configs: dict[str, dict] = {f"n{n}": {"num_speculative_tokens": n} for n in (int(x) for x in args.spec_tokens.split(","))}
    dv_sizes = [int(x) for x in args.draft_vocab.split(",")] if args.draft_vocab else []
    default_threads = args.threads
    engines: dict[str, RolloutEngine] = {}
    for label, extra in configs.items():
        engines[label] = RolloutEngine({**base_cfg, **extra})
        print(f"engine {label} up in {engines[label].startup_seconds:.1f}s", flush=True)
    tok = next(iter(engines.values())).tokenizer
    prompts = prompts_for(tok, max(batch_sizes), args.seed + 1)

    def sampling(b: int, temperature: float = args.temperature, repeat: int = 0) -> dict:
        # A repeat's seed differs from the last (--fresh-seeds): with one seed, every repeat of a
        # configuration replays the same T = 1 samples, so its lengths (and its tail of
        # few running sequences) are those of b samples, not of b x repeats.
        seed = args.seed + b + (SEED_STEP * repeat if args.fresh_seeds else 0)
        return {"n": 1, "temperature": temperature, "max_tokens": args.max_tokens, "seed": seed,
                "ignore_eos": args.ignore_eos}

    diag: dict = {}
    ranking = None
    if (dv_sizes or args.adaptive_draft_vocab) and "n0" not in engines:
        raise SystemExit("--draft-vocab/--adaptive-draft-vocab rank tokens from n0's answers: include 0 in --spec-tokens")
    if dv_sizes or args.adaptive_draft_vocab:
        ranking = draft_vocab_ranking(args.model, engines["n0"], prompts_for(tok, args.draft_vocab_prompts, args.seed + 1000),
                                      {**sampling(0), "seed": args.seed + 7}, "spec_decode.py n0 answers")
    if dv_sizes:
        from rollout.draft_vocab import coverage, read_draft_vocab

        measured = [a.token_ids for a in engines["n0"].generate(prompts[:8], sampling(8)).samples]
        for size in dv_sizes:
            label = f"n1-dv{size}"
            engines[label] = RolloutEngine({**base_cfg, "num_speculative_tokens": 1, "draft_vocab_size": size,
                                            "draft_vocab_path": str(ranking)})
            configs[label] = {"num_speculative_tokens": 1, "draft_vocab_size": size}
            cov = coverage(read_draft_vocab(args.model, size, ranking), measured)
            diag.setdefault("draft_vocab_coverage_b8", {})[label] = round(cov, 4)
            print(f"engine {label} up in {engines[label].startup_seconds:.1f}s; "
                  f"covers {cov:.4f} of the n0 answers at batch 8 ({ranking})", flush=True)

    if args.probabilistic:
        label = "n1-prob"
        configs[label] = {"num_speculative_tokens": 1, "draft_sample_method": "probabilistic"}
        engines[label] = RolloutEngine({**base_cfg, **configs[label]})
        print(f"engine {label} up in {engines[label].startup_seconds:.1f}s", flush=True)

    if args.adaptive:
        label = "adaptive"
        configs[label] = {"num_speculative_tokens": args.adaptive, "draft_sample_method": args.adaptive_method,
                          "adaptive_draft": {"enabled": True, "probe_every": args.adaptive_probe_every,
                                             "probe_steps": args.adaptive_probe_steps}}
        if args.adaptive_draft_vocab:
            configs[label].update(draft_vocab_size=args.adaptive_draft_vocab, draft_vocab_path=str(ranking))
        engines[label] = RolloutEngine({**base_cfg, **configs[label]})
        print(f"engine {label} up in {engines[label].startup_seconds:.1f}s", flush=True)

    # Warm-up: one small batch per engine (first-step costs, allocator).
    for e in engines.values():
        e.generate(prompts[:2], sampling(2))
    adaptive_log: dict[int, list[dict]] = {}
    if args.adaptive:  # its estimates start from a prior: let it measure each batch size first
        for b in batch_sizes:
            for _ in range(args.adaptive_warmup):
                engines["adaptive"].generate(prompts[:b], sampling(b))

    rates: dict[tuple[str, int], list[float]] = {}
    cpu_rates: dict[tuple[str, int], list[float]] = {}
    spec: dict[tuple[str, int], SpecStats] = {}
    tokens: dict[tuple[str, int], int] = {}
    seconds: dict[tuple[str, int], float] = {}
    for b in batch_sizes:
        for r in range(repeats[b]):
            for label in configs:
                kept: list = []
                tps, s, ntok, cps = run_once(engines[label], prompts[:b], sampling(b, repeat=r), kept)
                if label == "adaptive":
                    adaptive_log.setdefault(b, []).append({"k": kept[0].draft_k, "predicted": kept[0].predicted_speedup,
                                                           "measured": kept[0].measured_speedup,
                                                           "switch": kept[0].draft_switch,
                                                           "method": kept[0].draft_method,
                                                           "steps": kept[0].draft_steps})
                rates.setdefault((label, b), []).append(tps)
                cpu_rates.setdefault((label, b), []).append(cps)
                spec[(label, b)] = spec[(label, b)] + s if (label, b) in spec else s
                tokens[(label, b)] = tokens.get((label, b), 0) + ntok
                seconds[(label, b)] = seconds.get((label, b), 0.0) + kept[0].seconds
                print(f"batch {b:>2} {label:>9} repeat {r}: {tps:7.1f} tok/s {cps:7.1f} tok/cpu-s  "
                      f"acceptance {s.acceptance_rate:.3f}", flush=True)

    table = []
    for b in batch_sizes:
        base = statistics.median(rates[("n0", b)]) if ("n0", b) in rates else None
        cbase = statistics.median(cpu_rates[("n0", b)]) if ("n0", b) in rates else None
        tbase = tokens[("n0", b)] / seconds[("n0", b)] if ("n0", b) in rates else None
        for label, extra in configs.items():
            n = extra["num_speculative_tokens"]
            tps = statistics.median(rates[(label, b)])
            total = tokens[(label, b)] / seconds[(label, b)]
            cps = statistics.median(cpu_rates[(label, b)])
            s = spec[(label, b)]
            row = {
                "batch": b,
                "config": label,
                "n": n,
                "draft_vocab_size": extra.get("draft_vocab_size", 0),
                "draft_sample_method": extra.get("draft_sample_method", "greedy"),
                "tokens_per_s": round(tps, 1),
                "speedup_vs_n0": round(tps / base, 3) if base else None,
                "tokens_per_s_total": round(total, 1),
                "speedup_total_vs_n0": round(total / tbase, 3) if tbase else None,
                "timed_calls": repeats[b],
                "tokens_per_cpu_s": round(cps, 1),
                "cpu_speedup_vs_n0": round(cps / cbase, 3) if cbase else None,
                "acceptance_rate": round(s.acceptance_rate, 3),
                "mean_acceptance_length": round(s.mean_acceptance_length, 3),
                "accepted_per_position": [round(a / s.num_drafts, 3) for a in s.accepted_per_pos] if s.num_drafts else [],
                "step_cost_ratio": round(base * s.mean_acceptance_length / tps, 3) if base and n else None,
                "cpu_step_cost_ratio": round(cbase * s.mean_acceptance_length / cps, 3) if cbase and n else None,
                "mean_response_tokens": round(tokens[(label, b)] / (b * repeats[b]), 1),
            }
            if label == "adaptive":
                row["draft_k"] = [x["k"] for x in adaptive_log[b]]
                row["draft_switch"] = [x["switch"] for x in adaptive_log[b]]  # a short probe's length after it
                row["draft_method"] = [x["method"] for x in adaptive_log[b]]  # "" where the call drafted nothing
                row["predicted_speedup"] = [round(x["predicted"], 3) for x in adaptive_log[b]]
                row["measured_speedup"] = [x["measured"] and round(x["measured"], 3) for x in adaptive_log[b]]
                # Each call's decode steps (CallSteps.summary; seconds rounded to 0.1 ms): where measured
                # and predicted differ, slow steps beside the median or a long tail.
                row["draft_steps"] = [x["steps"] and {k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in x["steps"].items()} for x in adaptive_log[b]]
            table.append(row)
            print(json.dumps(row), flush=True)

    if not args.no_diagnostics and "n1" in engines and 8 in batch_sizes:
        for label in [x for x in configs if x.startswith("n1")]:
            g = run_once(engines[label], prompts[:8], sampling(8, 0.0))[1]
            key = "greedy_b8_n1" if label == "n1" else f"greedy_b8_{label}"
            diag[key] = {"acceptance_rate": round(g.acceptance_rate, 3), "mean_acceptance_length": round(g.mean_acceptance_length, 3)}
        threads: dict[str, list[float]] = {}
        for r in range(repeats.get(8, args.repeats)):
            for t in sorted({1, 2, default_threads}):
                set_threads(t)
                for label in ("n0", "n1"):
                    if label in engines:
                        threads.setdefault(f"threads{t}_{label}", []).append(run_once(engines[label], prompts[:8], sampling(8))[0])  # wall
        set_threads(default_threads)
        diag["threads_b8_tokens_per_s"] = {k: round(statistics.median(v), 1) for k, v in threads.items()}
        diag["default_threads"] = default_threads
        print(json.dumps(diag), flush=True)

    def pick(label: str, b: int) -> dict:
        return next(r for r in table if r["config"] == label and r["batch"] == b)

    have = ("n1", 8) in rates and ("n0", 8) in rates
    ref = pick("n1", 8) if ("n1", 8) in rates else table[0]
    result = {
        "speedup": pick("n1", 8)["speedup_vs_n0"] if have else None,
        "cpu_speedup": pick("n1", 8)["cpu_speedup_vs_n0"] if have else None,
        "acceptance_rate": ref["acceptance_rate"],
        "mean_acceptance_length": ref["mean_acceptance_length"],
        "speedup_draft_vocab": {f"n1-dv{v}": pick(f"n1-dv{v}", 8)["speedup_vs_n0"] for v in dv_sizes if 8 in batch_sizes},
        "cpu_speedup_draft_vocab": {f"n1-dv{v}": pick(f"n1-dv{v}", 8)["cpu_speedup_vs_n0"] for v in dv_sizes
                                    if 8 in batch_sizes},
        "acceptance_draft_vocab": {f"n1-dv{v}": pick(f"n1-dv{v}", 8)["acceptance_rate"] for v in dv_sizes if 8 in batch_sizes},
        "speedup_probabilistic": pick("n1-prob", 8)["speedup_vs_n0"] if args.probabilistic and have else None,
        "acceptance_probabilistic": pick("n1-prob", 8)["acceptance_rate"] if args.probabilistic and 8 in batch_sizes else None,
        "adaptive_ratio": {b: pick("adaptive", b)["speedup_total_vs_n0"] for b in batch_sizes} if args.adaptive and
        ("n0", batch_sizes[0]) in rates else None,
        "adaptive_ratio_median": {b: pick("adaptive", b)["speedup_vs_n0"] for b in batch_sizes} if args.adaptive and
        ("n0", batch_sizes[0]) in rates else None,
        "model": args.model,
        "task_config": TASK_CONFIG,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "repeats": {b: repeats[b] for b in batch_sizes},
        "fresh_seeds": args.fresh_seeds,
        "ignore_eos": args.ignore_eos,
        "adaptive_warmup": args.adaptive_warmup if args.adaptive else None,
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "table": table,
        **diag,
    }
    if result["adaptive_ratio"]:
        result["adaptive_min_ratio"] = min(result["adaptive_ratio"].values())
        result["adaptive_min_ratio_median"] = min(result["adaptive_ratio_median"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"# took {time.perf_counter() - t0:.0f}s", file=sys.stderr)
