"""`POST /v1/runs` refuses, before 201 and never with a 500, every spec a run would fail on at start,
and every malformed body gets a 4xx.

Raw bodies go through the real app (`create_app`, FastAPI's JSON parsing and validation, the real
embedded Redis) with TestClient; the launcher records runs without starting them. The bounds come
from the components that enforce them (`rollout.config.MAX_SPECULATIVE_TOKENS`,
`reward.config.DEFAULT_INNER_TIMEOUT_S`), so the tests move with them.
"""

from __future__ import annotations

import json

import pytest

from reward.config import DEFAULT_INNER_TIMEOUT_S
from rollout.config import MAX_SPECULATIVE_TOKENS, SEED_STRIDE

H = {"Authorization": "Bearer t", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from api_client import api_test_client

    with api_test_client(tmp_path_factory.mktemp("api"), mtp_layers=2) as c:
        yield c


def _spec(client, **sections) -> dict:
    spec = {"model": {"path": client.model_dir}, "data": {"dataset": "human_eval"},
            "rollout": {"max_model_len": 512, "max_tokens": 64}}
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v}
    return spec


def _count(client) -> int:
    return client.get("/v1/runs", headers=H).json()["count"]


def _post_raw(client, raw: bytes):
    before = _count(client)
    r = client.post("/v1/runs", headers=H, content=raw)
    if r.status_code >= 400:
        assert _count(client) == before, "a refused spec was recorded"
    return r


def _locs(r) -> list[list]:
    return [e["loc"] for e in r.json()["detail"]]


# ---- non-finite numbers: JSON has no inf/NaN; Python's parser accepts 1e309, NaN, Infinity -------
@pytest.mark.parametrize(("field", "literal"), [
    (("rollout", "temperature"), "1e309"),
    (("rollout", "temperature"), "NaN"),
    (("rollout", "kv_cache_gib"), "-Infinity"),
    (("algorithm", "lr"), "NaN"),
    (("algorithm", "advantage", "kl_coef"), "Infinity"),  # ge=0 alone lets +inf through
    (("reward", "timeout_s"), "1e999"),
    (("data", "task_config", "min_terms"), "NaN"),  # a free-form dict
])
def test_non_finite_numbers_are_422_naming_the_field(client, field, literal):
    spec = _spec(client)
    node = spec
    for k in field[:-1]:
        node = node.setdefault(k, {})
    node[field[-1]] = "__X__"
    raw = json.dumps(spec).replace('"__X__"', literal).encode()
    r = _post_raw(client, raw)
    assert r.status_code == 422, r.text
    loc = ["body", *field] if field[0] != "data" else ["body", "data", "task_config"]
    assert loc in _locs(r), r.text


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[1, 2]", b"null", b'"spec"', b"\xff\xfe", b'{"model": 1e999999}',
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser recurses
    b'{"name": "\\ud800", "model": {"path": "x"}, "data": {"dataset": "human_eval"}}',  # an unpaired surrogate
    b'{"model": {"path": "x"}, "data": {"dataset": "human_eval", "task_config": {"k": "\\udfff"}}}',
])
def test_malformed_bodies_are_4xx_with_a_json_answer(client, raw):
    r = _post_raw(client, raw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "detail" in r.json()


# ---- values the engine, the grader or the learner would refuse at run start ----------------------
def test_speculative_tokens_beyond_the_engines_bound(client):
    r = _post_raw(client, json.dumps(_spec(client, rollout={"num_speculative_tokens": MAX_SPECULATIVE_TOKENS + 1})).encode())
    assert r.status_code == 422 and ["body", "rollout", "num_speculative_tokens"] in _locs(r), r.text
    r = _post_raw(client, json.dumps(_spec(client, rollout={"num_speculative_tokens": MAX_SPECULATIVE_TOKENS})).encode())
    assert r.status_code == 201, r.text


def test_samples_per_prompt_stay_within_the_groups_seed_stride(client):
    """vLLM seeds a group's G samples seed..seed+G-1; more than the stride between two groups'
    seeds would replay another group's random streams."""
    r = _post_raw(client, json.dumps(_spec(client, rollout={"samples_per_prompt": SEED_STRIDE + 1})).encode())
    assert r.status_code == 422 and ["body", "rollout", "samples_per_prompt"] in _locs(r), r.text


def test_reward_timeout_must_exceed_the_math_workers_inner_timeout(client):
    r = _post_raw(client, json.dumps(_spec(client, reward={"timeout_s": DEFAULT_INNER_TIMEOUT_S})).encode())
    assert r.status_code == 422 and ["body", "reward", "timeout_s"] in _locs(r), r.text
    r = _post_raw(client, json.dumps(_spec(client, reward={"timeout_s": DEFAULT_INNER_TIMEOUT_S + 0.5})).encode())
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(("sections", "loc", "words"), [
    ({"rollout": {"max_tokens": 512}}, ["body", "rollout", "max_tokens"], "no room for a prompt"),
    ({"rollout": {"max_model_len": 1024, "max_tokens": 64}}, ["body", "rollout", "max_model_len"],
     "max_position_embeddings=512"),
    ({"algorithm": {"device": "cuda"}}, ["body", "algorithm", "device"], "learner_gpus=0"),
    ({"algorithm": {"precision": "bf16"}}, ["body", "algorithm", "precision"], "learner_gpus=0"),
    ({"rollout": {"temperature": 0.0}}, ["body", "rollout", "temperature"], "greedy"),
    ({"rollout": {"top_p": 0.9}}, ["body", "rollout", "top_p"], "use top_p=1.0"),
    ({"rollout": {"num_speculative_tokens": 0, "adaptive_draft": {"enabled": True}}},
     ["body", "rollout", "adaptive_draft"], "num_speculative_tokens >= 1"),
])
def test_cross_section_rules_are_422_naming_the_field(client, sections, loc, words):
    r = _post_raw(client, json.dumps(_spec(client, **sections)).encode())
    assert r.status_code == 422, r.text
    (err,) = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert words in err["msg"] and "\n" not in err["msg"]


def test_every_accepted_spec_builds_the_configs_run_start_builds(client):
    """The boundary values the API accepts are values the components accept (one bound each)."""
    from services.spec import RunSpec, spec_problems

    spec = RunSpec.model_validate(_spec(client, rollout={"num_speculative_tokens": MAX_SPECULATIVE_TOKENS},
                                        reward={"timeout_s": DEFAULT_INNER_TIMEOUT_S + 0.01, "workers": 1}))
    assert spec_problems(spec) == []
    assert spec.engine_config().num_speculative_tokens == MAX_SPECULATIVE_TOKENS
    assert spec.reward.actor_config()["math"]["deadline_s"] == DEFAULT_INNER_TIMEOUT_S + 0.01
    assert spec.rollout.sampling_config().max_tokens == 64


def test_the_controllers_engine_config_is_the_specs():
    """Until services.controller.engine_config delegates to RunSpec.engine_config, they must agree."""
    from services.controller import engine_config
    from services.spec import RunSpec

    spec = RunSpec.model_validate({"model": {"path": "some/hub-id"}, "data": {"dataset": "human_eval", "seed": 7},
                                   "rollout": {"num_speculative_tokens": 3, "draft_sample_method": "probabilistic"},
                                   "resources": {"cpus_per_engine": 2.5}})
    assert engine_config(spec) == spec.engine_config()


def test_component_refusals_are_located_at_the_spec_field_they_come_from():
    """The safety net under the field bounds: what a component refuses (here past the spec's own
    bounds, built without validation) is reported at the spec's field, not as a failed run."""
    from services.spec import RewardSpec, RolloutSpec, RunSpec, spec_problems

    spec = RunSpec.model_validate({"model": {"path": "some/hub-id"}, "data": {"dataset": "human_eval"}})
    bad = spec.model_copy(update={
        "rollout": RolloutSpec.model_construct(**{**dict(spec.rollout), "num_speculative_tokens": 99}),
        "reward": RewardSpec.model_construct(**{**spec.reward.model_dump(), "timeout_s": 1.0}),
    })
    got = {p["loc"]: p["msg"] for p in spec_problems(bad)}
    assert set(got) == {("rollout", "num_speculative_tokens"), ("reward", "timeout_s")}, got
    assert "EngineConfig.num_speculative_tokens" in got[("rollout", "num_speculative_tokens")]
    assert "inner_timeout_s (3) must be < deadline_s (1.0)" in got[("reward", "timeout_s")]


def test_the_learner_temperature_is_the_rollouts():
    """One definition: `algorithm.temperature` is filled from `rollout.temperature` (the learner's
    policy is the sampling distribution), and an explicit value that disagrees is refused."""
    from pydantic import ValidationError

    from services.spec import RunSpec

    base = {"model": {"path": "some/hub-id"}, "data": {"dataset": "human_eval"}}
    spec = RunSpec.model_validate({**base, "rollout": {"temperature": 0.7}})
    assert spec.algorithm.temperature == 0.7
    assert RunSpec.model_validate(spec.model_dump()).algorithm.temperature == 0.7  # stored and read back
    assert RunSpec.model_validate(base).algorithm.temperature == 1.0
    with pytest.raises(ValidationError, match="differs from rollout.temperature"):
        RunSpec.model_validate({**base, "rollout": {"temperature": 0.7}, "algorithm": {"temperature": 1.0}})


def test_a_tempered_spec_is_accepted(client):
    r = _post_raw(client, json.dumps(_spec(client, rollout={"temperature": 0.7})).encode())
    assert r.status_code == 201, r.text
