"""Weight publication: the learner's weights after a step → every rollout engine.

Two transports (``weight_sync.transport``, resolved at the first publish, docs/weights.md):
``object_store`` — the learner puts its weights in Ray's object store once
(`LearnerGroup.weights`) and each engine loads them, drafter included, from that one object
(`EngineGroup.publish_ref`); ``broadcast`` — rank 0 sends them over a gloo/NCCL group to every
engine (`EngineGroup.publish_broadcast`, `rollout.weight_transport`); publish waits for the
sender (the transfer), not for the engines' loads. Either way the loads run while the loop goes
on; `on_synced` records each engine's answer. An engine that died loading is handed to
``on_lost`` — the dispatcher, which reloads it with the latest weights once it is back (by
broadcast, through the object store once) — or, without one, recovered here. Engine versions
only grow.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from rollout import weight_transport
from services.learner_group import LearnerGroup, LearnerLost
from services.run_context import DIED, RunContext, result_or_died


log = logging.getLogger(__name__)


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
        self.transport: str | None = None  # weight_sync.transport, resolved at the first publish
        self.backend = "gloo"

    def resolve_transport(self) -> str:
        """``weight_sync.transport`` resolved once, where the learner and the engines were placed."""
        if self.transport is None:
            res, ws = self.ctx.spec.resources, self.ctx.spec.weight_sync
            nodes = [i.get("node_id", "") for i in ray.get([e.info.remote() for e in self.engines.engines])]
            self.transport, why = weight_transport.resolve(ws.transport, self.learner.node_id(), nodes,
                                                           res.learner_gpus > 0 or res.gpus_per_engine > 0)
            self.backend = "nccl" if res.learner_gpus > 0 and res.gpus_per_engine > 0 else "gloo"
            if self.transport == "broadcast":
                # An engine that missed a broadcast (restarted, replaced) gets the current weights
                # once through the object store; calls on one actor run in order, so no step lands
                # between the version and the weights.
                self.engines.fetch_weights = lambda: (self.learner.get_version(), self.learner.weights())
            log.info("weight_sync.transport: %s (%s)", self.transport, why)
        return self.transport

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
            if self.resolve_transport() == "broadcast":
                send, refs = self.engines.publish_broadcast(version, self.learner,
                                                            self.ctx.spec.weight_sync.bucket_mib << 20, self.backend)
                try:
                    send.wait()  # LearnerLost if a rank died
                except RayTaskError as e:  # an engine died mid-transfer: on_synced recovers it
                    log.warning("weight broadcast of version %d failed (%s); the group is re-formed", version, e)
                    self.engines.drop_weight_group()
            else:
                ref = self.learner.weights()
                refs = self.engines.publish_ref(version, ref)
        except RayActorError as e:
            raise LearnerLost(f"died while exporting weights: {e}") from e
        self.published = max(self.published, version)
        for i, r in enumerate(refs):
            self.sync_calls[r] = (i, version, t0)

    def on_synced(self, ref) -> None:
        i, version, t0 = self.sync_calls.pop(ref)
        try:
            res = result_or_died(ref)
        except RayTaskError:
            if self.transport != "broadcast":
                raise
            res = DIED  # its transfer broke (a peer died): reload it like a dead engine
        if res is DIED:
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
