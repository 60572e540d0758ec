"""Shared fixtures. Expensive real parts (Ray, vLLM engines, checkpoints) are session-scoped so the
suite starts each once: a vLLM engine takes 20–30 s to start on this CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("MTPRL_MODELS_DIR", REPO / ".cache" / "models"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random MiMo-layout checkpoint with 2 MTP modules (a few MB)."""
    from learner.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-mtp2", num_mtp=2, seed=0)


@pytest.fixture(scope="session")
def smollm2_ckpt() -> Path:
    """SmolLM2-135M-Instruct converted to the MiMo layout with 1 MTP module (built once, cached)."""
    from learner.convert import import_smollm2

    path = MODELS / "smollm2-mtp1"
    if not (path / "model.safetensors").is_file():
        import_smollm2(path, mtp_layers=1)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (tests must not init or shut down their own)."""
    import ray

    if not ray.is_initialized():
        from services.local_ray import start_local_ray
        start_local_ray(8)
    yield ray
    ray.shutdown()

