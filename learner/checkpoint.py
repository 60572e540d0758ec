"""Save and load the policy in the MiMo checkpoint layout, which vLLM serves natively with
``speculative_config={"method": "mtp", ...}``.

Layout (one directory): ``config.json`` (Qwen2 fields plus ``"architectures": ["MiMoForCausalLM"]``
and ``"num_nextn_predict_layers": N``), ``model.safetensors`` (the Qwen2 weights plus
``model.mtp_layers.{i}.*``), and the tokenizer files with the chat template.

Tied embeddings: vLLM's MiMo MTP loader keeps only ``mtp_layers``, ``embed_tokens`` and
``lm_head`` tensors and expects ``lm_head.weight`` to be present even when the target model ties it,
so the head is always written explicitly (a copy of the embedding when tied).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so
a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.model import MAX_MTP_LAYERS, MTPModule, PolicyModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ARCHITECTURE = "MiMoForCausalLM"
MTP_PREFIX = "model.mtp_layers."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


def export_state_dict(model: PolicyModel) -> dict[str, torch.Tensor]:
    """The policy's tensors under their MiMo checkpoint names (what vLLM loads)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.backbone.state_dict().items():
        tensors[name] = t
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = model.backbone.lm_head.weight
    for i, m in enumerate(model.mtp):
        for name, t in m.state_dict().items():
            tensors[f"{MTP_PREFIX}{i}.{name}"] = t
    return tensors


def export_name(fqn: str) -> str:
    """A `PolicyModel` parameter's MiMo checkpoint name (``backbone.model.x`` → ``model.x``,
    ``mtp.0.x`` → ``model.mtp_layers.0.x``): what a sharded learner, which sees its model's own
    names, writes and publishes under."""
    if fqn.startswith("backbone."):
        return fqn[len("backbone."):]
    if fqn.startswith("mtp."):
        return MTP_PREFIX + fqn[len("mtp."):]
    raise ValueError(f"{fqn!r} is not a PolicyModel tensor name (backbone.* or mtp.*)")


def is_drafter_tensor(name: str) -> bool:
    """Whether vLLM's MTP drafter loads the MiMo-named tensor ``name``."""
    return name.startswith(MTP_PREFIX) or "embed_tokens" in name or name == "lm_head.weight"


def iter_export_tensors(model: PolicyModel, mtp_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Detached CPU tensors in MiMo naming; ``mtp_only`` yields what vLLM's drafter needs.

    A policy on a GPU is copied to the host one tensor at a time (what the object store and the
    engines take); a CPU policy's tensors are yielded as they are, without a copy."""
    for name, t in export_state_dict(model).items():
        if mtp_only and not is_drafter_tensor(name):
            continue
        yield name, t.detach().cpu()


def mimo_config_dict(config: Qwen2Config, num_mtp: int) -> dict:
    d = config.to_dict()
    d.update(
        architectures=[ARCHITECTURE],
        model_type="qwen2",
        num_nextn_predict_layers=num_mtp,
    )
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        d.pop(key, None)
    rope = d.get("rope_parameters") or {}
    if "rope_theta" in rope:  # readers predating transformers v5 look for it at the top level
        d["rope_theta"] = rope["rope_theta"]
    return d


def _atomic_dir(out_dir: Path):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``, replacing an older checkpoint only once the new one is whole."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def save_policy(model: PolicyModel, out_dir: str | Path, tokenizer=None, extra: dict[str, str] | None = None) -> Path:
    """Write ``model`` (and ``tokenizer`` when given) to ``out_dir`` atomically. ``extra`` maps file
    names to text written alongside (e.g. a ``generation_config.json``)."""
    # CPU copies whatever the policy's device (safetensors files hold host tensors); copies,
    # not views, also for a tied head, which safetensors refuses to store shared
    tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in export_state_dict(model).items()}
    return save_policy_tensors(tensors, model.config, model.num_mtp, out_dir, tokenizer, extra)


def save_policy_tensors(tensors: dict[str, torch.Tensor], config: Qwen2Config, num_mtp: int,
                        out_dir: str | Path, tokenizer=None, extra: dict[str, str] | None = None) -> Path:
    """`save_policy` from tensors already in MiMo naming on the host (contiguous, unshared), e.g.
    the full tensors a sharded learner gathered on its rank 0."""
    out_dir = Path(out_dir)
    tmp = _atomic_dir(out_dir)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(mimo_config_dict(config, num_mtp), indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(path: str | Path) -> dict:
    """Read and validate a MiMo-layout ``config.json``; raise `CheckpointError` with advice."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"no checkpoint directory at {path}: create one with `mtprl model import-smollm2 --out {path}` "
            f"or `mtprl model tiny --out {path}`"
        )
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: {path} is not a model checkpoint (expected config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-create the checkpoint") from e
    archs = cfg.get("architectures") or []
    if archs != [ARCHITECTURE]:
        raise CheckpointError(
            f"{cfg_file} declares architectures={archs}, expected [{ARCHITECTURE!r}] (the MiMo MTP layout); "
            "convert the model with `mtprl model import-smollm2` or save it with learner.checkpoint.save_policy"
        )
    if cfg.get("model_type") != "qwen2":
        raise CheckpointError(f"{cfg_file} has model_type={cfg.get('model_type')!r}, expected 'qwen2'")
    n = cfg.get("num_nextn_predict_layers")
    if not isinstance(n, int) or not 1 <= n <= MAX_MTP_LAYERS:
        raise CheckpointError(
            f"{cfg_file} has num_nextn_predict_layers={n!r}; it must be an integer in 1..{MAX_MTP_LAYERS}"
        )
    return cfg


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32) -> PolicyModel:
    """Load a MiMo-layout checkpoint into a `PolicyModel` (fp32 by default, for training)."""
    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint at {path} is incomplete — re-create it")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is corrupt or unreadable ({e}); re-create the checkpoint") from e

    num_mtp = cfg["num_nextn_predict_layers"]
    config = Qwen2Config.from_dict({k: v for k, v in cfg.items() if k != "architectures"})
    config.num_nextn_predict_layers = num_mtp
    backbone = Qwen2ForCausalLM(config)
    mtp = torch.nn.ModuleList(MTPModule(config) for _ in range(num_mtp))
    model = PolicyModel(backbone, mtp)

    expected = set(export_state_dict(model))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    backbone_sd = {n: t for n, t in tensors.items() if not n.startswith(MTP_PREFIX)}
    if config.tie_word_embeddings:
        backbone_sd.pop("lm_head.weight", None)
    backbone.load_state_dict(backbone_sd, strict=not config.tie_word_embeddings)
    for i, m in enumerate(mtp):
        prefix = f"{MTP_PREFIX}{i}."
        m.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)})
    return model.to(dtype)
