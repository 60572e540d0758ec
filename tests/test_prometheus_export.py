"""The /metrics exposition: naming rules, and text that Prometheus's own tools parse."""

from __future__ import annotations

import random
import re
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics_export import METRIC_CATALOG, ApiMetrics, prom_name, render_runs
from services.registry import RunRecord
from services.synthetic_run import synthetic_metrics


@pytest.mark.parametrize("key, name, label", [
    ("batch/reward_mean", "mtprl_batch_reward_mean", None),
    ("mtp/lambda/head3", "mtprl_mtp_lambda", ("head", "3")),
    ("rollout/engine_busy_frac/engine1", "mtprl_rollout_engine_busy_frac", ("engine", "1")),
    ("reward/latency_p95_s", "mtprl_reward_latency_p95_seconds", None),
    ("rollout/tokens_per_s", "mtprl_rollout_tokens_per_second", None),
    ("loss/total", "mtprl_loss", None),  # gauges must not end in _total
    ("policy_version", "mtprl_run_policy_version", None),
    ("weird key/with-dash.x", "mtprl_weird_key_with_dash_x", None),
    ("optim/steps", "mtprl_optim_steps", None),  # not a seconds suffix
    ("loop/idle_frac_learner", "mtprl_loop_idle_frac_learner", None),
    ("loop/step_wall_s", "mtprl_loop_step_wall_seconds", None),
    ("loop/trained_samples_per_s", "mtprl_loop_trained_samples_per_second", None),
    # other gauges ending in _total: ..._cumulative
    ("loop/faults_rollout_total", "mtprl_loop_faults_rollout_cumulative", None),
    ("loop/dispatched_total", "mtprl_loop_dispatched_cumulative", None),
    ("optim/skipped_nonfinite_total", "mtprl_optim_skipped_nonfinite_cumulative", None),
])
def test_prom_name(key, name, label):
    assert prom_name(key) == (name, label)


def test_catalog_names_are_valid_distinct_gauge_names():
    names = [d.prom_name for d in METRIC_CATALOG]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len({d.key for d in METRIC_CATALOG}) == len(METRIC_CATALOG)
    for d in METRIC_CATALOG:
        assert re.fullmatch(r"mtprl_[a-z][a-z0-9_]*[a-z0-9]", d.prom_name), d.key
        assert "__" not in d.prom_name, d.key
        assert not d.prom_name.endswith(("_total", "_count", "_sum", "_bucket")), d.key  # reserved suffixes
        assert d.help.strip(), d.key


def test_synthetic_keys_do_not_collide():
    """Two reported keys never land on one series (the run loop's keys included)."""
    m = synthetic_metrics(7, 10, 3, random.Random(0))
    series = [prom_name(k) for k in m]
    assert len(series) == len(set(series))
    assert {d.key for d in METRIC_CATALOG if d.key.startswith("loop/")} <= m.keys()


def _exposition() -> str:
    rng = random.Random(0)
    runs = [RunRecord(id=f"run-{i}", state=s, spec={}, step=7, total_steps=10, last_report_at=1.7e9,
                      latest_metrics={**synthetic_metrics(7, 10, 2, rng), "x/y": float("1e-300")})
            for i, s in enumerate(("running", "paused", "completed"))]
    api = ApiMetrics()
    api.observe("GET", "/v1/runs/{run_id}", 200, 0.004)
    api.observe("GET", "/v1/runs/{run_id}", 404, 3.0)
    api.observe("GET", 'we"ird\\path', 200, 0.0)
    out: list[str] = []
    api.render(out)
    render_runs(out, runs, {"running": 1, "paused": 1, "completed": 1})
    return "".join(out)


def test_exposition_parses_and_holds_every_catalog_metric_per_run():
    fams = {f.name: f for f in text_string_to_metric_families(_exposition())}
    for d in METRIC_CATALOG:
        fam = fams[d.prom_name]
        assert {s.labels["run_id"] for s in fam.samples} == {"run-0", "run-1", "run-2"}, d.key
        if d.per_head:
            assert {s.labels["head"] for s in fam.samples} == {"1", "2"}, d.key
    state = {(s.labels["run_id"], s.labels["state"]): s.value for s in fams["mtprl_run_state"].samples}
    assert state[("run-1", "paused")] == 1.0 and state[("run-1", "running")] == 0.0
    hist = fams["mtprl_api_request_duration_seconds"]
    buckets = {(s.labels["route"], s.labels["le"]): s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets[("/v1/runs/{run_id}", "0.005")] == 1.0 and buckets[("/v1/runs/{run_id}", "+Inf")] == 2.0
    reqs = {(s.labels["route"], s.labels["status"]): s.value for s in fams["mtprl_api_requests"].samples}
    assert reqs[('we"ird\\path', "200")] == 1.0  # label values escaped


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_promtool_accepts_the_exposition_without_lint_findings():
    out = subprocess.run(["promtool", "check", "metrics"], input=_exposition(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_registry_down_is_reported_not_raised():
    out: list[str] = []
    render_runs(out, [], None)
    fams = {f.name: f for f in text_string_to_metric_families("".join(out))}
    assert fams["mtprl_registry_up"].samples[0].value == 0.0
