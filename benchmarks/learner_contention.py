"""The learner's step beside a generating rollout engine, with OpenMP threads spinning or sleeping.

On a CPU machine the async loop runs the learner (2 torch threads in the demo) while a vLLM engine
generates on the same cores. torch's OpenMP threads spin at every barrier by default; a spinning
thread holds the core its descheduled partner (or the engine) needs. This script times the demo's
learner step (SmolLM2 + 1 MTP head, the demo's algorithm, 48 samples: prompt 55 + responses of
20-64 tokens) alone and beside an engine that generates without pause (the demo's engine
settings, 8 prompts × 6 samples, T = 0.7), once with ``OMP_WAIT_POLICY=ACTIVE`` and once
``PASSIVE`` (each in a fresh process: OpenMP reads it at start-up), and the engine's tokens/s
during each. The last line is a JSON object.

    .venv/bin/python benchmarks/learner_contention.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def learner_child(model: str, steps: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from learner.batch import TrainBatch
    from learner.checkpoint import load_policy
    from learner.step import Learner
    from services.cli_demo import demo_spec
    from services.spec import RunSpec

    torch.set_num_threads(2)
    cfg = RunSpec.model_validate(demo_spec(Path(model), 5)).algorithm
    lrn = Learner(load_policy(Path(model)), cfg)
    times = []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        b, p, rmax = 48, 55, 64
        lens = torch.randint(20, rmax + 1, (b,), generator=g)
        lens[torch.rand(b, generator=g) < 0.4] = rmax  # the warm policy's truncated answers
        ids = torch.randint(3, 49000, (b, p + rmax), generator=g)
        attn = torch.zeros(b, p + rmax, dtype=torch.long)
        resp = torch.zeros(b, p + rmax, dtype=torch.bool)
        for r, n in enumerate(lens.tolist()):
            attn[r, :p + n] = 1
            resp[r, p:p + n] = True
        rewards = (torch.rand(b, generator=g) < 0.25).float()
        batch = TrainBatch(ids, attn, resp, rewards, torch.arange(b) // 6,
                           behav_logprobs=torch.full((b, p + rmax), -2.0),
                           policy_versions=torch.zeros(b, dtype=torch.long))
        t = time.perf_counter()
        lrn.step(batch)
        times.append(time.perf_counter() - t)
    print(json.dumps({"step_s": times}), flush=True)


def engine_child(model: str, ready: str, stop: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from rollout.config import EngineConfig
    from rollout.engine import RolloutEngine

    eng = RolloutEngine(EngineConfig(model=model, num_speculative_tokens=1, max_model_len=512, kv_cache_gib=0.5,
                                     num_threads=1))
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Calculate 3 + 4."}], add_generation_prompt=True)
    Path(ready).write_text("1")
    tokens, t0 = 0, time.perf_counter()
    while not Path(stop).exists():
        out = eng.generate([ids] * 8, {"n": 6, "temperature": 0.7, "max_tokens": 64})
        tokens += out.num_generated_tokens
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}), flush=True)


def _last_json(text: str) -> dict:
    """The child's JSON line (vLLM logs to stdout as well)."""
    return json.loads([ln for ln in text.strip().splitlines() if ln.startswith("{")][-1])


def run(model: str, steps: int, policy: str, beside: bool, tmp: Path) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": "2"}
    eng = None
    ready, stop = tmp / "ready", tmp / "stop"
    for f in (ready, stop):
        f.unlink(missing_ok=True)
    if beside:
        eng = subprocess.Popen([sys.executable, __file__, "--child", "engine", "--model", model, "--ready", str(ready),
                                "--stop", str(stop)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True)
        while not ready.exists():
            if eng.poll() is not None:
                raise SystemExit("the engine process exited before it was ready")
            time.sleep(1)
    out = subprocess.run([sys.executable, __file__, "--child", "learner", "--model", model, "--steps", str(steps)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, check=True)
    res = _last_json(out.stdout)
    if eng is not None:
        stop.write_text("1")
        e = _last_json(eng.communicate(timeout=300)[0])
        res["engine_tok_s"] = e["tokens"] / max(e["seconds"], 1e-9)
    steady = res["step_s"][1:] or res["step_s"]  # the first step includes one-off allocation
    res["step_s_median"] = sorted(steady)[len(steady) // 2]
    print(f"{policy:<8} {'beside engine' if beside else 'alone':<14} steps {[round(x, 1) for x in res['step_s']]}"
          + (f" engine {res['engine_tok_s']:.1f} tok/s" if beside else ""), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / ".cache/models/smollm2-mtp1-warm"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-alone", action="store_true", help="Only the two runs beside an engine.")
    ap.add_argument("--child", choices=["learner", "engine"])
    ap.add_argument("--ready")
    ap.add_argument("--stop")
    args = ap.parse_args()
    if args.child == "learner":
        return learner_child(args.model, args.steps)
    if args.child == "engine":
        return engine_child(args.model, args.ready, args.stop)
    if not Path(args.model, "model.safetensors").is_file():
        raise SystemExit(f"no checkpoint at {args.model}: run `make demo` once (it builds the warmed-up head)")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"learner-contention-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    places = (True,) if args.skip_alone else (False, True)
    r = {(p, b): run(args.model, args.steps, p, b, tmp) for b in places for p in ("ACTIVE", "PASSIVE")}
    out = {} if args.skip_alone else {
        "step_s_alone_active": r["ACTIVE", False]["step_s_median"],
        "step_s_alone_passive": r["PASSIVE", False]["step_s_median"],
        "alone_passive_over_active": r["PASSIVE", False]["step_s_median"] / r["ACTIVE", False]["step_s_median"]}
    out |= {
        "step_s_beside_engine_active": r["ACTIVE", True]["step_s_median"],
        "step_s_beside_engine_passive": r["PASSIVE", True]["step_s_median"],
        "engine_tok_s_active": r["ACTIVE", True]["engine_tok_s"],
        "engine_tok_s_passive": r["PASSIVE", True]["engine_tok_s"],
    }
    out["beside_passive_over_active"] = out["step_s_beside_engine_passive"] / out["step_s_beside_engine_active"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
