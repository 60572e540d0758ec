"""deploy/: cluster.yaml against Ray's schema and config preparation; Prometheus config; Grafana
provisioning and dashboard structure."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from services.metrics_export import METRIC_CATALOG

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_the_ray_wheel_schema(cluster):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(cluster, schema)
    broken = copy.deepcopy(cluster)
    broken["docker"]["imagee"] = "typo"  # the schema forbids unknown keys: the check can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_survives_rays_config_preparation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head.cpu"
    assert types["head.cpu"]["max_workers"] == 0
    gpu_types = [t for t in types if t != "head.cpu"]
    assert gpu_types and all(types[t]["node_config"]["InstanceType"].startswith(("g5.", "p4d.", "p4de.", "p5.", "a2-"))
                             for t in gpu_types)
    assert sum(types[t]["max_workers"] for t in gpu_types) <= prepared["max_workers"]


def test_cluster_uses_the_ray_gpu_image_of_the_installed_version(cluster):
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "ray-ml" not in json.dumps(cluster)  # deprecated images
    assert any("mtprl[gpu]" in c for c in cluster["setup_commands"])


def test_head_runs_control_plane_redis_prometheus_grafana(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in start and "--metrics-export-port" in start
    assert "deploy/head.sh start" in start
    script = (DEPLOY / "head.sh").read_text()
    for what in ("mtprl serve", "redis-server", "--appendonly yes", "prometheus/prometheus.yml",
                 "GF_PATHS_PROVISIONING", "MTPRL_GRAFANA_DASHBOARDS", "MTPRL_REDIS_URL"):
        assert what in script, what
    subprocess.run(["bash", "-n", str(DEPLOY / "head.sh")], check=True)
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_prometheus_config_is_valid_and_scrapes_control_plane_and_ray():
    path = DEPLOY / "prometheus/prometheus.yml"
    out = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = yaml.safe_load(path.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["mtprl-control-plane"]["metrics_path"] == "/metrics"
    assert jobs["mtprl-control-plane"]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_grafana_provisioning_files():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["uid"] == "mtprl-prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://127.0.0.1:9090"  # the head's Prometheus (head.sh)
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mtprl.yml").read_text())
    providers = {p["name"]: p for p in prov["providers"]}
    provider = providers["mtprl"]
    assert provider["type"] == "file"
    # Ray's generated dashboards, on the datasource above (its name is passed to `ray start`)
    assert providers["ray"]["options"]["path"] == "/tmp/ray/session_latest/metrics/grafana/dashboards"
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    start = " ".join(cluster["head_start_ray_commands"])
    assert f"RAY_PROMETHEUS_NAME={source['name']}" in start and "RAY_GRAFANA_HOST=" in start
    # the path is an env var head.sh sets to deploy/grafana/dashboards
    var = provider["options"]["path"].lstrip("$").strip("{}")
    assert f'{var}="$DEPLOY/grafana/dashboards"' in (DEPLOY / "head.sh").read_text()


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    dash = json.loads(path.read_text())
    assert dash["uid"] and len(dash["uid"]) <= 40
    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["run_id"]["datasource"]["uid"] == "mtprl-prometheus"
    assert "mtprl_" in variables["run_id"]["definition"]
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "mtprl-prometheus"}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "mtprl-prometheus"
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
    # no two panels overlap on the grid
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


_NAME_REGEX = re.compile(r'__name__=~\\?"([^"\\]+)\\?"')


def _split_names(expr: str) -> tuple[set[str], list[str]]:
    """The metric names an expression queries: plain names, and ``{__name__=~"…"}`` patterns (a
    panel over a family such as acceptance by draft position, one series per position)."""
    patterns = _NAME_REGEX.findall(expr)
    plain = set(re.findall(r"\b(mtprl_[a-zA-Z0-9_]+)", _NAME_REGEX.sub("", expr)))
    return plain, patterns


def test_dashboard_has_the_issues_panels_and_covers_the_metric_catalog():
    dash = json.loads((DEPLOY / "grafana/dashboards/mtprl-training.json").read_text())
    panels = [p for p in _panels(dash["panels"]) if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for needed in ("Reward and accuracy", "Clip fraction per head", "λₜ per head", "ĉₜ per head",
                   "v̂ₜ² per head", "Importance-ratio variance", "KL and entropy", "Tokens/s",
                   "Speculative decoding", "Staleness", "Weight-sync time", "Reward outcomes",
                   "Reward latency", "Idle fraction per actor kind", "Buffer depth and in-flight groups",
                   "Throughput (trained samples/s)", "Step wall time", "Group accounting",
                   "Faults and recoveries"):
        assert needed in titles, needed
    assert "Loop" in {p["title"] for p in _panels(dash["panels"]) if p["type"] == "row"}
    used: set[str] = set()
    patterns: list[str] = []
    for p in panels:
        for t in p["targets"]:
            names, pats = _split_names(t["expr"])
            used |= names
            patterns += pats
    for d in METRIC_CATALOG:
        assert d.prom_name in used or any(re.fullmatch(x, d.prom_name) for x in patterns), \
            f"{d.key} ({d.prom_name}) has no panel"
    per_head = {p["title"] for p in panels if any("{{head}}" in t.get("legendFormat", "") for t in p["targets"])}
    assert {"Clip fraction per head", "λₜ per head", "ĉₜ per head", "v̂ₜ² per head"} <= per_head


def _exported_names() -> set[str]:
    """Every metric name /metrics can serve: the catalog's, and the run-state and API families."""
    from prometheus_client.parser import text_string_to_metric_families

    from services.metrics_export import ApiMetrics, render_runs
    from services.registry import RunRecord

    api = ApiMetrics()
    api.observe("GET", "/healthz", 200, 0.001)
    run = RunRecord(id="r", state="running", spec={}, step=1, total_steps=2, last_report_at=1.7e9)
    out: list[str] = []
    api.render(out)
    render_runs(out, [run], {"running": 1})
    names = {s.name for f in text_string_to_metric_families("".join(out)) for s in f.samples}
    return names | {d.prom_name for d in METRIC_CATALOG}


def test_every_dashboard_metric_is_exported():
    """No panel queries a name that nothing exports (a typo, or a key renamed by the exporter)."""
    known = _exported_names()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for p in _panels(dash["panels"]):
            for t in p.get("targets", []):
                names, patterns = _split_names(t["expr"])
                for name in names:
                    assert name in known, f"{path.name}: panel {p['title']!r} queries {name}, which is not exported"
                for x in patterns:
                    assert any(re.fullmatch(x, k) for k in known), \
                        f"{path.name}: panel {p['title']!r} queries {x!r}, which matches nothing exported"


def test_control_plane_docs_exist():
    doc = (ROOT / "docs/control-plane.md").read_text()
    assert "ray up deploy/cluster.yaml" in doc and "/v1/runs" in doc
    assert os.path.exists(ROOT / "benchmarks/api_load.py")
