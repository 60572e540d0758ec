"""`/healthz` and `/metrics`: no token needed (load balancers and Prometheus call them)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from services.api.deps import RegistryDep, SettingsDep
from services.api.schemas import HealthPublic
from services.metrics_export import render_metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
async def healthz(request: Request, registry: RegistryDep) -> HealthPublic | JSONResponse:
    """200 when the registry answers, 503 (status `degraded`) when it does not."""
    try:
        redis_ok = await registry.ping()
    except Exception:
        redis_ok = False
    ray_ok = None
    if request.app.state.uses_ray:
        import ray

        ray_ok = ray.is_initialized()
    body = HealthPublic(status="ok" if redis_ok else "degraded", redis=redis_ok, ray=ray_ok,
                        version=request.app.version)
    if not redis_ok:
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Prometheus exposition: `mtprl_*` per run (label `run_id`, `head` for per-head metrics),
    run-state gauges and API request metrics."""
    body = await render_metrics(registry, request.app.state.api_metrics, settings.metrics_keep_finished_s)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
