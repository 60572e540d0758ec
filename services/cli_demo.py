"""`mtprl demo`: the default base model end to end on this machine.

Imports SmolLM2-135M-Instruct with one MTP head (cached after the first run), warms the head up on
the model's own answers to reasoning-gym arithmetic prompts, and generates through vLLM with MTP
speculative decoding, printing the acceptance rate before and after warm-up and a few answers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer


def demo(
    models_dir: Annotated[Path, typer.Option(help="Where checkpoints are cached.")] = Path(".cache/models"),
    runs_dir: Annotated[Path, typer.Option(help="Where the demo writes its summary.")] = Path("runs"),
    train_prompts: Annotated[int, typer.Option(help="Prompts answered for warm-up text.")] = 48,
    epochs: Annotated[int, typer.Option(help="Warm-up epochs.")] = 10,
) -> None:
    """Import SmolLM2 + MTP head, warm the head up, generate with MTP drafting; print acceptance."""
    from learner.checkpoint import read_config
    from learner.convert import import_smollm2
    from services.self_distill import SelfDistillConfig, run_self_distill

    t0 = time.perf_counter()
    base = models_dir / "smollm2-mtp1"
    if (base / "model.safetensors").is_file():
        read_config(base)
        typer.echo(f"[1/3] base model: {base} (cached)")
    else:
        typer.echo("[1/3] importing SmolLM2-135M-Instruct into the MiMo layout with 1 MTP head ...")
        import_smollm2(base, mtp_layers=1)
    typer.echo("[2/3] warming up the MTP head on the model's own answers (backbone frozen) ...")
    cfg = SelfDistillConfig(train_prompts=train_prompts)
    cfg.warmup.epochs = epochs
    result = run_self_distill(base, models_dir / "smollm2-mtp1-warm", cfg, log=lambda m: typer.echo(f"      {m}"))
    typer.echo("[3/3] a few answers generated with MTP speculative decoding:")
    for ex in result["examples"]:
        typer.echo(f"  Q: …{ex['prompt'].strip()[-90:]!r}\n  A: {ex['answer'].strip()[:200]!r}")
    result["wall_seconds"] = time.perf_counter() - t0
    out = runs_dir / "demo-foundation" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(
        f"\nacceptance rate: {result['acceptance_before']:.3f} (initial head) → {result['acceptance_after']:.3f} "
        f"(warmed up); mean acceptance length {result['mean_acceptance_length_after']:.2f}; "
        f"{result['wall_seconds']:.0f}s in all"
    )
    typer.echo(str(out))
