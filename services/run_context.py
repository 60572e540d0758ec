"""What every part of the run loop shares: the spec, the data, the checkpointed `LoopState`, the
rollback epoch and the current metrics interval's tallies.

The loop's parts (`services.dispatch`, `services.reward_routing`, `services.learner_stepping`,
`services.weight_publication`, `services.run_recovery`, `services.step_report`) each own their
in-flight calls; this is the little they all read. ``state`` is replaced wholesale by a restore,
so parts read ``ctx.state`` at use and never keep a reference to it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from rollout.engine import SpecStats
from services.batching import data_index
from services.run_checkpoint import LoopState
from services.spec import RunSpec

ACCOUNT = ("dispatched", "trained", "dropped_stale", "dropped_constant", "dropped_errors")
FAULTS = ("faults_rollout", "faults_reward", "faults_learner", "redispatched", "rolled_back",
          "straggler_redispatch", "straggler_discarded")


def fresh_state() -> LoopState:
    return LoopState(counters={k: 0 for k in ACCOUNT + FAULTS})


class BusyClock:
    """Seconds during which at least one call of an actor kind was outstanding."""

    def __init__(self) -> None:
        self.active = 0
        self.busy = 0.0
        self._since = 0.0
        self.iv_busy0 = 0.0  # busy seconds at the start of the current metrics interval

    def start(self) -> None:
        if self.active == 0:
            self._since = time.perf_counter()
        self.active += 1

    def stop(self) -> None:
        self.active = max(0, self.active - 1)
        if self.active == 0:
            self.busy += time.perf_counter() - self._since

    def read(self) -> float:
        return self.busy + (time.perf_counter() - self._since if self.active else 0.0)


@dataclass
class IntervalStats:
    """Tallies since the last reported step (reset by `services.step_report.StepReporter`)."""

    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    engine_s: float = 0.0
    spec: SpecStats = field(default_factory=SpecStats)
    dropped_stale: int = 0
    dropped_constant: int = 0
    dropped_errors: int = 0
    dropped_samples: collections.Counter = field(default_factory=collections.Counter)


DIED = object()  # what `result_or_died` returns for a call whose actor died


def result_or_died(ref):
    """``ray.get(ref)``, or `DIED` when the actor died under the call (restarted or gone); other
    errors (a bug in the call) propagate."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        if isinstance(e.cause, RayActorError):
            return DIED
        raise
    except RayActorError:
        return DIED


@dataclass
class RunContext:
    spec: RunSpec
    items: list
    tokenizer: Any
    state: LoopState = field(default_factory=fresh_state)
    epoch: int = 0  # bumped by a learner rollback: results of calls from older epochs are ignored
    stats: IntervalStats = field(default_factory=IntervalStats)
    _ids: dict[int, list[int]] = field(default_factory=dict)  # item index → prompt token ids

    @property
    def P(self) -> int:
        return self.spec.rollout.prompts_per_step

    def count(self, key: str, n: int = 1) -> None:
        self.state.counters[key] += n

    def item(self, cursor: int):
        return self.items[data_index(cursor, len(self.items), self.spec.data.seed)]

    def prompt_ids(self, cursor: int) -> list[int]:
        idx = data_index(cursor, len(self.items), self.spec.data.seed)
        if idx not in self._ids:
            self._ids[idx] = self.tokenizer.encode(self.items[idx].prompt, add_special_tokens=False)
        return self._ids[idx]
