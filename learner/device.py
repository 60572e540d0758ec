"""Where the learner runs and in which precision: `resolve_placement` turns the config's
`device`/`precision` choices into a `Placement` (a torch device and an optional autocast dtype).

    placement = resolve_placement("auto", "auto", gpu_assigned=True)   # cuda + bf16 if CUDA is here
    with placement.autocast():
        out = model.token_logprobs(ids.to(placement.device), ...)

One code path for CPU and GPU: the `Learner` moves the policy to `placement.device` once, moves
each batch there after the (host-side, tiny) reward shaping, runs its forwards under
`placement.autocast()`, and hands back python floats; checkpoints and published weights are
always CPU tensors (`learner.checkpoint`).

Scope: one device per learner (no FSDP/DDP: a run's `resources.learner_gpus > 1` still trains on
the first visible GPU). Precision is mixed, never pure bf16: the parameters, gradients and AdamW
state stay float32 and only the forward's matrix products run in bf16 (autocast). Pure bf16
parameters would round most updates away: at the RL learning rates used here (1e-6) a step
changes a weight by ~1e-6 of its size, far below bf16's resolution (2⁻⁸ ≈ 4e-3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

DeviceChoice = Literal["auto", "cpu", "cuda"]
PrecisionChoice = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class Placement:
    """A resolved device and the dtype of autocast's matrix products (None: plain float32)."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None

    @property
    def precision(self) -> str:
        return "fp32" if self.autocast_dtype is None else "bf16"

    def autocast(self):
        """The context the forwards run in: bf16 autocast, or nothing for fp32 (so the CPU path
        is exactly the plain float32 one)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        """Wait for queued device work, so host clocks time it (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


CPU_FP32 = Placement(torch.device("cpu"))


def resolve_placement(device: DeviceChoice = "auto", precision: PrecisionChoice = "auto",
                      gpu_assigned: bool = False) -> Placement:
    """The learner's `Placement`.

    `device="auto"` is cuda only when CUDA is available *and* the learner was given a GPU
    (`gpu_assigned`: the Ray actor was started with `num_gpus > 0`); a process that merely sees
    a GPU, like a test on a GPU box, stays on the CPU. `precision="auto"` is fp32 on the CPU and
    bf16 autocast on cuda. Raises ValueError for choices that cannot run here."""
    if device == "auto":
        device = "cuda" if gpu_assigned and torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device (torch "
                         f"{torch.__version__}); use device='auto' or 'cpu'")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    if precision == "bf16" and device != "cuda":
        raise ValueError(f"precision='bf16' needs device='cuda' (got device={device!r}): CPU "
                         "bf16 autocast is slower than float32 here; use precision='fp32'")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    return Placement(dev, torch.bfloat16 if precision == "bf16" else None)
