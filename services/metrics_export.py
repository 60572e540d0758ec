"""Prometheus exposition of what runs report, plus run-state gauges and API request metrics.

Values come from the registry in Redis (each run's latest reported step), read at scrape time,
so they survive API restarts and every API replica exports the same numbers. Exported runs: all
active ones, and finished ones for ``metrics_keep_finished_s`` after they end.

Naming: a reported key ``a/b/c`` becomes the gauge ``mtprl_a_b_c{run_id=…}``; a last component
``head<k>`` becomes the label ``head="<k>"`` instead (k ≥ 1 = MTP head k; the main head's
metrics carry no head label), a last component ``engine<i>`` the label ``engine="<i>"`` (rollout
engine i: ``rollout/engine_busy_frac/engine1`` → ``mtprl_rollout_engine_busy_frac{engine="1"}``), and a name ending in ``_s`` / ``_per_s`` ends in ``_seconds`` /
``_per_second`` (Prometheus base units): ``reward/latency_p95_s`` →
``mtprl_reward_latency_p95_seconds``. All run metrics are gauges, and a gauge must not end in
``_total`` (Prometheus's counter suffix): ``loss/total`` becomes ``mtprl_loss``, and any other
name ending in ``_total`` ends in ``_cumulative`` instead — the run loop's accounting
``loop/<counter>_total`` → ``mtprl_loop_<counter>_cumulative``
(``loop/faults_rollout_total`` → ``mtprl_loop_faults_rollout_cumulative``). They stay gauges, not
counters: a learner rollback restores the group accounting from a checkpoint, so they can fall.
Every key a run reports is exported, so new learner metrics need no change here;
:data:`METRIC_CATALOG` lists the keys DESIGN.md asks for (the Grafana dashboard uses them, the
synthetic run reports all of them, and the tests check each one reaches Prometheus).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from services.registry import STATES, RunRecord, RunRegistry


@dataclass(frozen=True)
class MetricDef:
    key: str  # as reported; "{h}" stands for the head index, "{e}" for the engine index
    help: str
    per_head: bool = False
    heads_from: int = 0  # first head index reported (0 = main head included, 1 = MTP heads only)
    per_engine: bool = False  # one series per rollout engine (0 .. engines − 1)

    @property
    def prom_name(self) -> str:
        return prom_name(self.key.replace("/head{h}", "/head0").replace("/engine{e}", "/engine0"))[0]


#: The metrics of DESIGN.md ("Metrics every step") and the dashboard, under the keys their
#: producers use: the learner (`learner/step.py`: loss/, ratio/, mtp/, optim/, policy/, batch/,
#: perf/), the rollout engines (`rollout/engine.py`: rollout/spec_*), the reward actors
#: (`reward/actors.py`: reward/outcome/*, reward/latency_*), and the run controller (rollout
#: throughput, stale-group drops, weight sync, policy version, and the loop's own loop/* metrics:
#: idle fractions, buffer depth, step wall time, group accounting and fault counts).
METRIC_CATALOG: tuple[MetricDef, ...] = (
    MetricDef("loss/total", "Total loss of the optimiser step."),
    MetricDef("ratio/clip_frac", "Fraction of response tokens whose (main-head or MPO block) ratio was clipped."),
    MetricDef("mtp/clip_frac/head{h}", "Fraction of clipped tokens in MTP head k's RL loss (OCC).",
              per_head=True, heads_from=1),
    MetricDef("ratio/token_mean", "Mean token importance ratio π_θ/π_old."),
    MetricDef("ratio/token_var", "Variance of the token importance ratio."),
    MetricDef("ratio/block_mean", "Mean MPO block ratio r̃^K (equals the token ratio when K=1)."),
    MetricDef("ratio/block_var", "Variance of the MPO block ratio."),
    MetricDef("mtp/lambda/head{h}", "OCC coefficient λ_t of MTP head k.", per_head=True, heads_from=1),
    MetricDef("mtp/c_hat/head{h}", "OCC ĉ_t = ⟨δ_RL, δ_MTP⟩ of MTP head k.", per_head=True, heads_from=1),
    MetricDef("mtp/v2_hat/head{h}", "OCC v̂²_t = ‖δ_MTP‖² of MTP head k.", per_head=True, heads_from=1),
    MetricDef("optim/grad_norm", "Global gradient norm before clipping."),
    MetricDef("policy/entropy", "Mean token entropy of the main head."),
    MetricDef("policy/kl_ref", "KL to the reference policy (k3 estimator)."),
    MetricDef("ratio/approx_kl", "Approximate KL between π_θ and π_old."),
    MetricDef("batch/reward_mean", "Mean reward of the step's samples."),
    MetricDef("batch/accuracy", "Fraction of samples judged correct."),
    MetricDef("batch/response_len_mean", "Mean response length in tokens."),
    MetricDef("batch/staleness_mean", "Mean policy-version lag v_learner − v_behav of consumed groups."),
    MetricDef("batch/staleness_max", "Largest lag among consumed groups."),
    MetricDef("batch/groups_dropped_stale", "Groups dropped this step for exceeding max_staleness."),
    MetricDef("rollout/tokens_per_s", "Generated tokens per second over all engines."),
    MetricDef("perf/tokens_per_s", "Learner throughput in tokens per second."),
    MetricDef("rollout/spec_acceptance_rate", "Speculative decoding: accepted / drafted tokens."),
    MetricDef("rollout/spec_mean_acceptance_length", "Speculative decoding: tokens per target forward."),
    MetricDef("sync/weight_s", "Seconds to publish and load new weights (last sync)."),
    MetricDef("rollout/engine_busy_frac/engine{e}", "Fraction of the step's wall time rollout engine i had a "
              "generation call outstanding (services/dispatch.py).", per_engine=True),
    MetricDef("rollout/engine_groups/engine{e}", "Prompt groups rollout engine i returned during the step.",
              per_engine=True),
    MetricDef("rollout/straggler_redispatch", "Prompt groups of straggling generation calls sent to an idle "
              "engine as well during the step (services/dispatch.py)."),
    MetricDef("rollout/straggler_discarded", "Late copies of straggler groups discarded during the step "
              "(the other copy came back first)."),
    MetricDef("rollout/spec_accept_pos1", "Speculative decoding: share of drafts whose first token was accepted "
              "(rollout/spec_accept_pos<i>: position i, counted when positions < i were accepted)."),
    MetricDef("rollout/engine_spec_accept_pos1/engine{e}", "Rollout engine i: share of its drafts whose first "
              "token was accepted during the step (…_pos<i>: position i).", per_engine=True),
    MetricDef("rollout/engine_draft_k/engine{e}", "Rollout engine i: tokens drafted per step in its last call "
              "(adaptive drafting's choice; the configured num_speculative_tokens otherwise).", per_engine=True),
    MetricDef("rollout/engine_draft_switch/engine{e}", "Rollout engine i: tokens drafted per step after its last "
              "call's short probe (rollout.adaptive_draft probe_steps; equal to engine_draft_k when the call did not "
              "switch).", per_engine=True),
    MetricDef("rollout/engine_draft_probabilistic/engine{e}", "Rollout engine i: 1 when its last call drafted "
              "samples of the head's distribution (probabilistic drafts), 0 when it drafted the head's argmax "
              "(rollout.draft_sample_method; 'auto' chooses per call).", per_engine=True),
    MetricDef("rollout/engine_draft_predicted_speedup/engine{e}", "Rollout engine i: speed-up over not drafting "
              "that its cost and acceptance estimates predicted for its last call (rollout/adaptive_draft.py).",
              per_engine=True),
    MetricDef("rollout/engine_draft_measured_speedup/engine{e}", "Rollout engine i: speed-up its last call "
              "measured (tokens per step × plain step time / its step time); reported once the engine timed "
              "plain steps (adaptive engines probe them).", per_engine=True),
    MetricDef("reward/latency_mean_s", "Mean verification latency per sample."),
    MetricDef("reward/latency_p95_s", "95th percentile verification latency."),
    MetricDef("reward/outcome/ok", "Samples verified correct (cumulative, reward actors)."),
    MetricDef("reward/outcome/wrong", "Samples verified wrong."),
    MetricDef("reward/outcome/timeout", "Verifications that hit their deadline (never silent zeros)."),
    MetricDef("reward/outcome/error", "Verifications that errored."),
    MetricDef("reward/outcome/sandbox_violation", "Code samples stopped by the sandbox."),
    MetricDef("policy_version", "Policy version after the step."),
    # the run loop itself (services/controller.py), per step ...
    MetricDef("loop/idle_frac_rollout", "Fraction of the step's wall time with no generation call outstanding."),
    MetricDef("loop/idle_frac_reward", "Fraction of the step's wall time with no scoring call outstanding."),
    MetricDef("loop/idle_frac_learner", "Fraction of the step's wall time with no learner call outstanding."),
    MetricDef("loop/buffer_groups", "Scored groups buffered for the learner (buffer depth) at the step's end."),
    MetricDef("loop/inflight_groups", "Groups being generated or scored at the step's end."),
    MetricDef("loop/engines", "Rollout engines in the run."),
    MetricDef("loop/step_wall_s", "Wall-clock seconds of the step (since the previous report, or the resume)."),
    MetricDef("loop/trained_samples_per_s", "Trained samples (responses) per second of wall time over the step."),
    MetricDef("loop/groups_dropped_constant", "Groups dropped this step because all their rewards were equal (DAPO)."),
    MetricDef("loop/groups_dropped_errors", "Groups dropped this step because fewer than 2 samples were left after "
              "dropping failed gradings (reward.on_error: drop)."),
    MetricDef("loop/samples_dropped_errors", "Samples taken out of training this step because their grading failed "
              "(never trained as a 0 reward)."),
    MetricDef("reward/dropped/timeout", "Samples dropped this step because math verification timed out."),
    MetricDef("reward/dropped/error", "Samples dropped this step because their grader errored."),
    # ... and its accounting since the run started (gauges: a rollback restores the first four)
    MetricDef("loop/dispatched_total", "Groups dispatched for generation since the run started."),
    MetricDef("loop/trained_total", "Groups trained on since the run started (redone groups counted once)."),
    MetricDef("loop/dropped_stale_total", "Groups dropped for exceeding max_staleness since the run started."),
    MetricDef("loop/dropped_constant_total", "Groups dropped for constant rewards since the run started."),
    MetricDef("loop/dropped_errors_total", "Groups dropped for failed gradings (< 2 valid samples) since the run started."),
    MetricDef("loop/faults_rollout_total", "Rollout-engine faults (dead engines) since the run started."),
    MetricDef("loop/faults_reward_total", "Reward-actor faults (dead reward actors) since the run started."),
    MetricDef("loop/faults_learner_total", "Learner faults (each one rolls the run back) since the run started."),
    MetricDef("loop/redispatched_total", "Groups queued again (lost with an engine, or their generation cancelled) since the run started."),
    MetricDef("loop/rolled_back_total", "Trained groups undone by learner rollbacks since the run started."),
    MetricDef("loop/straggler_redispatch_total", "Groups of straggling calls sent a second time since the run started."),
    MetricDef("loop/straggler_discarded_total", "Late straggler copies discarded since the run started."),
)

# Gauges must not end in _total (a counter suffix): loss/total is the loss, any other ..._total
# becomes ..._cumulative (see the module doc). The policy version is a run attribute.
_RENAME = {"mtprl_loss_total": "mtprl_loss", "mtprl_policy_version": "mtprl_run_policy_version"}
_LABELLED = re.compile(r"^(head|engine)(\d+)$")
_BAD = re.compile(r"[^a-zA-Z0-9_]")


@functools.lru_cache(maxsize=8192)
def prom_name(key: str) -> tuple[str, tuple[str, str] | None]:
    """Reported key -> (Prometheus metric name, ``(label, value)`` — ``("head", "2")``,
    ``("engine", "0")`` — or None)."""
    parts = key.split("/")
    label = None
    if len(parts) > 1 and (m := _LABELLED.match(parts[-1])):
        label = (m.group(1), m.group(2))
        parts = parts[:-1]
    name = "mtprl_" + _BAD.sub("_", "_".join(parts))
    name = re.sub(r"_+", "_", name)
    # Prometheus base units: ..._per_s -> ..._per_second, ..._s -> ..._seconds
    name = re.sub(r"_per_s$", "_per_second", name)
    name = re.sub(r"_s$", "_seconds", name)
    name = _RENAME.get(name, name)
    if name.endswith("_total"):
        name = name.removesuffix("_total") + "_cumulative"
    return name, label


_HELP = {d.prom_name: d.help for d in METRIC_CATALOG}


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return _labels_cached(tuple(kv.items()))


@functools.lru_cache(maxsize=16384)
def _labels_cached(items: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _family(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP {name} {_esc(help_)}\n# TYPE {name} {kind}\n")


class ApiMetrics:
    """Request counters and latency histograms of the API itself (this process only).

    Formatted by hand (as are the run gauges): prometheus_client's generic collectors cost
    ~2 ms per scrape here, a sizeable share of the /metrics latency budget on 2 busy cores.
    """

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.hist: dict[tuple[str, str], list[float]] = {}  # bucket counts..., +Inf count, sum

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.hist.get((method, route))
        if h is None:
            h = self.hist[(method, route)] = [0.0] * (len(self.BUCKETS) + 2)
        for i, b in enumerate(self.BUCKETS):
            if seconds <= b:
                h[i] += 1
        h[-2] += 1
        h[-1] += seconds

    def render(self, out: list[str]) -> None:
        _family(out, "mtprl_api_requests_total", "counter", "HTTP requests served.")
        for (m, r, st), n in sorted(self.requests.items()):
            out.append(f"mtprl_api_requests_total{_labels(method=m, route=r, status=st)} {n}.0\n")
        name = "mtprl_api_request_duration_seconds"
        _family(out, name, "histogram", "HTTP request latency (to the response start).")
        for (m, r), h in sorted(self.hist.items()):
            for i, b in enumerate(self.BUCKETS):
                out.append(f"{name}_bucket{_labels(method=m, route=r, le=repr(b))} {h[i]}\n")
            out.append(f"{name}_bucket{_labels(method=m, route=r, le='+Inf')} {h[-2]}\n")
            out.append(f"{name}_count{_labels(method=m, route=r)} {h[-2]}\n")
            out.append(f"{name}_sum{_labels(method=m, route=r)} {_num(h[-1])}\n")


def render_runs(out: list[str], runs: list[RunRecord], counts: dict[str, int] | None) -> None:
    """Run-state gauges and every reported metric of each exported run."""
    _family(out, "mtprl_registry_up", "gauge", "1 if the Redis registry answered this scrape.")
    out.append(f"mtprl_registry_up {1.0 if counts is not None else 0.0}\n")
    if counts is None:
        return
    _family(out, "mtprl_runs", "gauge", "Runs in the registry per state.")
    for st in STATES:
        out.append(f'mtprl_runs{{state="{st}"}} {float(counts.get(st, 0))}\n')
    _family(out, "mtprl_run_state", "gauge", "1 for the run's current state, 0 otherwise.")
    for r in runs:
        for st in STATES:
            out.append(f"mtprl_run_state{_labels(run_id=r.id, state=st)} {1.0 if r.state == st else 0.0}\n")
    _family(out, "mtprl_run_step", "gauge", "Last reported step.")
    out.extend(f"mtprl_run_step{_labels(run_id=r.id)} {float(r.step)}\n" for r in runs)
    _family(out, "mtprl_run_total_steps", "gauge", "Steps the run is scheduled for.")
    out.extend(f"mtprl_run_total_steps{_labels(run_id=r.id)} {float(r.total_steps)}\n"
               for r in runs if r.total_steps is not None)
    _family(out, "mtprl_run_last_report_timestamp_seconds", "gauge", "Unix time of the last reported step.")
    out.extend(f"mtprl_run_last_report_timestamp_seconds{_labels(run_id=r.id)} {_num(r.last_report_at)}\n"
               for r in runs if r.last_report_at is not None)

    # name -> (label name or None, samples, first key); a key reported both with and without a
    # head/engine suffix keeps the first shape seen (one label set per family).
    families: dict[str, tuple[str | None, list[str], str]] = {}
    for r in runs:
        run_label = f'run_id="{_esc(r.id)}"'
        for key, value in r.latest_metrics.items():
            name, label = prom_name(key)
            fam = families.get(name)
            if fam is None:
                fam = families[name] = (label and label[0], [], key)
            if fam[0] != (label and label[0]):
                continue
            lab = f'{{{run_label},{label[0]}="{label[1]}"}}' if label is not None else f"{{{run_label}}}"
            v = float(value)
            fam[1].append(f"{name}{lab} {repr(v) if v - v == 0 else _num(v)}\n")
    for name, (_h, samples, key) in families.items():
        _family(out, name, "gauge", _HELP.get(name, f"Reported by runs as {key!r}."))
        out.extend(samples)


async def render_metrics(registry: RunRegistry, api: ApiMetrics, keep_finished_s: float) -> bytes:
    """The /metrics body: API metrics, then the registry snapshot (or registry_up 0)."""
    try:
        runs, counts = await registry.metrics_snapshot(keep_finished_s)
    except Exception:  # Redis down: still serve API metrics, flag the registry as down
        runs, counts = [], None
    out: list[str] = []
    api.render(out)
    render_runs(out, runs, counts)
    return "".join(out).encode()
