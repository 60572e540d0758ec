"""The learner group's data-parallel context and the one place the policy is sharded (FSDP2).

    dp = DataParallel.init(rank, world_size, "tcp://10.0.0.1:29500", backend="gloo")
    model = shard_policy(load_policy(path), dp, placement)        # fully_shard per layer, then root
    learner = Learner(model, cfg, dp=dp)                           # learner.step: same update as N=1

How N ranks compute the one-process update (global normalisers, token-balanced row shares of
every global micro-batch, all-reduced OCC statistics, summed gradients): `docs/scale.md`.
`DataParallel` holds the process group and the few collectives the step needs; `shard_policy`
applies FSDP2 to a plain `PolicyModel` (the model file knows nothing of sharding, as in
torchtitan's ``parallelize.py``). `full_tensors` gathers the sharded parameters one at a time
(what the engines load and the consolidated checkpoint holds), so no rank ever holds the whole
model twice.

Scope: one data-parallel dimension (FSDP full sharding, no tensor or pipeline parallelism, no
HSDP); CPU ranks use gloo, CUDA ranks NCCL with one GPU each.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

#: How long a rank waits in a collective for a peer: a dead peer's group is killed and re-formed
#: by the controller long before this (docs/scale.md, faults); it only bounds a hang.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class DataParallel:
    """This rank's place in the learner group, and the collectives of the update."""

    rank: int
    world: int

    @staticmethod
    def init(rank: int, world: int, init_method: str, backend: str) -> DataParallel:
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                    timeout=COLLECTIVE_TIMEOUT)
        return DataParallel(rank, world)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (returns ``t``)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def sum_floats(self, values: list[float], device: torch.device | str = "cpu") -> list[float]:
        """Python floats summed over ranks (float64, one collective)."""
        if not values:
            return []
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()

    def max_floats(self, values: list[float], device: torch.device | str = "cpu") -> list[float]:
        if not values:
            return []
        return self.max_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()

    def union_keys(self, keys: list[str]) -> list[str]:
        """The sorted union of every rank's keys (ranks may see different metrics, e.g. a head
        with no valid tokens in one rank's rows)."""
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, sorted(keys))
        return sorted({k for ks in gathered for k in ks})

    def share(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``rows`` (indices into a batch whose per-row token counts are
        ``tokens``): longest first, each to the least-loaded rank (ties: the lower rank), so
        every rank's token count is balanced; the same on every rank. In ``rows``' order."""
        return balanced_shares(rows, tokens, self.world)[self.rank]


def balanced_shares(rows: torch.Tensor, tokens: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Greedy longest-first partition of ``rows`` over ``world`` ranks by ``tokens[rows]`` (see
    `DataParallel.share`); each share keeps ``rows``' order."""
    counts = tokens[rows].tolist()
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    load = [0] * world
    owner = [0] * len(counts)
    for i in order:
        r = min(range(world), key=lambda j: (load[j], j))
        owner[i] = r
        load[r] += counts[i] + 1  # +1: a row costs something even when short
    return [rows[[i for i in range(len(counts)) if owner[i] == r]] for r in range(world)]


def shard_policy(model: torch.nn.Module, *, bf16_compute: bool = False, reshard_after_forward: bool = True,
                 activation_checkpointing: bool = False) -> torch.nn.Module:
    """FSDP2 over the (initialised) process group: each backbone decoder layer and each MTP module
    is its own unit, then the root (embeddings, tied LM head, final norm). Gradients are summed
    over ranks (each rank's loss is its share of the mini-batch loss, docs/scale.md). With
    ``bf16_compute`` the units all-gather bf16 copies of the fp32 master weights and reduce
    gradients in fp32 (`MixedPrecisionPolicy`). Returns the same module, now sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        apply_activation_checkpointing(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute \
        else MixedPrecisionPolicy()
    opts = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for layer in model.backbone.model.layers:
        fully_shard(layer, **opts)
    for m in model.mtp:
        fully_shard(m, **opts)
        register_fsdp_forward_method(m, "mtp_forward")  # the learner calls it, not forward
    fully_shard(model, **opts)
    register_fsdp_forward_method(model, "token_logprobs")
    for method in ("distill_backbone", "distill_heads"):  # mtp.distill.head_steps
        register_fsdp_forward_method(model, method)
    for unit in [*model.backbone.model.layers, *model.mtp, model]:
        unit.set_gradient_divide_factor(1.0)  # sum, not mean: see docstring
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each backbone decoder layer in backward (non-reentrant checkpointing, through
    transformers' own layer hook, so parameter names stay those of the checkpoint)."""
    model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensors(model: torch.nn.Module, keep: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(name, full host tensor)`` for every entry of ``model.state_dict()``, gathered from the
    shards one at a time (a collective: every rank must iterate to the end). Ranks with
    ``keep=False`` get ``(name, None)`` and free each gathered tensor at once, so the group's peak
    is one full tensor beside the shards, plus whatever the keeping rank accumulates. Tied
    parameters are gathered once."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, torch.Tensor | None] = {}
    for name, t in model.state_dict(keep_vars=True).items():  # the parameters: tied ones once
        key = id(t)
        if key not in seen:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            seen[key] = full.detach().to("cpu", copy=True).contiguous() if keep else None
            del full
        yield name, seen[key]
