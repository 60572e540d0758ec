"""Evaluation of a checkpoint on a run's data: pass@1, avg@k and pass@k with the training verifiers.

    .venv/bin/mtprl eval --model .cache/models/smollm2-mtp1-warm \\
        --data reasoning_gym:basic_arithmetic --size 200 --samples 4 --temperature 1.0

or from Python (the demo's before/after numbers)::

    from services.evaluate import evaluate
    from services.spec import DataSpec
    res = evaluate("ckpt/", DataSpec(dataset="reasoning_gym:basic_arithmetic", size=200), samples=4)
    res["pass_at_1"], res["avg_at_k"]

What is shared with training, so the numbers mean the same thing as the run's `batch/accuracy`:
the prompts (`services.data`: same loader, same chat template, same stable held-out split for the
same `DataSpec`), the tokenisation (the checkpoint's tokenizer, no special tokens added), the
generation (`rollout.engine.RolloutEngine`, vLLM in this process) and the verifier
(`reward.actors.RewardScorer`, configured from a `RewardSpec` as the run configures its reward
actors). A sample is *correct* when its verdict's outcome is ``ok`` — exactly the learner's
`batch/accuracy` rule; `timeout`/`error` verdicts count as not correct and are reported apart.

Metrics (N prompts, k samples per prompt, c_i = correct samples of prompt i):

- ``pass_at_1`` = (1/N) Σ_i [sample 1 of prompt i is correct]. With temperature 0 that is greedy
  accuracy; with temperature > 0 it is a one-sample (unbiased, noisy) estimate of pass@1.
- ``avg_at_k`` = (1/N) Σ_i c_i / k: mean correctness over all k samples (the same expectation as
  pass@1 at temperature > 0, with k times the samples, hence lower variance).
- ``pass_at_k`` = (1/N) Σ_i [c_i > 0]: some sample is correct.

Greedy decoding (temperature 0) is deterministic, so only one sample per prompt is generated and
it stands for all k (``samples_generated`` says so); avg@k = pass@k = pass@1 then.

Speculative decoding over the evaluation: ``spec_num_draft_tokens`` drafted, of which
``spec_num_accepted_tokens`` accepted, ``spec_acceptance_rate`` their ratio (0 when nothing was
drafted).

Not covered: code datasets need the sandbox like training does (bubblewrap, or
``reward.allow_unsafe_code``); tensor-parallel engines (one in-process engine).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from reward.schema import RewardItem
from rollout.config import SEED_STRIDE
from services.spec import DataSpec, RewardSpec, RunSpec

Split = Literal["held_out", "train", "all"]


def load_items(data: DataSpec, split: Split = "held_out", tokenizer=None) -> list[RewardItem]:
    """The items of ``data`` in ``split``, rendered as the run renders them."""
    from services import data as run_data

    # The loaders read only `spec.data`; a RunSpec without a model (not validated) carries it.
    spec = RunSpec.model_construct(data=data)
    match split:
        case "held_out":
            return run_data.held_out_items(spec, tokenizer)
        case "train":
            return run_data.train_items(spec, tokenizer)
        case "all":
            return run_data.all_items(spec, tokenizer)
        case _:
            raise ValueError(f"split must be held_out, train or all, got {split!r}")


def check_model_dir(model_dir: str | Path) -> Path:
    """The checkpoint directory, or a FileNotFoundError that says what is missing."""
    p = Path(os.path.expanduser(str(model_dir)))
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} has no config.json (not a checkpoint)")
    return p


def prompt_seed(seed: int, index: int) -> int:
    """Sampling seed of prompt ``index``: its samples do not depend on the batch it is in."""
    return (seed * 1_000_003 + index * SEED_STRIDE + 17) % (2**31 - 1)


def evaluate(
    model_dir: str | Path,
    data_spec: DataSpec,
    samples: int = 1,
    max_tokens: int = 512,
    temperature: float = 0.0,
    seed: int = 0,
    *,
    split: Split = "held_out",
    top_p: float = 1.0,
    reward: RewardSpec | None = None,
    num_speculative_tokens: int = 0,
    max_model_len: int = 1024,
    kv_cache_gib: float = 0.5,
    num_threads: int | None = None,
    batch_prompts: int = 64,
    engine=None,
    scorer=None,
    progress: bool = True,
    include_items: bool = False,
) -> dict[str, Any]:
    """pass@1, avg@k and pass@k of ``model_dir`` on ``split`` of ``data_spec`` (see the module doc).

    ``samples`` is k. ``engine`` (a `RolloutEngine` already serving the policy, e.g. with weights
    loaded by a run) and ``scorer`` (a `RewardScorer`) are reused when given, else created here and
    closed at the end. Prompts go to vLLM ``batch_prompts`` at a time (the progress bar advances per
    batch). ``include_items`` adds per-prompt results (id, gold, correct per sample, first text).
    Raises FileNotFoundError for a missing checkpoint, ValueError for an empty split."""
    from transformers import AutoTokenizer

    from reward.actors import RewardScorer
    from rollout.config import EngineConfig
    from rollout.engine import RolloutEngine
    from services.batching import ScoredGroup, reward_items

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    path = check_model_dir(model_dir)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    items = load_items(data_spec, split, tokenizer)
    if not items:
        raise ValueError(f"split {split!r} of {data_spec.dataset} is empty (size {data_spec.size}, "
                         f"held_out_fraction {data_spec.held_out_fraction}); use another split or more items")
    prompt_ids = [tokenizer.encode(it.prompt, add_special_tokens=False) for it in items]

    own_scorer = scorer is None
    if engine is None:
        engine = RolloutEngine(EngineConfig(
            model=str(path), num_speculative_tokens=num_speculative_tokens, max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib, seed=seed, num_threads=num_threads, prompt_overflow="reject"))
    if scorer is None:
        scorer = RewardScorer((reward or RewardSpec()).actor_config())
    drafts = int(engine.config.num_speculative_tokens)
    greedy = temperature == 0
    n_gen = 1 if greedy else samples  # greedy samples are identical: generate one, count it k times
    sampling = {"n": n_gen, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}

    correct: list[list[bool]] = []
    outcomes: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    per_item: list[dict[str, Any]] = []
    gen_s = score_s = 0.0
    n_tokens = 0
    spec_before = engine.spec_stats()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"eval {split}", unit="prompt", dynamic_ncols=True)
    try:
        for start in range(0, len(items), batch_prompts):
            idx = list(range(start, min(start + batch_prompts, len(items))))
            batch = engine.generate([prompt_ids[i] for i in idx], sampling,
                                    seeds=[prompt_seed(seed, i) for i in idx])
            gen_s += batch.seconds
            n_tokens += batch.num_generated_tokens
            by_prompt: dict[int, list] = {}
            for s in batch.samples:
                by_prompt.setdefault(s.prompt_index, []).append(s)
            t1 = time.perf_counter()
            for j, i in enumerate(idx):
                got = by_prompt[j]
                group = ScoredGroup(cursor=i, prompt_ids=prompt_ids[i], responses=[s.token_ids for s in got],
                                    texts=[s.text if s.finish_reason != "prompt_too_long" else "" for s in got])
                verdicts = scorer.score_group(reward_items(group, items[i]))
                ok = [v.outcome == "ok" for v in verdicts]
                ok = ok * samples if greedy else ok  # (k,)
                correct.append(ok)
                outcomes.update(v.outcome for v in verdicts)
                finish.update(s.finish_reason for s in got)
                if include_items:
                    per_item.append({"id": items[i].id, "gold": items[i].gold if isinstance(items[i].gold, str)
                                     else items[i].gold.model_dump(), "correct": ok, "text": got[0].text})
            score_s += time.perf_counter() - t1
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix(avg=f"{sum(map(sum, correct)) / (samples * len(correct)):.3f}")
        spec = engine.spec_stats() - spec_before
    finally:
        if bar is not None:
            bar.close()
        if own_scorer:
            scorer.close()

    n = len(correct)
    total = sum(finish.values())
    out: dict[str, Any] = {
        "model": str(model_dir),
        "dataset": data_spec.dataset,
        "split": split,
        "prompts": n,
        "k": samples,
        "samples_generated": n_gen,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": seed,
        "pass_at_1": sum(c[0] for c in correct) / n,
        "avg_at_k": sum(sum(c) / samples for c in correct) / n,
        "pass_at_k": sum(any(c) for c in correct) / n,
        "outcomes": dict(outcomes),  # per generated sample
        "truncated_frac": finish.get("length", 0) / total if total else 0.0,
        "prompt_too_long": finish.get("prompt_too_long", 0),
        "mean_response_tokens": n_tokens / total if total else 0.0,
        "tokens_per_s": n_tokens / gen_s if gen_s > 0 else 0.0,
        "num_speculative_tokens": drafts,
        "spec_acceptance_rate": spec.acceptance_rate,
        # The engine's counters over this evaluation, so the rate can be checked and re-aggregated.
        "spec_num_draft_tokens": spec.num_draft_tokens,
        "spec_num_accepted_tokens": spec.num_accepted_tokens,
        "generation_s": gen_s,
        "scoring_s": score_s,
        "wall_s": time.perf_counter() - t0,
    }
    if include_items:
        out["items"] = per_item
    return out


class GroupEngine:
    """`evaluate`'s engine interface over engine 0 of a `rollout.group.EngineGroup`."""

    def __init__(self, group):
        self.group = group
        self.config = group.config

    def generate(self, prompts, sampling, seeds=None):
        import ray

        return ray.get(self.group.submit(0, prompts, sampling, seeds=seeds))

    def spec_stats(self):
        import ray

        return ray.get(self.group.engines[0].spec_stats.remote())


def evaluate_in_group(group, version: int, model_dir: str | Path, data_spec: DataSpec, *, samples: int = 1,
                      temperature: float = 0.0, max_tokens: int = 512, seed: int = 0, split: Split = "held_out",
                      reward: RewardSpec | None = None) -> dict[str, Any]:
    """`evaluate` the checkpoint ``model_dir`` on an already running `EngineGroup` (e.g. the one
    runs shared): its weights are published into the group as ``version`` first, so the engines
    (drafter included) serve exactly that policy; no new engine is started."""
    from learner.checkpoint import iter_export_tensors, load_policy

    group.publish(version, list(iter_export_tensors(load_policy(model_dir))))
    return evaluate(model_dir, data_spec, samples=samples, max_tokens=max_tokens, temperature=temperature,
                    seed=seed, split=split, reward=reward, engine=GroupEngine(group), progress=False)
