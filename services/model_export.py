"""`mtprl model export`: a policy checkpoint (or a run's latest one) out as a Hugging Face model.

``hf``: a plain ``Qwen2ForCausalLM`` directory (config without MTP fields, no MTP tensors, the head
left out when tied, as transformers itself saves it) that transformers and vLLM load as they are.
``mimo``: the MiMo layout with its MTP modules (what vLLM serves with MTP drafting), re-written in
one file whatever layout it was read from. Both carry the tokenizer, chat template and generation
config. Weights keep the checkpoint's dtype. Written atomically, as `save_policy` writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from learner.checkpoint import (CONFIG_NAME, CheckpointError, _atomic_dir, _publish, load_policy,
                                read_config, save_policy, weight_files)
from services import run_checkpoint

FORMATS = ("hf", "mimo")
#: Files of a checkpoint that follow the weights (the tokenizer's, the chat template, generation defaults).
_CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def resolve_checkpoint(src: str | Path, step: int | None = None) -> Path:
    """The policy directory ``src`` names: a checkpoint itself, a run checkpoint (``…/step-N``, its
    ``policy/``), or a run directory (its latest checkpoint, or ``step``'s)."""
    src = Path(src)
    if step is None and (src / CONFIG_NAME).is_file():
        return src
    if step is None and (src / "policy" / CONFIG_NAME).is_file():
        return src / "policy"
    root = run_checkpoint.checkpoint_root(src)
    if not root.is_dir():
        raise CheckpointError(f"{src} is neither a checkpoint (config.json) nor a run directory (checkpoints/); "
                              "pass a model directory, a run's checkpoints/step-N or the run directory")
    steps = sorted(p.name for p in root.glob("step-*") if (p / "policy" / CONFIG_NAME).is_file())
    if step is not None:
        ckpt = root / f"step-{step:06d}"
        if not (ckpt / "policy" / CONFIG_NAME).is_file():
            raise CheckpointError(f"{src} has no checkpoint of step {step}; it has {steps or 'none'}")
    else:
        ckpt = run_checkpoint.latest(src)
        if ckpt is None:
            raise CheckpointError(f"{src} has no complete checkpoint yet (checkpoints/LATEST); pause or finish the "
                                  "run first, or pass --step N of one of " + str(steps or "none"))
    return ckpt / "policy"


def stored_dtype(path: Path) -> torch.dtype:
    shards = weight_files(path)
    shard, names = next(iter(shards.items()))
    with safe_open(str(path / shard), framework="pt") as f:
        tag = f.get_slice(names[0]).get_dtype()
    return _DTYPES.get(tag, torch.float32)


def _carry_files(src: Path, dst: Path) -> None:
    for name in _CARRIED:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_checkpoint(src: str | Path, out: str | Path, fmt: str = "hf", step: int | None = None) -> Path:
    """Write the checkpoint ``src`` names (see `resolve_checkpoint`) to ``out`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt!r} is not one of {FORMATS}")
    path = resolve_checkpoint(src, step)
    read_config(path)
    dtype = stored_dtype(path)
    model = load_policy(path, dtype=dtype)
    out = Path(out)
    if fmt == "mimo":
        save_policy(model, out)
        _carry_files(path, out)
        return out
    backbone = model.backbone
    backbone.config.architectures = ["Qwen2ForCausalLM"]
    if hasattr(backbone.config, "num_nextn_predict_layers"):
        del backbone.config.num_nextn_predict_layers
    backbone.config.dtype = dtype
    tmp = _atomic_dir(out)
    try:
        backbone.save_pretrained(str(tmp))
        _carry_files(path, tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
