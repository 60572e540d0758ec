"""`/v1/runs`: create, list, inspect, pause, resume, cancel; metric history, events, checkpoints.

Every route needs the bearer token. Registry errors become HTTP errors in the app factory's
exception handlers (404 unknown run, 409 illegal transition or reused Idempotency-Key).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from services.api.deps import LauncherDep, RegistryDep, TokenDep
from services.api.schemas import (
    CheckpointPublic,
    CheckpointsPublic,
    EventPublic,
    Message,
    MetricPoint,
    MetricsHistoryPublic,
    RunCreate,
    RunPublic,
    RunsPublic,
    RunState,
)
from services.registry import FAILED, RUN_SOURCES, body_hash, downsample
from services.spec import spec_problems

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/runs", tags=["runs"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Run id.")]
_ERRORS = {401: {"model": Message}, 404: {"model": Message}}
_STREAM_ID = r"^(\$|0|[0-9]{1,20}(-[0-9]{1,20})?)$"


@router.post(
    "",
    response_model=RunPublic,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": RunPublic, "description": "Idempotent replay: the run created "
                     "earlier with this Idempotency-Key"},
               401: {"model": Message}, 409: {"model": Message}, 503: {"model": Message}},
)
async def create_run(
    spec: RunCreate,
    response: Response,
    registry: RegistryDep,
    launcher: LauncherDep,
    _token: TokenDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> RunPublic:
    """Create a run from a spec and start it. With an `Idempotency-Key` header, repeating the
    request (same key, same spec) returns the same run instead of a new one."""
    problems = spec_problems(spec)
    if problems:
        raise RequestValidationError([{**p, "loc": ("body", *p["loc"])} for p in problems])
    spec_dict = spec.model_dump(mode="json")
    run_id = uuid.uuid4().hex[:12]
    run_id, created = await registry.create_run(
        run_id,
        spec_dict,
        total_steps=spec.schedule.steps,
        idempotency_key=idempotency_key,
        request_hash=body_hash(json.dumps(spec_dict, sort_keys=True)),
    )
    if created:
        try:
            await launcher.start(run_id, spec_dict)
        except Exception as e:
            log.exception("starting run %s failed", run_id)
            await registry.transition(run_id, FAILED, RUN_SOURCES[FAILED],
                                      error=f"could not start: {type(e).__name__}: {e}")
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"run {run_id} could not be started: {type(e).__name__}: {e}") from e
        response.headers["Location"] = f"/v1/runs/{run_id}"
    else:
        response.status_code = status.HTTP_200_OK
    return RunPublic.from_record(await registry.get_run(run_id))


@router.get("", response_model=RunsPublic, responses={401: {"model": Message}})
async def list_runs(
    registry: RegistryDep,
    _token: TokenDep,
    state: RunState | None = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RunsPublic:
    """Runs, newest first, optionally only those in one state."""
    page = await registry.list_runs(state=state, offset=offset, limit=limit)
    return RunsPublic(data=[RunPublic.from_record(r) for r in page.runs], count=page.count,
                      offset=offset, limit=limit)


@router.get("/{run_id}", response_model=RunPublic, responses=_ERRORS)
async def get_run(run_id: RunId, registry: RegistryDep, _token: TokenDep) -> RunPublic:
    """State, step, policy version, latest metrics, last checkpoint, timestamps, error."""
    return RunPublic.from_record(await registry.get_run(run_id))


async def _act(run_id: str, action: Literal["pause", "resume", "cancel"], registry: RegistryDep,
               launcher: LauncherDep) -> RunPublic:
    # The registry changes first (atomic, the source of truth); the launcher call only makes the
    # run react sooner — a run that misses it sees the new state at its next step boundary.
    await registry.apply_action(run_id, action)
    try:
        await getattr(launcher, action)(run_id)
    except Exception:
        log.exception("%s of run %s: launcher call failed (the run will see the registry state)",
                      action, run_id)
    return RunPublic.from_record(await registry.get_run(run_id))


_ACTION_ERRORS = {**_ERRORS, 409: {"model": Message, "description": "Illegal in the current state"}}


@router.post("/{run_id}/pause", response_model=RunPublic, responses=_ACTION_ERRORS)
async def pause_run(run_id: RunId, registry: RegistryDep, launcher: LauncherDep, _token: TokenDep) -> RunPublic:
    """running → paused (no new step starts; a step in flight finishes)."""
    return await _act(run_id, "pause", registry, launcher)


@router.post("/{run_id}/resume", response_model=RunPublic, responses=_ACTION_ERRORS)
async def resume_run(run_id: RunId, registry: RegistryDep, launcher: LauncherDep, _token: TokenDep) -> RunPublic:
    """paused → running."""
    return await _act(run_id, "resume", registry, launcher)


@router.post("/{run_id}/cancel", response_model=RunPublic, responses=_ACTION_ERRORS)
async def cancel_run(run_id: RunId, registry: RegistryDep, launcher: LauncherDep, _token: TokenDep) -> RunPublic:
    """pending | running | paused → cancelled."""
    return await _act(run_id, "cancel", registry, launcher)


@router.get("/{run_id}/metrics", response_model=MetricsHistoryPublic, responses=_ERRORS)
async def run_metrics(
    run_id: RunId,
    registry: RegistryDep,
    _token: TokenDep,
    keys: Annotated[str | None, Query(max_length=4000, description="Comma-separated metric keys; all when absent.")] = None,
    start_step: Annotated[int | None, Query(ge=0)] = None,
    end_step: Annotated[int | None, Query(ge=0)] = None,
    max_points: Annotated[int | None, Query(ge=1, le=10_000, description="Downsample (bucket means) to at most this many points.")] = None,
) -> MetricsHistoryPublic:
    """Per-step metric history."""
    points = await registry.metric_history(run_id, start_step=start_step, end_step=end_step)
    total = len(points)
    if max_points is not None:
        points = downsample(points, max_points)
    wanted = {k.strip() for k in keys.split(",") if k.strip()} if keys else None
    out = [MetricPoint(step=p.step, t=p.t,
                       values={k: v for k, v in p.metrics.items() if wanted is None or k in wanted})
           for p in points]
    return MetricsHistoryPublic(run_id=run_id, points=out, total_points=total,
                                downsampled=len(out) < total)


@router.get("/{run_id}/checkpoints", response_model=CheckpointsPublic, responses=_ERRORS)
async def run_checkpoints(run_id: RunId, registry: RegistryDep, _token: TokenDep) -> CheckpointsPublic:
    """Checkpoints the run recorded, oldest first."""
    data = [CheckpointPublic(**c) for c in await registry.checkpoints(run_id)]
    return CheckpointsPublic(run_id=run_id, data=data, count=len(data))


@router.get(
    "/{run_id}/events",
    response_class=StreamingResponse,
    responses={**_ERRORS, 200: {"description": "Server-Sent Events; each `data:` is an EventPublic.",
                                "content": {"text/event-stream": {"schema": EventPublic.model_json_schema()}}}},
)
async def run_events(
    run_id: RunId,
    request: Request,
    registry: RegistryDep,
    _token: TokenDep,
    after: Annotated[str | None, Query(pattern=_STREAM_ID, description="Start after this event id ('$' = only new events); default: from the first.")] = None,
    follow: Annotated[bool, Query(description="Keep the stream open for new events; it ends after a terminal state event.")] = True,
    last_event_id: Annotated[str | None, Header(pattern=_STREAM_ID)] = None,
) -> StreamingResponse:
    """Server-Sent Events of the run: `state`, `step`, `checkpoint`, `log`."""
    if not await registry.exists(run_id):
        await registry.get_run(run_id)  # raises RunNotFound -> 404
    start = last_event_id or after or "0"

    async def stream() -> AsyncIterator[bytes]:
        if not follow:
            last = start
            while batch := await registry.read_events(run_id, last, count=500):
                for ev in batch:
                    last = ev.id
                    yield _sse(ev.id, ev.kind, ev.data)
            return
        async for ev in registry.follow_events(run_id, start, block_ms=1000):
            if ev is None:
                # The server is stopping (`mtprl serve` got SIGTERM/SIGINT): end the stream cleanly
                # at the next keep-alive; the client resumes with Last-Event-ID.
                if await request.is_disconnected() or getattr(request.app.state, "stopping", False):
                    return
                yield b": keep-alive\n\n"
            else:
                yield _sse(ev.id, ev.kind, ev.data)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(eid: str, kind: str, data: dict) -> bytes:
    body = json.dumps({"id": eid, "kind": kind, "data": data}, separators=(",", ":"))
    return f"id: {eid}\nevent: {kind}\ndata: {body}\n\n".encode()
