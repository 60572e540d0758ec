"""An engine that dies is restarted by Ray and reloaded with the latest published weights before it
serves again: killed mid-batch (the batch is retried) and killed while idle (the next batch notices
the new engine instance). Real vLLM engine, real process kill, learner-parity log-probs."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from learner.checkpoint import iter_export_tensors, load_policy
from parity import max_logprob_error
from rollout.group import EngineGroup

pytestmark = pytest.mark.integration

PROMPTS = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(6)]


def _kill(ray, group) -> str:
    info = ray.get(group.engines[0].info.remote())
    os.kill(info["pid"], signal.SIGKILL)
    return info["engine_id"]


def test_dead_engine_comes_back_with_the_latest_weights(ray_session, tiny_ckpt):
    group = EngineGroup(
        {"model": str(tiny_ckpt), "num_speculative_tokens": 1, "max_model_len": 512, "kv_cache_gib": 0.1},
        actor_options={"max_restarts": 3},
    )
    try:
        policy = load_policy(tiny_ckpt)
        torch.manual_seed(5)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        group.publish(1, iter_export_tensors(policy))

        # Killed mid-batch: the call fails inside the group, which waits for Ray's restart, reloads
        # version 1 and re-runs the batch.
        sampling = {"n": 2, "temperature": 1.0, "max_tokens": 200, "ignore_eos": True}
        out: dict = {}
        worker = threading.Thread(target=lambda: out.update(batch=group.generate(PROMPTS * 2, sampling)))
        info = ray_session.get(group.engines[0].info.remote())
        worker.start()
        time.sleep(1.0)
        os.kill(info["pid"], signal.SIGKILL)
        worker.join(timeout=300)
        batch = out["batch"]
        assert group.recoveries >= 1 and batch.engine_id != info["engine_id"]
        assert {s.policy_version for s in batch.samples} == {1}
        assert all(len(s.token_ids) == 200 for s in batch.samples)

        # Killed while idle: the next batch comes back from a new engine instance, so the group
        # reloads version 1 and runs it again.
        old = _kill(ray_session, group)
        time.sleep(1.0)
        batch = group.generate(PROMPTS, {"n": 2, "temperature": 1.0, "max_tokens": 24, "seed": 3})
        assert batch.engine_id != old and {s.policy_version for s in batch.samples} == {1}
        assert max_logprob_error(policy, batch) <= 1e-3
        assert max_logprob_error(load_policy(tiny_ckpt), batch) > 1e-2  # not the on-disk weights
    finally:
        group.kill()
