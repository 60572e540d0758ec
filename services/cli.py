"""The `mtprl` command line. Sub-commands live in small modules and are mounted here."""

from __future__ import annotations

import os

import typer

# vLLM's engine core runs in-process: weight updates reach the worker directly, and no process is
# spawned from an unguarded import.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="mtprl: RL post-training with MTP heads.")


def _mount() -> None:
    from services import cli_demo, cli_model

    app.add_typer(cli_model.app, name="model")
    app.command("demo")(cli_demo.demo)
    try:
        from services import cli_verify
    except ImportError:  # reward CLI not present in this checkout yet
        return
    app.add_typer(cli_verify.app, name="verify")


def main() -> None:
    _mount()
    app()


if __name__ == "__main__":
    main()
