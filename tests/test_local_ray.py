"""A command that starts its own Ray (demo, train, compare, the test session) is not derailed by
the address a killed `ray start --head` or test cluster left in <RAY_TMPDIR>/ray/ray_current_cluster.
Real Ray, in subprocesses with their own RAY_TMPDIR (this session's Ray is left alone)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed on return: nothing listens there


def _python(code: str, tmpdir: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmpdir, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture
def stale_cluster_file():
    # Short and outside pytest's tmp_path: Ray's unix sockets live under it (a 107-byte path limit).
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    (Path(tmp) / "ray").mkdir()
    (Path(tmp) / "ray" / "ray_current_cluster").write_text(_dead_address())
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_plain_ray_init_with_cpus_trips_on_a_dead_clusters_address(stale_cluster_file):
    """The failure mode itself (CI of 2026-12-07: every Ray test errored at setup)."""
    r = _python("import ray; ray.init(num_cpus=1, include_dashboard=False)", stale_cluster_file)
    assert r.returncode != 0 and "When connecting to an existing cluster" in r.stderr, r.stderr[-2000:]


def test_start_local_ray_starts_its_own_instance_beside_a_dead_clusters_address(stale_cluster_file):
    code = ("import ray\nfrom services.local_ray import start_local_ray\nstart_local_ray(3)\n"
            "print('CPUS', int(ray.cluster_resources()['CPU']), ray.get(ray.put(7)))\nray.shutdown()\n")
    r = _python(code, stale_cluster_file)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CPUS 3 7" in r.stdout, r.stdout
    # the recorded address is another cluster's business: left as it was
    assert (Path(stale_cluster_file) / "ray" / "ray_current_cluster").is_file()
