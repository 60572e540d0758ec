"""`RolloutEngine` as a Ray actor.

Ray restarts a dead engine (``max_restarts``); the restarted actor is built from the same config,
so it serves the checkpoint on disk, and the orchestrator (`rollout.group.EngineGroup`) then pushes
the latest published weights to it (``update_weights``) before sending it work.

The actor is threaded (``max_concurrency`` > 1) so that ``cancel`` can arrive while ``generate``
runs: with Ray's default of one call at a time, a cancel would queue behind the batch it is meant to
stop. The engine's own lock keeps generation and weight loading apart (see `RolloutEngine`).
``cancel`` and ``info`` run in a concurrency group of their own (``control``): with the default
group's threads all taken by calls waiting for the lock (two generation calls, a weight update and
a generation call of a benchmark or test behind the running batch), a cancel queued behind them
would wait for the very batch it is meant to stop (a straggler test's cancel took effect only when
its 60 s batch had ended; the four call threads were, by the calls sent, all taken).

``cpu_nice`` (a run's ``resources.cpu_nice``): the actor lowers the CPU priority of its process
before vLLM starts (`runtime.cpu_priority`), so vLLM's and OpenMP's threads inherit it.
"""

from __future__ import annotations

import os

import ray

from rollout.config import EngineConfig
from rollout.engine import RolloutEngine


CONCURRENCY_GROUPS = {"control": 2}  # cancel and info, never behind calls waiting for the engine's lock


class RolloutEngineActor(RolloutEngine):
    """`RolloutEngine` whose process first takes the requested niceness (0: unchanged)."""

    def __init__(self, config: EngineConfig | dict, cpu_nice: int = 0):
        from runtime.cpu_priority import lower_cpu_priority

        lower_cpu_priority(cpu_nice)
        super().__init__(config)

    @ray.method(concurrency_group="control")
    def cancel(self) -> int:
        return super().cancel()

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        return super().info()


def create_engine_actor(
    config: EngineConfig | dict,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_restarts: int = 3,
    max_concurrency: int = 4,
    name: str | None = None,
    namespace: str | None = None,
    scheduling_strategy=None,
    cpu_nice: int = 0,
):
    """Start a rollout engine actor; returns its handle (the engine starts in the background:
    the first call waits for it)."""
    cfg = EngineConfig.model_validate(config)
    opts = dict(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        max_task_retries=0,  # a batch lost with its engine is retried by the caller, on the latest weights
        max_concurrency=max_concurrency,
    )
    if scheduling_strategy is not None:  # e.g. a placement-group bundle of the run
        opts["scheduling_strategy"] = scheduling_strategy
    if name:
        opts.update(name=name, namespace=namespace, get_if_exists=True)
    # vLLM runs in the actor's own process; its engine core stays in-process so weight updates
    # reach the worker directly.
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # glibc malloc tuned for weight updates (docs/benchmarks.md, weight sync): each update packs a
    # new copy of every linear weight and frees the old one. With glibc's defaults the actor's call
    # threads (max_concurrency) each got a fresh arena, and freed memory went back to the OS, so
    # updates faulted every packed weight in anew: 1.4-1.7 s for SmolLM2-135M's first four, ~0.53 s
    # for many later ones, against 0.22-0.25 s when freed memory stays in one arena for the next
    # update. The engine lock serialises the work, so one arena costs no contention; the price is
    # that up to one model's packed weights stay reserved between updates. Caller's values win.
    for var, value in (("MALLOC_ARENA_MAX", "1"), ("MALLOC_MMAP_THRESHOLD_", str(1 << 30)),
                       ("MALLOC_TRIM_THRESHOLD_", str(4 << 30))):
        env[var] = os.environ.get(var, value)
    if cfg.num_threads:
        env["OMP_NUM_THREADS"] = str(cfg.num_threads)  # Ray would set num_cpus otherwise
    opts["runtime_env"] = {"env_vars": env}
    actor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutEngineActor)
    return actor_cls.options(**opts).remote(cfg.model_dump(), cpu_nice)
