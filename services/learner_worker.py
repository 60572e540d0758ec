"""The learner as a Ray actor: the policy, its `Learner` (AdamW, version) and checkpoint I/O.

    worker = create_learner_actor(model_path, algorithm_dict, threads=1)
    metrics = ray.get(worker.step.remote(train_batch))
    weights_ref = worker.weights.remote()      # published once; every engine loads the same object

A run checkpoint directory written by `save` holds ``policy/`` (the MiMo layout, servable by vLLM
as it is) and ``trainer.pt`` (optimiser state, learner version, torch RNG state). `restore` reads
both back. The actor is started with ``max_restarts``: a restarted learner is the base model again,
and the run controller restores it from its latest checkpoint (see `services.controller`).

Device: the factory tells the worker whether Ray gave it a GPU (``num_gpus > 0``), which is what
``algorithm.device='auto'`` needs to train there (`learner.device`). Whatever the device, `step`
returns python floats, `weights` host arrays and `save` host tensors; `restore` reads a
checkpoint onto the CPU first, so one written on a GPU loads on a CPU-only learner and back.

KL penalty (``algorithm.advantage.kl_coef > 0``): the reference policy is the model the worker
started from, kept frozen in a second copy on the learner's device; `step` fills the batch's
``ref_logprobs`` from it (main head, micro-batched) unless the caller gave them. Restores and
rollbacks leave it alone: the reference stays the run's starting model.

``cpu_nice`` (a run's ``resources.cpu_nice``): the worker lowers its CPU priority first
(`services.cpu_priority`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.batch import TrainBatch
from learner.checkpoint import iter_export_tensors, load_policy, save_policy
from learner.config import AlgorithmConfig
from learner.step import Learner
from services.cpu_priority import lower_cpu_priority

TRAINER_STATE = "trainer.pt"


class LearnerWorker:
    """One process holding the policy and its optimiser."""

    def __init__(self, model_path: str, algorithm: dict[str, Any], threads: int = 1, seed: int = 0,
                 gpus: float = 0, cpu_nice: int = 0) -> None:
        lower_cpu_priority(cpu_nice)  # before torch starts its thread pool: every thread inherits it
        torch.set_num_threads(max(1, int(threads)))
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.model_path = model_path
        self.gpu_assigned = gpus > 0
        self.model = load_policy(model_path)  # on the host; the Learner moves it to its device
        self.learner = Learner(self.model, AlgorithmConfig.model_validate(algorithm), self.gpu_assigned)
        self.ref_model = None
        if self.learner.cfg.advantage.kl_coef > 0:
            self.ref_model = load_policy(model_path).to(self.learner.device).eval().requires_grad_(False)
        self._tokenizer = None

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
        """log π_ref(x[b, t]) under the reference's main head at the response tokens (the KL term
        reads no others; 0 elsewhere), (B, T) float32 on the host, aligned like ``behav_logprobs``."""
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        dev, step = self.learner.device, self.learner.micro_size(batch, 1)
        for s in range(0, batch.size, step):
            ids, attn = batch.input_ids[s : s + step], batch.attention_mask[s : s + step]
            w = Learner._trim(ids, attn)
            with self.learner.placement.autocast():
                lp = self.ref_model.token_logprobs(ids[:, :w].to(dev), attn[:, :w].to(dev), num_mtp=0,
                                                   needed=batch.response_mask[s : s + step, :w].to(dev)).logprobs[0]
            out[s : s + step, :w] = lp.float().cpu()
        return out

    def weights(self) -> list[tuple[str, object]]:
        """Every tensor vLLM loads (target and MTP drafter), as numpy arrays for the object store."""
        from rollout.group import to_transport

        return to_transport(iter_export_tensors(self.model))

    # ---- checkpoints ---------------------------------------------------------------------------
    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def save(self, out_dir: str, with_optimizer: bool = True) -> dict[str, Any]:
        """Write ``out_dir/policy`` and ``out_dir/trainer.pt`` (the caller publishes ``out_dir``
        atomically). Returns what it wrote."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_policy(self.model, out / "policy", tokenizer=self._tok())
        state = {
            "version": self.learner.version,
            "skipped_nonfinite_total": self.learner.skipped_nonfinite_total,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "optimizer": self.learner.opt.state_dict() if with_optimizer else None,
        }
        torch.save(state, out / TRAINER_STATE)
        return {"version": self.learner.version, "optimizer": with_optimizer}

    def restore(self, ckpt_dir: str | None, version: int | None = None) -> int:
        """Load a checkpoint written by `save` (None: back to the model the actor started from,
        with a fresh optimiser); then set the version (if given). Returns the version."""
        if ckpt_dir is None:
            fresh = load_policy(self.model_path)
            self.model.load_state_dict(fresh.state_dict())
            self.learner = Learner(self.model, self.learner.cfg, self.gpu_assigned)
        else:
            ckpt = Path(ckpt_dir)
            fresh = load_policy(ckpt / "policy")
            self.model.load_state_dict(fresh.state_dict())
            # map to the host: AdamW's load_state_dict moves its state to the parameters' device
            state = torch.load(ckpt / TRAINER_STATE, weights_only=False, map_location="cpu")
            self.learner = Learner(self.model, self.learner.cfg, self.gpu_assigned)
            if state.get("optimizer") is not None:
                self.learner.opt.load_state_dict(state["optimizer"])
            self.learner.version = int(state["version"])
            self.learner.skipped_nonfinite_total = int(state.get("skipped_nonfinite_total", 0))
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            np.random.set_state(state["numpy_rng"])
        if version is not None:
            self.learner.version = int(version)
        return self.learner.version


def create_learner_actor(model_path: str, algorithm: dict[str, Any], *, threads: int = 1, seed: int = 0,
                         num_cpus: float = 1, num_gpus: float = 0, max_restarts: int = 3,
                         cpu_nice: int = 0, scheduling_strategy: Any = None):
    import ray

    opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                max_task_retries=0,  # a lost step is redone by the controller
                                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(threads)))}})
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    return ray.remote(LearnerWorker).options(**opts).remote(model_path, algorithm, threads, seed,
                                                            gpus=num_gpus, cpu_nice=cpu_nice)
