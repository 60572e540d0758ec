"""AlgorithmConfig: paper defaults, per-algorithm derived values, cross-field validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from learner.config import AlgorithmConfig, MPOConfig, OCCConfig


def test_paper_defaults():
    c = AlgorithmConfig(algorithm="dapo", mpo=MPOConfig())
    assert (c.clip_low, c.clip_high, c.aggregation) == (0.2, 0.28, "token-mean")
    assert c.dapo.dynamic_sampling is True
    assert (c.mpo.k, c.mpo.mtp_share, c.mpo.decay, c.mpo.form) == (5, 0.2, 0.8, "logsum")
    assert (c.occ.lambda_plus, c.occ.eps, c.occ.estimator) == (1.0, 1e-8, "paper")
    g = AlgorithmConfig(algorithm="gspo")
    assert (g.clip_low, g.clip_high, g.aggregation) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert AlgorithmConfig().dapo.dynamic_sampling is False


def test_explicit_values_override_algorithm_defaults_and_round_trip():
    c = AlgorithmConfig(algorithm="ppo", clip_high=0.3, aggregation="seq-mean-token-sum")
    assert (c.clip_low, c.clip_high) == (0.2, 0.3)
    assert AlgorithmConfig.model_validate(c.model_dump()) == c


def test_mpo_grad_follows_the_regime_and_conflicts_name_the_values():
    assert AlgorithmConfig(mpo=MPOConfig(), mtp_regime="detach").mpo.grad == "detach"
    assert AlgorithmConfig(mpo=MPOConfig(), mtp_regime="occ").mpo.grad == "occ"
    assert AlgorithmConfig(mpo=MPOConfig(), mtp_regime="policy").mpo.grad == "full"
    with pytest.raises(ValidationError, match="mpo.grad='detach' with mtp_regime='occ'"):
        AlgorithmConfig(mpo=MPOConfig(grad="detach"), mtp_regime="occ")
    with pytest.raises(ValidationError, match="mpo.grad='full'.*mtp_regime='detach'"):
        AlgorithmConfig(mpo=MPOConfig(grad="full"), mtp_regime="detach")
    with pytest.raises(ValidationError, match="mpo is set with algorithm='gspo'"):
        AlgorithmConfig(algorithm="gspo", mpo=MPOConfig())


@pytest.mark.parametrize("bad", [
    {"mpo": {"k": 0}}, {"mpo": {"k": 6}}, {"mpo": {"mtp_share": 1.0}}, {"mpo": {"decay": 0}},
    {"clip_low": 1.0}, {"micro_batch_size": 0}, {"algorithm": "trpo"}, {"mtp_regime": "full"},
    {"occ": {"estimator": "mine"}}, {"unknown_field": 1},
    {"dapo": {"overlong_max_len": 100, "overlong_cache_len": 100}},
    {"algorithm": "gspo", "aggregation": "token-mean"},
    {"mtp_regime": "occ", "mini_batches": 1, "epochs": 1},
])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValidationError):
        AlgorithmConfig(**bad)


def test_check_against_model():
    AlgorithmConfig(mpo=MPOConfig(k=5)).check_against_model(4)
    with pytest.raises(ValueError, match=r"mpo.k=5 needs 4 MTP heads .* num_mtp=2"):
        AlgorithmConfig(mpo=MPOConfig(k=5)).check_against_model(2)
    with pytest.raises(ValueError, match="mtp_heads=3 is more than"):
        AlgorithmConfig(mtp_heads=3).check_against_model(2)
    with pytest.raises(ValueError, match="has none"):
        AlgorithmConfig(mtp_regime="occ").check_against_model(0)
    c = AlgorithmConfig(mpo=MPOConfig(k=3), mtp_regime="occ", mtp_heads=1, occ=OCCConfig())
    assert c.heads_needed(4) == 2 and c.trained_mtp_heads(4) == 1
