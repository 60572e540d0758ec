"""The run report: plots of a run's metrics over steps and a JSON/Markdown summary.

    .venv/bin/mtprl report runs/my-run          # -> runs/my-run/report/{*.png,summary.json,summary.md}

or `services.report.write_report(run_dir)`. Reads ``<run_dir>/metrics.jsonl`` (one JSON object per
step, as `RunController` writes it) and, when present, ``<run_dir>/summary.json`` (the run's own
end-of-run summary: wall time, state). One PNG per quantity (`PLOTS`): reward, accuracy, clip
fraction per head, OCC's λₜ per head, importance-ratio variance, speculative acceptance rate and
rollout tokens/s. A plot whose metrics the run never logged (e.g. λ without `mtp_regime: occ`,
block-ratio variance without MPO, acceptance without drafting) is skipped and listed under
``skipped`` in the summary with the keys it looked for.

Summary per metric: first, last, min, max, mean over the logged steps, and ``best`` /
``best_step`` for metrics with a direction (higher reward, accuracy, acceptance, tokens/s is
better; clip fraction, λ and ratio variance have none). A step logged twice (a resumed run that
re-did steps after a rollback) counts once, with its last value.

Not covered: comparing several runs in one figure (that is `mtprl compare`'s job).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plot:
    """One figure: the metrics matching ``keys`` (exact names, or regexes for per-head families)."""

    name: str  # file stem
    title: str
    ylabel: str
    keys: tuple[str, ...]  # exact keys or regexes (anchored)
    higher_is_better: bool | None = None  # direction of `best` in the summary; None = no best
    log_y: bool = False  # when all values are > 0


PLOTS: tuple[Plot, ...] = (
    Plot("reward", "Reward (batch mean)", "reward", ("batch/reward_mean",), higher_is_better=True),
    Plot("accuracy", "Accuracy (training batch; held-out where logged)", "fraction correct",
         ("batch/accuracy", r"(eval|held_out|heldout)/.*(acc|pass).*"), higher_is_better=True),
    Plot("clip_fraction", "Clip fraction per head (main: ratio/clip_frac)", "fraction of tokens clipped",
         ("ratio/clip_frac", r"mtp/clip_frac/head\d+")),
    Plot("lambda", "OCC coefficient λₜ per MTP head", "λ", (r"mtp/lambda/head\d+",)),
    Plot("ratio_variance", "Importance-ratio variance", "variance", ("ratio/token_var", "ratio/block_var"),
         log_y=True),
    Plot("acceptance_rate", "Speculative (MTP) acceptance rate", "accepted / drafted",
         ("rollout/spec_acceptance_rate", "rollout/cum_spec_acceptance_rate"), higher_is_better=True),
    Plot("acceptance_by_position", "Acceptance by draft position (share of drafts accepted at position i)",
         "accepted / drafts", (r"rollout/spec_accept_pos\d+", r"rollout/engine_spec_accept_pos\d+/engine\d+")),
    Plot("draft_speedup", "Drafting: length per engine and its predicted / measured speed-up", "k, or × plain",
         (r"rollout/engine_draft_(k|switch)/engine\d+", r"rollout/engine_draft_(predicted|measured)_speedup/engine\d+")),
    Plot("tokens_per_s", "Rollout throughput", "tokens / s",
         ("rollout/tokens_per_s", "rollout/engine_tokens_per_s"), higher_is_better=True),
)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl, one per step (a repeated step keeps its last row), in step order."""
    by_step: dict[int, dict[str, float]] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # a run killed mid-write leaves a partial last line
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}:{n + 1}: not JSON ({e})") from None
        step = int(row.get("step", len(by_step) + 1))
        by_step[step] = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
    return [by_step[s] for s in sorted(by_step)]


def _matching(plot: Plot, keys: set[str]) -> list[str]:
    out: list[str] = []
    for pattern in plot.keys:
        if pattern in keys:
            out.append(pattern)
        else:
            rx = re.compile(pattern)
            out += sorted((k for k in keys if rx.fullmatch(k) and k not in out), key=_natural)
    return out


def _natural(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def _series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is not None and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def metric_summary(xs: list[float], ys: list[float], higher_is_better: bool | None) -> dict[str, Any]:
    """first/last/min/max/mean of one series, plus best and its step when the metric has a direction."""
    out: dict[str, Any] = {"first": ys[0], "last": ys[-1], "min": min(ys), "max": max(ys),
                           "mean": sum(ys) / len(ys), "points": len(ys)}
    if higher_is_better is not None:
        i = max(range(len(ys)), key=lambda j: ys[j] if higher_is_better else -ys[j])
        out["best"], out["best_step"] = ys[i], int(xs[i])
    return out


def _draw(plot: Plot, rows: list[dict[str, float]], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    all_y: list[float] = []
    for key in keys:
        xs, ys = _series(rows, key)
        all_y += ys
        dense = len(xs) <= 60
        line, = ax.plot(xs, ys, marker="o" if dense else None, markersize=3, linewidth=1.2,
                        alpha=0.45 if len(xs) >= 50 else 1.0, label=key)
        if len(xs) >= 50:  # long noisy runs: a trailing mean over ~10 % of the run on top
            w = len(xs) // 10
            smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, color=line.get_color(), linewidth=2.0, label=f"{key} (mean of {w})")
    if plot.log_y and all_y and min(all_y) > 0:
        ax.set_yscale("log")
    if plot.name == "lambda":
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_title(plot.title)
    ax.set_xlabel("step")
    ax.set_ylabel(plot.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_summary(run_dir: Path, rows: list[dict[str, float]]) -> tuple[dict[str, Any], dict[Plot, list[str]]]:
    """The summary dict and, per plot, the keys it draws (empty: skipped)."""
    keys = set().union(*rows) if rows else set()
    run_summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        try:
            run_summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            run_summary = {}
    wall = run_summary.get("wall_seconds")
    if wall is None and rows:
        wall = max((r.get("time/elapsed_s", 0.0) for r in rows), default=None)
    drawn = {p: _matching(p, keys) for p in PLOTS}
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": len(rows),
        "first_step": int(rows[0]["step"]) if rows else None,
        "last_step": int(rows[-1]["step"]) if rows else None,
        "wall_seconds": wall,
        "state": run_summary.get("state"),
        "plots": {p.name: f"{p.name}.png" for p in PLOTS if drawn[p]},
        "skipped": {p.name: "no metric logged among " + ", ".join(p.keys) for p in PLOTS if not drawn[p]},
        "metrics": {},
    }
    for p in PLOTS:
        for k in drawn[p]:
            xs, ys = _series(rows, k)
            summary["metrics"][k] = metric_summary(xs, ys, p.higher_is_better)
    for k in ("accuracy_before", "accuracy_after", "final_acceptance_rate"):  # the demo's, when there
        if k in run_summary:
            summary[k] = run_summary[k]
    return summary, drawn


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Run report: {summary['run_dir']}", ""]
    wall = summary["wall_seconds"]
    lines.append(f"- steps: {summary['steps']} (step {_fmt(summary['first_step'])} to {_fmt(summary['last_step'])})")
    lines.append(f"- wall time: {_fmt(wall)} s" + (f" ({wall / 60:.1f} min)" if wall else ""))
    if summary.get("state"):
        lines.append(f"- state: {summary['state']}")
    for k in ("accuracy_before", "accuracy_after", "final_acceptance_rate"):
        if k in summary:
            lines.append(f"- {k}: {_fmt(summary[k])}")
    lines += ["", "| metric | first | last | min | max | best (step) |", "|---|---|---|---|---|---|"]
    for k, m in summary["metrics"].items():
        best = f"{_fmt(m['best'])} ({m['best_step']})" if "best" in m else "–"
        lines.append(f"| `{k}` | {_fmt(m['first'])} | {_fmt(m['last'])} | {_fmt(m['min'])} | {_fmt(m['max'])} | {best} |")
    lines.append("")
    for name, file in summary["plots"].items():
        lines.append(f"![{name}]({file})")
    if summary["skipped"]:
        lines += ["", "Skipped plots (the run did not log these metrics):", ""]
        lines += [f"- {name}: {why}" for name, why in summary["skipped"].items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report/`` (PNGs, summary.json, summary.md) and return that directory.
    Raises FileNotFoundError when the run has no metrics.jsonl."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist (no step of this run has finished yet?)")
    rows = read_metrics(metrics)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary, drawn = build_summary(run_dir, rows)
    for p in PLOTS:
        if drawn[p]:
            _draw(p, rows, drawn[p], out / f"{p.name}.png")
        else:
            (out / f"{p.name}.png").unlink(missing_ok=True)  # a stale picture from an earlier report
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return out
