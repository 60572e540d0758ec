"""`mtprl plan SPEC [--json]`: will the run's learner ranks and engines fit their GPUs and the
cluster's node types? A table by default, one JSON object with ``--json`` (`services.plan.Plan`);
exit status 0 when it fits, 1 when not, 2 for an unreadable spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def plan(
    spec_file: Annotated[Path, typer.Argument(help="Run spec (YAML or JSON).", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    model_config: Annotated[Path | None, typer.Option(
        help="The model's config.json, when the spec's model directory is not on this machine and "
             "the model is not in the built-in table.", exists=True, dir_okay=False)] = None,
    cluster: Annotated[Path, typer.Option(help="Ray cluster YAML whose node types to place on.",
                                          exists=True, dir_okay=False)] = Path("deploy/cluster.yaml"),
    prompt_tokens: Annotated[int | None, typer.Option(
        help="Longest prompt in tokens (default: samples as long as rollout.max_model_len).", min=1)] = None,
) -> None:
    """Size the learner ranks (FSDP2 shards, activations, logits) and engines of a run spec and
    place them on the cluster's node types; say what does not fit and what would make it fit."""
    import yaml
    from pydantic import ValidationError

    from services.plan import load_cluster, plan_spec
    from services.spec import SKIP_FILE_CHECKS, RunSpec

    try:
        # sizes only: the model and data may live on the cluster's shared filesystem
        spec = RunSpec.model_validate(yaml.safe_load(spec_file.read_text()), context={SKIP_FILE_CHECKS: True})
        p = plan_spec(spec, load_cluster(cluster), model_config, prompt_tokens)
    except ValidationError as e:
        typer.secho(f"error: invalid run spec:\n{e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(p.model_dump()))
    else:
        _print_tables(p)
    raise typer.Exit(0 if p.fits else 1)


def _print_tables(p) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    m = p.model
    con.print(f"[bold]{m['name']}[/]: {m['params_billions']}B parameters ({m['num_mtp']} MTP), "
              f"config from {m['config_source']}")
    lr, eng = p.learner, p.engines[0]
    t = Table(title="Memory per device (GiB)")
    t.add_column("part")
    t.add_column(f"learner rank ({lr['ranks']} × {lr['device']}, {lr['precision']}, "
                 f"{lr['micro_batch_per_rank']}×{lr['seq_len']} tokens, AC {'on' if lr['activation_checkpointing'] else 'off'})",
                 justify="right")
    t.add_column(f"engine ({eng['engines']} × {eng['device']}, TP {eng['tensor_parallel']})", justify="right")
    for k in sorted(set(lr["gib"]) | set(eng["gib"]), key=lambda k: (k == "runtime_reserve", k)):
        t.add_row(k, _cell(lr["gib"].get(k)), _cell(eng["gib"].get(k)))
    t.add_row("[bold]total", f"[bold]{lr['total_gib']}", f"[bold]{eng['total_gib']}")
    con.print(t)
    con.print(f"engine KV cache: {eng['kv_tokens']} tokens = {eng['full_length_sequences']} sequences of max_model_len")
    nodes = Table(title="Placement (first-fit decreasing on deploy/cluster.yaml)")
    for c in ("node", "instance", "GPUs: what (used / capacity GiB)", "host (GiB)"):
        nodes.add_column(c)
    for n in p.placement["nodes"]:
        gpus = ", ".join(f"{d['what']} ({d['used_gib']}/{d['capacity_gib']})" for d in n["gpus"]) or "-"
        nodes.add_row(n["node_type"], n["instance"], gpus, f"{n['host_used_gib']}/{n['host_capacity_gib']}")
    con.print(nodes)
    con.print("[bold green]fits[/]" if p.fits else "[bold red]does not fit[/]")
    for line in p.problems:
        con.print(f"[red]problem:[/] {line}")
    for line in p.suggestions:
        con.print(f"[cyan]suggestion:[/] {line}")
    for line in p.warnings:
        con.print(f"[yellow]warning:[/] {line}")


def _cell(v) -> str:
    return "" if v is None else (f"{v}" if v else "0")
