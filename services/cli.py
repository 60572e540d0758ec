"""The `mtprl` command line. Sub-commands live in small modules and are mounted here."""

from __future__ import annotations

import os

import typer

# vLLM's engine core runs in-process: weight updates reach the worker directly, and no process is
# spawned from an unguarded import.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="mtprl: RL post-training with MTP heads.")


def _mount() -> None:
    from services import (cli_compare, cli_demo, cli_eval, cli_model, cli_plan, cli_report, cli_runs, cli_serve,
                          cli_train, cli_verify)

    app.add_typer(cli_model.app, name="model")
    app.add_typer(cli_verify.app, name="verify")
    app.add_typer(cli_runs.app, name="runs")
    app.add_typer(cli_serve.app, name="serve")
    app.command("demo")(cli_demo.demo)
    app.command("train")(cli_train.train)
    app.command("eval")(cli_eval.eval_cmd)
    app.command("report")(cli_report.report)
    app.command("compare")(cli_compare.compare)
    app.command("plan")(cli_plan.plan)


def main() -> None:
    _mount()
    app()


if __name__ == "__main__":
    main()
