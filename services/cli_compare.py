"""`mtprl compare SPEC`: train one spec under each MTP regime and tabulate (`services.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def compare(
    spec_file: Annotated[Path, typer.Argument(help="Base run spec (YAML or JSON); its mtp_regime is replaced.",
                                              exists=True)],
    out: Annotated[Path, typer.Option(help="One run directory per regime, compare.md and compare.json.")] = Path(
        "runs/compare"),
    regimes: Annotated[str, typer.Option(help="Comma-separated rows, in run order: the regimes detach, ce, "
                                              "policy, occ, and occ+distill, detach+distill (head distillation, "
                                              "algorithm.mtp.distill).")] = (
        "detach,ce,policy,occ,occ+distill,detach+distill"),  # services.compare.ROWS
    steps: Annotated[int | None, typer.Option(min=1, help="Override schedule.steps (all regimes).")] = None,
    eval_max_tokens: Annotated[int | None, typer.Option(min=1, help="Held-out evaluation length "
                                                                      "(default: rollout.max_tokens).")] = None,
    tail: Annotated[int, typer.Option(min=1, help="Steps averaged for the final reward and acceptance.")] = 5,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: start a local one).")] = None,
    verbose: Annotated[bool, typer.Option(help="vLLM's, Ray's and transformers' logs on the console too "
                                               "(default: OUT/mtprl.log).")] = False,
) -> None:
    """The OCC paper's Table 1 in miniature: detach / ce / policy / occ, and occ and detach with head
    distillation, on the same task and seed.

    Rerunning the same command resumes: finished regimes are kept, an unfinished one continues
    from its latest checkpoint."""

    import ray
    import yaml
    from pydantic import ValidationError

    from services.compare import regime_specs, render_markdown, run_comparison
    from services.spec import RunSpec

    raw = yaml.safe_load(spec_file.read_text())
    if steps is not None:
        raw.setdefault("schedule", {})["steps"] = steps
    try:
        base = RunSpec.model_validate(raw)
        names = [r.strip() for r in regimes.split(",") if r.strip()]
        regime_specs(base, names)  # every regime's spec is checked before anything starts
    except (ValidationError, ValueError) as e:
        raise typer.BadParameter(f"invalid run spec: {e}") from None
    from services.console import route_library_logs

    log_file = route_library_logs(out, verbose)
    if log_file:
        typer.echo(f"library logs: {log_file}", err=True)
    if ray_address:
        ray.init(address=ray_address, log_to_driver=verbose, configure_logging=verbose)
    else:
        from services.local_ray import start_local_ray
        start_local_ray(verbose=verbose)
    cmp = run_comparison(base, out, names, eval_max_tokens=eval_max_tokens, tail=tail,
                         log=lambda s: typer.echo(s, err=True))
    typer.echo(render_markdown(cmp))
    typer.echo(str(out / "compare.md"))
