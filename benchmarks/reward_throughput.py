"""Reward throughput: math verifications per second, and HumanEval programs per second through the
sandbox next to the same programs as plain subprocesses.

    .venv/bin/python benchmarks/reward_throughput.py [--math-items 2000] [--rounds 2]

Math: a mixed, realistic set shaped like GRPO groups (see `math_set`: reasoning-gym golds with
boxed / 'answer is' / '####' / missing answers, right and wrong, plus the LaTeX cases of the test
table) through `MathVerifierPool` with 2 workers, 64 items per batch, after the workers are up;
once with the default verdict cache and once without it (`math_uncached_per_s`); and a set with
no repeated gold or answer and no plain integers (`math_distinct_per_s`: every item parsed and
compared by math-verify, the worst case for every shortcut).
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


def math_set(n: int, seed: int = 0, group: int = 8) -> list[tuple[str, str]]:
    """GRPO-shaped: groups of `group` completions sharing a gold; each sample is right with
    probability 0.5, else one of a few common wrong answers or a random one; answers come boxed
    (60%), as 'The answer is' (15%), as '#### X' (15%) or not at all (10%). 15% of the groups use
    the LaTeX golds of the test table (fractions, radicals, sets, intervals, units)."""
    from math_table import CASES

    rng = random.Random(seed)
    golds = [it.gold for t in ("basic_arithmetic", "chain_sum", "gsm_symbolic")
             for it in reasoning_gym_items(t, seed=seed, size=300)]
    out: list[tuple[str, str]] = []
    while len(out) < n:
        if rng.random() < 0.15:
            g, c, _ = rng.choice(CASES)
            answers = [c] * group  # table completions already carry their answer
            out += [(g, f"Step {k}: simplify.\n" + a) for k, a in enumerate(answers)]
            continue
        g = rng.choice(golds)
        base = int(float(g)) if g.lstrip("-").replace(".", "", 1).isdigit() else 0
        common_wrong = [str(base + d) for d in (-1, 1, 10)]
        for k in range(group):
            r = rng.random()
            ans = g if r < 0.5 else rng.choice(common_wrong) if r < 0.85 else str(rng.randint(-999, 9999))
            reasoning = f"Sample {k}. Let me work through this step by step, combining the partial results.\n" * 3
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
    return out[:n]


def distinct_set(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Worst case for every cache: no gold and no (gold, answer) pair occurs twice, and none of
    them is a plain integer (which skips math-verify): fractions, decimals, radicals, sums."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        p, q = 1000 + k, 1001 + k + rng.randint(0, 5)
        kind = k % 4
        if kind == 0:
            g, right, wrong = f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"\\frac{{{q}}}{{{p}}}"
        elif kind == 1:
            g, right, wrong = f"{p}.5", f"\\frac{{{2 * p + 1}}}{{2}}", f"{p}.25"
        elif kind == 2:
            g, right, wrong = f"{p}\\sqrt{{2}}", f"\\sqrt{{{2 * p * p}}}", f"{p}\\sqrt{{3}}"
        else:
            g, right, wrong = f"{p}+{q}", f"{p + q}.0", f"{p + q + 1}"
        ans = right if rng.random() < 0.5 else wrong
        out.append((g, f"Working it out step by step.\nSo the final answer is $\\boxed{{{ans}}}$."))
    return out


def bench_math(n: int) -> dict:
    items = math_set(n)
    res: dict = {}
    for name, cache, data in (("math_per_s", 65536, items), ("math_uncached_per_s", 0, items),
                              ("math_distinct_per_s", 0, distinct_set(n))):
        with MathVerifierPool(MathConfig(num_workers=2, cache_size=cache)) as pool:
            pool.verify_batch([("1", "\\boxed{1}")] * 2)  # workers up
            t0 = time.perf_counter()
            verdicts = []
            for k in range(0, n, 64):  # the controller sends a few groups at a time
                verdicts += pool.verify_batch(data[k:k + 64])
            dt = time.perf_counter() - t0
            res[name] = n / dt
            if data is items:
                res.setdefault("math_outcomes", {o: sum(v.outcome == o for v in verdicts)
                                                 for o in ("ok", "wrong", "timeout", "error")})
    res["math_items"] = n
    return res


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
    print(f"math: {res['math_per_s']:.0f} verifications/s ({res['math_uncached_per_s']:.0f}/s without the verdict "
          f"cache, {res['math_distinct_per_s']:.0f}/s with no repeats at all) over {args.math_items} items "
          f"{res['math_outcomes']}", flush=True)
    res.update(bench_sandbox(args.rounds))
    print(f"sandbox: {res['sandbox_per_s']:.1f}/s vs plain {res['unsandboxed_per_s']:.1f}/s "
          f"(x{res['sandbox_over_unsandboxed']:.2f}); fresh sandbox per program {res['sandbox_fresh_per_program_per_s']:.1f}/s",
          flush=True)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
