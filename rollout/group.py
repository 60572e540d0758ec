"""A group of rollout engine actors that survives engine deaths.

`EngineGroup` remembers the latest published weights (version and one Ray object reference shared
by every engine). When an engine dies, Ray restarts it (``max_restarts``) from the checkpoint on
disk; the group waits for the restart (or, once Ray has given up, starts a fresh actor), pushes the
latest weights to it and retries the batch, so no batch is served by a stale policy:

- a call that fails with `ray.exceptions.RayActorError` (the engine died mid-batch, or is gone for
  good) → recover that engine, retry;
- a batch that comes back from an engine with another ``engine_id`` than the one the group last
  loaded (it died and was restarted between calls, so it serves the on-disk weights) → recover,
  retry.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sequence

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from rollout import weight_transport
from rollout.actor import create_engine_actor
from rollout.config import EngineConfig, SamplingConfig
from rollout.engine import RolloutBatch

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """An engine could not be brought back within the group's retry budget."""


class EngineGroup:
    """Engine actors plus the latest published weights; `generate` retries on a dead engine."""

    def __init__(
        self,
        config: EngineConfig | dict,
        num_engines: int = 1,
        actor_options: dict | None = None,
        max_retries: int = 3,
        restart_timeout_s: float = 600.0,
        engines: Sequence | None = None,
        strategies: Sequence | None = None,  # engine i's scheduling strategy (its placement-group bundle)
    ):
        self.config = EngineConfig.model_validate(config)
        self.actor_options = dict(actor_options or {})
        n = len(engines) if engines is not None else num_engines
        self.strategies = list(strategies) if strategies is not None else [None] * n
        self.max_retries = max_retries
        self.restart_timeout_s = restart_timeout_s
        self.engines = list(engines) if engines is not None else [self._new_actor(i) for i in range(num_engines)]
        self.version = 0
        self.weights_ref: ray.ObjectRef | None = None
        self._loaded: list[str | None] = [None] * len(self.engines)  # engine_id holding self.version
        self._next = itertools.count()
        self.recoveries = 0
        self.recreated = 0
        self.loaded_version: list[int] = [0] * len(self.engines)  # last version each engine confirmed
        # weight_sync.transport 'broadcast' (rollout.weight_transport): the engine ids of the
        # group's members 1..N (None: no group), and how a recovered engine gets the latest
        # weights between broadcasts: () -> (version, object ref), through the object store once.
        self._members: list[str] | None = None
        self.member_dtype = ""
        self.fetch_weights = None
        self._sender = None

    def _new_actor(self, i: int):
        # In engine i's own bundle: a replacement started without it would land outside the run's
        # placement group (Ray re-places a lost node's bundles; the actor waits for its bundle).
        strategy = self.strategies[i] if i < len(self.strategies) else None
        opts = {**self.actor_options, **({"scheduling_strategy": strategy} if strategy is not None else {})}
        return create_engine_actor(self.config, **opts)

    # ---- weights -------------------------------------------------------------------------------
    def publish(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> list[float]:
        """Store the weights once in the object store and load them into every engine; returns each
        engine's load seconds. A dead engine is recovered (and then loaded) on the way."""
        self.version = version
        self.weights_ref = ray.put(to_transport(weights))
        return [self._load(i) for i in range(len(self.engines))]

    def _load(self, i: int) -> float:
        """Push the latest weights to engine i and remember which engine instance holds them.

        While Ray restarts an actor, calls fail fast with `ActorUnavailableError`: retried until
        ``restart_timeout_s``. A call failing with `ActorDiedError` twice in a row means Ray has given
        up on it (restarts exhausted, or killed for good): the group starts a new actor instead."""
        dead_in_a_row = 0
        deadline = time.monotonic() + self.restart_timeout_s
        while time.monotonic() < deadline:
            try:
                info = ray.get(self.engines[i].info.remote(), timeout=self.restart_timeout_s)
                seconds = 0.0
                version = self.version
                if self.weights_ref is not None:
                    seconds = ray.get(self.engines[i].update_weights.remote(self.version, self.weights_ref))
                elif self._members is not None and self.fetch_weights is not None:
                    # Broadcast transport: this engine missed versions (restarted or new); it gets
                    # the learner's current weights once through the object store and rejoins the
                    # broadcast group at the next publish (its engine id is not a member's).
                    version, ref = self.fetch_weights()
                    seconds = ray.get(self.engines[i].update_weights.remote(version, ref))
                self._loaded[i] = info["engine_id"]
                self.loaded_version[i] = version
                return seconds
            except ActorDiedError:
                dead_in_a_row += 1
                if dead_in_a_row >= 2:
                    log.warning("engine %d is dead for good; starting a new actor", i)
                    self._replace(i)
                    dead_in_a_row = 0
                else:
                    time.sleep(1.0)
            except (RayActorError, ActorUnavailableError, GetTimeoutError):
                time.sleep(0.5)  # restarting
        raise EngineUnavailable(
            f"engine {i} did not come back within restart_timeout_s={self.restart_timeout_s} to load version {self.version}"
        )

    def publish_ref(self, version: int, weights_ref: ray.ObjectRef) -> list[ray.ObjectRef]:
        """Non-blocking publish of weights already in the object store (e.g. returned by the
        learner actor): returns one ``update_weights`` call per engine; the caller passes each
        result (or its failure) to `confirm`."""
        self.version, self.weights_ref = version, weights_ref
        return [e.update_weights.remote(version, weights_ref) for e in self.engines]

    def publish_broadcast(self, version: int, sender, bucket_bytes: int, backend: str = "gloo"):
        """Non-blocking publish by broadcast from ``sender`` (a `services.learner_group.LearnerGroup`,
        duck-typed: ``sender_id``, ``weight_group_address``, ``join_weight_group``, ``send_weights``).
        The group is (re-)formed first, on a new port, when its members are not exactly the engines
        now serving or the sender is another process (a new or restarted learner rank 0); an
        engine that is down is recovered first. Returns (the sender's call, one ``receive_weights``
        call per engine); the caller waits for the sender and passes each engine's result to
        `confirm`."""
        ids = []
        for i, e in enumerate(self.engines):
            try:
                ids.append(ray.get(e.info.remote(), timeout=self.restart_timeout_s)["engine_id"])
            except (RayActorError, ActorUnavailableError, GetTimeoutError):
                self.recoveries += 1
                self._load(i)  # restarted or replaced (it fetches the current weights once), then a member
                ids.append(self._loaded[i])
        sender_id = sender.sender_id()
        if ids != self._members or sender_id != self._sender:
            self._members, self._sender = None, sender_id
            address = sender.weight_group_address()
            tp = [self.config.tensor_parallel_size] * len(self.engines)  # every engine of a group alike
            ranks, world = weight_transport.member_ranks(tp), weight_transport.group_world_size(tp)
            joins = [e.join_weight_group.remote(address, ranks[i][0], world, backend)
                     for i, e in enumerate(self.engines)]
            first = sender.join_weight_group(address, world, backend)
            replies = ray.get(joins + [first])[:-1]
            dtypes = {r["dtype"] for r in replies}
            if len(dtypes) != 1:
                raise ValueError(f"engines of one group with different dtypes: {sorted(dtypes)}")
            self.member_dtype = dtypes.pop()
            self._members = ids
            log.info("weight broadcast group formed at %s: learner + %d engine(s), %s", address, len(ids), backend)
        self.version, self.weights_ref = version, None
        recv = [e.receive_weights.remote() for e in self.engines]
        return sender.send_weights(version, self.member_dtype, bucket_bytes), recv

    def drop_weight_group(self) -> None:
        """Forget the broadcast group (a transfer failed): the next publish forms a new one."""
        self._members = None

    def confirm(self, i: int, version: int, ok: bool) -> None:
        """Record that engine i loaded ``version`` (ok) or failed to (it died: recover on next use)."""
        if ok:
            self.loaded_version[i] = max(self.loaded_version[i], version)
        else:
            self._loaded[i] = None

    def recover(self, i: int) -> None:
        """Bring engine i back (waiting for Ray's restart, or a new actor) with the latest weights."""
        self.recoveries += 1
        self._loaded[i] = None
        self._load(i)

    def submit(self, i: int, prompts: Sequence, sampling: SamplingConfig | dict | None = None,
               seeds: Sequence[int] | None = None) -> ray.ObjectRef:
        """Start a batch on engine i without waiting (the engine is reloaded first if it lost the
        latest weights); check the result with `accept`."""
        if self._loaded[i] is None:
            self._load(i)
        sampling = SamplingConfig.model_validate(sampling or {}).model_dump()
        return self.engines[i].generate.remote(prompts, sampling, False, seeds)

    def accept(self, i: int, batch: RolloutBatch) -> bool:
        """False if the batch came from a restarted instance of engine i (it served the on-disk
        weights): the caller re-dispatches it."""
        if batch.engine_id != self._loaded[i]:
            self._loaded[i] = None
            return False
        return True

    def _replace(self, i: int) -> None:
        try:
            ray.kill(self.engines[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.engines[i] = self._new_actor(i)
        self.recreated += 1

    # ---- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence,
        sampling: SamplingConfig | dict | None = None,
        engine: int | None = None,
    ) -> RolloutBatch:
        """Generate on one engine (round-robin unless ``engine`` is given) with the latest published
        weights; a batch lost to a dying engine is re-run once the engine is back and reloaded."""
        i = next(self._next) % len(self.engines) if engine is None else engine
        sampling = SamplingConfig.model_validate(sampling or {}).model_dump()
        for attempt in range(self.max_retries + 1):
            if self._loaded[i] is None:
                self._load(i)
            try:
                batch = ray.get(self.engines[i].generate.remote(prompts, sampling))
            except (RayActorError, ActorUnavailableError) as e:
                log.warning("engine %d died during a batch (%s); retrying on the latest weights", i, type(e).__name__)
                self.recoveries += 1
                self._loaded[i] = None
                continue
            if batch.engine_id != self._loaded[i]:  # restarted between calls: it served on-disk weights
                log.warning("engine %d was restarted; reloading version %d and retrying", i, self.version)
                self.recoveries += 1
                self._loaded[i] = None
                continue
            return batch
        raise EngineUnavailable(f"engine {i} failed {self.max_retries + 1} times in a row")

    def cancel(self) -> None:
        """Cancel the batches in flight on every engine (see `RolloutEngine.cancel`)."""
        ray.get([e.cancel.remote() for e in self.engines])

    def kill(self) -> None:
        for e in self.engines:
            ray.kill(e, no_restart=True)


def to_transport(weights: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, object]]:
    """Weights as Ray stores them best: numpy arrays (Ray puts them in the object store with one
    copy and hands readers zero-copy views; a torch tensor is pickled through a byte string, a copy
    on each side). Dtypes numpy lacks (bfloat16) stay torch tensors. `RolloutEngine.update_weights`
    takes either."""
    out: list[tuple[str, object]] = []
    for n, t in weights:
        t = t.detach().cpu()
        out.append((n, t if t.dtype == torch.bfloat16 else t.contiguous().numpy()))
    return out
