"""Where a run's actors live: one placement group (PACK: on one node when they fit) with one
bundle per actor — learner ranks, engines, reward actors — and the actors started in it.

CPU bundles here, GPU bundles on a cluster (``resources``). Injected actors (tests share engines)
get no bundle. ``resources.cpu_nice`` goes to every actor started here, which lowers its own CPU
priority before anything else (`runtime.cpu_priority`).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from services.spec import RunSpec


def engine_config(spec: RunSpec):
    """The rollout engines' `EngineConfig` for a run spec (`RunSpec.engine_config`: the one
    translation, which the API also checks before it accepts a spec)."""
    return spec.engine_config()


def start_engine_group(spec: RunSpec, strategies: list | None = None):
    """The run's rollout engine actors (one per ``strategies`` entry, else ``rollout.engines``)."""
    from rollout.actor import create_engine_actor
    from rollout.group import EngineGroup

    res = spec.resources
    cfg = engine_config(spec)
    # in actor_options too: an engine the group starts to replace a dead one is niced alike
    opts = dict(num_cpus=res.cpus_per_engine, num_gpus=res.engine_gpus, cpu_nice=res.cpu_nice)
    actors = [create_engine_actor(cfg, **opts, scheduling_strategy=s)
              for s in strategies or [None] * spec.rollout.engines]
    return EngineGroup(cfg, engines=actors, actor_options=opts, strategies=strategies)


def start_reward_actors(spec: RunSpec, strategies: list | None = None) -> list:
    """The run's reward actors (one per ``strategies`` entry, else ``reward.actors``)."""
    from reward.actors import RewardActor

    cfg = spec.reward.actor_config()
    opts = dict(num_cpus=spec.resources.cpus_per_reward_worker, max_restarts=3, max_task_retries=0,
                max_concurrency=cfg["max_concurrency"] + 2)
    return [RewardActor.options(**opts, **({"scheduling_strategy": s} if s else {})).remote(
        cfg, cpu_nice=spec.resources.cpu_nice) for s in strategies or [None] * spec.reward.actors]


def place(run_id: str, spec: RunSpec, learner: bool, engines: bool, rewards: bool):
    """A ready placement group with a bundle per actor of the kinds asked for, and each kind's
    scheduling strategies (``{"learner": [...], "engine": [...], "reward": [...]}``)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = spec.resources
    bundles: list[dict[str, float]] = []
    kinds: list[str] = []

    def bundle(kind: str, cpus: float, gpus: float) -> None:
        b = {"CPU": cpus}
        if gpus:
            b["GPU"] = gpus
        bundles.append(b)
        kinds.append(kind)

    if learner:  # one bundle per learner rank
        for _ in range(int(res.learner_workers)):
            bundle("learner", res.cpus_per_learner, res.gpus_per_learner)
    if engines:
        for _ in range(spec.rollout.engines):
            bundle("engine", res.cpus_per_engine, res.engine_gpus)
    if rewards:
        for _ in range(spec.reward.actors):
            bundle("reward", res.cpus_per_reward_worker, 0)
    pg = placement_group(bundles, strategy="PACK", name=f"mtprl-run-{run_id}")
    try:
        ray.get(pg.ready(), timeout=120)
    except GetTimeoutError:
        total = ray.cluster_resources()
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"the run asks Ray for {bundles} (learner, engines, reward actors) but the cluster has "
            f"{ {k: v for k, v in total.items() if k in ('CPU', 'GPU')} }; lower `resources` or add nodes"
        ) from None
    # Every actor gets its own bundle: with a wildcard bundle (-1) a reward actor can take the
    # learner's bundle, and a restarted learner then waits forever (seen in a fault test).
    out: dict[str, list[Any]] = {}
    for i, kind in enumerate(kinds):
        out.setdefault(kind, []).append(PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
    return pg, out
