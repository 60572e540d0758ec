"""Does the drafter pay during RL? Issue 17's benchmark, in one run.

1. Trains SmolLM2 + 1 MTP head at temperature 1 under `detach`, `occ` and `occ+distill` (same
   data, seed and steps; `services.compare.run_comparison`, engines shared), on the demo's task
   (two-term single-digit arithmetic, `services.cli_demo.DEMO_TASK`) with `--draft-method` drafts
   (default ``auto``: each engine drafts samples of the head's q or its argmax, per call, whichever
   it measures accepted more; ``draft_probabilistic_by_step`` in the JSON is the share of engines
   whose last call drew samples). The acceptance during RL is the engines' own
   (`rollout/spec_acceptance_rate`: the policy's own T = 1 samples, drafted by the head being
   trained), averaged over the last 5 steps; held-out accuracy is greedy, as `mtprl demo`'s.
2. Measures the spec-decode configurations on the trained `occ+distill` policy with
   `benchmarks/spec_decode.py` (batch 1, 8, 32; temperature 0 and 1): adaptive drafting
   (0..`--adaptive-k` tokens, probabilistic drafts at T = 1, short probes of `--probe-steps` decode
   steps, a `--draft-vocab` pruned drafter vocabulary ranked from the no-draft engine's answers
   since a trained checkpoint carries no ``draft_vocab.json``) against no drafting, timed round
   robin in one process. A ratio is of whole-run throughput (tokens of all timed calls over their
   time), so probes count at the rate they run at; the median per-call ratio is
   ``adaptive_ratio_median``.

The last line is one JSON object: ``t1_acceptance_end`` (occ+distill), ``t1_acceptance_baseline``
(occ), ``accuracy_delta_vs_detach`` (occ+distill − detach, held-out), ``adaptive_min_ratio`` (lowest
adaptive / no-draft tokens/s over the six configurations) and ``t1_speedup_batch8`` (adaptive at
T = 1, batch 8), with the comparison table and both spec-decode results; per row also
``entropy_end`` and ``acceptance_at_entropy`` (acceptance read at 0.5 and 1.0 nats a token on the
line through the row's steps: rows whose policies sharpened differently compared at equal entropy).

    .venv/bin/python benchmarks/spec_rl.py --out /tmp/spec_rl            # 30 steps per regime
    .venv/bin/python benchmarks/spec_rl.py --out /tmp/s --steps 2 --skip-decode   # a smoke run
    .venv/bin/mtprl demo --seed 0 && .venv/bin/python benchmarks/spec_rl.py --out /tmp/spec_rl --init runs/<id>
    .venv/bin/python benchmarks/spec_rl.py --out /tmp/spec_rl_lr --init runs/<id> --mtp-lr 1e-3

``--regimes occ+distill --steps 90`` trains one row for longer (a new ``--out``: the base spec differs),
to see where the head's RL-time acceptance levels off; ``acceptance_by_step`` in the JSON is each
row's per-step trajectory.

``--mtp-lr`` gives the MTP modules their own AdamW rate (``algorithm.mtp.lr``) in every regime: at
the RL rate (1e-5) AdamW moves a head ~1e-5 per step whatever the distillation coefficient, while
warm-ups train heads at 3e-3.

``--init`` starts every regime from a trained policy (a run directory: its latest checkpoint, or a
checkpoint's ``policy`` directory) instead of the warmed-up SmolLM2. From the untrained model the
demo's task gives RL almost no signal at T = 1 (session 11: 5 correct answers in 480 samples over
30 steps of ``detach``), so the accuracy comparison would measure evaluation noise; a demo-trained
policy (greedy 0.4–0.55 held-out) is right often enough at T = 1 for the regimes to differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = ["detach", "occ", "occ+distill"]


def init_policy(path: Path) -> Path:
    """The policy directory that ``--init`` names: a run directory's latest checkpoint, or a policy."""
    from services import run_checkpoint

    try:
        return run_checkpoint.policy_dir(path)
    except ValueError as e:
        raise SystemExit(f"--init {e}") from None


def base_spec(model: Path, args) -> dict:
    from services.cli_demo import demo_spec

    raw = demo_spec(model, args.steps, args.seed)
    raw["name"] = "spec-rl"
    raw["rollout"].update(temperature=1.0, prompts_per_step=args.prompts_per_step,
                          samples_per_prompt=args.samples_per_prompt, max_tokens=args.max_tokens,
                          draft_sample_method=args.draft_method)
    raw["algorithm"]["lr"] = args.lr
    raw["algorithm"]["mtp"] = {"distill": {"kind": args.distill_kind, "coef": args.distill_coef,
                                           "head_steps": args.head_steps, "replay": args.replay}}
    if args.mtp_lr is not None:  # every regime: the heads' rate is a setting of the run, not of a row
        raw["algorithm"]["mtp"]["lr"] = args.mtp_lr
    raw["schedule"]["checkpoint_every"] = 0
    return raw


def _metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(run_dir: Path, key: str, digits: int = 3) -> list[float | None]:
    """One metric of a row at each step (None where the step lacks it)."""
    return [round(r[key], digits) if key in r else None for r in _metric_rows(run_dir)]


def acceptance_by_step(run_dir: Path) -> list[float | None]:
    """The engines' acceptance during RL at each step (the policy's own T = 1 samples)."""
    return by_step(run_dir, "rollout/spec_acceptance_rate")


def probabilistic_by_step(run_dir: Path) -> list[float | None]:
    """Each step's share of engines whose last call drafted samples of q (not the argmax)."""
    out = []
    for row in _metric_rows(run_dir):
        v = [x for key, x in row.items() if key.startswith("rollout/engine_draft_probabilistic/")]
        out.append(round(sum(v) / len(v), 2) if v else None)
    return out


def tail_mean(values: list[float | None], n: int = 5) -> float | None:
    kept = [v for v in values[-n:] if v is not None]
    return round(sum(kept) / len(kept), 3) if kept else None


def at_entropy(acceptance: list[float | None], entropy: list[float | None],
               points: tuple[float, ...] = (0.5, 1.0)) -> dict[str, float] | None:
    """A row's acceptance read at equal policy entropy: the least-squares line of its per-step
    acceptance on its per-step entropy, at ``points`` (nats a token). Runs of one seed sharpen their
    policies differently and acceptance follows the entropy (session 17), so rows are compared
    here, not at their last steps alone. Step index drives both, so this is a reading, not a test."""
    pairs = [(e, a) for a, e in zip(acceptance, entropy) if a is not None and e is not None]
    if len(pairs) < 3 or len({e for e, _ in pairs}) < 2:
        return None
    n = len(pairs)
    me, ma = sum(e for e, _ in pairs) / n, sum(a for _, a in pairs) / n
    slope = sum((e - me) * (a - ma) for e, a in pairs) / sum((e - me) ** 2 for e, _ in pairs)
    return {f"{x:.1f}": round(ma + slope * (x - me), 3) for x in points}


def spec_decode(model: Path, temperature: float, args) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "spec_decode.py"), "--model", str(model),
           "--spec-tokens", "0", "--batch-sizes", "1,8,32", "--adaptive", str(args.adaptive_k),
           "--adaptive-method", args.draft_method if temperature > 0 else "greedy",
           "--temperature", str(temperature), "--task-config", "demo", "--max-tokens", str(args.decode_max_tokens),
           "--repeats", str(args.repeats), "--repeats-by-batch", args.decode_repeats, "--no-diagnostics",
           "--adaptive-probe-steps", str(args.probe_steps), "--adaptive-draft-vocab", str(args.draft_vocab)]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=Path(".cache/models"))
    ap.add_argument("--out", type=Path, required=True, help="Comparison directory (a finished regime is kept).")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None,
                    help="Start from this trained policy (run directory or policy directory), not the warm-up.")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--distill-kind", default="kl", choices=("kl", "topk_ce", "tv"))
    ap.add_argument("--distill-coef", type=float, default=1.0)
    ap.add_argument("--head-steps", type=int, default=0,
                    help="algorithm.mtp.distill.head_steps of the occ+distill row: head-only distillation steps after "
                    "each update (the rows without distillation have none)")
    ap.add_argument("--replay", type=int, default=0,
                    help="algorithm.mtp.distill.replay of the occ+distill row: earlier update batches the head steps "
                    "also run on (needs --head-steps)")
    ap.add_argument("--mtp-lr", type=float, default=None,
                    help="algorithm.mtp.lr, the MTP modules' own AdamW rate (default: --lr for everything).")
    ap.add_argument("--draft-method", default="auto", choices=("auto", "probabilistic", "greedy"),
                    help="how the RL engines and the adaptive decode engine draft at T = 1 (all lossless): "
                    "probabilistic drafts are accepted with 1 - TV(p, q), greedy ones with p(argmax q), which is "
                    "larger once the policy is peaked and the head under-confident (benchmarks/head_acceptance.py); "
                    "auto chooses per call from the acceptance each engine measures")
    ap.add_argument("--adaptive-k", type=int, default=3)
    ap.add_argument("--decode-max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-repeats", default="1:16,8:6,32:3", metavar="B:R,...",
                    help="timed calls per batch size: a probe is one call in 8-64, so the whole-run ratio needs many "
                    "calls where they are cheap (batch 1 ~4 s a call, 32 ~30 s)")
    ap.add_argument("--probe-steps", type=int, default=8, help="the adaptive engine's short probes (0: whole calls)")
    ap.add_argument("--draft-vocab", type=int, default=1024,
                    help="the adaptive engine's pruned drafter vocabulary (ranked from no-draft answers; 0: full)")
    ap.add_argument("--skip-decode", action="store_true", help="Only the training part.")
    ap.add_argument("--regimes", default=",".join(ROWS),
                    help="comma-separated rows to train (default all three; a subset leaves the keys it lacks null)")
    args = ap.parse_args()
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if not regimes or set(regimes) - set(ROWS):
        raise SystemExit(f"--regimes: choose among {ROWS}, got {args.regimes!r}")
    if not args.skip_decode and "occ+distill" not in regimes:
        raise SystemExit("the decode half measures the trained occ+distill policy: include it or pass --skip-decode")

    import ray

    from services import run_checkpoint
    from services.cli_demo import prepare_models
    from services.compare import render_markdown, run_comparison
    from services.spec import RunSpec

    start = init_policy(args.init) if args.init else prepare_models(args.models_dir)
    print(f"initial policy: {start}", flush=True)
    base = RunSpec.model_validate(base_spec(start, args))
    from services.local_ray import start_local_ray
    start_local_ray()
    try:
        cmp = run_comparison(base, args.out, regimes)
    finally:
        ray.shutdown()
    print(render_markdown(cmp), flush=True)
    rows = {r.regime: r for r in cmp.rows}
    def pick(regime: str, field: str):
        return getattr(rows[regime], field) if regime in rows else None

    delta = (rows["occ+distill"].accuracy - rows["detach"].accuracy) if {"occ+distill", "detach"} <= rows.keys() else None
    result: dict = {
        "t1_acceptance_end": pick("occ+distill", "acceptance"),
        "t1_acceptance_baseline": pick("occ", "acceptance"),
        "t1_acceptance_detach": pick("detach", "acceptance"),
        "accuracy_delta_vs_detach": delta,
        "accuracy": {r: rows[r].accuracy for r in regimes},
        "accuracy_before": cmp.accuracy_before,
        "eval_acceptance": {r: rows[r].eval_acceptance for r in regimes},
        "acceptance_by_step": {r: acceptance_by_step(args.out / r) for r in regimes},
        "draft_probabilistic_by_step": {r: probabilistic_by_step(args.out / r) for r in regimes},
        # Acceptance follows how far RL has sharpened the policy (docs/benchmarks.md, session 17), and
        # that differs between runs of the same seed once drafting draws other samples: each row's
        # main-head entropy (nats a token, learner's rows) over its last 5 steps, to read it beside.
        "entropy_end": {r: tail_mean(by_step(args.out / r, "policy/entropy")) for r in regimes},
        "acceptance_at_entropy": {r: at_entropy(acceptance_by_step(args.out / r), by_step(args.out / r, "policy/entropy"))
                                  for r in regimes},
        "entropy_by_step": {r: by_step(args.out / r, "policy/entropy", 2) for r in regimes},
        "steps": args.steps, "task": "demo (reasoning_gym basic_arithmetic, 2 single-digit terms)",
        "distill": {"kind": args.distill_kind, "coef": args.distill_coef, "head_steps": args.head_steps,
                    "replay": args.replay},
        "lr": args.lr, "mtp_lr": args.mtp_lr,
        "draft_method": args.draft_method,
        "init": str(start),
    }
    if not args.skip_decode:
        trained = run_checkpoint.latest(args.out / "occ+distill") / "policy"
        decode = {t: spec_decode(trained, t, args) for t in (0.0, 1.0)}
        ratios = [v for d in decode.values() for v in d["adaptive_ratio"].values()]
        result.update(adaptive_min_ratio=min(ratios),
                      adaptive_ratio_median={str(t): d["adaptive_ratio_median"] for t, d in decode.items()},
                      t1_speedup_batch8=decode[1.0]["adaptive_ratio"].get("8", decode[1.0]["adaptive_ratio"].get(8)),
                      adaptive_ratio={str(t): d["adaptive_ratio"] for t, d in decode.items()},
                      spec_decode={str(t): d for t, d in decode.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
