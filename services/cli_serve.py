"""`mtprl serve`: run the control plane (FastAPI under uvicorn).

    mtprl serve --host 0.0.0.0 --port 8000 --data-dir ~/.mtprl
    MTPRL_REDIS_URL=redis://head:6380/0 RAY_ADDRESS=auto mtprl serve

Flags win over the environment (``MTPRL_*``, ``RAY_ADDRESS``; see ``services.settings``). Without
``MTPRL_API_TOKEN`` a token is generated on the first start, stored in the data dir and printed.
Mount in ``services/cli.py`` with ``app.add_typer(cli_serve.app, name="serve")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, invoke_without_command=True,
                  help="Run the control plane (REST API, /metrics).")


@app.callback()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Interface to bind [env MTPRL_HOST; 127.0.0.1].")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port [env MTPRL_PORT; 8000].")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Token file and embedded Redis [env MTPRL_DATA_DIR; ~/.mtprl].")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="External Redis [env MTPRL_REDIS_URL]; default: embedded.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster [env RAY_ADDRESS]; default: auto, else local.")] = None,
    launcher: Annotated[Optional[str], typer.Option(help="'controller' (real training runs, the default), 'synthetic' (fake-metric runs) or 'none' [env MTPRL_LAUNCHER].")] = None,
    stop_redis: Annotated[bool, typer.Option("--stop-redis", help="Stop the embedded Redis on exit (runs then stop reporting).")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    import uvicorn

    from services.api import create_app
    from services.settings import Settings

    overrides = {k: v for k, v in dict(host=host, port=port, data_dir=data_dir, redis_url=redis_url,
                                       ray_address=ray_address, launcher=launcher).items() if v is not None}
    if stop_redis:
        overrides["embedded_redis_keep_running"] = False
    settings = Settings(**overrides)
    if settings.launcher != "none":
        from services.launcher import RayUnreachable, check_ray_reachable

        try:  # before the server starts: one clear line, not a failed start-up's traceback
            check_ray_reachable(settings.ray_address)
        except RayUnreachable as e:
            typer.echo(f"mtprl serve: {e}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"mtprl control plane on http://{settings.host}:{settings.port} (data dir {settings.data_dir})")
    api = create_app(settings)
    # Event streams end on their own when the server stops; anything else gets 10 s to finish.
    config = uvicorn.Config(api, host=settings.host, port=settings.port, log_level=log_level,
                            access_log=False, timeout_graceful_shutdown=10)
    _serve(config, api)


def _serve(config, api) -> None:
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGTERM is a clean stop (a service manager's `stop`): in-flight
        requests finish, the app shuts down, the embedded Redis it serves from is stopped (its
        append-only file flushed; runs buffer their reports until the next start) and the process
        exits 0. uvicorn itself re-raises the signal after shutting down, so the process died with
        status 143 and left redis-server running with no owner. SIGINT (Ctrl-C) keeps uvicorn's
        behaviour and leaves the embedded Redis running for the next start."""

        def handle_exit(self, sig, frame):
            api.state.stopping = True  # open event streams end at their next keep-alive
            if sig == signal.SIGTERM:
                api.state.stop_embedded_redis = True  # read by the app's shutdown
                self.should_exit = True  # not recorded in _captured_signals: not re-raised
                return
            super().handle_exit(sig, frame)

    Server(config).run()


if __name__ == "__main__":
    app()
