"""The MTP-regime comparison, the OCC paper's Table 1 in miniature (`mtprl compare`).

One base run spec is trained once per row, everything else equal: model, data order, seeds,
schedule. A row is a regime of ``algorithm.mtp_regime`` (``detach``, ``ce``, ``policy``, ``occ``;
head distillation off) or a regime with head distillation (``occ+distill``, ``detach+distill``:
``algorithm.mtp.distill`` as the base spec sets it if it turns it on, else `DEFAULT_DISTILL`). Each run is a
normal run (`services.controller.RunController`) in ``<out>/<regime>/`` with its own checkpoints and
``metrics.jsonl``; the rollout engines and reward actors are started once and shared (each run
publishes its own weights first, as runs sharing engines always do), the learner is fresh per run.

After the runs, the base policy and each final policy are evaluated on the held-out split with
`services.evaluate.evaluate` (greedy, the training verifier), with the weights pushed into the
shared engine — so the evaluation's acceptance rate is that of each run's trained drafter.

A completed regime (its ``result.json`` exists) is not run again: an interrupted comparison resumes
where it stopped (an unfinished run resumes from its latest checkpoint).

Columns (`summarize`; "tail" = the last ``tail`` steps of the run):

- ``accuracy``: held-out greedy pass@1 of the final policy; ``accuracy_before`` is the base's;
- ``train_reward``: mean ``batch/reward_mean`` over the tail;
- ``clip_frac``: mean ``ratio/clip_frac`` (the main head's clipped-token fraction) over the run;
  ``mtp_clip_frac``: the same for the MTP heads' surrogates (``policy``/``occ`` only);
- ``acceptance``: mean ``rollout/spec_acceptance_rate`` over the tail (the drafter during RL);
  ``eval_acceptance``: the acceptance rate while evaluating the final policy;
- ``lambda_mean``: ``occ``: the mean of λₜ (``mtp/lambda/head*``) over the run; ``ce``/``policy``:
  their fixed λ (``occ.fixed_lambda``); ``detach``: none (the heads' loss never reaches the trunk).
- ``distill_accept``: the ``+distill`` rows: mean ``mtp/distill_accept/head1`` (1 − TV between head 1
  and the main head on the learner's batch: probabilistic drafting's expected acceptance) over the tail.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from services.evaluate import evaluate_in_group
from services.spec import RunSpec

REGIMES = ("detach", "ce", "policy", "occ")
#: Rows that add head distillation (`algorithm.mtp.distill`) to a regime.
DISTILL_ROWS = {"occ+distill": "occ", "detach+distill": "detach"}
ROWS = REGIMES + tuple(DISTILL_ROWS)
#: The distillation of the ``+distill`` rows when the base spec leaves it off: forward KL at
#: weight 1 (the term reaches only the heads, so it does not trade against the policy loss).
DEFAULT_DISTILL = {"kind": "kl", "coef": 1.0}
RESULT = "result.json"


class RegimeRow(BaseModel):
    """One line of the comparison table (see the module doc for each column)."""

    regime: str
    state: str
    steps: int
    wall_seconds: float
    train_reward: float | None = None
    clip_frac: float | None = None
    mtp_clip_frac: float | None = None
    acceptance: float | None = None
    lambda_mean: float | None = None
    distill_accept: float | None = None
    accuracy: float | None = None
    eval_acceptance: float | None = None


class Comparison(BaseModel):
    base_model: str
    dataset: str
    seed: int
    steps: int
    eval_prompts: int
    accuracy_before: float
    eval_acceptance_before: float | None
    rows: list[RegimeRow]


def regime_specs(base: RunSpec, regimes: list[str]) -> dict[str, RunSpec]:
    """``base`` with ``algorithm.mtp_regime`` set to each row's regime and head distillation on for
    the ``+distill`` rows, off for the others (validated: a regime the spec cannot run, e.g. ``occ``
    with one mini-batch, fails here, before anything starts)."""
    unknown = [r for r in regimes if r not in ROWS]
    if unknown or not regimes:
        raise ValueError(f"unknown regime(s) {unknown or regimes}; choose from {', '.join(ROWS)}")
    base_distill = base.algorithm.mtp.distill
    distill_on = base_distill.model_dump() if base_distill.enabled else dict(DEFAULT_DISTILL)
    distill_off = {**base_distill.model_dump(), "coef": 0.0, "head_steps": 0, "replay": 0}
    from pydantic import ValidationError

    from learner.config import default_mpo_grad
    from services.spec import problem_lines, spec_problems

    # An mpo.grad the base left to its default follows each row's regime (a validated spec holds
    # the derived value: the base's `occ` would make the `detach` row's MPO send gradients into the
    # backbone it detaches, a spec error).
    mpo = base.algorithm.mpo
    grad_derived = mpo is not None and mpo.grad == default_mpo_grad(base.algorithm.mtp_regime)
    out = {}
    for r in regimes:
        raw = base.model_dump()
        raw["algorithm"]["mtp_regime"] = DISTILL_ROWS.get(r, r)
        if grad_derived:
            raw["algorithm"]["mpo"]["grad"] = None
        raw["algorithm"].setdefault("mtp", {})["distill"] = distill_on if r in DISTILL_ROWS else distill_off
        raw["name"] = f"{base.name or 'compare'}-{r}"
        try:
            out[r] = RunSpec.model_validate(raw)
        except ValidationError as e:
            raise ValueError(f"the spec cannot run regime {r!r}:\n{e}") from None
        problems = spec_problems(out[r])
        if problems:
            raise ValueError(f"the spec cannot run regime {r!r}: " + "; ".join(problem_lines(problems)))
    return out


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def summarize(history: list[dict[str, float]], tail: int = 5) -> dict[str, float | None]:
    """The table's training columns from a run's metric history (one dict per step)."""
    last = history[-tail:] if tail > 0 else history

    def heads(m: dict[str, float], prefix: str) -> float | None:
        return _mean([v for k, v in m.items() if k.startswith(prefix)])

    return {
        "train_reward": _mean([m.get("batch/reward_mean") for m in last]),
        "clip_frac": _mean([m.get("ratio/clip_frac") for m in history]),
        "mtp_clip_frac": _mean([heads(m, "mtp/clip_frac/head") for m in history]),
        "acceptance": _mean([m.get("rollout/spec_acceptance_rate") for m in last]),
        "lambda_mean": _mean([heads(m, "mtp/lambda/head") for m in history]),
        "distill_accept": _mean([m.get("mtp/distill_accept/head1") for m in last]),
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render_markdown(c: Comparison) -> str:
    """The comparison as a Markdown table (what `mtprl compare` prints and writes)."""
    lines = [
        f"Base model `{c.base_model}`, data `{c.dataset}` (seed {c.seed}), {c.steps} steps per regime; "
        f"held-out accuracy on {c.eval_prompts} prompts (greedy): **{_fmt(c.accuracy_before)} before training** "
        f"(acceptance {_fmt(c.eval_acceptance_before)}).",
        "",
        "| regime | held-out acc | Δ acc | train reward (tail) | clip frac | MTP clip frac | acceptance in RL (tail) "
        "| eval acceptance | λ | head-1 1−TV (tail) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c.rows:
        delta = None if r.accuracy is None else r.accuracy - c.accuracy_before
        lines.append(
            f"| {r.regime} | {_fmt(r.accuracy)} | {'–' if delta is None else f'{delta:+.3f}'} | {_fmt(r.train_reward)} "
            f"| {_fmt(r.clip_frac, 4)} | {_fmt(r.mtp_clip_frac, 4)} | {_fmt(r.acceptance)} | {_fmt(r.eval_acceptance)} "
            f"| {_fmt(r.lambda_mean, 4)} | {_fmt(r.distill_accept)} | {r.wall_seconds:.0f} |")
    return "\n".join(lines) + "\n"


def run_comparison(
    base: RunSpec,
    out_dir: str | Path,
    regimes: list[str] | None = None,
    *,
    eval_max_tokens: int | None = None,
    tail: int = 5,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Train ``base`` under each regime, evaluate, and write ``compare.json`` / ``compare.md`` in
    ``out_dir``. Ray must be initialised by the caller."""
    import ray

    from services import run_checkpoint
    from services.controller import RunController, start_engine_group, start_reward_actors

    specs = regime_specs(base, list(regimes or ROWS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "base_spec.json"
    if saved.exists() and RunSpec.model_validate_json(saved.read_text()) != base:
        # Kept regimes would be mixed with runs of another spec in one table.
        raise ValueError(f"{out} holds a comparison of a different base spec ({saved}); use another --out "
                         "or remove that directory")
    saved.write_text(base.model_dump_json(indent=2))
    max_tokens = eval_max_tokens or base.rollout.max_tokens
    log(f"starting {base.rollout.engines} rollout engine(s) and {base.reward.actors} reward actor(s), "
        f"shared by the {len(specs)} runs")
    group = start_engine_group(base)
    rewards = start_reward_actors(base)
    rows: list[RegimeRow] = []
    try:
        for regime, spec in specs.items():
            run_dir = out / regime
            done = run_dir / RESULT
            if done.exists():
                log(f"[{regime}] already completed; kept ({done})")
                rows.append(RegimeRow.model_validate_json(done.read_text()))
                continue
            log(f"[{regime}] training {spec.schedule.steps} steps -> {run_dir}")
            res = RunController(f"{spec.name}", spec, run_dir, engines=group, reward_actors=rewards,
                                progress=progress).run()
            row = RegimeRow(regime=regime, state=res.state, steps=res.step, wall_seconds=res.wall_seconds,
                            **summarize(res.history, tail))
            if DISTILL_ROWS.get(regime, regime) in ("ce", "policy"):
                row.lambda_mean = spec.algorithm.occ.fixed_lambda
            if res.state != "completed":
                raise RuntimeError(f"the {regime} run ended {res.state} at step {res.step}; rerun to resume it")
            rows.append(row)
            (run_dir / "summary.json").write_text(json.dumps(
                {"state": res.state, "steps": res.step, "counters": res.counters, "wall_seconds": res.wall_seconds},
                indent=2))
            done.write_text(row.model_dump_json(indent=2))

        version = 10**9  # above every run's versions: the engine reloads for each evaluation
        log(f"evaluating the base policy and {len(rows)} final policies on the held-out split")
        before = evaluate_in_group(group, version, base.model.path, base.data, max_tokens=max_tokens,
                                   seed=base.data.seed, reward=base.reward)
        for row in rows:
            version += 1
            ckpt = run_checkpoint.latest(out / row.regime)
            if ckpt is None:
                raise RuntimeError(f"the {row.regime} run has no checkpoint in {out / row.regime}")
            t0 = time.perf_counter()
            res = evaluate_in_group(group, version, ckpt / "policy", base.data, max_tokens=max_tokens,
                                    seed=base.data.seed, reward=specs[row.regime].reward)
            row.accuracy = float(res["pass_at_1"])
            row.eval_acceptance = res.get("spec_acceptance_rate")
            log(f"[{row.regime}] held-out accuracy {row.accuracy:.3f} ({time.perf_counter() - t0:.0f} s)")
    finally:
        group.kill()
        for a in rewards:
            ray.kill(a, no_restart=True)

    cmp = Comparison(base_model=base.model.path, dataset=base.data.dataset, seed=base.data.seed,
                     steps=base.schedule.steps, eval_prompts=int(before["prompts"]),
                     accuracy_before=float(before["pass_at_1"]),
                     eval_acceptance_before=before.get("spec_acceptance_rate"), rows=rows)
    (out / "compare.json").write_text(cmp.model_dump_json(indent=2))
    (out / "compare.md").write_text(render_markdown(cmp))
    return cmp
