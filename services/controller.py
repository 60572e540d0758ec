"""The asynchronous actor-learner loop of one run: rollout → reward → learner → weights → rollout.

    ctl = RunController("r1", spec, run_dir="runs/r1", progress=True)
    result = ctl.run()          # blocks; pause()/resume()/cancel() from another thread

One thread drives everything through Ray object references (`ray.wait` on whatever is in flight).
The parts, each owning its state (docs/run-loop.md has the map):

- `services.dispatch.Dispatcher`: data cursors → prompt groups spread over every engine (least
  pending tokens first, idle engines take what is waiting), within the staleness bound counted in
  policy versions (``max_staleness = 0`` is the synchronous loop); a lost engine's groups move to
  the others while it comes back.
- `services.reward_routing.RewardRouter`: generated groups → reward actors → the learner's buffer
  (grader failures and, with DAPO dynamic sampling, constant-reward groups dropped and counted).
- `services.learner_stepping.LearnerStepper`: P buffered groups → one learner step.
- `services.weight_publication.WeightPublisher`: the step's weights → every engine.
- `services.run_recovery.RunRecovery`: checkpoint, restore, rollback when the learner dies.
- `services.step_report.StepReporter`: one metrics record per step.

Counters (`RunResult.counters`) account for every dispatched group exactly:
``trained + dropped_stale + dropped_constant + dropped_errors + unused == dispatched`` with no
cursor twice, through engine, reward-actor and learner deaths.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from services import run_storage
from services.dispatch import Dispatcher
from services.launcher import MetricsSink
from services.learner_group import LearnerGroup, LearnerLost
from services.learner_stepping import LearnerStepper
from services.reward_routing import RewardRouter
from services.run_context import RunContext
from services.run_placement import engine_config, place, start_engine_group, start_reward_actors  # noqa: F401
from services.run_recovery import RunRecovery
from services.spec import RunSpec
from services.step_report import StepReporter
from services.tracking import Tracking
from services.weight_publication import WeightPublisher

RUN, PAUSE, CANCEL = "run", "pause", "cancel"


class RunCancelled(Exception):
    pass


@dataclass
class RunResult:
    state: str  # completed | cancelled | paused
    step: int
    version: int
    counters: dict[str, int]
    trained: list[int]  # data cursors trained on, in order
    unused: list[int]  # dispatched but never trained (in flight/buffered when the run ended)
    wall_seconds: float
    run_dir: str
    history: list[dict[str, float]] = field(default_factory=list)


class RunController:
    """Drives one run; see the module docstring. Thread-safe `pause`, `resume`, `cancel`."""

    def __init__(
        self,
        run_id: str,
        spec: RunSpec | dict,
        run_dir: str | Path,
        *,
        sink: MetricsSink | None = None,
        progress: bool = False,
        resume: bool = True,
        engines: Any = None,  # an EngineGroup to reuse (tests, benchmarks); default: started here
        reward_actors: list | None = None,
        learner: Any = None,  # a LearnerGroup (or one learner actor handle) to reuse
        control: Callable[[], str | None] | None = None,  # external state (the registry): run/pause/cancel
        items: list | None = None,  # training items; default from spec.data
    ) -> None:
        self.run_id = run_id
        self.spec = RunSpec.model_validate(spec)
        self.run_dir = Path(run_dir)
        self.storage = run_storage.mark(self.run_dir)  # the learner checks it sees this directory
        self.sink, self.progress, self.resume_from_disk = sink, progress, resume
        if learner is not None and not isinstance(learner, LearnerGroup):
            learner = LearnerGroup.wrap(learner)
        self.engines, self._rewards, self._learner = engines, reward_actors, learner
        self._owned: list = []  # what this controller started (stopped at the end)
        self._pg = None
        self.tracking: Tracking | None = None  # set up with the run (_setup)
        self.control = control
        self._items = items
        self._flag = RUN
        self._stop_when_paused = False
        self._wake = threading.Event()
        self.status: dict[str, Any] = {"state": "starting", "step": 0}

    # ---- control (any thread) -------------------------------------------------------------------
    def pause(self) -> None:
        self._flag = PAUSE

    def resume(self) -> None:
        if self._flag == PAUSE:
            self._flag = RUN
        self._wake.set()

    def cancel(self) -> None:
        self._flag = CANCEL
        self._wake.set()

    def cancel_after_pause(self) -> None:
        """Stop once the pause checkpoint is written (Ctrl-C in `mtprl train`)."""
        self._stop_when_paused = True

    def _wanted(self) -> str:
        if self._flag == CANCEL:
            return CANCEL
        ext = self.control() if self.control else None
        if ext == CANCEL:
            return CANCEL
        if self._flag == PAUSE or ext == PAUSE:
            return PAUSE
        return RUN

    @property
    def state(self):
        """The run's `LoopState` (step, version, counters, …)."""
        return self.ctx.state

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run to the schedule's end, a pause (stopped) or a cancel. However it ends, an error
        included, the trackers close and what this controller started (actors, placement group)
        stops, so a retry with the same id can start again."""
        try:
            return self._run()
        finally:
            if self.tracking is not None:
                self.tracking.finish()  # the report's plots, then close (warns, never raises)
            self._teardown()

    def _run(self) -> RunResult:
        t_start = time.perf_counter()
        self._setup()
        self.recovery.start(resume=self.resume_from_disk)
        self.report.t_start = t_start
        self.report.new_interval()
        steps = self.spec.schedule.steps
        bar = self._progress_bar()
        outcome = "completed"
        try:
            while self.ctx.state.step < steps:
                want = self._wanted()
                if want == CANCEL:
                    outcome = "cancelled"
                    break
                if want == PAUSE:
                    if not self._pause_point():
                        stopped = self._stop_when_paused and self._flag != CANCEL
                        outcome = "paused" if stopped else "cancelled"
                        break
                    continue
                self.dispatch.fill(self._live_elsewhere(), self.learning.busy)
                if self.learning.maybe_step():
                    self.rewards.new_step()
                self._handle_next(timeout=0.5)
                if bar is not None and bar.n != self.ctx.state.step:
                    bar.update(self.ctx.state.step - bar.n)
            if outcome == "completed":
                while self.learning.busy or self.weights.sync_calls:
                    self._handle_next(timeout=1.0)
                self.recovery.checkpoint()
        finally:
            if bar is not None:
                bar.close()
            unused = sorted(set(self.live_cursors()) | set(self.dispatch.queue) | set(self.learning.in_step()))
            self.dispatch.shutdown()
            self.rewards.wait_inflight()
            self.weights.wait_inflight()
        st = self.ctx.state
        st.counters["unused"] = len(unused)
        self.status = {"state": outcome, "step": st.step}
        return RunResult(outcome, st.step, st.version, dict(st.counters), list(st.trained), unused,
                         time.perf_counter() - t_start, str(self.run_dir), self.report.history())

    def _handle_next(self, timeout: float) -> None:
        """Wait for whatever finishes first (up to ``timeout``) and hand each result to its part."""
        self.rewards.resubmit_due()
        if self.learning.answered():
            self._on_trained()  # every rank answered since the last wait
        refs = self.dispatch.refs() + self.rewards.refs() + self.weights.refs() + self.learning.refs()
        if not refs:
            time.sleep(min(timeout, 0.05))
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if done:  # take everything already finished, not just the first
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in self.dispatch.inflight:
                for grp in self.dispatch.on_generated(ref):
                    self.rewards.submit(grp)
            elif ref in self.rewards.inflight:
                grp = self.rewards.on_scored(ref)
                if grp is not None:
                    self.learning.add(grp)
            elif ref in self.weights.sync_calls:
                self.weights.on_synced(ref)
            elif ref in self.dispatch.probes:
                self.dispatch.on_probe(ref)
            elif self.learning.owns(ref):
                self._on_trained()

    def _on_trained(self) -> None:
        """A learner rank answered: account the step once every rank has; publish, checkpoint."""
        try:
            done = self.learning.collect()
        except LearnerLost as e:
            self.recovery.rollback(f"died during a step: {e}")
            return
        if done is None:
            return
        metrics, groups = done
        st, sched = self.ctx.state, self.spec.schedule
        st.step += 1
        # the learner reports the version it trained from; an all-filtered batch leaves it as it was
        st.version = int(metrics["learner/version"]) + (0 if metrics.get("optim/skipped_empty_batch") else 1)
        st.trained += [g.cursor for g in groups]
        st.counters["trained"] += len(groups)
        if not self.report.report(metrics, groups):
            self._flag = CANCEL  # the registry says the run is over (cancelled through the API)
        self.status = {"state": "running", "step": st.step, "version": st.version}
        if st.version > self.weights.published and (st.step % sched.weight_sync_every == 0
                                                    or st.step >= sched.steps):
            try:
                self.weights.publish(st.version)
            except LearnerLost:
                self.recovery.rollback("died while exporting weights")
                return
        if sched.checkpoint_every and st.step % sched.checkpoint_every == 0 and st.step < sched.steps:
            self.recovery.checkpoint()

    def _pause_point(self) -> bool:
        """Drain in-flight work, finish the running step, checkpoint, wait. False = cancelled."""
        self.status = {"state": "pausing", "step": self.ctx.state.step}
        while (self.dispatch.inflight or self.rewards.busy() or self.learning.busy or self.weights.sync_calls):
            if self._wanted() == CANCEL:
                return False
            self._handle_next(timeout=0.5)
        self.recovery.checkpoint()
        self.report.event("log", {"message": f"paused at step {self.ctx.state.step}; checkpoint written"})
        self.status = {"state": "paused", "step": self.ctx.state.step}
        if self._stop_when_paused:
            return False
        while True:
            want = self._wanted()
            if want == CANCEL:
                return False
            if want == RUN:
                self.report.new_interval()
                self.status = {"state": "running", "step": self.ctx.state.step}
                return True
            self._wake.wait(0.2)
            self._wake.clear()

    def live_cursors(self) -> list[int]:
        """Groups dispatched and not yet trained or dropped: generating, scoring, buffered."""
        return self.dispatch.cursors() + self.rewards.cursors() + self.learning.cursors()

    def _live_elsewhere(self) -> int:
        return len(self.rewards.cursors()) + len(self.learning.cursors())

    # ---- set-up and tear-down -------------------------------------------------------------------
    def _setup(self) -> None:
        from transformers import AutoTokenizer

        spec = self.spec
        tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
        if self._items is None:
            from services.data import train_items

            self._items = train_items(spec, tokenizer)
        if not self._items:
            raise ValueError(f"dataset {spec.data.dataset!r} gave no training items")
        res = spec.resources
        strategies: dict[str, list] = {}
        if self._learner is None or self.engines is None or self._rewards is None:
            self._pg, strategies = place(self.run_id, spec, self._learner is None, self.engines is None,
                                         self._rewards is None)
        if self._learner is None:
            self._learner = LearnerGroup(
                spec.model.path, spec.algorithm.model_dump(), workers=int(res.learner_workers),
                threads=int(max(1, res.cpus_per_learner)), seed=spec.data.seed, num_cpus=res.cpus_per_learner,
                num_gpus=res.gpus_per_learner, cpu_nice=res.cpu_nice, strategies=strategies.get("learner"),
                storage=self.storage)
            self._owned.append(self._learner.kill)
        if self.engines is None:
            self.engines = start_engine_group(spec, strategies.get("engine"))
            self._owned.append(self.engines.kill)
        if self._rewards is None:
            self._rewards = start_reward_actors(spec, strategies.get("reward"))
            self._owned += [lambda a=a: ray.kill(a, no_restart=True) for a in self._rewards]
        self.ctx = RunContext(spec, self._items, tokenizer)
        self.report = StepReporter(self.ctx, self.run_id, self.run_dir, self.sink, self.progress, self)
        self.tracking = Tracking(spec.tracking, self.run_dir, self.run_id, spec.model_dump(mode="json"))
        self.dispatch = Dispatcher(self.ctx, self.engines, self.report.event)
        self.rewards = RewardRouter(self.ctx, self._rewards)
        self.learning = LearnerStepper(self.ctx, self._learner)
        self.weights = WeightPublisher(self.ctx, self._learner, self.engines, on_lost=self.dispatch.mark_down)
        self.recovery = RunRecovery(self, self.run_dir)

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.spec.schedule.steps, initial=self.ctx.state.step, desc=f"run {self.run_id}",
                    unit="step", dynamic_ncols=True)

    def _teardown(self) -> None:
        owned, self._owned = self._owned, []
        for stop in owned:
            try:
                stop()
            except Exception:  # noqa: BLE001 - already gone
                pass
        pg, self._pg = self._pg, None
        if pg is not None:
            ray.util.remove_placement_group(pg)
