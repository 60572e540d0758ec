"""The learner as a Ray actor: the policy, its `Learner` (AdamW, version) and checkpoint I/O; one
rank of a learner group (`services.learner_group`, which is what the controller holds).

    worker = create_learner_actor(model_path, algorithm_dict, threads=1)
    metrics = ray.get(worker.step.remote(train_batch))
    weights_ref = worker.weights.remote()      # published once; every engine loads the same object

A rank of a group of N > 1 is started with ``rank``/``world_size``, builds nothing in
``__init__`` and joins the group in `setup` (`torch.distributed` over ``init_method``, then the
policy sharded with FSDP2, see `learner.distributed`); every call is then made on every rank.

A run checkpoint directory written by `save` holds ``policy/`` (the MiMo layout, servable by vLLM
as it is; gathered to rank 0 tensor by tensor), ``trainer/`` (`torch.distributed.checkpoint` of
the model and AdamW state: each rank writes its shards, and any number of ranks reads them back)
and ``trainer.pt`` (learner version, counters, RNG state). `restore` reads them back, also a
checkpoint of the older layout (optimiser state inside ``trainer.pt``, one process). The actor
of a single learner is started with ``max_restarts``: a restarted learner is the base model
again, and the run controller restores it from its latest checkpoint (see
`services.controller`); a group's ranks are re-formed together instead.

Device: the factory tells the worker whether Ray gave it a GPU (``num_gpus > 0``), which is what
``algorithm.device='auto'`` needs to train there (`learner.device`). Whatever the device, `step`
returns python floats, `weights` host arrays and `save` host tensors; `restore` reads a
checkpoint onto the CPU first, so one written on a GPU loads on a CPU-only learner and back.

KL penalty (``algorithm.advantage.kl_coef > 0``): the reference policy is the model the worker
started from, kept frozen in a second copy on the learner's device; `step` fills the batch's
``ref_logprobs`` from it (main head, micro-batched) unless the caller gave them. Restores and
rollbacks leave it alone: the reference stays the run's starting model.

``storage`` (`services.run_storage.mark` of the run directory): the worker refuses to start on a
node that does not see the run directory the controller writes, saying what to mount.

``cpu_nice`` (a run's ``resources.cpu_nice``): the worker lowers its CPU priority first
(`runtime.cpu_priority`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.batch import TrainBatch
from learner.checkpoint import export_name, iter_export_tensors, load_policy, save_policy, save_policy_tensors
from learner.config import AlgorithmConfig
from learner.distributed import DataParallel, full_tensors, shard_policy
from learner.step import Learner, distill_rows
from runtime.cpu_priority import lower_cpu_priority
from services.run_storage import check as check_storage

TRAINER_STATE = "trainer.pt"
TRAINER_SHARDS = "trainer"  # torch.distributed.checkpoint of {"model", "optim"}


class LearnerWorker:
    """One process holding the policy and its optimiser."""

    def __init__(self, model_path: str, algorithm: dict[str, Any], threads: int = 1, seed: int = 0,
                 gpus: float = 0, cpu_nice: int = 0, rank: int = 0, world_size: int = 1,
                 storage: dict[str, Any] | None = None) -> None:
        if storage is not None:  # before loading anything: checkpoints go there (services.run_storage)
            check_storage(storage, what=f"learner rank {rank}")
        lower_cpu_priority(cpu_nice)  # before torch starts its thread pool: every thread inherits it
        torch.set_num_threads(max(1, int(threads)))
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.model_path = model_path
        self.algorithm = algorithm
        self.gpu_assigned = gpus > 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.dp: DataParallel | None = None
        self._tokenizer = None
        if self.world_size == 1:
            self._build()

    def rendezvous(self) -> str:
        """Rank 0: the ``tcp://address:port`` the group's ranks meet at (this node, a free port)."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init_method: str) -> int:
        """Join the group (every rank at once: it blocks until all have), then build the sharded
        policy. Returns this rank's pid."""
        if self.gpu_assigned and torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray shows each rank its own GPU as device 0
        backend = "nccl" if self.gpu_assigned and torch.cuda.is_available() else "gloo"
        self.dp = DataParallel.init(self.rank, self.world_size, init_method, backend)
        self._build()
        return os.getpid()

    def _build(self) -> None:
        self.model = load_policy(self.model_path)  # on the host; the Learner moves it to its device
        self.learner = Learner(self.model, AlgorithmConfig.model_validate(self.algorithm), self.gpu_assigned,
                               dp=self.dp)
        self.ref_model = None
        if self.learner.cfg.advantage.kl_coef > 0:
            ref = load_policy(self.model_path).to(self.learner.device).eval().requires_grad_(False)
            if self.dp is not None:  # sharded like the policy; no optimiser
                shard_policy(ref, bf16_compute=self.learner.placement.autocast_dtype == torch.bfloat16)
            self.ref_model = ref

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def ping(self) -> int:
        return os.getpid()

    @property
    def version(self) -> int:
        return self.learner.version

    def get_version(self) -> int:
        return self.learner.version

    def set_version(self, version: int) -> None:
        """Versions only grow: after a restore the run continues above every published version."""
        self.learner.version = int(version)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        if self.ref_model is not None and batch.ref_logprobs is None:
            batch.ref_logprobs = self.ref_logprobs(batch)
        return self.learner.step(batch)

    @torch.no_grad()
    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """log π_ref(x[b, t]) (tempered by the sampling temperature) under the reference's main head at the response tokens (the KL term
        reads no others; 0 elsewhere), (B, T) float32 on the host, aligned like ``behav_logprobs``."""
        dev, step = self.learner.device, self.learner.chunk_size(batch, 1)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=dev)
        for idx, pad in self.learner.row_chunks(batch.size, step):  # this rank's share of the rows
            idx = idx.cpu()
            ids, attn = batch.input_ids[idx], batch.attention_mask[idx]
            w = Learner._trim(ids, attn)
            with self.learner.placement.autocast():
                # at the sampling temperature, like the policy's (veRL's reference does the same)
                lp = self.ref_model.token_logprobs(ids[:, :w].to(dev), attn[:, :w].to(dev), num_mtp=0,
                                                   needed=batch.response_mask[idx, :w].to(dev),
                                                   temperature=self.learner.cfg.temperature).logprobs[0]
            if not pad:
                out[idx.to(dev), :w] = lp.float()
        return self.learner._sum(out).cpu()  # disjoint rows: the sum is the whole batch's

    def weights(self) -> list[tuple[str, object]] | None:
        """Every tensor vLLM loads (target and MTP drafter), as numpy arrays for the object store.
        In a group every rank takes part in gathering the shards; rank 0 returns them, the others
        None."""
        from rollout.group import to_transport

        if self.dp is None:
            return to_transport(iter_export_tensors(self.model))
        full = self._gather()
        return to_transport(full.items()) if self.is_main else None

    # ---- weights by broadcast (rollout.weight_transport; rank 0 is the sender) -------------------
    def weight_group_address(self) -> str:
        """Rank 0: a free ``host:port`` on this node for the weight group's store."""
        from rollout.weight_transport import free_address

        return free_address()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def instance_id(self) -> str:
        """New in every process (a restarted rank is another sender: the engines' group is gone)."""
        if getattr(self, "_instance_id", None) is None:
            import uuid

            self._instance_id = uuid.uuid4().hex
        return self._instance_id

    def join_weight_group(self, address: str, world_size: int, backend: str = "gloo") -> None:
        """Rank 0: join the weight broadcast group as its sender, member 0 (blocks until the
        engines joined). A previous group is left first."""
        from rollout.weight_transport import BroadcastGroup

        self.leave_weight_group()
        self._weight_group = BroadcastGroup(address, 0, world_size, backend)

    def leave_weight_group(self) -> None:
        group = getattr(self, "_weight_group", None)
        if group is not None:
            group.close()
        self._weight_group = None

    def send_weights(self, version: int, dtype: str, bucket_bytes: int) -> dict | None:
        """Broadcast every tensor vLLM loads (the same set as `weights`) converted to ``dtype``.
        Every rank takes part in gathering the shards; rank 0 sends and returns what it sent."""
        from rollout.weight_transport import send

        if self.dp is None:
            tensors = list(iter_export_tensors(self.model))
        else:
            full = self._gather()
            tensors = list(full.items()) if self.is_main else []
        if not self.is_main:
            return None
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("send_weights: rank 0 has not joined a weight broadcast group")
        return send(group, version, tensors, dtype, bucket_bytes)

    def _gather(self) -> dict[str, torch.Tensor]:
        """Rank 0: every tensor in MiMo naming, full, on the host (gathered one at a time);
        other ranks: {}. A tied head is its own copy (safetensors stores no shared tensors)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for fqn, t in full_tensors(self.model, keep=self.is_main):
            if t is None:
                continue
            out[export_name(fqn)] = t.clone() if id(t) in seen else t
            seen.add(id(t))
        return out

    # ---- checkpoints ---------------------------------------------------------------------------
    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def save(self, out_dir: str, with_optimizer: bool = True) -> dict[str, Any]:
        """Write ``out_dir/policy`` (rank 0), ``out_dir/trainer/`` (every rank its shards) and
        ``out_dir/trainer.pt`` (rank 0); the caller publishes ``out_dir`` atomically. Returns
        what it wrote. No optimiser state is written before the first optimiser step (there is
        none: a restore then starts AdamW afresh, as the run would have)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.dp is None:
            save_policy(self.model, out / "policy", tokenizer=self._tok())
        else:
            full = self._gather()
            if self.is_main:
                save_policy_tensors(full, self.model.config, self.model.num_mtp, out / "policy", tokenizer=self._tok())
            del full
        optim = with_optimizer and bool(self.learner.opt.state)
        if optim:
            msd, osd = get_state_dict(self.model, self.learner.opt)
            state = {"model": msd, "optim": osd}
        else:
            state = {"model": get_model_state_dict(self.model)}
        dcp.save(state, checkpoint_id=str(out / TRAINER_SHARDS))
        if self.is_main:
            torch.save({
                "version": self.learner.version,
                "skipped_nonfinite_total": self.learner.skipped_nonfinite_total,
                # mtp.distill.replay's batches (the same on every rank): a resumed run replays them
                "distill_replay": [(b.input_ids, b.attention_mask, b.response_mask)
                                   for b in self.learner.distill_replay],
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(),
                "ranks": self.world_size,
            }, out / TRAINER_STATE)
        return {"version": self.learner.version, "optimizer": optim, "ranks": self.world_size}

    def restore(self, ckpt_dir: str | None, version: int | None = None) -> int:
        """Load a checkpoint written by `save` by any number of ranks (None: back to the model the
        actor started from, with a fresh optimiser); then set the version (if given). Returns the
        version."""
        cfg = self.learner.cfg
        if ckpt_dir is None:
            self._load_full(load_policy(self.model_path).state_dict())
            self.learner = Learner(self.model, cfg, self.gpu_assigned, dp=self.dp)
        else:
            ckpt = Path(ckpt_dir)
            state = torch.load(ckpt / TRAINER_STATE, weights_only=False, map_location="cpu")
            self.learner = Learner(self.model, cfg, self.gpu_assigned, dp=self.dp)  # a fresh AdamW
            if (ckpt / TRAINER_SHARDS).is_dir():
                self._load_shards(ckpt / TRAINER_SHARDS)
            else:  # the older layout: full weights in policy/, one process's optimiser in trainer.pt
                self._load_full(load_policy(ckpt / "policy").state_dict())
                if state.get("optimizer") is not None:
                    if self.dp is not None:
                        raise ValueError(f"{ckpt} holds a one-process optimiser state (trainer.pt); "
                                         "resume it with learner_workers: 1")
                    self.learner.opt.load_state_dict(state["optimizer"])
            self.learner.version = int(state["version"])
            self.learner.skipped_nonfinite_total = int(state.get("skipped_nonfinite_total", 0))
            self.learner.distill_replay.extend(  # the deque keeps the last `replay` of them
                distill_rows(*rows) for rows in state.get("distill_replay", []))
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            np.random.set_state(state["numpy_rng"])
        if version is not None:
            self.learner.version = int(version)
        return self.learner.version

    def _load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Full (unsharded) weights into the model: every rank keeps its own shards of them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.dp is None:
            self.model.load_state_dict(full)
        else:
            set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))

    def _load_shards(self, path: Path) -> None:
        """The model (and AdamW state, when saved) from a distributed checkpoint, resharded to this
        group's size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict
        from torch.distributed.checkpoint.state_dict import set_state_dict

        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if any(k.startswith("optim.") for k in saved):
            # get_state_dict gives AdamW's state its shape (a zero-lr step that changes nothing);
            # every entry is then overwritten by the loaded one
            msd, osd = get_state_dict(self.model, self.learner.opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(self.model, self.learner.opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            state = {"model": get_model_state_dict(self.model)}
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(self.model, state["model"])


def learner_env(threads: int) -> dict[str, str]:
    """The learner process's OpenMP settings. ``OMP_WAIT_POLICY=PASSIVE`` (unless the caller's
    environment sets one): torch's threads sleep at a barrier instead of spinning. Where the
    learner shares cores with rollout engines (the async loop on a CPU machine), a spinning thread
    burns the core its descheduled partner needs: one demo step took 126-138 s beside a generating
    engine with the default policy and 53-74 s passive (benchmarks/learner_contention.py)."""
    return {"OMP_NUM_THREADS": str(max(1, int(threads))),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def create_learner_actor(model_path: str, algorithm: dict[str, Any], *, threads: int = 1, seed: int = 0,
                         num_cpus: float = 1, num_gpus: float = 0, max_restarts: int = 3,
                         cpu_nice: int = 0, scheduling_strategy: Any = None, rank: int = 0, world_size: int = 1,
                         storage: dict[str, Any] | None = None):
    import ray

    opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                max_task_retries=0,  # a lost step is redone by the controller
                                runtime_env={"env_vars": learner_env(threads)})
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    return ray.remote(LearnerWorker).options(**opts).remote(model_path, algorithm, threads, seed,
                                                            gpus=num_gpus, cpu_nice=cpu_nice, rank=rank,
                                                            world_size=world_size, storage=storage)
