"""Reward throughput: math verifications per second, and HumanEval programs per second through the
sandbox next to the same programs as plain subprocesses.

    .venv/bin/python benchmarks/reward_throughput.py [--math-items 2000] [--rounds 2]

Math: a mixed, realistic set (reasoning-gym golds with boxed / 'answer is' / '####' / missing
answers, right and wrong, plus the LaTeX cases of the test table: fractions, radicals, sets,
intervals, units) through `MathVerifierPool` with 2 workers, after the workers are up.
Sandbox: the 164 HumanEval canonical solutions graded by `CodeGrader` (bubblewrap, 2 programs at
a time, sandboxes warm), and the same program + test + `check(entry_point)` files run by the same
interpreter with the same flags as plain `subprocess.run`, 2 at a time; rounds alternate and the
best round of each is kept. Also reported: a fresh sandbox per program (`jobs_per_sandbox=1`).
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward.code_grader import CodeGrader  # noqa: E402
from reward.config import CodeConfig, MathConfig, SandboxConfig  # noqa: E402
from reward.datasets import humaneval_items, reasoning_gym_items  # noqa: E402
from reward.math_verify_worker import MathVerifierPool  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data" / "reward"))


def math_set(n: int, seed: int = 0) -> list[tuple[str, str]]:
    from math_table import CASES

    rng = random.Random(seed)
    golds = [it.gold for t in ("basic_arithmetic", "chain_sum", "gsm_symbolic") for it in reasoning_gym_items(t, seed=seed, size=200)]
    reasoning = "Let me work through this step by step. First we compute the partial sums, then combine them.\n" * 3
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.15:
            g, c, _ = rng.choice(CASES)
            out.append((g, reasoning + c))
            continue
        g = rng.choice(golds)
        ans = g if rng.random() < 0.5 else str(int(float(g)) + rng.choice([-1, 1, 10])) if g.lstrip("-").isdigit() else g + "1"
        style = rng.random()
        if style < 0.6:
            c = f"{reasoning}So the final answer is $\\boxed{{{ans}}}$."
        elif style < 0.75:
            c = f"{reasoning}The answer is {ans}."
        elif style < 0.9:
            c = f"{reasoning}#### {ans}"
        else:
            c = reasoning + "I could not finish."
        out.append((g, c))
    return out


def bench_math(n: int) -> dict:
    items = math_set(n)
    with MathVerifierPool(MathConfig(num_workers=2)) as pool:
        pool.verify_batch(items[:20])  # workers up and warm
        t0 = time.perf_counter()
        verdicts = pool.verify_batch(items)
        dt = time.perf_counter() - t0
        counts = {o: sum(v.outcome == o for v in verdicts) for o in ("ok", "wrong", "timeout", "error")}
    return {"math_per_s": n / dt, "math_items": n, "math_outcomes": counts}


def plain_files(items, tmp: Path, python: str, flags: list[str]) -> list[list[str]]:
    cmds = []
    for i, it in enumerate(items):
        f = tmp / f"p{i}.py"
        f.write_text(it.meta["reference_program"] + "\n\n" + it.gold.test + f"\n\ncheck({it.gold.entry_point})\n")
        cmds.append([python, *flags, str(f)])
    return cmds


def run_plain(cmds: list[list[str]]) -> float:
    def one(cmd):
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60).returncode

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        codes = list(ex.map(one, cmds))
    dt = time.perf_counter() - t0
    assert all(c == 0 for c in codes), f"{sum(c != 0 for c in codes)} plain runs failed"
    return len(cmds) / dt


def run_sandbox(grader: CodeGrader, items) -> float:
    pairs = [(it.meta["reference_program"], it.gold) for it in items]
    t0 = time.perf_counter()
    verdicts = grader.grade_batch(pairs)
    dt = time.perf_counter() - t0
    bad = [v for v in verdicts if v.outcome != "ok"]
    assert not bad, bad[:3]
    return len(pairs) / dt


def bench_sandbox(rounds: int) -> dict:
    items = humaneval_items()
    cfg = SandboxConfig(max_parallel=2)
    grader = CodeGrader(CodeConfig(sandbox=cfg))
    fresh = CodeGrader(CodeConfig(sandbox=cfg.model_copy(update={"jobs_per_sandbox": 1})))
    grader.grade_batch([(it.meta["reference_program"], it.gold) for it in items[:4]])  # sandboxes up
    sbx, plain, fresh_rates = [], [], []
    with tempfile.TemporaryDirectory() as d:
        cmds = plain_files(items, Path(d), cfg.python, cfg.python_flags)
        for _ in range(rounds):
            plain.append(run_plain(cmds))
            sbx.append(run_sandbox(grader, items))
        fresh_rates.append(run_sandbox(fresh, items))
    grader.sandbox.close()
    fresh.sandbox.close()
    return {"sandbox_per_s": max(sbx), "unsandboxed_per_s": max(plain),
            "sandbox_over_unsandboxed": max(sbx) / max(plain), "sandbox_fresh_per_program_per_s": max(fresh_rates),
            "sandbox_rounds_per_s": [round(x, 1) for x in sbx], "unsandboxed_rounds_per_s": [round(x, 1) for x in plain],
            "interpreter": " ".join([cfg.python, *cfg.python_flags])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math-items", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    res = {}
    res.update(bench_math(args.math_items))
    print(f"math: {res['math_per_s']:.0f} verifications/s over {args.math_items} items {res['math_outcomes']}", flush=True)
    res.update(bench_sandbox(args.rounds))
    print(f"sandbox: {res['sandbox_per_s']:.1f}/s vs plain {res['unsandboxed_per_s']:.1f}/s "
          f"(x{res['sandbox_over_unsandboxed']:.2f}); fresh sandbox per program {res['sandbox_fresh_per_program_per_s']:.1f}/s",
          flush=True)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
