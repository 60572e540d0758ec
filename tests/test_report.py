"""The run report (`services.report`): one PNG per logged quantity, skipped plots named with the
keys they looked for, and summary values computed from metrics.jsonl (a synthetic one, written
here, in the layout `RunController._report` writes)."""

from __future__ import annotations

import json

import pytest

from services.report import read_metrics, write_report


def _write_run(run_dir, steps=6, occ=True, drafting=True, extra_rows=()):
    rows = []
    for s in range(1, steps + 1):
        m = {"step": s, "batch/reward_mean": 0.1 * s, "batch/accuracy": 0.05 * s, "ratio/clip_frac": 0.01,
             "mtp/clip_frac/head1": 0.2, "mtp/clip_frac/head2": 0.1, "ratio/token_var": 1e-3 / s,
             "rollout/tokens_per_s": 100.0 + s, "time/elapsed_s": 10.0 * s}
        if occ:
            m |= {"mtp/lambda/head1": 1e-3 * (-1) ** s, "mtp/lambda/head2": 2e-3}
        if drafting:
            m["rollout/spec_acceptance_rate"] = 0.5 - 0.01 * s
            m |= {"rollout/spec_accept_pos1": 0.5, "rollout/spec_accept_pos2": 0.3,
                  "rollout/engine_spec_accept_pos1/engine0": 0.5, "rollout/engine_draft_k/engine0": float(s % 3),
                  "rollout/engine_draft_predicted_speedup/engine0": 1.3,
                  "rollout/engine_draft_measured_speedup/engine0": 1.2}
        rows.append(m)
    rows += list(extra_rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_report_writes_one_png_per_quantity_and_summaries(tmp_path):
    out = write_report(_write_run(tmp_path / "run"))
    assert out == tmp_path / "run" / "report"
    for name in ("reward", "accuracy", "clip_fraction", "lambda", "ratio_variance", "acceptance_rate",
                 "acceptance_by_position", "draft_speedup", "tokens_per_s"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 6 and s["first_step"] == 1 and s["last_step"] == 6
    assert s["wall_seconds"] == 60.0  # from time/elapsed_s when the run wrote no summary.json
    r = s["metrics"]["batch/reward_mean"]
    assert r["first"] == pytest.approx(0.1) and r["last"] == pytest.approx(0.6)
    assert r["best"] == pytest.approx(0.6) and r["best_step"] == 6
    acc = s["metrics"]["rollout/spec_acceptance_rate"]
    assert acc["best"] == pytest.approx(0.49) and acc["best_step"] == 1
    assert "best" not in s["metrics"]["ratio/clip_frac"]  # no direction: no "best"
    assert s["metrics"]["mtp/lambda/head1"]["min"] == pytest.approx(-1e-3)
    assert s["skipped"] == {}
    md = (out / "summary.md").read_text()
    assert "| `batch/reward_mean` | 0.1 | 0.6 |" in md and "![lambda](lambda.png)" in md


def test_missing_metrics_skip_their_plot_and_say_so(tmp_path):
    run = _write_run(tmp_path / "run", occ=False, drafting=False)
    out = write_report(run)
    s = json.loads((out / "summary.json").read_text())
    assert set(s["skipped"]) == {"lambda", "acceptance_rate", "acceptance_by_position", "draft_speedup"}
    assert "mtp/lambda" in s["skipped"]["lambda"]
    assert not (out / "lambda.png").exists() and (out / "reward.png").exists()
    assert "Skipped plots" in (out / "summary.md").read_text()


def test_run_summary_wall_time_and_repeated_steps(tmp_path):
    """A resumed run may log a step again: the last row wins; the run's own summary gives wall time."""
    run = _write_run(tmp_path / "run", steps=3, extra_rows=[{"step": 3, "batch/reward_mean": 0.9}])
    (run / "summary.json").write_text(json.dumps({"wall_seconds": 123.5, "state": "completed",
                                                  "accuracy_before": 0.2, "accuracy_after": 0.5}))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["batch/reward_mean"] == 0.9
    s = json.loads((write_report(run) / "summary.json").read_text())
    assert s["wall_seconds"] == 123.5 and s["state"] == "completed"
    assert s["accuracy_before"] == 0.2 and s["accuracy_after"] == 0.5
    assert s["metrics"]["batch/reward_mean"]["last"] == 0.9


def test_report_of_a_run_without_metrics_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from services.cli import _mount, app

    _mount()
    run = _write_run(tmp_path / "run")
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(run / "report" / "summary.md")
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert bad.exit_code != 0 and "metrics.jsonl" in bad.output
