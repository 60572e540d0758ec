"""The seam between the control plane and the runs.

Two protocols:

- :class:`RunLauncher` — what the API calls to start, pause, resume, cancel and find runs. The
  API first changes the state in the registry (atomically; Redis is the source of truth), then
  tells the launcher, so a launcher call that is lost (API crash) is repaired by the run itself,
  which reads its state from the registry at every step boundary.
- :class:`MetricsSink` — what a run reports through (steps with metrics, events, its own state
  changes). :class:`services.registry.RedisSink` implements it.

:class:`RayLauncher` is the Ray implementation: one **detached, named** actor per run
(``name=f"mtprl-run-{run_id}"``, ``namespace="mtprl"``, ``lifetime="detached"``), so runs outlive
the API process and a restarted API finds them again by name (:meth:`RayLauncher.is_alive`).
It takes the actor class as a parameter. Today that is
:class:`services.synthetic_run.SyntheticRunActor` (synthetic metrics, for tests and demos); the
real run controller plugs in by passing its class instead — it must offer the same actor
methods: ``__init__(run_id, spec: dict, sink_config: dict)``, async ``start()`` (returns at
once, training continues in the actor), ``pause()``, ``resume()``, ``cancel()``, ``status()``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

NAMESPACE = "mtprl"


def actor_name(run_id: str) -> str:
    return f"mtprl-run-{run_id}"


@runtime_checkable
class MetricsSink(Protocol):
    """What a run reports through. Implemented by :class:`services.registry.RedisSink`.

    Metric keys are ``/``-namespaced as the learner, rollout and reward packages emit them
    (``batch/reward_mean``, ``mtp/lambda/head1``); a last component ``head<k>`` becomes the
    Prometheus label ``head``. The key
    ``policy_version`` also sets the run's policy version. See
    ``services.metrics_export.METRIC_CATALOG`` for the keys the dashboards use.
    """

    def report_step(self, run_id: str, step: int, metrics: dict[str, float]) -> bool:
        """Record a finished step; False once the run is no longer running/paused."""
        ...

    def event(self, run_id: str, kind: str, payload: dict[str, Any]) -> str:
        """Append an event (``checkpoint`` with step/path/policy_version is also recorded as the
        run's last checkpoint). Returns the event id."""
        ...

    def set_state(self, run_id: str, state: str, *, error: str | None = None) -> bool:
        """The run's own transition (running, completed, failed, …); False if not allowed now."""
        ...

    def get_state(self, run_id: str) -> str | None:
        """The registry's state of the run, read at step boundaries (pause/cancel land here)."""
        ...


@runtime_checkable
class RunLauncher(Protocol):
    """How the API reaches runs. All methods are idempotent."""

    async def start(self, run_id: str, spec: dict[str, Any]) -> None:
        """Create the run's controller (or find the existing one) and start it."""
        ...

    async def pause(self, run_id: str) -> None: ...

    async def resume(self, run_id: str) -> None: ...

    async def cancel(self, run_id: str) -> None:
        """Stop the run and release its resources."""
        ...

    async def is_alive(self, run_id: str) -> bool:
        """Whether the run's controller exists (after an API restart: reattach by name)."""
        ...

    async def close(self) -> None: ...


class NullLauncher:
    """Records runs and starts nothing (``MTPRL_LAUNCHER=none``): runs stay pending."""

    async def start(self, run_id: str, spec: dict[str, Any]) -> None:
        return None

    async def pause(self, run_id: str) -> None:
        return None

    async def resume(self, run_id: str) -> None:
        return None

    async def cancel(self, run_id: str) -> None:
        return None

    async def is_alive(self, run_id: str) -> bool:
        return True

    async def close(self) -> None:
        return None


class RayUnreachable(ConnectionError):
    """The Ray cluster the settings (or Ray's session files) name does not answer."""


#: How long `mtprl serve` waits for a Ray cluster's GCS port before saying it is unreachable
#: (ray.init itself retries a dead address for minutes).
RAY_PROBE_TIMEOUT_S = 3.0


def _ray_address_source(address: str | None) -> tuple[str | None, str]:
    """The GCS address ``ray.init(address=address or "auto")`` would connect to, and where it came
    from; (None, …) when there is none to connect to (Ray then starts a local instance)."""
    import os

    from ray._common.utils import get_ray_address_file
    from ray._private.services import get_ray_address_from_environment  # Ray's own resolution

    if os.environ.get("RAY_ADDRESS"):
        where = "RAY_ADDRESS"
    elif address and address != "auto":
        where = "--ray-address / MTPRL ray_address"
    else:
        where = f"{get_ray_address_file(None)} (the last `ray start` on this machine)"
    try:
        resolved = get_ray_address_from_environment(address or "auto", None)
    except ConnectionError:  # "auto" and no cluster recorded or running
        return None, where
    return resolved, where


def check_ray_reachable(address: str | None, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Raise `RayUnreachable` with the address and what to do when the cluster that
    ``ray.init`` would join does not accept connections within ``timeout_s``."""
    import socket

    resolved, where = _ray_address_source(address)
    if not resolved or resolved == "local" or "://" in resolved:
        return  # a new local instance, or a Ray client address (not a GCS port)
    host, _, port = resolved.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        raise RayUnreachable(
            f"the Ray cluster at {resolved} (from {where}) does not answer ({type(e).__name__}: {e}); "
            "start it (`ray start --head`), clear a dead cluster's address (`ray stop`), or point "
            "--ray-address / RAY_ADDRESS at a running cluster") from None


class RayLauncher:
    """Detached named Ray actors, one per run.

    ``actor_cls`` is a ``@ray.remote`` class with the methods listed in the module docstring;
    ``sink_config`` (Redis URL, caps, step time, …) is passed to its constructor unchanged.
    """

    def __init__(self, actor_cls: Any, sink_config: dict[str, Any], *, ray_address: str | None = None,
                 actor_options: dict[str, Any] | None = None):
        import ray

        self._ray = ray
        self.actor_cls = actor_cls
        self.sink_config = sink_config
        self.actor_options = actor_options or {}
        if not ray.is_initialized():
            check_ray_reachable(ray_address)  # seconds, instead of ray.init retrying for minutes
            # `auto` attaches to a running cluster (`ray start --head` or `ray up`); the runs then
            # outlive this process. Without one, Ray starts a local instance owned by this
            # process, and runs end with it.
            try:
                ray.init(address=ray_address or "auto", namespace=NAMESPACE, log_to_driver=False)
            except ConnectionError:
                if ray_address:
                    raise
                log.warning("no running Ray cluster found; starting a local one (runs stop "
                            "with this process — use `ray start --head` for runs that outlive it)")
                ray.init(namespace=NAMESPACE, log_to_driver=False, include_dashboard=False)

    def _get(self, run_id: str) -> Any | None:
        try:
            return self._ray.get_actor(actor_name(run_id), namespace=NAMESPACE)
        except ValueError:
            return None

    async def _handle(self, run_id: str) -> Any | None:
        # get_actor asks the GCS synchronously: keep it off the event loop.
        return await asyncio.to_thread(self._get, run_id)

    async def start(self, run_id: str, spec: dict[str, Any]) -> None:
        def create() -> Any:
            return self.actor_cls.options(
                name=actor_name(run_id),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=0,
                **self.actor_options,
            ).remote(run_id, spec, self.sink_config)

        handle = await asyncio.to_thread(create)
        # Waits only for the actor to be scheduled and its start() to return (it spawns the
        # training loop inside the actor and returns at once).
        await handle.start.remote()

    async def _call(self, run_id: str, method: str) -> None:
        handle = await self._handle(run_id)
        if handle is None:
            return
        try:
            await getattr(handle, method).remote()
        except self._ray.exceptions.RayActorError:
            pass  # it already exited: the registry state is what counts

    async def pause(self, run_id: str) -> None:
        await self._call(run_id, "pause")

    async def resume(self, run_id: str) -> None:
        await self._call(run_id, "resume")

    async def cancel(self, run_id: str) -> None:
        await self._call(run_id, "cancel")

    async def is_alive(self, run_id: str) -> bool:
        return (await self._handle(run_id)) is not None

    async def kill(self, run_id: str) -> None:
        handle = await self._handle(run_id)
        if handle is not None:
            await asyncio.to_thread(self._ray.kill, handle, no_restart=True)

    async def close(self) -> None:
        return None  # leave Ray connected: other users of this process may share it
