"""The asynchronous actor-learner loop of one run: rollout → reward → learner → weights → rollout.

    ctl = RunController("r1", spec, run_dir="runs/r1", progress=True)
    result = ctl.run()          # blocks; pause()/resume()/cancel() from another thread

One thread drives everything through Ray object references (`ray.wait` on whatever is in flight):

- **Dispatch.** Prompt groups leave in chunks of `rollout.prompts_per_step` groups per engine call
  (``n = samples_per_prompt`` each, a per-group sampling seed). A chunk may start only while the
  policy that will consume it is at most ``max_staleness`` versions ahead of the weights the
  engines hold: with ``v`` steps done (plus one if the learner is busy), ``live`` groups in flight
  or buffered and the engines at version ``u``, dispatch iff ``v + live // P − u ≤ max_staleness``.
  ``max_staleness = 0`` is the synchronous loop (generate, score, train, sync, repeat).
- **Reward.** Each finished group goes to a reward actor (round robin); scored groups wait in the
  buffer. DAPO dynamic sampling drops groups whose rewards are all equal and refills, up to
  ``schedule.max_refill_factor × P`` groups per step.
- **Learner.** When it is idle and P fresh groups are buffered (lowest data cursor first), they
  become one `TrainBatch`; groups staler than ``max_staleness`` are dropped and counted. After the
  step the learner publishes its weights once (one object in Ray's object store) and every engine
  loads them, drafter included; engine versions only grow.
- **Checkpoints** every ``checkpoint_every`` steps, on pause and at the end (`services.run_checkpoint`).
- **Faults.** A dead engine: its chunk is re-dispatched and the engine reloaded (Ray restarts it,
  or a new one is started). A dead reward actor: the group is re-scored after the restart. A dead
  learner: the run rolls back to its latest checkpoint (or the start), the restarted learner loads
  it, and every group trained since then is redone — so each group contributes to the final policy
  at most once. Counters (`counters`) account for every dispatched group exactly:
  ``trained + dropped_stale + dropped_constant + dropped_errors + unused == dispatched`` with no
  cursor twice.
- **Grader failures** (``reward.on_error: drop``, the default): a sample whose grading failed
  (`reward.schema.grader_failed`: math timeout/error, code error) leaves its group before the
  group is buffered, so the learner never sees it and the group's advantages are over its valid
  members; a group left with fewer than 2 samples is dropped whole (``dropped_errors``). Dropped
  samples are counted per outcome (``reward/dropped/<outcome>``). ``zero`` trains them with the
  grader's failure reward.

Resources: a placement group with one bundle per actor (learner, engines, reward actors); CPU
bundles here, GPU bundles on a cluster (``resources``). Injected actors (tests share engines)
skip it. ``resources.cpu_nice`` goes to every actor started here, which lowers its own CPU
priority before anything else (`services.cpu_priority`); injected ones are left as they are.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from reward.schema import GRADER_FAILURES, grader_failed
from rollout import weight_transport
from rollout.engine import SpecStats
from services import run_checkpoint, run_storage
from services.batching import ScoredGroup, data_index, group_seed, reward_items, to_train_batch
from services.launcher import MetricsSink
from services.learner_group import GroupCall, LearnerGroup, LearnerLost
from services.spec import RunSpec

log = logging.getLogger(__name__)

RUN, PAUSE, CANCEL = "run", "pause", "cancel"
ACCOUNT = ("dispatched", "trained", "dropped_stale", "dropped_constant", "dropped_errors")
FAULTS = ("faults_rollout", "faults_reward", "faults_learner", "redispatched", "rolled_back")


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
class _Gen:
    engine: int
    cursors: list[int]
    epoch: int


@dataclass
class _Score:
    actor: int
    group: ScoredGroup
    epoch: int


_DIED = object()  # what `_result` returns for a call whose actor died


def _result(ref):
    """``ray.get(ref)``, or `_DIED` when the actor died under the call (restarted or gone); other
    errors (a bug in the call) propagate."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        if isinstance(e.cause, RayActorError):
            return _DIED
        raise
    except RayActorError:
        return _DIED


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
        self.sink = sink
        self.progress = progress
        self.resume_from_disk = resume
        if learner is not None and not isinstance(learner, LearnerGroup):
            learner = LearnerGroup.wrap(learner)
        self._engines, self._rewards, self._learner = engines, reward_actors, learner
        self._owned_learner = False
        self._owned: list = []  # actors this controller started (killed at the end)
        self._pg = None
        self.control = control
        self._items = items
        self._flag = RUN
        self._stop_when_paused = False
        self._owned_engines = False
        self._transport: str | None = None  # weight_sync.transport, resolved at the first publish
        self._backend = "gloo"
        self._next_reward = -1
        self._ids_cache: dict[int, list[int]] = {}  # item index → prompt token ids
        self.gen_clock, self.score_clock, self.learner_clock = BusyClock(), BusyClock(), BusyClock()
        self.cum_spec = SpecStats()  # the engines' cumulative drafting counters, as last reported
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

    # ---- set-up ---------------------------------------------------------------------------------
    def _load_items(self) -> list:
        if self._items is not None:
            return self._items
        from services.data import train_items

        return train_items(self.spec, self.tokenizer)

    def _setup(self) -> None:
        from transformers import AutoTokenizer

        spec = self.spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
        self.items = self._load_items()
        if not self.items:
            raise ValueError(f"dataset {spec.data.dataset!r} gave no training items")
        res = spec.resources
        need_pg = self._learner is None or self._engines is None or self._rewards is None
        strategies = self._placement() if need_pg else {}
        if self._learner is None:
            self._learner = LearnerGroup(
                spec.model.path, spec.algorithm.model_dump(), workers=int(res.learner_workers),
                threads=int(max(1, res.cpus_per_learner)), seed=spec.data.seed, num_cpus=res.cpus_per_learner,
                num_gpus=res.gpus_per_learner, cpu_nice=res.cpu_nice, strategies=strategies.get("learner"),
                storage=self.storage)
            self._owned_learner = True
        if self._engines is None:
            self._engines = start_engine_group(spec, strategies.get("engine"))
            self._owned_engines = True
        if self._rewards is None:
            self._rewards = start_reward_actors(spec, strategies.get("reward"))
            self._owned += self._rewards

    def _placement(self) -> dict[str, Any]:
        """One placement group for the run's actors (PACK: on one node when they fit)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res, spec = self.spec.resources, self.spec
        bundles: list[dict[str, float]] = []
        kinds: list[str] = []

        def bundle(kind: str, cpus: float, gpus: float) -> None:
            b = {"CPU": cpus}
            if gpus:
                b["GPU"] = gpus
            bundles.append(b)
            kinds.append(kind)

        if self._learner is None:  # one bundle per learner rank
            for _ in range(int(res.learner_workers)):
                bundle("learner", res.cpus_per_learner, res.gpus_per_learner)
        if self._engines is None:
            for _ in range(spec.rollout.engines):
                bundle("engine", res.cpus_per_engine, res.engine_gpus)
        if self._rewards is None:
            for _ in range(spec.reward.actors):
                bundle("reward", res.cpus_per_reward_worker, 0)
        pg = placement_group(bundles, strategy="PACK", name=f"mtprl-run-{self.run_id}")
        try:
            ray.get(pg.ready(), timeout=120)
        except GetTimeoutError:
            total = ray.cluster_resources()
            ray.util.remove_placement_group(pg)
            raise RuntimeError(
                f"the run asks Ray for {bundles} (learner, engines, reward actors) but the cluster has "
                f"{ {k: v for k, v in total.items() if k in ('CPU', 'GPU')} }; lower `resources` or add nodes"
            ) from None
        self._pg = pg
        # Every actor gets its own bundle: with a wildcard bundle (-1) a reward actor can take the
        # learner's bundle, and a restarted learner then waits forever (seen in a fault test).
        out: dict[str, list] = {}
        for i, kind in enumerate(kinds):
            out.setdefault(kind, []).append(PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
        return out

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t_start = time.perf_counter()
        self._setup()
        spec = self.spec
        self.P = spec.rollout.prompts_per_step
        self.s_max = spec.schedule.max_staleness
        self.dynamic = bool(spec.algorithm.dapo.dynamic_sampling)
        self.history_path = self.run_dir / "metrics.jsonl"
        self.state = run_checkpoint.LoopState(counters={k: 0 for k in ACCOUNT + FAULTS})
        ckpt = run_checkpoint.latest(self.run_dir) if self.resume_from_disk else None
        self.epoch = 0  # bumped by a learner rollback: results of older epochs are ignored
        self.published = 0
        self._restore(ckpt, first=True)
        self.t_start = t_start
        self._interval_reset()
        bar = self._progress_bar()
        state = "completed"
        try:
            while self.state.step < spec.schedule.steps:
                want = self._wanted()
                if want == CANCEL:
                    state = "cancelled"
                    break
                if want == PAUSE:
                    if not self._pause_point():
                        stopped = self._stop_when_paused and self._flag != CANCEL
                        state = "paused" if stopped else "cancelled"
                        break
                    continue
                self._dispatch()
                self._maybe_train()
                self._wait_and_handle(timeout=0.5)
                if bar is not None and bar.n != self.state.step:
                    bar.update(self.state.step - bar.n)
            if state == "completed":
                self._drain_learner()
                self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
            in_learner = [g.cursor for g in self.learner_call[1]] if self.learner_call else []
            unused = sorted(set(self._live_cursors()) | set(self.queue) | set(in_learner))
            self._shutdown_inflight()
        self.state.counters["unused"] = len(unused)
        self.status = {"state": state, "step": self.state.step}
        result = RunResult(state, self.state.step, self.state.version, dict(self.state.counters),
                           list(self.state.trained), unused, time.perf_counter() - t_start, str(self.run_dir),
                           self._read_history())
        self._teardown()
        return result

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.spec.schedule.steps, initial=self.state.step, desc=f"run {self.run_id}",
                    unit="step", dynamic_ncols=True)

    # ---- restore / rollback ---------------------------------------------------------------------
    def _restore(self, ckpt: Path | None, first: bool) -> None:
        """Set the loop (and the learner) to checkpoint ``ckpt`` (None: the start of the run)."""
        faults = {k: self.state.counters.get(k, 0) for k in FAULTS}
        if ckpt is not None:
            self.state = run_checkpoint.read_state(ckpt)
        elif not first:
            self.state = run_checkpoint.LoopState(counters={k: 0 for k in ACCOUNT + FAULTS})
        for k in ACCOUNT + FAULTS:
            self.state.counters.setdefault(k, 0)
        if not first:
            self.state.counters.update(faults)
        self.queue: collections.deque[int] = collections.deque(sorted(self.state.pending))
        self.inflight_gen: dict[ray.ObjectRef, _Gen] = {}
        self.inflight_score: dict[ray.ObjectRef, _Score] = {}
        self.score_retry: list[tuple[float, ScoredGroup]] = []
        self.buffer: dict[int, ScoredGroup] = {}
        self.learner_call: tuple[GroupCall, list[ScoredGroup]] | None = None
        self.sync_calls: dict[ray.ObjectRef, tuple[int, int, float]] = {}
        self.constant_drops_this_step = 0
        self.last_sync_s = float("nan")
        if first:
            self.published = 0
            self._engines.loaded_version = [-1] * len(self._engines.engines)  # shared engines: forget older runs
        else:
            try:  # generation for the rolled-back policy is void
                self._engines.cancel()
            except RayActorError:
                pass
            for clock in (self.gen_clock, self.score_clock, self.learner_clock):
                clock.active = 0
        self._learner.wait_ready()  # a learner that cannot be placed fails the run, with a reason
        if first and ckpt is None:
            self._truncate_history(0)
            version = self._learner.get_version()
        else:
            version = max(self.published + 1, self.state.version) if not first else self.state.version
            version = self._learner.restore(None if ckpt is None else str(ckpt), version)
            self._truncate_history(self.state.history_len)
        self.state.version = version
        self._publish(version, wait=True)

    def _rollback(self, reason: str) -> None:
        """The learner died: restart from the latest checkpoint, redo what was trained since."""
        log.warning("learner lost (%s); rolling back to the latest checkpoint", reason)
        self.state.counters["faults_learner"] += 1
        self._learner.restart()  # one actor: Ray restarts it; a group: every rank, re-formed
        ckpt = run_checkpoint.latest(self.run_dir)
        kept = run_checkpoint.read_state(ckpt) if ckpt else run_checkpoint.LoopState()
        since, rolled = kept.step, len(self.state.trained) - len(kept.trained)
        self.state.counters["rolled_back"] += rolled
        self.epoch += 1
        self._restore(ckpt, first=False)
        self._event("log", {"message": f"learner restarted ({reason}); rolled back to step {since}, "
                                       f"{rolled} trained groups will be redone"})

    # ---- dispatch -------------------------------------------------------------------------------
    def _live_cursors(self) -> list[int]:
        out = [c for g in self.inflight_gen.values() for c in g.cursors]
        out += [s.group.cursor for s in self.inflight_score.values()]
        out += [g.cursor for _, g in self.score_retry]
        out += list(self.buffer)
        return out

    def _may_dispatch(self) -> bool:
        live = len(self._live_cursors())
        steps_ahead = self.state.version + (1 if self.learner_call else 0) + live // self.P
        synced = min(self._engines.loaded_version)
        return steps_ahead - synced <= self.s_max

    def _next_cursors(self, n: int) -> list[int]:
        out = []
        while len(out) < n and self.queue:
            out.append(self.queue.popleft())
        while len(out) < n:
            out.append(self.state.next_cursor)
            self.state.next_cursor += 1
            self.state.counters["dispatched"] += 1
        return out

    def _dispatch(self) -> None:
        n_eng = len(self._engines.engines)
        busy = collections.Counter(g.engine for g in self.inflight_gen.values())
        while self._may_dispatch():
            free = [i for i in range(n_eng) if busy[i] < 2]  # one running, one queued behind it
            if not free:
                return
            i = min(free, key=lambda e: busy[e])
            cursors = self._next_cursors(self.P)
            self._submit_gen(i, cursors)
            busy[i] += 1

    def _submit_gen(self, i: int, cursors: list[int]) -> None:
        r = self.spec.rollout
        prompts = [self._prompt_ids(c) for c in cursors]
        seeds = [group_seed(self.spec.data.seed, c) for c in cursors]
        sampling = {"n": r.samples_per_prompt, "temperature": r.temperature, "top_p": r.top_p,
                    "max_tokens": r.max_tokens}
        try:
            ref = self._engines.submit(i, prompts, sampling, seeds)
        except Exception as e:  # noqa: BLE001 - recovering the engine failed: put the work back
            log.warning("engine %d unavailable (%s)", i, e)
            self.queue.extendleft(reversed(cursors))
            raise
        self.inflight_gen[ref] = _Gen(i, cursors, self.epoch)
        self.gen_clock.start()

    def _item(self, cursor: int):
        return self.items[data_index(cursor, len(self.items), self.spec.data.seed)]

    def _prompt_ids(self, cursor: int) -> list[int]:
        cache = self._ids_cache
        idx = data_index(cursor, len(self.items), self.spec.data.seed)
        if idx not in cache:
            cache[idx] = self.tokenizer.encode(self.items[idx].prompt, add_special_tokens=False)
        return cache[idx]

    # ---- completions ----------------------------------------------------------------------------
    def _wait_and_handle(self, timeout: float) -> None:
        self._resubmit_scores()
        if self.learner_call and not self.learner_call[0].pending():
            self._on_trained()  # every rank answered since the last wait
        refs = list(self.inflight_gen) + list(self.inflight_score) + list(self.sync_calls)
        refs += self.learner_call[0].pending() if self.learner_call else []
        if not refs:
            time.sleep(min(timeout, 0.05))
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        # take everything already finished, not just the first
        if done:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in self.inflight_gen:
                self._on_generated(ref)
            elif ref in self.inflight_score:
                self._on_scored(ref)
            elif ref in self.sync_calls:
                self._on_synced(ref)
            elif self.learner_call and ref in self.learner_call[0].refs:
                self._on_trained()

    def _on_generated(self, ref) -> None:
        g = self.inflight_gen.pop(ref)
        self.gen_clock.stop()
        batch = _result(ref)
        if g.epoch != self.epoch:
            return
        if batch is _DIED:
            log.warning("engine %d died mid-batch; re-dispatching %d groups", g.engine, len(g.cursors))
            self._redispatch(g.cursors)
            self._engines.recover(g.engine)
            self._event("log", {"message": f"rollout engine {g.engine} restarted; "
                                           f"{len(g.cursors)} groups re-dispatched"})
            return
        if not self._engines.accept(g.engine, batch):  # served by a restarted engine's disk weights
            self._redispatch(g.cursors)
            return
        self.iv_tokens += batch.num_generated_tokens
        self.iv_engine_s += batch.seconds
        self.iv_spec = self.iv_spec + batch.spec
        self.cum_spec = batch.cumulative_spec
        groups = {c: ScoredGroup(c, list(self._prompt_ids(c))) for c in g.cursors}
        redo: set[int] = set()
        for s in batch.samples:
            c = g.cursors[s.prompt_index]
            if s.finish_reason == "cancelled":
                redo.add(c)
                continue
            grp = groups[c]
            grp.responses.append(list(s.token_ids))
            grp.logprobs.append(list(s.logprobs))
            grp.versions.append(s.policy_version)
            grp.finish_reasons.append(s.finish_reason)
            grp.texts.append(s.text)
        for c in g.cursors:
            if c in redo:
                self.state.counters["redispatched"] += 1
                self.queue.appendleft(c)
            else:
                self._submit_score(groups[c])

    def _redispatch(self, cursors: list[int]) -> None:
        """A chunk lost with its engine: its groups go first in the queue, in order."""
        self.state.counters["faults_rollout"] += 1
        self.state.counters["redispatched"] += len(cursors)
        self.queue.extendleft(reversed(cursors))

    def _submit_score(self, grp: ScoredGroup) -> None:
        k = self._next_reward = (self._next_reward + 1) % len(self._rewards)
        ref = self._rewards[k].score_group.remote(reward_items(grp, self._item(grp.cursor)))
        self.inflight_score[ref] = _Score(k, grp, self.epoch)
        self.score_clock.start()

    def _resubmit_scores(self) -> None:
        now = time.monotonic()
        ready = [g for t, g in self.score_retry if t <= now]
        self.score_retry = [(t, g) for t, g in self.score_retry if t > now]
        for g in ready:
            self._submit_score(g)

    def _on_scored(self, ref) -> None:
        s = self.inflight_score.pop(ref)
        self.score_clock.stop()
        verdicts = _result(ref)
        if s.epoch != self.epoch:
            return
        if verdicts is _DIED:
            log.warning("reward actor %d died; re-scoring group %d", s.actor, s.group.cursor)
            self.state.counters["faults_reward"] += 1
            self.score_retry.append((time.monotonic() + 0.5, s.group))
            return
        grp = s.group
        grp.rewards = [float(v["reward"]) for v in verdicts]
        grp.outcomes = [str(v["outcome"]) for v in verdicts]
        if self.spec.reward.on_error == "drop" and not self._drop_failed_samples(grp):
            return
        if self.dynamic and grp.constant_reward():
            budget = (self.spec.schedule.max_refill_factor - 1) * self.P
            if self.constant_drops_this_step < budget:
                self.constant_drops_this_step += 1
                self.state.counters["dropped_constant"] += 1
                self.iv_dropped_constant += 1
                return
        self.buffer[grp.cursor] = grp

    def _drop_failed_samples(self, grp: ScoredGroup) -> bool:
        """Take the samples whose grading failed out of ``grp`` (counted per outcome); False when
        fewer than 2 valid samples are left: the group is dropped whole and counted."""
        kind = self._item(grp.cursor).kind
        failed = [grader_failed(kind, o) for o in grp.outcomes]
        if not any(failed):
            return True
        for outcome in grp.drop_samples(failed):
            self.iv_dropped_samples[outcome] += 1
        if len(grp.responses) >= 2:  # a group to compare against: GRPO over the valid members
            return True
        self.state.counters["dropped_errors"] += 1
        self.iv_dropped_errors += 1
        return False

    # ---- training -------------------------------------------------------------------------------
    def _maybe_train(self) -> None:
        if self.learner_call is not None:
            return
        v = self.state.version
        for c in sorted(self.buffer):
            if v - self.buffer[c].behaviour_version > self.s_max:
                del self.buffer[c]
                self.state.counters["dropped_stale"] += 1
                self.iv_dropped_stale += 1
        if len(self.buffer) < self.P:
            return
        cursors = sorted(self.buffer)[: self.P]
        groups = [self.buffer.pop(c) for c in cursors]
        batch = to_train_batch(groups, pad_id=self.tokenizer.pad_token_id or 0)
        self.learner_call = (self._learner.step(batch), groups)
        self.learner_clock.start()
        self.constant_drops_this_step = 0

    def _drain_learner(self) -> None:
        while self.learner_call is not None or self.sync_calls:
            self._wait_and_handle(timeout=1.0)

    def _on_trained(self) -> None:
        """A rank answered: the step's metrics once every rank has, a rollback if one died."""
        call, groups = self.learner_call
        try:
            metrics = call.result()
        except LearnerLost as e:
            self.learner_call = None
            self.learner_clock.stop()
            self._rollback(f"died during a step: {e}")
            return
        if metrics is None:  # other ranks still at work
            return
        self.learner_call = None
        self.learner_clock.stop()
        st = self.state
        st.step += 1
        # the learner reports the version it trained from; an all-filtered batch leaves it as it was
        st.version = int(metrics["learner/version"]) + (0 if metrics.get("optim/skipped_empty_batch") else 1)
        st.trained += [g.cursor for g in groups]
        st.counters["trained"] += len(groups)
        self._report(metrics, groups)
        if st.version > self.published and (st.step % self.spec.schedule.weight_sync_every == 0
                                            or st.step >= self.spec.schedule.steps):
            self._publish(st.version, wait=False)
        every = self.spec.schedule.checkpoint_every
        if every and st.step % every == 0 and st.step < self.spec.schedule.steps:
            self._checkpoint()

    # ---- weights --------------------------------------------------------------------------------
    def _weight_transport(self) -> str:
        """``weight_sync.transport`` resolved once, where the learner and the engines were placed."""
        if self._transport is None:
            res, ws = self.spec.resources, self.spec.weight_sync
            nodes = [i.get("node_id", "") for i in ray.get([e.info.remote() for e in self._engines.engines])]
            self._transport, why = weight_transport.resolve(ws.transport, self._learner.node_id(), nodes,
                                                            res.learner_gpus > 0 or res.gpus_per_engine > 0)
            self._backend = "nccl" if res.learner_gpus > 0 and res.gpus_per_engine > 0 else "gloo"
            if self._transport == "broadcast":
                # an engine that missed a broadcast (restarted, replaced) gets the current weights
                # once through the object store; calls on one actor run in order, so no step
                # lands between the version and the weights
                self._engines.fetch_weights = lambda: (self._learner.get_version(), self._learner.weights())
            log.info("weight_sync.transport: %s (%s)", self._transport, why)
        return self._transport

    def _publish(self, version: int, wait: bool) -> None:
        t0 = time.perf_counter()
        try:
            if self._weight_transport() == "broadcast":
                send, refs = self._engines.publish_broadcast(version, self._learner,
                                                             self.spec.weight_sync.bucket_mib << 20, self._backend)
                try:
                    send.wait()
                except RayTaskError as e:  # an engine died mid-transfer; _on_synced recovers it
                    log.warning("weight broadcast of version %d failed (%s); the group is re-formed", version, e)
                    self._engines.drop_weight_group()
            else:
                ref = self._learner.weights()
                refs = self._engines.publish_ref(version, ref)
        except (RayActorError, LearnerLost):
            self._rollback("died while exporting weights")
            return
        self.published = max(self.published, version)
        for i, r in enumerate(refs):
            self.sync_calls[r] = (i, version, t0)
        if wait:
            while self.sync_calls:
                self._wait_and_handle(timeout=1.0)

    def _on_synced(self, ref) -> None:
        i, version, t0 = self.sync_calls.pop(ref)
        try:
            res = _result(ref)
        except RayTaskError:
            if self._transport != "broadcast":
                raise
            res = _DIED  # its transfer broke (a peer died): reload it like a dead engine
        if res is _DIED:
            self.state.counters["faults_rollout"] += 1
            self._engines.recover(i)  # reloads the latest weights
            return
        self._engines.confirm(i, version, True)
        self.last_sync_s = time.perf_counter() - t0

    # ---- checkpoints ----------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        st = self.state
        tmp = run_checkpoint.begin(self.run_dir, st.step)
        try:
            self._learner.save(str(tmp), self.spec.checkpointing.save_optimizer)
        except (RayActorError, LearnerLost):
            self._rollback("died while checkpointing")
            return
        st.pending = sorted(set(self._live_cursors()) | set(self.queue))
        st.history_len = self._history_len
        path = run_checkpoint.commit(self.run_dir, tmp, st, self.spec.checkpointing.keep_last)
        self._event("checkpoint", {"step": st.step, "policy_version": st.version, "path": str(path / "policy")})

    def _pause_point(self) -> bool:
        """Drain in-flight work, finish the running step, checkpoint, wait. False = cancelled."""
        self.status = {"state": "pausing", "step": self.state.step}
        while self.inflight_gen or self.inflight_score or self.score_retry or self.learner_call or self.sync_calls:
            if self._wanted() == CANCEL:
                return False
            self._wait_and_handle(timeout=0.5)
        self._checkpoint()
        self._event("log", {"message": f"paused at step {self.state.step}; checkpoint written"})
        self.status = {"state": "paused", "step": self.state.step}
        if self._stop_when_paused:
            return False
        while True:
            want = self._wanted()
            if want == CANCEL:
                return False
            if want == RUN:
                self._interval_reset()
                self.status = {"state": "running", "step": self.state.step}
                return True
            self._wake.wait(0.2)
            self._wake.clear()

    # ---- metrics --------------------------------------------------------------------------------
    def _interval_reset(self) -> None:
        self.iv_t0 = time.perf_counter()
        self.iv_tokens = 0
        self.iv_engine_s = 0.0
        self.iv_spec = SpecStats()
        self.iv_dropped_stale = 0
        self.iv_dropped_constant = 0
        self.iv_dropped_errors = 0
        self.iv_dropped_samples: collections.Counter[str] = collections.Counter()
        for clock in (self.gen_clock, self.score_clock, self.learner_clock):
            clock.iv_busy0 = clock.read()

    def _reward_snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            snaps = ray.get([a.metrics.remote() for a in self._rewards], timeout=5)
        except (RayActorError, GetTimeoutError):
            return out
        for snap in snaps:
            for k, v in snap.items():
                if "latency" in k:
                    out[k] = max(out.get(k, 0.0), v)
                else:
                    out[k] = out.get(k, 0.0) + v
        return out

    def _report(self, learner_metrics: dict[str, float], groups: list[ScoredGroup]) -> None:
        now = time.perf_counter()
        wall = max(now - self.iv_t0, 1e-9)
        st = self.state
        m = dict(learner_metrics)
        m.update(self._reward_snapshot())
        m.update(self.iv_spec.as_metrics())
        m.update(self.cum_spec.as_metrics("rollout/cum_"))
        n_eng = len(self._engines.engines)
        m.update({
            "policy_version": float(st.version),
            "rollout/tokens_per_s": self.iv_tokens / wall,
            "rollout/engine_tokens_per_s": self.iv_tokens / self.iv_engine_s if self.iv_engine_s else 0.0,
            "rollout/num_tokens": float(self.iv_tokens),
            "batch/groups_dropped_stale": float(self.iv_dropped_stale),
            "loop/groups_dropped_constant": float(self.iv_dropped_constant),
            "loop/groups_dropped_errors": float(self.iv_dropped_errors),
            "loop/samples_dropped_errors": float(sum(self.iv_dropped_samples.values())),
            "loop/buffer_groups": float(len(self.buffer)),
            "loop/inflight_groups": float(len(self._live_cursors()) - len(self.buffer)),
            "loop/idle_frac_rollout": 1.0 - min(1.0, (self.gen_clock.read() - self.gen_clock.iv_busy0) / wall),
            "loop/idle_frac_reward": 1.0 - min(1.0, (self.score_clock.read() - self.score_clock.iv_busy0) / wall),
            "loop/idle_frac_learner": 1.0 - min(1.0, (self.learner_clock.read() - self.learner_clock.iv_busy0) / wall),
            "loop/engines": float(n_eng),
            "loop/step_wall_s": wall,
            "loop/trained_samples_per_s": sum(len(g.responses) for g in groups) / wall,
            "sync/weight_s": self.last_sync_s,
            "time/elapsed_s": now - self.t_start,
            "time/eta_s": (now - self.t_start) / max(st.step, 1) * (self.spec.schedule.steps - st.step),
        })
        failures = sorted({o for outs in GRADER_FAILURES.values() for o in outs})
        m.update({f"reward/dropped/{o}": float(self.iv_dropped_samples[o]) for o in failures})
        m.update({f"loop/{k}_total": float(v) for k, v in st.counters.items()})
        m = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with self.history_path.open("a") as f:
            f.write(json.dumps({"step": st.step, **m}) + "\n")
        self._history_len += 1
        if self.sink is not None and not self.sink.report_step(self.run_id, st.step, m):
            self._flag = CANCEL  # the registry says the run is over (cancelled through the API)
        if self.progress:
            from tqdm import tqdm

            tqdm.write(self._progress_line(m))
        self.status = {"state": "running", "step": st.step, "version": st.version}
        self._interval_reset()

    def _progress_line(self, m: dict[str, float]) -> str:
        parts = [f"step {self.state.step}/{self.spec.schedule.steps}",
                 f"reward {m.get('batch/reward_mean', float('nan')):.3f}",
                 f"acc {m.get('batch/accuracy', float('nan')):.3f}",
                 f"clip {m.get('ratio/clip_frac', float('nan')):.3f}"]
        lam = [v for k, v in m.items() if k.startswith("mtp/lambda/")]
        if lam:
            parts.append("λ " + ",".join(f"{x:.2f}" for x in lam))
        parts += [f"accept {m.get('rollout/spec_acceptance_rate', 0.0):.2f}",
                  f"{m.get('rollout/tokens_per_s', 0.0):.0f} tok/s",
                  f"stale {m.get('batch/staleness_mean', 0.0):.1f}",
                  f"ETA {m.get('time/eta_s', 0.0):.0f}s"]
        return " | ".join(parts)

    def _truncate_history(self, n: int) -> None:
        lines = self.history_path.read_text().splitlines() if self.history_path.exists() else []
        self.history_path.write_text("".join(x + "\n" for x in lines[:n]))
        self._history_len = min(n, len(lines))

    def _read_history(self) -> list[dict[str, float]]:
        if not self.history_path.exists():
            return []
        return [json.loads(x) for x in self.history_path.read_text().splitlines() if x.strip()]

    def _event(self, kind: str, payload: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.event(self.run_id, kind, payload)
        if self.progress and kind == "log":
            from tqdm import tqdm

            tqdm.write(payload.get("message", ""))

    # ---- shutdown -------------------------------------------------------------------------------
    def _shutdown_inflight(self) -> None:
        """Stop generation still in flight and wait for it, so shared engines are free again."""
        if self.inflight_gen:
            try:
                self._engines.cancel()
            except RayActorError:
                pass
            try:
                ray.wait(list(self.inflight_gen), num_returns=len(self.inflight_gen), timeout=60)
            except Exception:  # noqa: BLE001
                pass
        if self.inflight_score:
            ray.wait(list(self.inflight_score), num_returns=len(self.inflight_score), timeout=60)
        for ref in list(self.sync_calls):
            try:
                ray.get(ref, timeout=60)
            except Exception:  # noqa: BLE001
                pass

    def _teardown(self) -> None:
        if self._owned_learner:
            self._learner.kill()
        for a in self._owned:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self._owned_engines:
            self._engines.kill()
        if self._pg is not None:
            ray.util.remove_placement_group(self._pg)
