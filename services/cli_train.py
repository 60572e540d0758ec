"""`mtprl train SPEC.yaml`: run one training run in this process (no control plane), with a
progress bar; Ctrl-C pauses at the next step boundary, checkpoints and exits, and running the same
command again resumes from that checkpoint."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

import typer


def train(
    spec_file: Annotated[Path, typer.Argument(help="Run spec (YAML or JSON), see docs/run-loop.md.", exists=True)],
    run_dir: Annotated[Path, typer.Option(help="Checkpoints, metrics.jsonl and summary.json go here.")] = Path("runs/local"),
    fresh: Annotated[bool, typer.Option(help="Ignore checkpoints already in run-dir.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: start a local one).")] = None,
    verbose: Annotated[bool, typer.Option(help="vLLM's, Ray's and transformers' logs on the console too "
                                               "(default: RUN_DIR/mtprl.log).")] = False,
) -> None:
    """Train from a run spec on a local (or given) Ray cluster."""

    import ray
    import yaml
    from pydantic import ValidationError

    from services.console import route_library_logs
    from services.controller import RunController
    from runtime.cpu_priority import lower_cpu_priority
    from services.spec import RunSpec, problem_lines, spec_problems

    raw = yaml.safe_load(spec_file.read_text())
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as e:
        raise typer.BadParameter(f"invalid run spec:\n{e}") from None
    problems = spec_problems(spec)
    if problems:
        raise typer.BadParameter("invalid run spec:\n" + "\n".join(f"  {line}" for line in problem_lines(problems)))
    # This process runs the run's controller (and a local Ray started below inherits it); the
    # actors lower their own priority wherever they run.
    lower_cpu_priority(spec.resources.cpu_nice)
    log_file = route_library_logs(run_dir, verbose)
    if log_file:
        typer.echo(f"library logs: {log_file}", err=True)
    if ray_address:
        ray.init(address=ray_address, log_to_driver=verbose, configure_logging=verbose)
    else:  # logical CPUs: the run's actors share this machine's cores (see resources in the spec)
        from services.local_ray import start_local_ray
        start_local_ray(verbose=verbose)
    ctl = RunController(run_dir.name, spec, run_dir, progress=True, resume=not fresh)
    signal.signal(signal.SIGINT, lambda *_: (typer.echo("\npausing: finishing the step and checkpointing ..."),
                                             ctl.pause(), ctl.cancel_after_pause()))
    res = ctl.run()
    summary = {"state": res.state, "steps": res.step, "policy_version": res.version, "counters": res.counters,
               "wall_seconds": res.wall_seconds, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(json.dumps(summary["counters"]))
    typer.echo(f"{res.state} after {res.step} steps; checkpoints in {run_dir / 'checkpoints'}")
    typer.echo(str(run_dir / "summary.json"))
