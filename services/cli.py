"""The `mtprl` command line. Sub-commands live in small modules and are mounted here."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="mtprl: RL post-training with MTP heads.")


def _mount() -> None:
    from services import cli_model

    app.add_typer(cli_model.app, name="model")
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
