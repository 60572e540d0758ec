"""`mtprl report RUN_DIR`: plots and a JSON/Markdown summary of a run (see `services.report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (holds metrics.jsonl), e.g. runs/local.")],
) -> None:
    """Write RUN_DIR/report/ (one PNG per metric, summary.json, summary.md) and print its path."""
    from services.report import write_report

    try:
        out = write_report(run_dir)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="RUN_DIR") from None
    summary = json.loads((out / "summary.json").read_text())
    for name in summary["plots"]:
        typer.echo(f"  {out / (name + '.png')}")
    for name, why in summary["skipped"].items():
        typer.echo(f"  skipped {name}: {why}")
    typer.echo(str(out / "summary.md"))
