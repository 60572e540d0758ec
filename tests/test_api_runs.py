"""REST API end to end: a real uvicorn process, the embedded Redis, real Ray with detached
SyntheticRunActor runs (synthetic metrics, real control flow)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from services.metrics_export import METRIC_CATALOG
from services.registry import EmbeddedRedis
from test_api_support import TOKEN, ApiServer, gcs_address, make_model_dir, spec_for, wait_for

pytestmark = pytest.mark.integration

TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def ray_address(ray_session):
    return gcs_address(ray_session)


@pytest.fixture(scope="module")
def model_dir(tiny_ckpt):
    """The session's real tiny checkpoint (MiMo layout, 2 MTP modules; `mtprl model tiny`)."""
    assert json.loads((tiny_ckpt / "config.json").read_text())["num_nextn_predict_layers"] == 2
    return tiny_ckpt


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_address):
    data = tmp_path_factory.mktemp("api-data")
    srv = ApiServer(data, ray_address, step_seconds=0.1)
    yield srv
    srv.stop()
    EmbeddedRedis(data).stop()


@pytest.fixture
def api(server):
    with server.client() as c:
        yield c


def create(api: httpx.Client, spec: dict, **headers) -> dict:
    r = api.post("/v1/runs", json=spec, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def wait_state(api: httpx.Client, run_id: str, states: tuple[str, ...] | str, timeout: float = 30.0) -> dict:
    states = (states,) if isinstance(states, str) else states
    return wait_for(lambda: (lambda r: r if r["state"] in states else None)(api.get(f"/v1/runs/{run_id}").json()),
                    timeout, what=f"{run_id} in {states}")


def test_health_and_metrics_need_no_token_everything_else_does(server):
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(server.url + "/metrics").status_code == 200
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    checked = 0
    for path, ops in paths.items():
        if path in ("/healthz", "/metrics"):
            continue
        url = server.url + path.replace("{run_id}", "some-run")
        for method in ops:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                r = httpx.request(method.upper(), url, headers=headers, json={}, timeout=10)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                checked += 1
    assert checked >= 27  # 9 operations × 3 bad credentials


def test_full_life_cycle(api, model_dir):
    run = create(api, spec_for(model_dir, steps=25))
    rid = run["id"]
    assert run["state"] in ("pending", "running") and run["total_steps"] == 25
    wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 3, what="3 steps")

    paused = api.post(f"/v1/runs/{rid}/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    at_pause = paused.json()["step"]
    time.sleep(1.0)  # the one step in flight at the pause may still land
    step_paused = api.get(f"/v1/runs/{rid}").json()["step"]
    assert step_paused <= at_pause + 1
    time.sleep(0.6)
    still = api.get(f"/v1/runs/{rid}").json()
    assert still["state"] == "paused" and still["step"] == step_paused  # no progress while paused

    assert api.post(f"/v1/runs/{rid}/resume").json()["state"] == "running"
    done = wait_state(api, rid, TERMINAL)
    assert done["state"] == "completed" and done["step"] == 25 and done["policy_version"] == 25
    assert done["error"] is None and done["finished_at"] >= done["started_at"] >= done["created_at"]
    flat = {d.key for d in METRIC_CATALOG if not d.per_head}
    assert flat <= done["latest_metrics"].keys()
    assert {"ratio/clip_frac", "mtp/clip_frac/head1", "mtp/clip_frac/head2", "mtp/lambda/head1",
            "mtp/lambda/head2"} <= done["latest_metrics"].keys()
    assert done["last_checkpoint"]["step"] == 25

    cks = api.get(f"/v1/runs/{rid}/checkpoints").json()
    assert [c["step"] for c in cks["data"]] == [5, 10, 15, 20, 25]

    hist = api.get(f"/v1/runs/{rid}/metrics").json()
    assert [p["step"] for p in hist["points"]] == list(range(1, 26)) and not hist["downsampled"]
    small = api.get(f"/v1/runs/{rid}/metrics", params={"max_points": 5, "keys": "batch/reward_mean,loss/total"}).json()
    assert len(small["points"]) == 5 and small["downsampled"] and small["total_points"] == 25
    assert all(set(p["values"]) == {"batch/reward_mean", "loss/total"} for p in small["points"])
    window = api.get(f"/v1/runs/{rid}/metrics", params={"start_step": 10, "end_step": 12}).json()
    assert [p["step"] for p in window["points"]] == [10, 11, 12]

    listed = api.get("/v1/runs", params={"state": "completed", "limit": 200}).json()
    assert rid in [r["id"] for r in listed["data"]]
    assert rid not in [r["id"] for r in api.get("/v1/runs", params={"state": "running"}).json()["data"]]

    text = api.get(f"/v1/runs/{rid}/events", params={"follow": "false"}).text
    states = [json.loads(line[5:])["data"]["to"] for line in text.splitlines()
              if line.startswith("data:") and '"kind":"state"' in line]
    assert states == ["pending", "running", "paused", "running", "completed"]
    assert text.count("event: step") == 25 and text.count("event: checkpoint") == 5


def test_list_is_paginated(api, model_dir):
    ids = [create(api, spec_for(model_dir, steps=1))["id"] for _ in range(3)]
    first = api.get("/v1/runs", params={"limit": 2}).json()
    second = api.get("/v1/runs", params={"limit": 2, "offset": 2}).json()
    assert len(first["data"]) == 2 and first["count"] >= 3 and first["count"] == second["count"]
    assert [r["id"] for r in first["data"]] == ids[::-1][:2]  # newest first
    assert second["data"][0]["id"] == ids[0]
    for rid in ids:
        wait_state(api, rid, TERMINAL)


def test_idempotent_create(api, model_dir):
    spec = spec_for(model_dir, steps=5)
    before = api.get("/v1/runs").json()["count"]
    a = api.post("/v1/runs", json=spec, headers={"Idempotency-Key": "create-once-1"})
    b = api.post("/v1/runs", json=spec, headers={"Idempotency-Key": "create-once-1"})
    assert a.status_code == 201 and b.status_code == 200
    assert a.json()["id"] == b.json()["id"]
    assert api.get("/v1/runs").json()["count"] == before + 1
    other = api.post("/v1/runs", json=spec_for(model_dir, steps=6), headers={"Idempotency-Key": "create-once-1"})
    assert other.status_code == 409 and other.json()["run_id"] == a.json()["id"]
    c = api.post("/v1/runs", json=spec)  # no key: a new run each time
    assert c.status_code == 201 and c.json()["id"] != a.json()["id"]
    for rid in (a.json()["id"], c.json()["id"]):
        wait_state(api, rid, TERMINAL)


@pytest.mark.parametrize("change, loc", [
    (lambda s: s["algorithm"].update(algorithm="reinforce++"), ["body", "algorithm", "algorithm"]),
    (lambda s: s["algorithm"].update(mpo={"k": 4}), ["body", "algorithm", "mpo", "k"]),  # 3 heads > 2
    (lambda s: s["rollout"].update(samples_per_prompt=-2), ["body", "rollout", "samples_per_prompt"]),
    (lambda s: s["rollout"].update(max_tokens=-1), ["body", "rollout", "max_tokens"]),
    (lambda s: s["schedule"].update(steps=-5), ["body", "schedule", "steps"]),
    (lambda s: s["data"].update(dataset="reasoning_gym:tower_of_hanoi"), ["body", "data", "dataset"]),
    (lambda s: s["data"].update(dataset="jsonl:/no/such/file.jsonl"), ["body", "data", "dataset"]),
    (lambda s: s.pop("model"), ["body", "model"]),
    (lambda s: s["model"].update(path="/no/such/model"), ["body", "model", "path"]),
    (lambda s: s.update(surprise=1), ["body", "surprise"]),
])
def test_invalid_specs_are_422_with_field_paths(api, model_dir, change, loc):
    spec = spec_for(model_dir)
    change(spec)
    before = api.get("/v1/runs").json()["count"]
    r = api.post("/v1/runs", json=spec)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]
    assert api.get("/v1/runs").json()["count"] == before  # nothing recorded


def test_speculative_tokens_need_mtp_heads(api, tmp_path):
    no_mtp = make_model_dir(tmp_path / "plain", num_mtp=0)
    spec = spec_for(no_mtp, algorithm={"algorithm": "grpo", "mtp_regime": "none"})
    r = api.post("/v1/runs", json=spec)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "rollout", "num_speculative_tokens"]


def test_a_pruned_draft_vocabulary_needs_its_ranking(api, model_dir):
    spec = spec_for(model_dir)
    spec["rollout"]["draft_vocab_size"] = 2048
    r = api.post("/v1/runs", json=spec)
    assert r.status_code == 422
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "rollout", "draft_vocab_size"] and "mtprl model warmup" in err["msg"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/runs/nope"), ("POST", "/v1/runs/nope/pause"), ("POST", "/v1/runs/nope/resume"),
    ("POST", "/v1/runs/nope/cancel"), ("GET", "/v1/runs/nope/metrics"),
    ("GET", "/v1/runs/nope/checkpoints"), ("GET", "/v1/runs/nope/events"),
])
def test_unknown_run_is_404(api, method, path):
    r = api.request(method, path)
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_illegal_transitions_are_409(api, model_dir):
    rid = create(api, spec_for(model_dir, steps=200))["id"]
    wait_state(api, rid, "running")
    r = api.post(f"/v1/runs/{rid}/resume")  # resume a running run
    assert r.status_code == 409 and r.json()["current_state"] == "running"
    assert api.post(f"/v1/runs/{rid}/cancel").json()["state"] == "cancelled"
    for action in ("pause", "resume", "cancel"):  # nothing after the end
        r = api.post(f"/v1/runs/{rid}/{action}")
        assert r.status_code == 409 and r.json()["current_state"] == "cancelled"


def test_cancel_stops_the_run_and_its_actor(api, model_dir):
    import ray

    rid = create(api, spec_for(model_dir, steps=200))["id"]
    wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 2, what="2 steps")
    assert api.post(f"/v1/runs/{rid}/cancel").json()["state"] == "cancelled"

    def actor_gone():
        try:
            ray.get_actor(f"mtprl-run-{rid}", namespace="mtprl")
            return False
        except ValueError:
            return True

    wait_for(actor_gone, 20, what="actor exit")
    step = api.get(f"/v1/runs/{rid}").json()["step"]
    time.sleep(0.4)
    assert api.get(f"/v1/runs/{rid}").json()["step"] == step


def test_events_stream_live_until_the_run_ends(server, model_dir):
    with server.client() as api:
        rid = create(api, spec_for(model_dir, steps=8))["id"]
        kinds, steps = [], []
        with api.stream("GET", f"/v1/runs/{rid}/events", timeout=httpx.Timeout(30, read=15)) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines():  # ends when the server closes after the terminal event
                if line.startswith("event:"):
                    event = line[6:].strip()
                    kinds.append(event)
                elif line.startswith("data:") and event == "step":
                    steps.append(json.loads(line[5:])["data"]["step"])
        assert kinds[0] == "state" and kinds[-1] == "state"
        assert steps == list(range(1, 9))
        assert api.get(f"/v1/runs/{rid}").json()["state"] == "completed"
        # resuming the stream after an event id replays only what came later
        text = api.get(f"/v1/runs/{rid}/events", params={"follow": "false"}).text
        ids = [line[3:].strip() for line in text.splitlines() if line.startswith("id:")]
        tail = api.get(f"/v1/runs/{rid}/events", params={"follow": "false"},
                       headers={"Last-Event-ID": ids[-3]}).text
        assert [line[3:].strip() for line in tail.splitlines() if line.startswith("id:")] == ids[-2:]


def test_reconciler_fails_a_run_whose_actor_died(api, model_dir):
    import ray

    rid = create(api, spec_for(model_dir, steps=500))["id"]
    wait_state(api, rid, "running")
    ray.kill(ray.get_actor(f"mtprl-run-{rid}", namespace="mtprl"), no_restart=True)
    failed = wait_state(api, rid, TERMINAL, timeout=20)
    assert failed["state"] == "failed" and "actor is gone" in failed["error"]


def test_cli_drives_a_run(server, model_dir, tmp_path, monkeypatch):
    from services.cli_runs import app

    monkeypatch.setenv("MTPRL_URL", server.url)
    monkeypatch.setenv("MTPRL_API_TOKEN", TOKEN)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(model_dir, steps=6)))
    cli = CliRunner()
    out = cli.invoke(app, ["start", str(spec_path), "--idempotency-key", "cli-1"])
    assert out.exit_code == 0, out.output
    rid = json.loads(out.output)["id"]
    watched = cli.invoke(app, ["watch", rid])
    assert watched.exit_code == 0, watched.output
    assert "step 6:" in watched.output and "-> completed" in watched.output
    assert "checkpoint step 5" in watched.output
    listed = cli.invoke(app, ["list", "--state", "completed"])
    assert listed.exit_code == 0 and rid in listed.output
    shown = cli.invoke(app, ["show", rid])
    assert json.loads(shown.output)["state"] == "completed"
    bad = cli.invoke(app, ["pause", rid])
    assert bad.exit_code == 1 and "409" in bad.output
    missing = cli.invoke(app, ["show", "nope"])
    assert missing.exit_code == 1 and "404" in missing.output
    spec_path.write_text(yaml.safe_dump(spec_for(model_dir, steps=-1)))
    invalid = cli.invoke(app, ["start", str(spec_path)])
    assert invalid.exit_code == 1 and "schedule.steps" in invalid.output


def test_api_restart_mid_run_loses_nothing(tmp_path, ray_address, model_dir):
    """SIGKILL the API mid-run: the run keeps training and reporting; a new API process on the
    same data dir sees everything and can still steer the run."""
    import redis as redis_sync

    first = ApiServer(tmp_path, ray_address, step_seconds=0.1)
    second = None
    try:
        with first.client() as api:
            # long enough to still be running when the second API is up, even on a busy machine
            rid = create(api, spec_for(model_dir, steps=150), **{"Idempotency-Key": "restart-1"})["id"]
            wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 3, what="3 steps")
        first.kill()

        r = redis_sync.Redis.from_url(EmbeddedRedis(tmp_path).url, decode_responses=True)
        s0 = int(r.hget(f"mtprl:run:{rid}", "step"))
        wait_for(lambda: int(r.hget(f"mtprl:run:{rid}", "step")) >= s0 + 3, what="steps while the API is down")
        r.close()

        second = ApiServer(tmp_path, ray_address, step_seconds=0.1)
        with second.client() as api:
            run = api.get(f"/v1/runs/{rid}").json()
            assert run["state"] == "running" and run["step"] >= s0 + 3
            assert f'mtprl_batch_reward_mean{{run_id="{rid}"}}' in httpx.get(second.url + "/metrics").text
            again = api.post("/v1/runs", json=spec_for(model_dir, steps=150), headers={"Idempotency-Key": "restart-1"})
            assert again.status_code == 200 and again.json()["id"] == rid  # idempotency keys survive too
            assert api.post(f"/v1/runs/{rid}/pause").json()["state"] == "paused"  # reattached by name
            assert api.post(f"/v1/runs/{rid}/resume").json()["state"] == "running"
            done = wait_state(api, rid, TERMINAL, timeout=90)
            assert done["state"] == "completed" and done["step"] == 150
            hist = api.get(f"/v1/runs/{rid}/metrics").json()["points"]
            assert [p["step"] for p in hist] == list(range(1, 151))  # no step lost
    finally:
        first.kill()
        if second is not None:
            second.stop()
        EmbeddedRedis(tmp_path).stop()
