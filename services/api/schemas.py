"""Request and response bodies of the REST API, one family per resource (Run…, Metric…, …)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.registry import RunRecord
from services.spec import RunSpec

RunState = Literal["pending", "running", "paused", "completed", "failed", "cancelled"]


def _ts(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)


class RunCreate(RunSpec):
    """Body of `POST /v1/runs`: a run spec (see `services.spec.RunSpec`)."""


class CheckpointPublic(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int = Field(description="Step the checkpoint was taken after.")
    path: str = Field(description="Where it is stored.")
    policy_version: int | None = Field(None, description="Policy version it holds.")
    t: float | None = Field(None, description="Unix time it was recorded.")


class RunPublic(BaseModel):
    """A run as the API shows it."""

    id: str
    name: str | None = None
    state: RunState
    step: int = Field(description="Last reported step (0 before the first).")
    total_steps: int | None = Field(None, description="Steps scheduled.")
    policy_version: int | None = None
    latest_metrics: dict[str, float] = Field(default_factory=dict,
                                             description="Metrics of the last reported step.")
    last_checkpoint: CheckpointPublic | None = None
    error: str | None = Field(None, description="Why the run failed (state `failed`).")
    created_at: datetime
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    last_report_at: datetime | None = None
    spec: dict[str, Any] = Field(description="The spec the run was created with.")

    @classmethod
    def from_record(cls, r: RunRecord) -> RunPublic:
        return cls(
            id=r.id, name=r.spec.get("name"), state=r.state, step=r.step, total_steps=r.total_steps,
            policy_version=r.policy_version, latest_metrics=r.latest_metrics,
            last_checkpoint=CheckpointPublic(**r.last_checkpoint) if r.last_checkpoint else None,
            error=r.error, created_at=_ts(r.created_at), started_at=_ts(r.started_at),
            updated_at=_ts(r.updated_at), finished_at=_ts(r.finished_at),
            last_report_at=_ts(r.last_report_at), spec=r.spec,
        )


class RunsPublic(BaseModel):
    """A page of runs, newest first."""

    data: list[RunPublic]
    count: int = Field(description="Runs matching the filter, over all pages.")
    offset: int
    limit: int


class MetricPoint(BaseModel):
    step: int
    t: float = Field(description="Unix time the step was reported.")
    values: dict[str, float]


class MetricsHistoryPublic(BaseModel):
    """Per-step metric history (capped in the registry; optionally downsampled)."""

    run_id: str
    points: list[MetricPoint]
    total_points: int = Field(description="Points in the requested range before downsampling.")
    downsampled: bool


class CheckpointsPublic(BaseModel):
    run_id: str
    data: list[CheckpointPublic]
    count: int


class EventPublic(BaseModel):
    """One Server-Sent Event of `GET /v1/runs/{id}/events` (`id:` = this id, `event:` = kind,
    `data:` = this object as JSON). Kinds: `state` (from, to, error), `step` (step, metrics),
    `checkpoint` (step, path, policy_version), `log` (message)."""

    id: str
    kind: str
    data: dict[str, Any]


class HealthPublic(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool = Field(description="The registry answered a PING.")
    ray: bool | None = Field(None, description="Ray is connected (None: no Ray launcher).")
    version: str


class Message(BaseModel):
    detail: str
