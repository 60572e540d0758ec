"""Learner stepping: the buffer of scored groups → one `TrainBatch` per step → the step's metrics.

When the learner is idle and ``P`` groups are buffered (lowest data cursor first), they become one
batch; groups staler than ``max_staleness`` (behaviour version vs the learner's) are dropped and
counted first. A rank lost during a step surfaces as `LearnerLost` from `collect`: the caller
rolls the run back (`services.run_recovery`).
"""

from __future__ import annotations

import ray

from services.batching import ScoredGroup, to_train_batch
from services.learner_group import GroupCall, LearnerGroup, LearnerLost  # noqa: F401 - re-exported
from services.run_context import BusyClock, RunContext


class LearnerStepper:
    """Owns the buffer and the learner call in flight."""

    def __init__(self, ctx: RunContext, learner: LearnerGroup) -> None:
        self.ctx, self.learner = ctx, learner
        self.clock = BusyClock()
        self.buffer: dict[int, ScoredGroup] = {}
        self.call: tuple[GroupCall, list[ScoredGroup]] | None = None

    def reset(self) -> None:
        self.buffer, self.call = {}, None
        self.clock.active = 0

    @property
    def busy(self) -> bool:
        return self.call is not None

    def cursors(self) -> list[int]:
        """Buffered groups (`in_step` has those in the running step)."""
        return list(self.buffer)

    def in_step(self) -> list[int]:
        return [g.cursor for g in self.call[1]] if self.call else []

    def refs(self) -> list[ray.ObjectRef]:
        return self.call[0].pending() if self.call else []

    def owns(self, ref) -> bool:
        return self.call is not None and ref in self.call[0].refs

    def answered(self) -> bool:
        """Every rank answered (collect now)."""
        return self.call is not None and not self.call[0].pending()

    def add(self, grp: ScoredGroup) -> None:
        self.buffer[grp.cursor] = grp

    def maybe_step(self) -> bool:
        """Start a step if the learner is idle and enough fresh groups are buffered."""
        if self.call is not None:
            return False
        ctx = self.ctx
        v = ctx.state.version
        for c in sorted(self.buffer):
            if v - self.buffer[c].behaviour_version > ctx.spec.schedule.max_staleness:
                del self.buffer[c]
                ctx.count("dropped_stale")
                ctx.stats.dropped_stale += 1
        if len(self.buffer) < ctx.P:
            return False
        cursors = sorted(self.buffer)[: ctx.P]
        groups = [self.buffer.pop(c) for c in cursors]
        batch = to_train_batch(groups, pad_id=ctx.tokenizer.pad_token_id or 0)
        self.call = (self.learner.step(batch), groups)
        self.clock.start()
        return True

    def collect(self) -> tuple[dict[str, float], list[ScoredGroup]] | None:
        """A rank answered: ``(metrics, groups)`` once every rank has, else None; raises
        `LearnerLost` (the call is then over) if a rank died."""
        call, groups = self.call
        try:
            metrics = call.result()
        except LearnerLost:
            self.call = None
            self.clock.stop()
            raise
        if metrics is None:  # other ranks still at work
            return None
        self.call = None
        self.clock.stop()
        return metrics, groups
