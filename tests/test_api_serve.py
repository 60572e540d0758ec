"""`mtprl serve` (services.cli_serve) as a real process: token generation, settings from flags and
the environment, the embedded Redis's lifetime. No Ray (``--launcher none``)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.registry import EmbeddedRedis
from services.settings import Settings, resolve_api_token
from test_api_support import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration


def serve(data: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    e = {k: v for k, v in os.environ.items() if not k.startswith("MTPRL_")}
    e.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli_serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data), "--launcher", "none", "--log-level", "warning", *extra],
        cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, what="mtprl serve")
    return proc, url


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.stdout.read()


def test_token_generated_once_stored_private_and_printed(tmp_path):
    proc, url = serve(tmp_path)
    try:
        token_file = tmp_path / "api_token"
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert httpx.get(url + "/v1/runs").status_code == 401
        assert httpx.get(url + "/v1/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        out = stop(proc)
    assert token in out  # printed on the first start
    proc2, url2 = serve(tmp_path)
    try:
        assert httpx.get(url2 + "/v1/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        out2 = stop(proc2)
        EmbeddedRedis(tmp_path).stop()
    assert token not in out2  # not printed again


def test_env_token_wins_and_redis_outlives_the_api_unless_asked(tmp_path):
    proc, url = serve(tmp_path, env={"MTPRL_API_TOKEN": "from-env-123"})
    try:
        assert httpx.get(url + "/v1/runs", headers={"Authorization": "Bearer from-env-123"}).status_code == 200
        assert not (tmp_path / "api_token").exists()
    finally:
        stop(proc)
    emb = EmbeddedRedis(tmp_path)
    assert emb.is_running()  # kept for runs that report while the API restarts
    proc, url = serve(tmp_path, "--stop-redis", env={"MTPRL_API_TOKEN": "t"})
    stop(proc)
    wait_for(lambda: not emb.is_running(), 10, what="redis stopped")


def test_external_redis_url_is_used_instead_of_the_embedded_one(tmp_path):
    ext = EmbeddedRedis(tmp_path / "external")
    ext.start()
    try:
        proc, url = serve(tmp_path / "api", env={"MTPRL_API_TOKEN": "t", "MTPRL_REDIS_URL": ext.url})
        try:
            h = {"Authorization": "Bearer t"}
            model = tmp_path / "m"
            model.mkdir()
            (model / "config.json").write_text('{"num_nextn_predict_layers": 1}')
            r = httpx.post(url + "/v1/runs", headers=h, json={
                "model": {"path": str(model)}, "data": {"dataset": "human_eval"}})
            assert r.status_code == 201
            assert not (tmp_path / "api" / "redis").exists()  # no embedded server started
            import redis

            c = redis.Redis.from_url(ext.url, decode_responses=True)
            assert c.hget(f"mtprl:run:{r.json()['id']}", "state") == "pending"
            c.close()
        finally:
            stop(proc)
    finally:
        ext.stop()


def test_healthz_degrades_when_redis_goes_away(tmp_path):
    proc, url = serve(tmp_path, env={"MTPRL_API_TOKEN": "t"})
    try:
        EmbeddedRedis(tmp_path).stop()
        r = httpx.get(url + "/healthz", timeout=10)
        assert r.status_code == 503 and r.json()["redis"] is False
        m = httpx.get(url + "/metrics", timeout=10)
        assert m.status_code == 200 and "mtprl_registry_up 0.0" in m.text
    finally:
        stop(proc)
        EmbeddedRedis(tmp_path).stop()


def test_settings_validation_and_token_file_race(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("MTPRL_REDIS_URL", "")
    s = Settings(data_dir=tmp_path)
    assert s.ray_address == "10.0.0.1:6379" and s.redis_url is None
    with pytest.raises(ValueError, match="redis_url"):
        Settings(data_dir=tmp_path, redis_url="http://nope")
    a, gen_a = resolve_api_token(s)
    b, gen_b = resolve_api_token(s)
    assert gen_a and not gen_b and a == b


def test_a_run_that_cannot_be_started_is_503_and_recorded_failed(tmp_path):
    """The launcher's start raising (e.g. no Ray cluster) fails the run visibly, not silently."""
    from fastapi.testclient import TestClient

    from services.api import create_app
    from services.launcher import NullLauncher

    class NoCluster(NullLauncher):
        async def start(self, run_id, spec):
            raise ConnectionError("no Ray cluster at 10.0.0.9:6379")

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_nextn_predict_layers": 1}')
    app = create_app(Settings(data_dir=tmp_path, api_token="t"), launcher=NoCluster())
    try:
        with TestClient(app) as c:
            h = {"Authorization": "Bearer t"}
            r = c.post("/v1/runs", headers=h, json={"model": {"path": str(model)}, "data": {"dataset": "human_eval"}})
            assert r.status_code == 503 and "no Ray cluster" in r.json()["detail"]
            (run,) = c.get("/v1/runs", headers=h).json()["data"]
            assert run["state"] == "failed" and "could not start: ConnectionError" in run["error"]
    finally:
        EmbeddedRedis(tmp_path).stop()


def test_sigterm_finishes_requests_stops_the_embedded_redis_and_exits_0(tmp_path):
    """A service manager's stop: exit status 0 (not 143), no redis-server left without its owner,
    an open event stream does not hold the shutdown, and what was recorded is on disk."""
    import threading

    proc, url = serve(tmp_path, env={"MTPRL_API_TOKEN": "t"})
    emb = EmbeddedRedis(tmp_path)
    redis_pid = emb.pid()
    assert redis_pid and emb.is_running()
    h = {"Authorization": "Bearer t"}
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_nextn_predict_layers": 1}')
    r = httpx.post(url + "/v1/runs", headers=h, json={"model": {"path": str(model)}, "data": {"dataset": "human_eval"}})
    assert r.status_code == 201
    run_id = r.json()["id"]
    streamed: list[int] = []
    errors: list[Exception] = []

    def follow():  # a pending run's event stream stays open until the server closes it
        try:
            with httpx.stream("GET", f"{url}/v1/runs/{run_id}/events", headers=h, timeout=60) as s:
                streamed.append(s.status_code)
                for _ in s.iter_lines():
                    pass
        except httpx.HTTPError as e:  # cut mid-message instead of ended
            errors.append(e)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    wait_for(lambda: streamed, 10, what="the event stream to open")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    took = time.monotonic() - t0
    out = proc.stdout.read()
    assert rc == 0, out[-2000:]
    wait_for(lambda: not os.path.exists(f"/proc/{redis_pid}"), 10, what="redis-server to exit")
    assert not emb.is_running()
    t.join(5)
    assert not t.is_alive() and streamed == [200] and errors == []  # the stream ended, cleanly
    assert took < 8, f"shutdown took {took:.1f}s: the open stream held it"
    # The run recorded before the stop is there when the next start brings Redis back.
    proc2, url2 = serve(tmp_path, env={"MTPRL_API_TOKEN": "t"})
    try:
        assert httpx.get(f"{url2}/v1/runs/{run_id}", headers=h).json()["state"] == "pending"
    finally:
        stop(proc2)
        EmbeddedRedis(tmp_path).stop()


def test_a_dead_ray_address_is_a_clear_error_within_seconds(tmp_path):
    """ray.init retries a dead GCS address for minutes; `mtprl serve` says so at once, exit 1."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MTPRL_", "RAY_ADDRESS"))}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "services.cli_serve", "--data-dir", str(tmp_path),
                        "--launcher", "synthetic", "--ray-address", dead, "--port", str(free_port())],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert dead in line and "ray start --head" in line and "--ray-address" in line, r.stderr
    assert took < 20, f"took {took:.0f}s"
    assert not EmbeddedRedis(tmp_path).is_running()  # refused before anything was started


def test_a_dead_clusters_address_in_rays_session_file_is_named(tmp_path, monkeypatch):
    """`auto` reads the last `ray start`'s address from <RAY_TMPDIR>/ray/ray_current_cluster."""
    import ray._private.services as ray_services

    from services.launcher import RayUnreachable, check_ray_reachable

    dead = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Ray's `auto` prefers a gcs_server found running on this machine (other tests' clusters).
    monkeypatch.setattr(ray_services, "find_gcs_addresses", lambda: [])
    t0 = time.monotonic()
    with pytest.raises(RayUnreachable) as err:
        check_ray_reachable("auto")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert dead in msg and str(tmp_path / "ray" / "ray_current_cluster") in msg and "ray stop" in msg
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    check_ray_reachable("auto")  # no cluster recorded: Ray starts a local one, nothing to probe
