"""Prometheus exposition of what runs report, plus run-state gauges and API request metrics.

Values come from the registry in Redis (each run's latest reported step), read at scrape time,
so they survive API restarts and every API replica exports the same numbers. Exported runs: all
active ones, and finished ones for ``metrics_keep_finished_s`` after they end.

Naming: a reported key ``a/b/c`` becomes the gauge ``mtprl_a_b_c{run_id=…}``; a last component
``head<k>`` becomes the label ``head="<k>"`` instead (0 = the main head, k ≥ 1 = MTP head k).
Every key a run reports is exported, so new learner metrics need no change here;
:data:`METRIC_CATALOG` lists the keys DESIGN.md asks for (the Grafana dashboard uses them, the
synthetic run reports all of them, and the tests check each one reaches Prometheus).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.registry import STATES, RunRecord, RunRegistry


@dataclass(frozen=True)
class MetricDef:
    key: str  # as reported; "{h}" stands for the head index
    help: str
    per_head: bool = False
    heads_from: int = 0  # first head index reported (0 = main head included, 1 = MTP heads only)

    @property
    def prom_name(self) -> str:
        return prom_name(self.key.replace("/head{h}", "/head0"))[0]


#: The metrics of DESIGN.md ("Metrics every step") and the dashboard, as runs report them.
METRIC_CATALOG: tuple[MetricDef, ...] = (
    MetricDef("loss", "Total loss of the optimiser step."),
    MetricDef("clip_frac/head{h}", "Fraction of response tokens whose ratio was clipped; head 0 = "
              "main head, k = MTP head k (MPO block ratio / OCC MTP loss).", per_head=True),
    MetricDef("ratio/token_mean", "Mean token importance ratio π_θ/π_old."),
    MetricDef("ratio/token_var", "Variance of the token importance ratio."),
    MetricDef("ratio/block_mean", "Mean MPO block ratio r̃^K (equals the token ratio when K=1)."),
    MetricDef("ratio/block_var", "Variance of the MPO block ratio."),
    MetricDef("occ/lambda/head{h}", "OCC coefficient λ_t of MTP head k.", per_head=True, heads_from=1),
    MetricDef("occ/c_hat/head{h}", "OCC ĉ_t = ⟨δ_RL, δ_MTP⟩ of MTP head k.", per_head=True, heads_from=1),
    MetricDef("occ/v2_hat/head{h}", "OCC v̂²_t = ‖δ_MTP‖² of MTP head k.", per_head=True, heads_from=1),
    MetricDef("grad_norm", "Global gradient norm before clipping."),
    MetricDef("entropy", "Mean token entropy of the main head."),
    MetricDef("kl", "KL to the reference / old policy (k3 estimator)."),
    MetricDef("reward/mean", "Mean reward of the step's samples."),
    MetricDef("reward/accuracy", "Fraction of samples judged correct."),
    MetricDef("response/length_mean", "Mean response length in tokens."),
    MetricDef("staleness/mean", "Mean policy-version lag v_learner − v_behav of consumed groups."),
    MetricDef("staleness/max", "Largest lag among consumed groups."),
    MetricDef("staleness/dropped_groups", "Groups dropped this step for exceeding max_staleness."),
    MetricDef("rollout/tokens_per_s", "Generated tokens per second over all engines."),
    MetricDef("spec/acceptance_rate", "Speculative decoding: accepted / drafted tokens."),
    MetricDef("spec/mean_acceptance_length", "Speculative decoding: mean tokens emitted per target forward."),
    MetricDef("sync/weight_seconds", "Seconds to publish and load new weights (last sync)."),
    MetricDef("reward/latency_mean_s", "Mean verification latency per sample."),
    MetricDef("reward/latency_p95_s", "95th percentile verification latency."),
    MetricDef("reward/correct", "Samples verified correct this step."),
    MetricDef("reward/incorrect", "Samples verified incorrect this step."),
    MetricDef("reward/timeouts", "Verifications that hit their deadline this step (never silent zeros)."),
    MetricDef("reward/errors", "Verifications that errored this step."),
    MetricDef("policy_version", "Policy version after the step."),
)

_HEAD = re.compile(r"^head(\d+)$")
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prom_name(key: str) -> tuple[str, str | None]:
    """Reported key -> (Prometheus metric name, head label or None)."""
    parts = key.split("/")
    head = None
    if len(parts) > 1 and (m := _HEAD.match(parts[-1])):
        head = m.group(1)
        parts = parts[:-1]
    name = "mtprl_" + _BAD.sub("_", "_".join(parts))
    return re.sub(r"_+", "_", name), head


_HELP = {d.prom_name: d.help for d in METRIC_CATALOG}


class ApiMetrics:
    """Request counters and latency histograms of the API itself (per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "mtprl_api_requests", "HTTP requests served.", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mtprl_api_request_duration_seconds", "HTTP request latency (to the response start).",
            ["method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class _Snapshot(Collector):
    """Collector over one registry snapshot taken by the async scrape handler."""

    def __init__(self, runs: list[RunRecord], counts: dict[str, int] | None):
        self.runs, self.counts = runs, counts

    def collect(self):  # noqa: D401 - prometheus_client API
        up = GaugeMetricFamily("mtprl_registry_up", "1 if the Redis registry answered this scrape.")
        up.add_metric([], 1.0 if self.counts is not None else 0.0)
        yield up
        if self.counts is None:
            return
        by_state = GaugeMetricFamily("mtprl_runs", "Runs in the registry per state.", labels=["state"])
        for s in STATES:
            by_state.add_metric([s], float(self.counts.get(s, 0)))
        yield by_state

        state = GaugeMetricFamily("mtprl_run_state", "1 for the run's current state, 0 otherwise.",
                                  labels=["run_id", "state"])
        step = GaugeMetricFamily("mtprl_run_step", "Last reported step.", labels=["run_id"])
        total = GaugeMetricFamily("mtprl_run_total_steps", "Steps the run is scheduled for.", labels=["run_id"])
        last = GaugeMetricFamily("mtprl_run_last_report_timestamp_seconds",
                                 "Unix time of the last reported step.", labels=["run_id"])
        families: dict[str, GaugeMetricFamily] = {}
        for r in self.runs:
            for s in STATES:
                state.add_metric([r.id, s], 1.0 if r.state == s else 0.0)
            step.add_metric([r.id], float(r.step))
            if r.total_steps is not None:
                total.add_metric([r.id], float(r.total_steps))
            if r.last_report_at is not None:
                last.add_metric([r.id], r.last_report_at)
            for key, value in r.latest_metrics.items():
                name, head = prom_name(key)
                if name == "mtprl_policy_version":
                    name = "mtprl_run_policy_version"
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = GaugeMetricFamily(
                        name, _HELP.get(name, f"Reported by runs as {key!r}."),
                        labels=["run_id", "head"] if head is not None else ["run_id"])
                if head is not None and len(fam._labelnames) == 2:
                    fam.add_metric([r.id, head], float(value))
                elif head is None and len(fam._labelnames) == 1:
                    fam.add_metric([r.id], float(value))
                # a key reported both with and without a head suffix: the first shape wins
        yield state
        yield step
        yield total
        yield last
        yield from families.values()


async def render_metrics(registry: RunRegistry, api: ApiMetrics, keep_finished_s: float) -> bytes:
    """The /metrics body: API metrics, then the registry snapshot (or registry_up 0)."""
    try:
        runs = await registry.exported_runs(keep_finished_s)
        counts = await registry.state_counts()
    except Exception:  # Redis down: still serve API metrics, flag the registry as down
        runs, counts = [], None
    snap = CollectorRegistry(auto_describe=False)
    snap.register(_Snapshot(runs, counts))
    return generate_latest(api.registry) + generate_latest(snap)


