"""``resources.cpu_nice``: every process of a run at a lower CPU priority (`runtime.cpu_priority`).

Unit tests (no Ray): `lower_cpu_priority` in a child Python process — niceness cannot be lowered
again without privileges, so the pytest process itself must keep its own — sets every thread
(also threads started while it runs), later threads and child processes inherit it, and it never
lowers a niceness. Integration: a REAL tiny-model run through the REST API (`real_spec`, the
controller launcher) with ``cpu_nice`` set; every thread of its run actor, rollout engine (vLLM
in-process), learner and reward actor, and of their child processes (the math-verify worker),
runs at that niceness (without it, Ray leaves some of each worker's threads at the raylet's
niceness and moves the rest by +15) while the API process keeps its own. Niceness is read from
``/proc/<pid>/task/<tid>/stat`` (field 19); Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.cpu_priority import lower_cpu_priority, thread_niceness
from services.spec import ResourcesSpec

ROOT = Path(__file__).resolve().parents[1]
BASE = os.getpriority(os.PRIO_PROCESS, 0)  # this process's niceness: Ray and the API start from it

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")


def _in_child(body: str) -> dict:
    """Run ``body`` (which sets ``out``) in a fresh Python process; return ``out``."""
    code = ("import json, os, subprocess, sys, threading, time\n"
            "from runtime.cpu_priority import lower_cpu_priority, thread_niceness\n"
            "out = {}\n" + textwrap.dedent(body) + "\nprint(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(BASE > 14, reason="needs room for two niceness levels above this process's")
def test_every_thread_is_reniced_later_threads_and_children_inherit_and_it_never_decreases():
    target, higher = BASE + 3, BASE + 5
    out = _in_child(f"""
        stop = threading.Event()
        waiting = [threading.Thread(target=stop.wait) for _ in range(6)]
        for t in waiting:
            t.start()
        out["before"] = sorted(set(thread_niceness().values()))

        # one thread already nicer than the target, set behind the helper's back
        high = threading.Thread(target=stop.wait)
        high.start()
        os.setpriority(os.PRIO_PROCESS, high.native_id, {higher})

        # a thread that keeps starting threads while the helper runs: each pass may find new ones
        spawned = []
        def spawner():
            while not stop.is_set() and len(spawned) < 300:
                t = threading.Thread(target=stop.wait)
                t.start()
                spawned.append(t)
        sp = threading.Thread(target=spawner)
        sp.start()
        time.sleep(0.01)
        out["changed"] = lower_cpu_priority({target})
        out["after"] = thread_niceness()
        out["high_after"] = os.getpriority(os.PRIO_PROCESS, high.native_id)

        # threads started afterwards, by the main thread and by an older thread, inherit it
        seen = []
        def record():
            seen.append(os.getpriority(os.PRIO_PROCESS, 0))
        t = threading.Thread(target=record); t.start(); t.join()
        def start_from_here():
            t2 = threading.Thread(target=record); t2.start(); t2.join()
        t = threading.Thread(target=start_from_here); t.start(); t.join()
        out["later_threads"] = seen
        out["child_process"] = int(subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
            capture_output=True, text=True, check=True).stdout)

        # never lowers: a smaller value (or 0) changes nothing
        out["again_lower"] = lower_cpu_priority({BASE + 1})
        out["again_zero"] = lower_cpu_priority(0)
        out["final"] = thread_niceness()
        stop.set()
        out["threads"] = len(out["final"])
    """)
    assert out["before"] == [BASE]
    assert out["changed"] >= 8  # main, 6 waiting, the spawner, and what it started meanwhile
    high_tid_values = [v for v in out["after"].values() if v == higher]
    assert len(high_tid_values) == 1 and out["high_after"] == higher  # left nicer than asked
    assert sorted(set(out["after"].values())) == [target, higher]  # every other thread at the target
    assert out["later_threads"] == [target, target]
    assert out["child_process"] == target
    assert out["again_lower"] == 0 and out["again_zero"] == 0
    assert sorted(set(out["final"].values())) == [target, higher]
    assert out["threads"] >= 10


@pytest.mark.parametrize("bad", [-1, 20, 2.5, True, "5"])
def test_invalid_niceness_is_refused_before_anything_changes(bad):
    with pytest.raises(ValueError, match="cpu_nice must be an integer from 0"):
        lower_cpu_priority(bad)
    assert set(thread_niceness().values()) == {BASE}


def test_spec_field_defaults_to_unchanged_and_is_bounded():
    assert ResourcesSpec().cpu_nice == 0
    assert ResourcesSpec(cpu_nice=19).cpu_nice == 19
    for bad in (-1, 20):
        with pytest.raises(ValidationError, match="cpu_nice"):
            ResourcesSpec(cpu_nice=bad)


# ---- a real run ---------------------------------------------------------------------------------

def _descendants(pids: list[int]) -> list[int]:
    """Every process below ``pids`` (children, grandchildren, …), from /proc/*/stat."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parent[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _run_actors(ray, run_id: str) -> dict[str, list[int]]:
    """Class name → pids of the run's actor and of the actors it owns (learner, engines, reward
    actors), from the GCS actor table: owned actors name the run actor's address as their owner."""
    from ray._private.state import actors

    alive = [a for a in actors().values() if a["State"] == "ALIVE"]
    run = next(a for a in alive if a["Name"] == f"mtprl-run-{run_id}")
    addr = (run["Address"]["IPAddress"], run["Address"]["Port"])
    out: dict[str, list[int]] = {"RunActor": [run["Pid"]]}
    for a in alive:
        if (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) == addr:  # qualified name's last part
            out.setdefault(a["ActorClassName"].rsplit(".", 1)[-1], []).append(a["Pid"])
    return out


@pytest.mark.integration
@pytest.mark.skipif(BASE >= 19, reason="needs room above the niceness Ray is started with")
def test_a_real_runs_processes_all_run_at_its_cpu_nice(ray_session, tiny_ckpt, tmp_path):
    from learner.tiny import write_toy_dataset
    from services.registry import EmbeddedRedis
    from test_api_support import ApiServer, create_run, end_run, gcs_address, real_spec, wait_for

    # 19, the recommended value: without it a worker's threads are split between the raylet's
    # niceness (BASE; Ray's own gRPC and event-loop threads) and BASE + 15 (RAY_worker_niceness)
    nice = 19
    data = write_toy_dataset(tmp_path / "toy.jsonl", gold="21")
    spec = real_spec(tiny_ckpt, data, 1000, name="tiny-nice",
                     resources={"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1,
                                "cpu_nice": nice})
    (tmp_path / "api").mkdir()
    srv = ApiServer(tmp_path / "api", gcs_address(ray_session), launcher="controller")
    rid = None
    try:
        with srv.client() as api:
            run = create_run(api, spec)
            rid = run["id"]
            assert run["spec"]["resources"]["cpu_nice"] == nice
            # two steps: the engine has generated, the reward actor has started its math worker
            wait_for(lambda: (lambda x: x["step"] >= 2 or x["state"] not in ("pending", "running"))(
                api.get(f"/v1/runs/{rid}").json()), 300, interval=0.5, what="two steps")
            assert api.get(f"/v1/runs/{rid}").json()["state"] == "running"

            procs = _run_actors(ray_session, rid)
            assert set(procs) == {"RunActor", "RolloutEngineActor", "LearnerWorker", "RewardActor"}, procs
            children = {kind: _descendants(pids) for kind, pids in procs.items()}
            assert children["RewardActor"], "the reward actor's math-verify worker process"
            every = [p for pids in procs.values() for p in pids] + [c for cs in children.values() for c in cs]
            threads = {pid: thread_niceness(pid) for pid in every}
            wrong = {pid: t for pid, t in threads.items() if set(t.values()) != {nice}}
            assert not wrong, f"threads not at niceness {nice}: {wrong}"
            assert len(threads[procs["RolloutEngineActor"][0]]) > 4  # vLLM's and torch's threads too
            # the control plane keeps its priority
            assert set(thread_niceness(srv.proc.pid).values()) == {BASE}
            assert api.post(f"/v1/runs/{rid}/cancel").status_code == 200
    finally:
        with srv.client() as api:
            end_run(api, rid)
        srv.stop()
        EmbeddedRedis(tmp_path / "api").stop()
