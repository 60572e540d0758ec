"""The learner the run controller holds: one learner actor, or N ranks that shard the policy.

    group = LearnerGroup(model_path, algorithm, workers=2, strategies=bundles)   # starts the ranks
    call = group.step(batch)          # asynchronous: ray.wait on call.refs, then call.result()
    ref = group.weights()             # rank 0's (name, array) list, every engine loads this object
    group.save(dir); group.restore(dir, version); group.get_version()
    except LearnerLost: group.restart()   # then roll back to the latest checkpoint

Every call goes to every rank (the ranks run the same update in lock step, see docs/scale.md) and
is answered once all have answered. When one rank dies the others wait in a collective that
will never complete, so each call fails as soon as any rank's reply is an error (`LearnerLost`),
and `restart` kills every rank and forms the group anew in the same placement-group bundles, on
a new rendezvous port. A single learner (N = 1) keeps today's behaviour: Ray restarts its actor
(``max_restarts``) and `restart` waits until it answers again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

log = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """A rank of the learner died (or failed) during a call; the group must be restarted."""


class GroupCall:
    """One call in flight on every rank. ``refs`` are the replies to wait on; `result` is rank 0's
    reply once all ranks answered, None while some are pending, and raises `LearnerLost` as soon
    as a reply says a rank died. A rank's own exception (a bug, bad input) is raised as it is,
    unless a peer is dead: a rank whose peer died fails in its collective, and that is a loss."""

    def __init__(self, refs: list[ray.ObjectRef], workers: list) -> None:
        self.refs, self._workers = refs, workers

    def _check(self, ref: ray.ObjectRef) -> None:
        try:
            ray.get(ref)
        except RayActorError as e:
            raise LearnerLost(f"learner rank {self.refs.index(ref)} died ({type(e).__name__})") from e
        except RayTaskError as e:
            if isinstance(e.cause, RayActorError):
                raise LearnerLost(f"learner rank {self.refs.index(ref)} died under the call") from e
            dead = [r for r, w in enumerate(self._workers) if not _answers(w)]
            if dead:
                raise LearnerLost(f"learner rank(s) {dead} died; rank {self.refs.index(ref)} failed with "
                                  f"{type(e.cause).__name__}") from e
            raise

    def pending(self) -> list[ray.ObjectRef]:
        """The replies not in yet (what a caller's `ray.wait` should watch: a finished rank's
        reply is ready for good and would wake every wait at once)."""
        _, left = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return left

    def result(self) -> Any:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        for ref in ready:
            self._check(ref)
        return ray.get(self.refs[0]) if len(ready) == len(self.refs) else None

    def wait(self, timeout_s: float | None = None) -> Any:
        """Block until every rank answered (or one failed); GetTimeoutError past ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(self.refs)
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise GetTimeoutError(f"the learner did not answer within {timeout_s:.0f}s")
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0 if left is None else min(1.0, left))
            for ref in done:  # one reply at a time: a dead rank is seen at once, not at the end
                self._check(ref)
        return ray.get(self.refs[0])


def _answers(worker, timeout_s: float = 10.0) -> bool:
    try:
        ray.get(worker.ping.remote(), timeout=timeout_s)
        return True
    except (RayActorError, GetTimeoutError):
        return False


class LearnerGroup:
    """N learner ranks (`services.learner_worker.LearnerWorker`) started in ``strategies`` (one
    scheduling strategy per rank: the run's placement-group bundles), or an existing single
    learner actor (`wrap`)."""

    def __init__(self, model_path: str, algorithm: dict[str, Any], *, workers: int = 1, threads: int = 1,
                 seed: int = 0, num_cpus: float = 1, num_gpus: float = 0, cpu_nice: int = 0,
                 strategies: list | None = None, max_restarts: int = 3, storage: dict | None = None) -> None:
        self._args = dict(model_path=model_path, algorithm=algorithm, threads=threads, seed=seed,
                          num_cpus=num_cpus, num_gpus=num_gpus, cpu_nice=cpu_nice, storage=storage)
        self.size = int(workers)
        self._strategies = strategies or [None] * self.size
        if len(self._strategies) != self.size:
            raise ValueError(f"{self.size} learner ranks but {len(self._strategies)} placements")
        self.max_restarts = max_restarts
        self.workers: list = []
        self._formed = False
        self._start()

    @classmethod
    def wrap(cls, actor) -> LearnerGroup:
        """A one-rank group around an existing learner actor (tests and benchmarks reuse one)."""
        g = cls.__new__(cls)
        g._args, g.size, g._strategies, g.max_restarts = {}, 1, [None], 0
        g.workers, g._formed = [actor], True
        return g

    # ---- life cycle -----------------------------------------------------------------------------
    def _start(self) -> None:
        from services.learner_worker import create_learner_actor

        a = self._args
        # A group's rank cannot come back alone (its peers wait on the old group), so Ray does
        # not restart it; `restart` re-forms the whole group.
        restarts = self.max_restarts if self.size == 1 else 0
        self.workers = [create_learner_actor(
            a["model_path"], a["algorithm"], threads=a["threads"], seed=a["seed"], num_cpus=a["num_cpus"],
            num_gpus=a["num_gpus"], max_restarts=restarts, cpu_nice=a["cpu_nice"],
            scheduling_strategy=self._strategies[r], rank=r, world_size=self.size,
            storage=a.get("storage")) for r in range(self.size)]
        self._formed = self.size == 1

    def _form(self, timeout_s: float) -> None:
        """Rendezvous and build the sharded policy on every rank (blocks until all joined)."""
        addr = ray.get(self.workers[0].rendezvous.remote(), timeout=timeout_s)
        log.info("learner group of %d ranks meets at %s", self.size, addr)
        GroupCall([w.setup.remote(addr) for w in self.workers], self.workers).wait(timeout_s)
        self._formed = True

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Every rank placed and answering (and the group formed); RuntimeError with a reason
        otherwise — a learner that cannot be placed fails the run."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get([w.ping.remote() for w in self.workers], timeout=30)
                if not self._formed:
                    self._form(max(30.0, deadline - time.monotonic()))
                return
            except (RayActorError, GetTimeoutError, LearnerLost):
                if self.size > 1 and not self._alive():
                    self.restart()  # a rank died while forming: start them all again
                time.sleep(0.5)
        raise RuntimeError(f"the learner ({self.size} rank(s)) did not answer within {timeout_s:.0f}s "
                           "(not placed, or crashing while it loads the model; see the Ray worker logs)")

    def _alive(self) -> bool:
        return all(_answers(w) for w in self.workers)

    def restart(self) -> None:
        """After `LearnerLost`: a single learner is restarted by Ray (wait for it); a group's ranks
        are all killed and started again, and form a new group at the next `wait_ready`."""
        if self.size == 1:
            return
        log.warning("re-forming the learner group (%d ranks)", self.size)
        self.kill()
        self._start()

    def kill(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 — already gone
                pass

    # ---- calls ----------------------------------------------------------------------------------
    def _all(self, method: str, *args: Any) -> GroupCall:
        return GroupCall([getattr(w, method).remote(*args) for w in self.workers], self.workers)

    def step(self, batch) -> GroupCall:
        ref = ray.put(batch) if self.size > 1 else batch  # one copy in the object store for all ranks
        return self._all("step", ref)

    def weights(self) -> ray.ObjectRef:
        """Rank 0's reply (the weights) once every rank has taken part in gathering them."""
        call = self._all("weights")
        if self.size > 1:
            call.wait()
        return call.refs[0]

    def save(self, out_dir: str, with_optimizer: bool = True) -> dict[str, Any]:
        return self._all("save", out_dir, with_optimizer).wait()

    def restore(self, ckpt_dir: str | None, version: int | None = None) -> int:
        return int(self._all("restore", ckpt_dir, version).wait())

    def get_version(self) -> int:
        return int(ray.get(self.workers[0].get_version.remote()))
