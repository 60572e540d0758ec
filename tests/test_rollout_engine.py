"""Rollout engine robustness on a real vLLM engine (tiny MiMo-layout model): cancelling a batch in
flight (and the calls queued behind it) through the threaded actor, the engine serving afterwards,
and cumulative tokens/s and spec-decode metrics reported with every batch."""

from __future__ import annotations

import time

import pytest

from rollout.actor import create_engine_actor

pytestmark = pytest.mark.integration

PROMPTS = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(6)]
# Long enough that it is still running when cancelled (24 x 2 sequences x 400 tokens).
LONG = {"n": 2, "temperature": 1.0, "max_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(ray_session, tiny_ckpt):
    actor = create_engine_actor(
        {"model": str(tiny_ckpt), "num_speculative_tokens": 1, "max_model_len": 512, "kv_cache_gib": 0.1}
    )
    ray_session.get(actor.info.remote())
    yield actor
    ray_session.kill(actor)


def test_cancel_aborts_the_batch_in_flight_and_the_queued_one(ray_session, engine):
    first = engine.generate.remote(PROMPTS * 4, LONG)
    queued = engine.generate.remote(PROMPTS * 4, LONG)
    time.sleep(1.5)  # the first batch is decoding, the second waits for the engine's lock
    assert ray_session.get(engine.cancel.remote()) == 2
    a, b = ray_session.get([first, queued])
    # Aborted, not run to the end: samples without tokens (a finished one would have 400). The
    # abort lands within one engine step (~20 ms measured in-process on an idle core); no wall-clock
    # bound is asserted because other jobs on the shared cores stretch it by seconds.
    for batch in (a, b):
        assert batch.cancelled and len(batch.samples) == 48
        assert {s.finish_reason for s in batch.samples} <= {"cancelled", "length"}
        assert any(s.finish_reason == "cancelled" and s.token_ids == [] for s in batch.samples)
    # The engine keeps serving: a later call is not cancelled and runs to the end.
    after = ray_session.get(engine.generate.remote(PROMPTS, {"n": 1, "temperature": 0.0, "max_tokens": 8}))
    assert not after.cancelled and all(len(s.token_ids) == 8 for s in after.samples)
    assert ray_session.get(engine.cancel.remote()) == 0  # nothing in flight


def test_batches_report_cumulative_tokens_per_s_and_acceptance(ray_session, engine):
    sampling = {"n": 2, "temperature": 1.0, "max_tokens": 16, "seed": 1}
    a = ray_session.get(engine.generate.remote(PROMPTS, sampling))
    b = ray_session.get(engine.generate.remote(PROMPTS, sampling))
    assert b.cumulative_tokens == a.cumulative_tokens + b.num_generated_tokens
    assert b.cumulative_seconds == pytest.approx(a.cumulative_seconds + b.seconds)
    assert b.cumulative_spec.num_drafts == a.cumulative_spec.num_drafts + b.spec.num_drafts > 0
    assert b.tokens_per_s > 0 and b.cumulative_tokens_per_s > 0
    m = b.metrics()
    for key in ("rollout/tokens_per_s", "rollout/cum_tokens_per_s", "rollout/spec_acceptance_rate",
                "rollout/cum_spec_acceptance_rate", "rollout/cum_spec_mean_acceptance_length"):
        assert key in m
