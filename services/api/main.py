"""The control-plane app factory.

    uvicorn --factory services.api.main:app_from_env    # settings from MTPRL_* / RAY_ADDRESS
    mtprl serve --host 0.0.0.0 --port 8000 --data-dir ~/.mtprl

On start (lifespan): connect to Redis (``MTPRL_REDIS_URL``, or start/reuse the embedded one in
the data dir), resolve the API token, connect to Ray and build the launcher, and start the
reconciler, which every few seconds checks that each active run still has its actor: a pending
run without one (the API died between creating and starting it) is started; a running or paused
run without one is marked failed. Nothing else lives in this process, so it can be restarted (or
replicated) at will.
"""

from __future__ import annotations

from pathlib import Path

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.api.routes import health, runs
from services.launcher import NullLauncher, RayLauncher, RunLauncher
from services.metrics_export import ApiMetrics
from services.registry import (
    ACTIVE_STATES,
    FAILED,
    PENDING,
    RUN_SOURCES,
    EmbeddedRedis,
    IdempotencyConflict,
    IllegalTransition,
    RegistryError,
    RunNotFound,
    RunRegistry,
)
from services.settings import Settings, resolve_api_token

log = logging.getLogger("mtprl.api")
VERSION = "0.1.0"
PENDING_GRACE_S = 30.0  # a pending run younger than this may still be starting


def redis_url_for(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use, starting the embedded server when none is configured."""
    if settings.redis_url:
        return settings.redis_url, None
    emb = EmbeddedRedis(settings.data_dir)
    if emb.start():
        log.info("started embedded redis-server (%s)", emb.url)
    return emb.url, emb


def build_launcher(settings: Settings, redis_url: str) -> RunLauncher:
    if settings.launcher == "none":
        return NullLauncher()
    sink_config = {
        "redis_url": redis_url,
        "metrics_history_cap": settings.metrics_history_cap,
        "events_cap": settings.events_cap,
        "synthetic_step_seconds": settings.synthetic_step_seconds,
        "runs_dir": str(Path(settings.runs_dir or Path(settings.data_dir) / "runs").resolve()),
    }
    if settings.launcher == "controller":
        from services.run_actor import RunActor

        return RayLauncher(RunActor, sink_config, ray_address=settings.ray_address)
    from services.synthetic_run import SyntheticRunActor

    return RayLauncher(SyntheticRunActor, sink_config, ray_address=settings.ray_address)


async def reconcile_once(registry: RunRegistry, launcher: RunLauncher) -> dict[str, str]:
    """Repair runs whose actor is missing; returns {run_id: action taken}."""
    done: dict[str, str] = {}
    for run_id in await registry.ids_in_states(ACTIVE_STATES):
        if await launcher.is_alive(run_id):
            continue
        try:
            run = await registry.get_run(run_id)
        except RunNotFound:
            continue
        if run.state == PENDING:
            if time.time() - run.created_at > PENDING_GRACE_S:
                await launcher.start(run_id, run.spec)
                done[run_id] = "restarted"
            continue
        if await launcher.is_alive(run_id):  # it finished or started between the two looks
            continue
        try:
            await registry.transition(run_id, FAILED, RUN_SOURCES[FAILED],
                                      error="the run's controller actor is gone (process or node lost)")
            done[run_id] = "failed"
        except (IllegalTransition, RunNotFound):
            pass  # it reached a terminal state by itself meanwhile
    return done


async def _reconciler(app: FastAPI, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            acted = await reconcile_once(app.state.registry, app.state.launcher)
            if acted:
                log.warning("reconciler: %s", acted)
        except Exception:
            log.exception("reconciler pass failed")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as its text (``"inf"``, ``"nan"``) and every string that
    UTF-8 cannot encode escaped: JSON has no inf/NaN and Starlette's encoder refuses them (and such
    strings), so a 422 echoing the offending input back would itself fail (a 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):  # an unpaired surrogate ("\\ud800" in the body) is not UTF-8: escape it
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class _RequestMetrics:
    """Pure-ASGI middleware: request count and latency per route template (bounded labels)."""

    def __init__(self, app: Any, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        elapsed: float | None = None

        async def send_wrapper(message: dict) -> None:
            nonlocal status, elapsed
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed = time.perf_counter() - t0
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], path, status,
                                 elapsed if elapsed is not None else time.perf_counter() - t0)


def create_app(settings: Settings | None = None, *, launcher: RunLauncher | None = None,
               registry: RunRegistry | None = None) -> FastAPI:
    """Build the app. ``launcher``/``registry`` override what the settings would build (tests)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded = None
        if registry is None:
            url, embedded = await asyncio.to_thread(redis_url_for, settings)
            app.state.registry = RunRegistry.from_url(
                url, metrics_history_cap=settings.metrics_history_cap,
                events_cap=settings.events_cap, idempotency_ttl_s=settings.idempotency_ttl_s)
        else:
            url, app.state.registry = None, registry
        token, generated = resolve_api_token(settings)
        app.state.api_token = token
        if generated:
            print(f"mtprl: generated API token (stored in {settings.data_dir / 'api_token'}):\n{token}",
                  flush=True)
        if launcher is None:
            # ray.init blocks (seconds): run it off the loop.
            app.state.launcher = await asyncio.to_thread(build_launcher, settings, url or "")
        else:
            app.state.launcher = launcher
        app.state.uses_ray = isinstance(app.state.launcher, RayLauncher)
        task = asyncio.create_task(_reconciler(app, settings.reconcile_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await app.state.launcher.close()
            if registry is None:
                await app.state.registry.close()
            stop_redis = not settings.embedded_redis_keep_running or getattr(app.state, "stop_embedded_redis", False)
            if embedded is not None and stop_redis:
                await asyncio.to_thread(embedded.stop)

    app = FastAPI(
        title="mtprl control plane",
        version=VERSION,
        description="Start, pause, resume, cancel and inspect RL post-training runs. "
        "Bearer token on every endpoint but /healthz and /metrics.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_metrics = ApiMetrics()
    app.include_router(health.router)
    app.include_router(runs.router)
    app.add_middleware(_RequestMetrics, metrics=app.state.api_metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler, but encodable whatever the body held (see json_safe).
        return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(RunNotFound)
    async def _not_found(_req: Request, exc: RunNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(IllegalTransition)
    async def _illegal(_req: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "current_state": exc.current}, status_code=409)

    @app.exception_handler(IdempotencyConflict)
    async def _idem(_req: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "run_id": exc.run_id}, status_code=409)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_away(_req: Request, exc: Exception) -> JSONResponse:
        # Redis holds every run: without it there is nothing to answer, but nothing is wrong with
        # the request either. The client reconnects by itself on the next request.
        return JSONResponse({"detail": f"the run registry (Redis) is unreachable: {type(exc).__name__}: {exc}; "
                                       "retry shortly"}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(RegistryError)
    async def _registry(_req: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    return app


def app_from_env() -> FastAPI:
    """uvicorn --factory entry point: settings from the environment."""
    logging.basicConfig(level=logging.INFO)
    return create_app(Settings())
