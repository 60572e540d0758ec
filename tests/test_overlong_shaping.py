"""DAPO's overlong shaping has one definition (learner.shaping) that the learner and the grader share."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from learner.advantages import overlong_penalty
from learner.config import AlgorithmConfig
from reward.config import MathConfig

CASES = [(20, 4), (100, 99), (1, 1), (100, 100), (10, 20), (0, 4), (20, 0), (-5, 2)]


def _learner_accepts(max_len: int, cache_len: int) -> bool:
    try:
        AlgorithmConfig(dapo={"overlong_max_len": max_len, "overlong_cache_len": cache_len})
        return True
    except ValidationError:
        return False


def _grader_accepts(max_len: int, cache_len: int) -> bool:
    try:
        MathConfig(overlong={"max_length": max_len, "cache_length": cache_len})
        return True
    except ValidationError:
        return False


def _tensor_accepts(max_len: int, cache_len: int) -> bool:
    try:
        overlong_penalty(torch.tensor([1]), max_len, cache_len)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize(("max_len", "cache_len"), CASES)
def test_learner_and_grader_accept_the_same_bounds(max_len, cache_len):
    want = max_len > 0 and 0 < cache_len < max_len
    assert (_learner_accepts(max_len, cache_len), _grader_accepts(max_len, cache_len),
            _tensor_accepts(max_len, cache_len)) == (want, want, want)


def test_errors_name_each_configs_own_fields():
    with pytest.raises(ValidationError, match=r"dapo.overlong_cache_len=100 must be smaller than dapo.overlong_max_len=100"):
        AlgorithmConfig(dapo={"overlong_max_len": 100, "overlong_cache_len": 100})
    with pytest.raises(ValidationError, match=r"cache_length=100 must be smaller than max_length=100"):
        MathConfig(overlong={"max_length": 100, "cache_length": 100})


@pytest.mark.parametrize(("max_len", "cache_len"), [(20, 4), (7, 6), (64, 32)])
def test_learner_tensor_penalty_equals_grader_scalar_penalty(max_len, cache_len):
    lengths = torch.arange(0, max_len + 5)
    grader = MathConfig(overlong={"max_length": max_len, "cache_length": cache_len}).overlong
    want = torch.tensor([grader.penalty(int(n)) for n in lengths])
    assert torch.allclose(overlong_penalty(lengths, max_len, cache_len), want)
    # Hand values at the band's edges: 0 up to L_max − L_c, −1 at and past L_max.
    assert grader.penalty(max_len - cache_len) == 0.0 and grader.penalty(max_len) == -1.0
    assert grader.penalty(max_len + 1) == -1.0
