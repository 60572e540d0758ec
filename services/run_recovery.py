"""Checkpoint, restore and rollback of a run (on disk: `services.run_checkpoint`).

- **Checkpoint** every ``checkpoint_every`` steps, on pause and at the end: the learner saves its
  part, the loop its `LoopState` (groups in flight or queued become ``pending``: redone first).
- **Restore** sets every part of the loop to a checkpoint (or the start of the run): the loop
  state, the queue, nothing in flight, the learner's weights and version, the metric history
  truncated to the checkpoint, and the engines loaded with the restored weights.
- **Rollback** (the learner died): restart the learner, restore the latest checkpoint, and redo
  every group trained since, so each group contributes to the final policy at most once. Fault
  counters survive it; results of calls from before it are void (the epoch changes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray.exceptions import RayActorError

from services.learner_group import LearnerLost
from services.run_checkpoint import Checkpoints, LoopState
from services.run_context import ACCOUNT, FAULTS, fresh_state

log = logging.getLogger(__name__)


class RunRecovery:
    """Owns the run's checkpoints; resets the loop's parts on restore."""

    def __init__(self, loop, run_dir: Path) -> None:
        self.loop = loop  # the controller: ctx and the parts to reset
        self.checkpoints = Checkpoints(run_dir)

    def start(self, resume: bool) -> None:
        """The run's first restore: its latest checkpoint (``resume``), else the start."""
        ckpt, state = self.checkpoints.latest() if resume else (None, None)
        self._restore(ckpt, state, first=True)

    def checkpoint(self) -> None:
        lp = self.loop
        st = lp.ctx.state
        spec = lp.ctx.spec.checkpointing

        def save(tmp: Path) -> None:
            lp.learning.learner.save(str(tmp), spec.save_optimizer)
            st.pending = sorted(set(lp.live_cursors()) | set(lp.dispatch.queue))
            st.history_len = lp.report.history_len

        try:
            path = self.checkpoints.write(st, spec.keep_last, save)
        except (RayActorError, LearnerLost):
            self.rollback("died while checkpointing")
            return
        lp.report.event("checkpoint", {"step": st.step, "policy_version": st.version, "path": str(path / "policy")})

    def rollback(self, reason: str) -> None:
        """The learner died: restart from the latest checkpoint, redo what was trained since."""
        lp = self.loop
        ctx = lp.ctx
        log.warning("learner lost (%s); rolling back to the latest checkpoint", reason)
        ctx.count("faults_learner")
        lp.learning.learner.restart()  # one actor: Ray restarts it; a group: every rank, re-formed
        ckpt, kept = self.checkpoints.latest()
        since = kept.step if kept else 0
        rolled = len(ctx.state.trained) - (len(kept.trained) if kept else 0)
        ctx.count("rolled_back", rolled)
        ctx.epoch += 1
        self._restore(ckpt, kept, first=False)
        lp.report.event("log", {"message": f"learner restarted ({reason}); rolled back to step {since}, "
                                           f"{rolled} trained groups will be redone"})

    def _restore(self, ckpt: Path | None, state: LoopState | None, first: bool) -> None:
        """Set the loop (and the learner) to checkpoint ``ckpt`` with ``state`` (None: the start)."""
        lp = self.loop
        ctx = lp.ctx
        faults = {k: ctx.state.counters.get(k, 0) for k in FAULTS}
        if state is not None:
            ctx.state = state
        elif not first:
            ctx.state = fresh_state()
        for k in ACCOUNT + FAULTS:
            ctx.state.counters.setdefault(k, 0)
        if not first:
            ctx.state.counters.update(faults)
        published = lp.weights.published
        lp.dispatch.reset(ctx.state.pending)
        lp.rewards.reset()
        lp.learning.reset()
        lp.weights.reset(first)
        if not first:
            lp.dispatch.cancel_all()  # generation for the rolled-back policy is void
        learner = lp.learning.learner
        learner.wait_ready()  # a learner that cannot be placed fails the run, with a reason
        if first and ckpt is None:
            lp.report.truncate(0)
            version = learner.get_version()
        else:
            version = ctx.state.version if first else max(published + 1, ctx.state.version)
            version = learner.restore(None if ckpt is None else str(ckpt), version)
            lp.report.truncate(ctx.state.history_len)
        ctx.state.version = version
        try:
            lp.weights.publish(version)
        except LearnerLost as e:
            self.rollback(str(e))
            return
        lp.weights.wait()
