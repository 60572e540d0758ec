"""Save and load the policy in the MiMo checkpoint layout, which vLLM serves natively with
``speculative_config={"method": "mtp", ...}``.

Layout written (one directory): ``config.json`` (Qwen2 fields plus ``"architectures": ["MiMoForCausalLM"]``
and ``"num_nextn_predict_layers": N``), ``model.safetensors`` (the Qwen2 weights plus
``model.mtp_layers.{i}.*``), and the tokenizer files with the chat template.

Layouts read (`load_policy`): that one, and Hugging Face's sharded release layout
(``model.safetensors.index.json`` + shards, bf16 or fp32) with ``"model_type": "mimo"`` — what
XiaomiMiMo publishes MiMo-7B-RL as (same tensor names; vLLM serves both).

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.model import MAX_MTP_LAYERS, MTPModule, PolicyModel

try:  # transformers >= 5 moved it; it skips the random init of weights about to be loaded
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - older transformers
    from transformers.modeling_utils import no_init_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
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


# ---- loading ------------------------------------------------------------------------------------
#: model_type values `load_policy` reads: this project's writer ("qwen2", what vLLM serves today)
#: and XiaomiMiMo's own release ("mimo": the same Qwen2 fields plus num_nextn_predict_layers; its
#: MTP tensors use the names above, see vLLM's mimo_mtp.py).
SUPPORTED_MODEL_TYPES = ("qwen2", "mimo")

#: Tensors a checkpoint may carry that the policy does not hold, dropped on purpose: rotary-embedding
#: caches that old transformers versions (and ColossalAI/GPTQ exports) saved. They are recomputed
#: from the config; vLLM's loader drops the same names (`AutoWeightsLoader`'s
#: REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER). Anything else unexpected is an error, not silently skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq", "rotary_emb.cos_cached",
                    "rotary_emb.sin_cached")

#: Config keys of a real MiMo release that must not follow the weights into our own layout:
#: ``auto_map`` names remote-code files (configuration_mimo.py) that `save_policy` does not copy.
_DROPPED_CONFIG_KEYS = ("architectures", "auto_map", "model_type")


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
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{cfg_file} has model_type={cfg.get('model_type')!r}; supported: 'qwen2' (this project's layout) "
            "and 'mimo' (XiaomiMiMo's release). Another Qwen2-shaped MiMo export: set model_type to 'qwen2'; "
            "another architecture: convert it (PolicyModel.from_backbone + save_policy)"
        )
    n = cfg.get("num_nextn_predict_layers")
    if not isinstance(n, int) or not 1 <= n <= MAX_MTP_LAYERS:
        raise CheckpointError(
            f"{cfg_file} has num_nextn_predict_layers={n!r}; it must be an integer in 1..{MAX_MTP_LAYERS}"
        )
    return cfg


def weight_files(path: str | Path) -> dict[str, list[str]]:
    """Which file holds which tensor: ``{shard file name: [tensor names]}``, from
    ``model.safetensors.index.json`` (Hugging Face's sharded layout, its ``weight_map``) when present,
    else the single ``model.safetensors``. Raises `CheckpointError` for a missing file or a bad index."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map ({e}); "
                                  "re-download the checkpoint") from e
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing} that are not in {path}; the download is "
                                  "incomplete — fetch the missing files again")
        return shards
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} (or a sharded {INDEX_NAME}) is missing; the checkpoint at {path} "
                              "is incomplete — re-create it")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {WEIGHTS_NAME: list(f.keys())}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is corrupt or unreadable ({e}); re-create the checkpoint") from e


def _empty_policy(cfg: dict, dtype: torch.dtype) -> PolicyModel:
    """A `PolicyModel` of the config's shape, parameters allocated in ``dtype`` but not initialised
    (every one is then loaded): random init of a 7B model costs minutes, and building it in fp32 to
    convert to bf16 would hold two copies."""
    num_mtp = cfg["num_nextn_predict_layers"]
    config = Qwen2Config.from_dict({k: v for k, v in cfg.items() if k not in _DROPPED_CONFIG_KEYS})
    config.num_nextn_predict_layers = num_mtp
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            backbone = Qwen2ForCausalLM(config)
            mtp = torch.nn.ModuleList(MTPModule(config) for _ in range(num_mtp))
    finally:
        torch.set_default_dtype(previous)
    backbone.tie_weights()  # part of the init that no_init_weights skipped: a tied head shares the embedding
    return PolicyModel(backbone, mtp)


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32) -> PolicyModel:
    """Load a MiMo-layout checkpoint into a `PolicyModel` (fp32 by default, for training).

    Reads this project's layout (one ``model.safetensors``, model_type qwen2) and Hugging Face's
    sharded one (``model.safetensors.index.json`` + shards, e.g. XiaomiMiMo/MiMo-7B-RL as published,
    model_type mimo), tensors in any float dtype (converted to ``dtype``). Tensors are read one at a
    time straight into the model's parameters, so the peak is the model plus one tensor, not the
    model plus every shard."""
    path = Path(path)
    cfg = read_config(path)
    shards = weight_files(path)
    model = _empty_policy(cfg, dtype if dtype.is_floating_point else torch.float32)
    targets = export_state_dict(model)  # MiMo name -> the parameter's storage (views, not copies)
    tied = bool(model.config.tie_word_embeddings)

    present = {n for names in shards.values() for n in names}
    unexpected = sorted(n for n in present - set(targets) if not n.endswith(IGNORED_SUFFIXES))
    # A tied head is the embedding matrix: a checkpoint may leave it out (we always write it).
    missing = sorted(set(targets) - present - ({"lm_head.weight"} if tied else set()))
    if missing or unexpected:
        where = path / (WEIGHTS_NAME if list(shards) == [WEIGHTS_NAME] else INDEX_NAME)
        raise CheckpointError(
            f"{where} does not match its config: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}; check num_nextn_predict_layers, "
            "num_hidden_layers and tie_word_embeddings against the weights"
        )
    with torch.no_grad():
        for shard, names in shards.items():
            _load_shard(path / shard, names, targets, skip={"lm_head.weight"} if tied else set())
    return model.to(dtype)


def _load_shard(file: Path, names: list[str], targets: dict[str, torch.Tensor], skip: set[str]) -> None:
    """Copy ``names`` from one safetensors ``file`` into ``targets`` (converting dtype), a tensor at a time."""
    try:
        with safe_open(str(file), framework="pt") as f:
            lacking = sorted(set(names) - set(f.keys()))
            if lacking:
                raise CheckpointError(
                    f"{file} lacks {lacking[:5]}{'…' if len(lacking) > 5 else ''}, which the index places "
                    "there; the shard is truncated or from another revision — fetch it again")
            for name in names:
                if name in skip or name not in targets:  # a tied head, or an ignored extra
                    continue
                t, dst = f.get_tensor(name), targets[name]
                if t.shape != dst.shape:
                    raise CheckpointError(f"{file}: {name} has shape {tuple(t.shape)}, the config gives "
                                          f"{tuple(dst.shape)}; the config.json does not belong to these weights")
                dst.copy_(t)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt or unreadable ({e}); fetch or re-create it") from e
