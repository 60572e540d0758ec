"""`mtprl eval --model DIR --data DATASET`: pass@1 / avg@k / pass@k of a checkpoint with the
training verifiers, batched through an in-process vLLM engine (see `services.evaluate`). Prints
one JSON object (last line) and writes it to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def eval_cmd(
    model: Annotated[str, typer.Option(help="Checkpoint directory (MiMo layout, config.json).")],
    data: Annotated[str, typer.Option(help="reasoning_gym:TASK, human_eval or jsonl:PATH (as in a run spec).")],
    samples: Annotated[int, typer.Option(help="k: samples per prompt (avg@k, pass@k).", min=1)] = 1,
    size: Annotated[int, typer.Option(help="Items generated (reasoning_gym) or read at most.", min=1)] = 200,
    split: Annotated[str, typer.Option(help="held_out (the run's evaluation items), train, or all.")] = "held_out",
    held_out_fraction: Annotated[float, typer.Option(help="As the run's data.held_out_fraction.")] = 0.1,
    data_seed: Annotated[int, typer.Option(help="As the run's data.seed (item generation and split).")] = 0,
    task_config: Annotated[str | None, typer.Option(help="JSON of reasoning_gym task options "
                                                          "(data.task_config), when the spec supports it.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens per sample.", min=1)] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy (one sample stands for all k).", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (per prompt, independent of batching).")] = 0,
    speculative_tokens: Annotated[int, typer.Option(help="MTP drafting (0 = off; lossless either way).", min=0)] = 0,
    max_model_len: Annotated[int, typer.Option(help="Longest prompt + response.")] = 1024,
    kv_cache_gib: Annotated[float, typer.Option(help="KV-cache size of the engine.")] = 0.5,
    threads: Annotated[int | None, typer.Option(help="torch/OpenMP threads of the engine.")] = None,
    workers: Annotated[int, typer.Option(help="Verifier worker processes.", min=1)] = 2,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result here.")] = None,
    items: Annotated[bool, typer.Option(help="Include per-prompt results in the JSON.")] = False,
    verbose: Annotated[bool, typer.Option(help="vLLM's and transformers' logs on the console too (default: "
                                               "mtprl.log next to --out, else in runs/eval/).")] = False,
) -> None:
    """pass@1 and avg@k of a checkpoint on a dataset, graded like training."""
    from pydantic import ValidationError

    from services.console import route_library_logs

    # before services.evaluate imports vLLM: it then installs no console handler of its own
    log_file = route_library_logs(out.parent if out is not None else Path("runs") / "eval", verbose)
    from services.evaluate import evaluate
    from services.spec import DataSpec, RewardSpec

    if split not in ("held_out", "train", "all"):
        raise typer.BadParameter(f"--split must be held_out, train or all, got {split!r}")
    fields = {"dataset": data, "size": size, "seed": data_seed, "held_out_fraction": held_out_fraction}
    if task_config:
        fields["task_config"] = json.loads(task_config)
    try:
        data_spec = DataSpec.model_validate(fields)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'data'}: {x['msg']}" for x in e.errors())
        raise typer.BadParameter(msgs, param_hint="--data") from None
    if log_file:
        typer.echo(f"evaluating {model} on {data} ({samples} sample(s) per prompt); library logs: {log_file}",
                   err=True)
    try:
        res = evaluate(model, data_spec, samples=samples, max_tokens=max_tokens, temperature=temperature,
                       seed=seed, split=split, top_p=top_p, reward=RewardSpec(workers=workers),  # type: ignore[arg-type]
                       num_speculative_tokens=speculative_tokens, max_model_len=max_model_len,
                       kv_cache_gib=kv_cache_gib, num_threads=threads, include_items=items)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    text = json.dumps(res, indent=None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        typer.echo(f"pass@1 {res['pass_at_1']:.3f} | avg@{samples} {res['avg_at_k']:.3f} | "
                   f"pass@{samples} {res['pass_at_k']:.3f} on {res['prompts']} prompts -> {out}", err=True)
    typer.echo(text)
