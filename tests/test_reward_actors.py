"""Reward actors on Ray: verification off the actor's main thread gives the same verdicts as in
the main thread here; groups mix math and code; metrics count every outcome; concurrency is bounded."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from reward.actors import RewardMetrics, RewardScorer
from reward.config import MathConfig, RewardActorConfig
from reward.math_verify_worker import MathVerifierPool
from reward.schema import Verdict

sys.path.insert(0, str(Path(__file__).parent / "data" / "reward"))
from math_table import CASES  # noqa: E402

pytestmark = pytest.mark.integration

ADD = {"type": "assert", "entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


@pytest.fixture(scope="module")
def reward_ray():
    """A 2-CPU Ray for this module, shut down after it; a Ray already started by the session's
    `ray_session` fixture (other modules) is reused and left running."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    from services.local_ray import start_local_ray
    start_local_ray(2)
    yield ray
    ray.shutdown()


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_actor_matches_main_thread_and_counts_outcomes(reward_ray):
    ray = reward_ray
    from reward.actors import RewardActor

    # Two actors: verdicts are compared under generous deadlines (a loaded machine must not turn a
    # slow case into a timeout), while the adversarial item needs a short one to time out at all
    # (given 10 s, an idle machine finishes `(10^{100000})!` and grades it "wrong").
    slow_cfg = RewardActorConfig(math=MathConfig(num_workers=2, deadline_s=20.0, inner_timeout_s=10), max_concurrency=2)
    fast_cfg = RewardActorConfig(math=MathConfig(num_workers=2, deadline_s=3.0, inner_timeout_s=2), max_concurrency=2)
    actor = RewardActor.options(max_concurrency=2).remote(slow_cfg.model_dump())
    strict = RewardActor.options(max_concurrency=2).remote(fast_cfg.model_dump())
    try:
        assert ray.get(actor.on_main_thread.remote()) is False  # threaded actor: methods run off the main thread
        items = [{"kind": "math", "gold": g, "completion": c} for g, c, _ in CASES]
        remote = ray.get(actor.score_group.remote(items))
        with MathVerifierPool(slow_cfg.math) as pool:
            local = pool.verify_batch([(g, c) for g, c, _ in CASES])
        assert [r["outcome"] for r in remote] == [v.outcome for v in local] == [e for _, _, e in CASES]
        assert [r["reward"] for r in remote] == [v.reward for v in local]
        m = ray.get(actor.metrics.remote())
        n_ok = sum(e == "ok" for _, _, e in CASES)
        assert m["reward/math/ok"] == n_ok and m["reward/math/wrong"] == len(CASES) - n_ok
        assert m["reward/items"] == len(CASES)
        assert 0 < m["reward/latency_p50_s"] <= m["reward/latency_p95_s"] <= m["reward/latency_max_s"]

        code = [{"kind": "code", "gold": ADD, "completion": "```python\ndef add(a, b):\n    return a + b\n```"},
                {"kind": "code", "gold": ADD, "completion": "def add(a, b):\n    return a * b\n"},
                {"kind": "math", "gold": "1", "completion": r"\boxed{(10^{100000})!}"}]
        out = ray.get(strict.score_group.remote(code))
        assert [o["outcome"] for o in out] == ["ok", "wrong", "timeout"]
        m = ray.get(strict.metrics.remote())
        assert m["reward/math/timeout"] == 1 and m["reward/code/ok"] == 1 and m["reward/code/wrong"] == 1
        assert m["reward/math_worker_restarts"] == 0  # math-verify's own alarm fired first: no kill needed
        assert m["reward/sandbox_restarts"] == 0
        assert m["reward/items"] == 3
    finally:
        for a in (actor, strict):
            ray.get(a.shutdown.remote())
            ray.kill(a)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_groups_beyond_max_concurrency_wait():
    scorer = RewardScorer(RewardActorConfig(max_concurrency=1))
    slow = [{"kind": "code", "gold": ADD,
             "program": "import time\ndef add(a, b):\n    time.sleep(0.4)\n    return a + b\n"}]
    try:
        scorer.score_group(slow)  # warm the sandbox
        results: list[list[Verdict]] = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=lambda: results.append(scorer.score_group(slow))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.monotonic() - t0 >= 3 * 0.4  # serialised by the group semaphore
        assert [r[0].outcome for r in results] == ["ok"] * 3
    finally:
        scorer.close()


def test_metrics_snapshot_and_bad_kind():
    m = RewardMetrics(window=2)
    m.add("math", [Verdict("ok", 1.0, "", 0.1), Verdict("timeout", 0.0, "", 3.0), Verdict("error", 0.0, "", 0.2)])
    s = m.snapshot()
    assert s["reward/outcome/timeout"] == 1 and s["reward/outcome/error"] == 1 and s["reward/items"] == 3
    assert s["reward/latency_max_s"] == 3.0 and s["reward/latency_p50_s"] == 3.0  # window keeps the last 2
    with pytest.raises(ValueError, match="kind"):
        RewardScorer().score_group([{"kind": "poetry", "gold": "", "completion": ""}])
