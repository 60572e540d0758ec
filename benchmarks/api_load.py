"""Control-plane latency under load: GET /v1/runs/{id} and GET /metrics at a fixed request rate
while runs train. Goal: p99 ≤ 25 ms at 100 requests/s.

    .venv/bin/python benchmarks/api_load.py                 # self-contained (see below)
    .venv/bin/python benchmarks/api_load.py --url http://127.0.0.1:8000 --token T --run-id ID

Self-contained mode starts a local Ray instance (2 CPUs), the API as a separate uvicorn process
on a free loopback port (embedded Redis in a temp dir) and ``--runs`` synthetic runs
(SyntheticRunActor, one step every 0.1 s, reporting every dashboard metric), then drives the load
from this process and stops everything. The load is open-loop: request i is due at
t0 + i/rate whatever earlier requests do, and its latency counts from that due time, so a stall
shows up in the percentiles instead of silently lowering the rate (no coordinated omission).
Requests alternate between the two endpoints, over 32 keep-alive connections of a minimal
HTTP/1.1 client (cheaper than httpx, so the generator steals less CPU from the server). Bounded: ``--rate`` × ``--seconds`` requests,
loopback only. Last line: a JSON object with ``p99_ms`` and ``rps``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class _Pool:
    """A minimal HTTP/1.1 keep-alive client on raw asyncio streams: a fraction of httpx's CPU per
    request, so the load generator disturbs the server less on a small shared machine."""

    def __init__(self, host: str, port: int, token: str, size: int):
        self.host, self.port, self.size = host, port, size
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.free: asyncio.Queue = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.free.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def get(self, path: str) -> int:
        reader, writer = await self.free.get()
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n".encode() + self.auth + b"\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            self.free.put_nowait((reader, writer))
            return status
        except Exception:
            writer.close()
            self.free.put_nowait(await asyncio.open_connection(self.host, self.port))
            raise

    async def close(self) -> None:
        while not self.free.empty():
            _r, w = self.free.get_nowait()
            w.close()


async def drive(url: str, token: str, run_ids: list[str], rate: float, seconds: float) -> dict:
    n = int(rate * seconds)
    paths = []
    for i in range(n):
        paths.append(f"/v1/runs/{run_ids[(i // 2) % len(run_ids)]}" if i % 2 == 0 else "/metrics")
    lat: dict[str, list[float]] = {"run": [], "metrics": []}
    errors = 0
    hostport = url.split("://", 1)[1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    pool = _Pool(host, int(port), token, size=32)
    await pool.open()
    try:
        for _ in range(20):  # warm-up: connections, imports, caches
            assert await pool.get(paths[0]) == 200 and await pool.get("/metrics") == 200
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal errors
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                ok = await asyncio.wait_for(pool.get(paths[i]), 10.0) == 200
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                ok = False
            elapsed = time.perf_counter() - due
            if not ok:
                errors += 1
            lat["run" if i % 2 == 0 else "metrics"].append(elapsed * 1000)

        lags: list[float] = []

        async def probe() -> None:
            # How late this process's own 10 ms timer fires: a stall here is the machine (CPU
            # starvation), not the server.
            end = t0 + n / rate
            while time.perf_counter() < end:
                before = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append((time.perf_counter() - before - 0.01) * 1000)

        await asyncio.gather(probe(), *(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    finally:
        await pool.close()
    every = lat["run"] + lat["metrics"]
    return {
        "requests": n,
        "errors": errors,
        "duration_s": round(wall, 3),
        "rps": round(n / wall, 1),
        "p50_ms": round(_pct(every, 0.50), 2),
        "p99_ms": round(_pct(every, 0.99), 2),
        "max_ms": round(max(every), 2),
        "client_timer_lag_ms": {"p99": round(_pct(lags, 0.99), 2), "max": round(max(lags), 2)},
        "per_endpoint": {
            "GET /v1/runs/{id}": {"p50_ms": round(_pct(lat["run"], 0.5), 2), "p99_ms": round(_pct(lat["run"], 0.99), 2)},
            "GET /metrics": {"p50_ms": round(_pct(lat["metrics"], 0.5), 2), "p99_ms": round(_pct(lat["metrics"], 0.99), 2)},
        },
    }


def server_side_p99(text: str) -> dict[str, float]:
    """The API's own latency histogram (request in to response start): the upper bound of the
    bucket holding the 99th percentile, per benchmarked route."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "mtprl_api_request_duration_seconds":
            continue
        for route in ("/v1/runs/{run_id}", "/metrics"):
            buckets = sorted((float(s.labels["le"]), s.value) for s in fam.samples
                             if s.name.endswith("_bucket") and s.labels["route"] == route
                             and s.labels["method"] == "GET")
            if buckets:
                total = buckets[-1][1]
                le = next(b for b, c in buckets if c >= 0.99 * total)
                out[f"GET {route}"] = le * 1000
    return out


def self_contained(args: argparse.Namespace) -> dict:
    import ray

    from services.registry import EmbeddedRedis

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    data = Path(tempfile.mkdtemp(prefix="mtprl-bench-"))
    model = data / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_nextn_predict_layers": 2, "model_type": "qwen2"}))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    token = "bench-token"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MTPRL_")},
           "MTPRL_DATA_DIR": str(data), "MTPRL_API_TOKEN": token,
           "MTPRL_SYNTHETIC_STEP_SECONDS": "0.1",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    log = open(data / "api.log", "wb")
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "services.api.main:app_from_env",
                            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                            "--no-access-log"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise RuntimeError((data / "api.log").read_text()[-2000:])
            time.sleep(0.1)
        spec = {"model": {"path": str(model)}, "data": {"dataset": "reasoning_gym:basic_arithmetic"},
                "algorithm": {"mpo": {"k": 3}}, "schedule": {"steps": 100000, "checkpoint_every": 50}}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0) as c:
            run_ids = [c.post("/v1/runs", json=spec).json()["id"] for _ in range(args.runs)]
            while min(c.get(f"/v1/runs/{r}").json()["step"] for r in run_ids) < 3:
                time.sleep(0.2)
            result = asyncio.run(drive(url, token, run_ids, args.rate, args.seconds))
            steps = [c.get(f"/v1/runs/{r}").json()["step"] for r in run_ids]
            for r in run_ids:
                c.post(f"/v1/runs/{r}/cancel")
        result["training_during_load"] = min(steps) > 3
        result["server_p99_ms_upper_bound"] = server_side_p99(httpx.get(url + "/metrics", timeout=60).text)
        redis_log = (data / "redis" / "redis.log").read_text(errors="replace")
        result["redis_slow_fsync_warnings"] = redis_log.count("fsync is taking too long")
        result["runs"] = args.runs
        series = httpx.get(url + "/metrics", timeout=60).text.count("\nmtprl_")
        result["metrics_series"] = series
        return result
    finally:
        api.send_signal(signal.SIGTERM)
        try:
            api.wait(15)
        except subprocess.TimeoutExpired:
            api.kill()
        log.close()
        EmbeddedRedis(data).stop()
        ray.shutdown()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=100.0, help="Requests per second (open loop).")
    p.add_argument("--seconds", type=float, default=30.0, help="Load duration.")
    p.add_argument("--runs", type=int, default=4, help="Synthetic runs training during the load.")
    p.add_argument("--url", help="Use a running control plane instead of starting one.")
    p.add_argument("--token", default=os.environ.get("MTPRL_API_TOKEN"))
    p.add_argument("--run-id", action="append", help="Run(s) to GET (with --url).")
    args = p.parse_args()
    if args.rate * args.seconds > 20000:
        p.error("bounded: at most 20000 requests")
    load_before = os.getloadavg()[0]
    if args.url:
        if not (args.token and args.run_id):
            p.error("--url needs --token and --run-id")
        result = asyncio.run(drive(args.url, args.token, args.run_id, args.rate, args.seconds))
    else:
        result = self_contained(args)
    result.update(benchmark="api_load", target_rps=args.rate, goal={"p99_ms": 25.0, "rps": 100.0},
                  loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)], cpus=os.cpu_count())
    result["meets_goal"] = bool(result["p99_ms"] <= 25.0 and result["rps"] >= 0.98 * 100.0
                                and result["errors"] == 0 and args.rate >= 100.0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
