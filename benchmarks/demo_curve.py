"""The demo's held-out accuracy after every step: the curve a recipe is chosen from.

Trains the demo's run spec (`services.cli_demo.demo_spec`, overridable below) in this process with
a checkpoint after every step, then loads each checkpoint into one vLLM engine and evaluates it
greedily on the held-out split exactly as `mtprl demo` does (64-token answers, math-verify). The
demo is deterministic, so the curve of a seed is the curve `mtprl demo --seed N --steps S` walks.
Prints one line per evaluated step and one JSON object as its last line.

    .venv/bin/python benchmarks/demo_curve.py --steps 12 --seed 0 --out-dir /tmp/curve
    .venv/bin/python benchmarks/demo_curve.py --steps 6 --lr 1e-5 --prompts-per-step 8 --eval-every 3 --out-dir /tmp/c2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=Path(".cache/models"))
    ap.add_argument("--warm", type=Path, default=None,
                    help="Use this warmed-up checkpoint as it is (no import, no fingerprint check).")
    ap.add_argument("--out-dir", type=Path, required=True, help="Run directory (replaced).")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--prompts-per-step", type=int, default=None)
    ap.add_argument("--samples-per-prompt", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--eval-max-tokens", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=1, help="Evaluate every N steps (and the last step).")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoints (default: deleted after use).")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="Any other spec field, e.g. --set resources.learner_cpus=2 (repeatable).")
    args = ap.parse_args()

    import ray

    from learner.checkpoint import iter_export_tensors, load_policy
    from rollout.config import EngineConfig
    from rollout.engine import RolloutEngine
    from services import run_checkpoint
    from services.cli_demo import demo_spec, prepare_models
    from services.controller import RunController
    from services.evaluate import evaluate
    from services.spec import DataSpec, RunSpec

    t0 = time.perf_counter()
    warm = args.warm or prepare_models(args.models_dir)
    raw = demo_spec(warm, args.steps, args.seed)
    for key, section, value in (("lr", "algorithm", args.lr), ("prompts_per_step", "rollout", args.prompts_per_step),
                                ("samples_per_prompt", "rollout", args.samples_per_prompt),
                                ("temperature", "rollout", args.temperature)):
        if value is not None:
            raw[section][key] = value
    for item in args.set:
        dotted, _, value = item.partition("=")
        *sections, key = dotted.split(".")
        node = raw
        for name in sections:
            node = node.setdefault(name, {})
        node[key] = json.loads(value)
    raw["schedule"]["checkpoint_every"] = 1
    raw["checkpointing"] = {"keep_last": args.steps + 1, "save_optimizer": False}
    spec = RunSpec.model_validate(raw)
    shutil.rmtree(args.out_dir, ignore_errors=True)
    args.out_dir.mkdir(parents=True)

    from services.local_ray import start_local_ray
    start_local_ray()
    try:
        res = RunController("curve", spec, args.out_dir, progress=True, resume=False).run()
    finally:
        ray.shutdown()
    train_s = time.perf_counter() - t0
    if res.state != "completed":
        raise SystemExit(f"run ended {res.state}")
    history = [json.loads(line) for line in (args.out_dir / "metrics.jsonl").read_text().splitlines() if line]

    data = DataSpec.model_validate(raw["data"])
    engine = RolloutEngine(EngineConfig(model=str(warm), num_speculative_tokens=1,
                                        max_model_len=raw["rollout"]["max_model_len"], kv_cache_gib=0.5,
                                        num_threads=2, prompt_overflow="reject"))
    root = run_checkpoint.checkpoint_root(args.out_dir)
    ckpts = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [p for p in ckpts if int(p.name.split("-")[1]) % args.eval_every == 0 or p == ckpts[-1]]
    curve: list[dict] = []
    for step, path in [(0, warm)] + [(int(p.name.split("-")[1]), p / "policy") for p in ckpts]:
        if step:
            engine.update_weights(step, iter_export_tensors(load_policy(path)))
        r = evaluate(path, data, max_tokens=args.eval_max_tokens, temperature=0.0, engine=engine, progress=False)
        reward = next((h.get("batch/reward_mean") for h in history if h.get("step") == step), None)
        point = {"step": step, "accuracy": r["pass_at_1"], "truncated_frac": r["truncated_frac"],
                 "mean_response_tokens": r["mean_response_tokens"], "batch_reward": reward}
        curve.append(point)
        print(json.dumps(point), flush=True)
        if step and not args.keep:
            shutil.rmtree(path.parent, ignore_errors=True)
    base = curve[0]["accuracy"]
    best = max(curve[1:], key=lambda p: p["accuracy"])
    print(json.dumps({"seed": args.seed, "steps": args.steps, "spec": {k: raw[k] for k in ("algorithm", "rollout")},
                      "accuracy_before": base, "accuracy_after": curve[-1]["accuracy"],
                      "gain_end": curve[-1]["accuracy"] - base, "best_step": best["step"],
                      "gain_best": best["accuracy"] - base, "curve": [p["accuracy"] for p in curve],
                      "train_seconds": train_s, "wall_seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
