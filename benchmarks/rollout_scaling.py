"""Rollout fan-out: one engine with two threads vs two engines with one thread each.

    .venv/bin/python benchmarks/rollout_scaling.py                  # SmolLM2 (warm MTP head) if cached, else tiny
    .venv/bin/python benchmarks/rollout_scaling.py --model tiny --steps 3 --fit-steps 20   # smoke run

Two real runs (`services.controller.RunController`, which places its own learner, engines and
reward actor) on the same data, seeds and schedule: ``rollout.engines: 1`` with
``cpus_per_engine: 2``, then ``engines: 2`` with ``cpus_per_engine: 1`` (the same cores for
generation). The model: ``.cache/models/smollm2-mtp1-warm`` (the demo's spec, `mtprl demo`
builds it) when it exists and ``--model auto``, else the tiny guessing policy
(`learner.tiny.write_guessing_policy`) on the toy task.

The last line is a JSON object:

- ``engines_busy_min``: the lowest per-engine busy fraction of the 2-engine run during its
  generation phases — seconds engine i had a call outstanding over seconds any engine had one
  (goal ≥ 0.8: the dispatcher keeps every engine fed).
- ``groups_per_engine_min``: the fewest prompt groups any engine of the 2-engine run returned
  (> 0: every engine took part).
- ``two_over_one``: trained samples per second (from the end of step 1 to the end of the run),
  2 engines over 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WARM = REPO / ".cache" / "models" / "smollm2-mtp1-warm"


def _spec(model: str, data: Path | None, args, engines: int) -> dict:
    if data is None:  # the demo's task and shape
        from services.cli_demo import demo_spec

        spec = demo_spec(Path(model), args.steps)
    else:
        spec = {
            "model": {"path": model},
            "data": {"dataset": f"jsonl:{data}", "size": 100, "held_out_fraction": 0.0, "seed": 0},
            "algorithm": {"algorithm": "grpo", "lr": 3e-4, "mini_batches": 2, "mtp_regime": "occ"},
            "rollout": {"samples_per_prompt": 8, "prompts_per_step": 4, "max_tokens": 16, "temperature": 1.0,
                        "max_model_len": 256, "kv_cache_gib": 0.1},
            "reward": {"workers": 1},
            "schedule": {"steps": args.steps, "max_staleness": 1, "checkpoint_every": 0},
        }
    spec["rollout"]["engines"] = engines
    if args.prompts:
        spec["rollout"]["prompts_per_step"] = args.prompts
    spec["resources"] = {"learner_cpus": 1, "cpus_per_engine": 2 // engines, "cpus_per_reward_worker": 1}
    spec["schedule"].update(steps=args.steps, checkpoint_every=0)
    return spec


def _samples_per_s(res) -> float:
    h = res.history
    return sum(x["batch/samples"] for x in h[1:]) / (h[-1]["time/elapsed_s"] - h[0]["time/elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="auto", help="auto (SmolLM2 warm if cached, else tiny), tiny, or a checkpoint path")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=0, help="prompts_per_step (0: the spec's)")
    ap.add_argument("--fit-steps", type=int, default=300, help="training steps of the tiny guessing policy")
    args = ap.parse_args()

    import ray

    from services.controller import RunController

    tmp = Path(tempfile.mkdtemp(prefix="mtprl-scaling-"))
    data = None
    if args.model == "tiny" or (args.model == "auto" and not (WARM / "model.safetensors").is_file()):
        from learner.tiny import make_tokenizer, write_guessing_policy, write_toy_dataset
        from reward.datasets import jsonl_items

        data = write_toy_dataset(tmp / "toy.jsonl")
        prompts = [it.prompt for it in jsonl_items(data, tokenizer=make_tokenizer())]
        model, name = str(write_guessing_policy(tmp / "guess", prompts, steps=args.fit_steps, lr=1e-2)), "tiny-guessing"
    else:
        model = str(WARM if args.model == "auto" else Path(args.model))
        name = Path(model).name
    from services.local_ray import start_local_ray
    start_local_ray(8)
    out: dict = {"model": name, "steps": args.steps, "cpus": os.cpu_count()}
    try:
        runs = {}
        for engines in (1, 2):
            spec = _spec(model, data, args, engines)
            ctl = RunController(f"scaling-{engines}", spec, tmp / f"e{engines}")
            res = ctl.run()
            d = ctl.dispatch
            any_busy = max(d.clock.busy, 1e-9)
            runs[engines] = {
                "samples_per_s": round(_samples_per_s(res), 3),
                "busy_frac": [round(c.busy / any_busy, 3) for c in d.engine_clocks],
                "groups": list(d.groups_served),
                "counters": res.counters,
            }
            print(f"{engines} engine(s): {runs[engines]}", flush=True)
        out["runs"] = {str(k): v for k, v in runs.items()}
        out["engines_busy_min"] = min(runs[2]["busy_frac"])
        out["groups_per_engine_min"] = min(runs[2]["groups"])
        out["two_over_one"] = round(runs[2]["samples_per_s"] / runs[1]["samples_per_s"], 3)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
