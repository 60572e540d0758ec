"""Weight publication: the learner's weights after a step → every rollout engine.

The learner puts its weights in Ray's object store once (`LearnerGroup.weights`) and each engine
loads them, drafter included, from that one object (`EngineGroup.publish_ref`). The loads run
while the loop goes on; `on_synced` records each engine's answer (an engine that died is handed
to ``on_lost`` — the dispatcher, which reloads it with the latest weights once it is back).
Engine versions only grow.
"""

from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import RayActorError

from services.learner_group import LearnerGroup, LearnerLost
from services.run_context import DIED, RunContext, result_or_died


class WeightPublisher:
    """Owns the engines' weight-load calls in flight (``sync_calls``) and the latest published
    version."""

    def __init__(self, ctx: RunContext, learner: LearnerGroup, engines,
                 on_lost: Callable[[int], bool] | None = None) -> None:
        self.ctx, self.learner, self.engines = ctx, learner, engines
        self.on_lost = on_lost  # an engine died loading: who brings it back (else: here, blocking)
        self.sync_calls: dict[ray.ObjectRef, tuple[int, int, float]] = {}  # ref → (engine, version, t0)
        self.published = 0
        self.last_sync_s = float("nan")

    def reset(self, first: bool) -> None:
        self.sync_calls = {}
        self.last_sync_s = float("nan")
        if first:
            self.published = 0
            self.engines.loaded_version = [-1] * len(self.engines.engines)  # shared engines: forget older runs

    def refs(self) -> list[ray.ObjectRef]:
        return list(self.sync_calls)

    def publish(self, version: int) -> None:
        """Start loading the learner's current weights (``version``) into every engine; raises
        `LearnerLost` if the learner died exporting them."""
        t0 = time.perf_counter()
        try:
            ref = self.learner.weights()
            refs = self.engines.publish_ref(version, ref)
        except RayActorError as e:
            raise LearnerLost(f"died while exporting weights: {e}") from e
        self.published = max(self.published, version)
        for i, r in enumerate(refs):
            self.sync_calls[r] = (i, version, t0)

    def on_synced(self, ref) -> None:
        i, version, t0 = self.sync_calls.pop(ref)
        if result_or_died(ref) is DIED:
            if self.on_lost is None:
                self.ctx.count("faults_rollout")
                self.engines.recover(i)  # reloads the latest weights
            elif self.on_lost(i):  # the dispatcher reloads it once it is back, without blocking the loop
                self.ctx.count("faults_rollout")  # once per loss, not per publish while it is down
            return
        self.engines.confirm(i, version, True)
        self.last_sync_s = time.perf_counter() - t0

    def wait(self) -> None:
        """Until every engine answered the loads in flight."""
        while self.sync_calls:
            done, _ = ray.wait(list(self.sync_calls), num_returns=1, timeout=1.0)
            for ref in done:
                self.on_synced(ref)

    def wait_inflight(self) -> None:
        for ref in list(self.sync_calls):
            try:
                ray.get(ref, timeout=60)
            except Exception:  # noqa: BLE001
                pass
