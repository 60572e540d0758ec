"""`mtprl demo`: the main job end to end on this machine.

1. import SmolLM2-135M-Instruct with one MTP head (cached after the first run);
2. warm the head up on the model's own answers (cached);
3. held-out accuracy of the starting policy (`services.evaluate`, greedy, the training verifier);
4. start the control plane (`mtprl serve` in a subprocess: embedded Redis, this process's local
   Ray, the real run controller) and submit the run **through the REST API**;
5. follow it (step, reward, accuracy, clip fraction, λ, acceptance, tokens/s, ETA) until it ends:
   GRPO with the MPO block ratio (K = 2) and OCC-trained MTP head, vLLM rollouts with MTP drafting,
   math-verify rewards, asynchronous updates (max_staleness 1);
6. held-out accuracy of the trained policy, the run report, and ``runs/<run id>/summary.json``,
   whose path is printed last.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

#: The task: two-term single-digit addition and subtraction. SmolLM2-135M-Instruct gets ~20 % of
#: these right greedily (it often mis-adds or rambles past the token budget), far below the ceiling.
DEMO_TASK = {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+", "-"],
             "allow_parentheses": False, "allow_negation": False}


def task_options(value: str | None) -> dict[str, Any]:
    """A ``--task-config`` value as reasoning-gym options: ``demo`` = `DEMO_TASK`, else a JSON
    object; None or '' = none (the task's defaults). Raises ValueError on anything else."""
    if not value:
        return {}
    if value == "demo":
        return dict(DEMO_TASK)
    try:
        options = json.loads(value)
    except ValueError as e:
        raise ValueError(f"--task-config must be a JSON object (or 'demo'): {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--task-config must be a JSON object (or 'demo'), got {type(options).__name__}")
    return options


#: Training steps of the default demo (8 prompts × 6 samples each).
DEMO_STEPS = 5
#: Answer cap of the warm-up's own answers: the demo's rollout budget (``rollout.max_tokens``).
#: The head is trained on what it will draft for; at the recipe's default 128 the answers took
#: twice the generation and head-training time of a fresh clone's first demo (docs/benchmarks.md).
DEMO_WARMUP_MAX_TOKENS = 64


def demo_spec(model: Path, steps: int, seed: int = 0) -> dict[str, Any]:
    """The default run: small groups and short answers, sized for two CPU cores. ``seed`` picks the
    data (which problems are trained on and which are held out) and the sampling seeds.

    Why these numbers (docs/benchmarks.md, "End-to-end demo", `benchmarks/demo_curve.py`): at lr
    5e-5 with 4 prompts a step, the first step lifted held-out accuracy 0.064 → 0.312 (it ends
    truncation) and the next eleven walked it down to 0.156 on gradients from a handful of rewarded
    samples; lr 1e-5 with 8 prompts a step reached 0.459 after 3 steps and 0.468 after 6."""
    return {
        "name": "demo",
        "model": {"path": str(model.resolve())},
        "data": {"dataset": "reasoning_gym:basic_arithmetic", "size": 2000, "seed": seed,
                 "held_out_fraction": 0.05, "task_config": DEMO_TASK},
        "algorithm": {"algorithm": "grpo", "mtp_regime": "occ", "mpo": {"k": 2}, "lr": 1e-5,
                      "mini_batches": 2, "micro_batch_size": 8},
        "rollout": {"samples_per_prompt": 6, "prompts_per_step": 8, "max_tokens": 64, "temperature": 0.7,
                    "max_model_len": 512, "kv_cache_gib": 0.5, "num_speculative_tokens": 1},
        "reward": {"workers": 1},
        # 2 learner threads: the learner is the bottleneck (the engine is idle half the step);
        # ~15 % faster steps measured with the engine's thread beside them (docs/benchmarks.md)
        "resources": {"learner_cpus": 2, "cpus_per_engine": 1, "cpus_per_reward_worker": 1},
        "schedule": {"steps": steps, "max_staleness": 1, "checkpoint_every": 0},
    }


def latest_demo_run(runs_dir: str | Path) -> Path:
    """The newest finished `mtprl demo` run under ``runs_dir`` (its ``summary.json`` names the spec
    ``demo`` and its checkpoint is complete): the start that `make rl-drafter` warms up for RL at
    T = 1. Raises ValueError when there is none."""
    from services import run_checkpoint

    found = []
    for summary in Path(runs_dir).glob("*/summary.json"):
        try:
            name = json.loads(summary.read_text()).get("spec", {}).get("name")
        except (OSError, ValueError, AttributeError):
            continue  # a run being written, or not a summary of ours
        if name == "demo" and run_checkpoint.latest(summary.parent) is not None:
            found.append((summary.stat().st_mtime, summary.parent))
    if not found:
        raise ValueError(f"no finished `mtprl demo` run under {runs_dir}/: run `make demo` first")
    return max(found)[1]


def print_latest_demo_run(runs_dir: str = "runs") -> None:
    """`latest_demo_run` for the Makefile: its path on stdout, or its error alone and exit status 1."""
    try:
        print(latest_demo_run(runs_dir))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def prepare_models(models_dir: Path, echo=print) -> Path:
    """Stages 1 and 2: the imported SmolLM2 + 1 MTP head and its warmed-up copy, each built only
    when its cache is missing or stale; returns the warmed-up checkpoint."""
    from learner.checkpoint import read_config
    from learner.convert import import_smollm2
    from services.self_distill import SelfDistillConfig, is_current, run_self_distill

    base, warm = models_dir / "smollm2-mtp1", models_dir / "smollm2-mtp1-warm"
    recipe = SelfDistillConfig(max_tokens=DEMO_WARMUP_MAX_TOKENS)
    if (base / "model.safetensors").is_file():
        read_config(base)
        echo(f"[1/6] base model: {base} (cached)")
    else:
        echo("[1/6] importing SmolLM2-135M-Instruct into the MiMo layout with 1 MTP head ...")
        import_smollm2(base, mtp_layers=1)
    current, why = is_current(base, warm, recipe)
    if current:
        echo(f"[2/6] warmed-up MTP head: {warm} (cached, {why})")
    else:
        echo(f"[2/6] warming up the MTP head on the model's own answers (backbone frozen; cache: {why}) ...")
        r = run_self_distill(base, warm, recipe, log=lambda m: echo(f"      {m}"))
        echo(f"      acceptance {r['acceptance_before']:.3f} → {r['acceptance_after']:.3f}")
    return warm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _heldout_accuracy(model: Path, spec: dict, max_tokens: int) -> float:
    from services.evaluate import evaluate
    from services.spec import DataSpec

    res = evaluate(model, DataSpec.model_validate(spec["data"]), samples=1, max_tokens=max_tokens,
                   temperature=0.0, num_speculative_tokens=1, max_model_len=spec["rollout"]["max_model_len"],
                   num_threads=2, progress=False)
    return float(res["pass_at_1"]), int(res["prompts"])


def _progress(m: dict[str, float], step: int, total: int) -> str:
    lam = [v for k, v in sorted(m.items()) if k.startswith("mtp/lambda/")]
    return (f"  step {step:>3}/{total} | reward {m.get('batch/reward_mean', 0):.3f} | acc {m.get('batch/accuracy', 0):.3f}"
            f" | clip {m.get('ratio/clip_frac', 0):.3f} | λ {','.join(f'{x:+.3f}' for x in lam) or '-'}"
            f" | accept {m.get('rollout/spec_acceptance_rate', 0):.2f} | {m.get('rollout/tokens_per_s', 0):.0f} tok/s"
            f" | ETA {m.get('time/eta_s', 0) / 60:.1f} min")


def demo(
    models_dir: Annotated[Path, typer.Option(help="Where checkpoints are cached.")] = Path(".cache/models"),
    runs_dir: Annotated[Path, typer.Option(help="Run directories: runs/<run id>/.")] = Path("runs"),
    steps: Annotated[int, typer.Option(help="Training steps.")] = DEMO_STEPS,
    eval_max_tokens: Annotated[int, typer.Option(help="Answer budget of the held-out evaluation.")] = 64,
    seed: Annotated[int, typer.Option(help="Data seed: the problems trained on and held out, and the sampling "
                                           "seeds (the warmed-up head is the same for every seed).")] = 0,
    verbose: Annotated[bool, typer.Option(help="vLLM's, Ray's and transformers' logs on the console too "
                                               "(default: RUNS_DIR/mtprl.log).")] = False,
) -> None:
    """Train SmolLM2 + MTP head with MPO + OCC through the REST API; held-out accuracy before/after."""
    import httpx
    import ray

    from services.console import route_library_logs

    log_file = route_library_logs(runs_dir, verbose)
    if log_file:
        typer.echo(f"library logs: {log_file} (--verbose shows them here)")
    t0 = time.perf_counter()
    warm = prepare_models(models_dir, typer.echo)
    spec = demo_spec(warm, steps, seed)
    typer.echo("[3/6] held-out accuracy before training (greedy, math-verify) ...")
    acc_before, n_held = _heldout_accuracy(warm, spec, eval_max_tokens)
    typer.echo(f"      {acc_before:.3f} on {n_held} held-out problems")

    typer.echo("[4/6] control plane: local Ray, embedded Redis, REST API; submitting the run ...")
    from services.local_ray import start_local_ray
    start_local_ray()
    port, token = _free_port(), secrets.token_urlsafe(24)
    data_dir = models_dir.parent / "control-plane"
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MTPRL_API_TOKEN": token, "MTPRL_RUNS_DIR": str(runs_dir.resolve()),
           "MTPRL_LAUNCHER": "controller", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log_path = data_dir / "api.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
         "--stop-redis", "--log-level", "warning"],
        env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as api:
            for _ in range(600):
                if server.poll() is not None:
                    raise typer.Exit(f"the control plane exited; see {log_path}")
                try:
                    if api.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            r = api.post("/v1/runs", json=spec)
            if r.status_code != 201:
                raise typer.Exit(f"the API refused the run: {r.status_code} {r.text}")
            run_id = r.json()["id"]
            typer.echo(f"      POST {url}/v1/runs → run {run_id} (OpenAPI at {url}/docs)")
            typer.echo(f"[5/6] training ({steps} steps: GRPO + MPO K=2 + OCC, vLLM with MTP drafting, async) ...")
            seen, run = 0, {}
            while True:
                run = api.get(f"/v1/runs/{run_id}").json()
                if run["step"] > seen:
                    seen = run["step"]
                    typer.echo(_progress(run.get("latest_metrics") or {}, seen, steps))
                if run["state"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(2.0)
            if run["state"] != "completed":
                raise typer.Exit(f"the run ended {run['state']}: {run.get('error')}")
            final_metrics = run.get("latest_metrics") or {}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        ray.shutdown()

    from services import run_checkpoint
    from services.report import write_report

    run_dir = runs_dir / run_id
    ckpt = run_checkpoint.latest(run_dir)
    typer.echo("[6/6] held-out accuracy after training, and the run report ...")
    acc_after, _ = _heldout_accuracy(ckpt / "policy", spec, eval_max_tokens)
    report = write_report(run_dir)
    summary = {
        "run_id": run_id,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "heldout_problems": n_held,
        "wall_seconds": time.perf_counter() - t0,
        "steps": run["step"],
        "final_acceptance_rate": final_metrics.get("rollout/spec_acceptance_rate"),
        "final_reward": final_metrics.get("batch/reward_mean"),
        "checkpoint": str(ckpt / "policy"),
        "report": str(report),
        "spec": spec,
    }
    out = run_dir / "summary.json"
    out.write_text(json.dumps(summary, indent=2))
    typer.echo(f"\nheld-out accuracy: {acc_before:.3f} → {acc_after:.3f} ({acc_after - acc_before:+.3f}) on {n_held} "
               f"problems; {summary['wall_seconds'] / 60:.1f} min in all; report: {report}")
    typer.echo(str(out))
