"""Failed gradings are not rewards (`reward.on_error`): which outcomes count as the grader's
failure, how a group loses such samples before it becomes a batch, and that the learner's group
statistics then cover the valid members only. The run loop end to end (real reward actors, a
grader that errors on some answers) is in tests/test_run_loop.py."""

from __future__ import annotations


import pytest
import torch

from learner.advantages import grpo_advantages
from reward.schema import grader_failed
from services.batching import ScoredGroup, to_train_batch


def _group(cursor: int, rewards: list[float], outcomes: list[str]) -> ScoredGroup:
    n = len(rewards)
    return ScoredGroup(cursor, [1, 2, 3], responses=[[10 + j, 20 + j] for j in range(n)],
                       logprobs=[[-0.5, -0.25]] * n, versions=[0] * n, finish_reasons=["stop"] * n,
                       texts=[f"t{j}" for j in range(n)], rewards=list(rewards), outcomes=list(outcomes))


def test_grader_failures_are_the_graders_not_the_programs():
    assert grader_failed("math", "timeout") and grader_failed("math", "error")
    assert grader_failed("code", "error")
    # a program that runs past its limit or breaks the sandbox is judged, not excused
    assert not grader_failed("code", "timeout") and not grader_failed("code", "sandbox_violation")
    assert not any(grader_failed(k, o) for k in ("math", "code") for o in ("ok", "wrong"))


def test_a_group_that_loses_members_keeps_the_valid_members_advantages():
    """The failed sample leaves the batch, so its 0 reward moves neither the group mean nor the
    std: the advantages equal those of the group of valid samples alone."""
    grp = _group(5, [1.0, 0.0, 0.0, 1.0], ["ok", "error", "wrong", "ok"])
    gone = grp.drop_samples([o == "error" for o in grp.outcomes])
    assert gone == ["error"] and len(grp.responses) == len(grp.texts) == len(grp.versions) == 3
    batch = to_train_batch([grp, _group(6, [0.0, 1.0], ["wrong", "ok"])])
    assert batch.size == 5 and batch.correct.tolist() == [True, False, True, False, True]
    adv = grpo_advantages(batch.rewards, batch.group_ids, True, 1e-6)
    alone = grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.long), True, 1e-6)
    assert torch.allclose(adv[:3], alone)
    with pytest.raises(ValueError, match="flags"):
        grp.drop_samples([True])


def test_the_loop_drops_failed_samples_and_groups_left_too_small():
    from services.reward_routing import drop_failed_samples
    from services.run_context import IntervalStats

    stats, counters = IntervalStats(), {"dropped_errors": 0}
    keep = _group(0, [1.0, 0.0, 0.0, 0.0], ["ok", "timeout", "wrong", "error"])
    assert drop_failed_samples(keep, "math", stats, counters) is True
    assert keep.outcomes == ["ok", "wrong"] and keep.rewards == [1.0, 0.0]
    lost = _group(1, [0.0, 0.0, 1.0], ["error", "error", "ok"])  # one valid sample: nothing to compare
    assert drop_failed_samples(lost, "math", stats, counters) is False
    clean = _group(2, [0.0, 1.0], ["wrong", "ok"])
    assert drop_failed_samples(clean, "math", stats, counters) is True and len(clean.responses) == 2
    assert stats.dropped_samples == {"timeout": 1, "error": 3}
    assert stats.dropped_errors == 1 == counters["dropped_errors"]
    prog = _group(3, [0.0, 1.0], ["timeout", "ok"])  # a program's timeout is a graded failure, kept
    assert drop_failed_samples(prog, "code", IntervalStats(), {"dropped_errors": 0}) is True
    assert len(prog.responses) == 2


def test_on_error_defaults_to_drop():
    from pydantic import ValidationError

    from services.spec import RewardSpec

    assert RewardSpec().on_error == "drop" and RewardSpec(on_error="zero").on_error == "zero"
    with pytest.raises(ValidationError):
        RewardSpec(on_error="ignore")
