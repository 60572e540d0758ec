"""The demo: its run spec is a valid run for a checkpoint with one MTP head (what the demo trains), and its cached warm-up is reused only while it is current."""

from services.cli_demo import DEMO_TASK, demo_spec
from services.spec import RunSpec, spec_problems


def test_demo_spec_is_valid_and_trains_mpo_with_occ(tiny_ckpt):
    spec = RunSpec.model_validate(demo_spec(tiny_ckpt, steps=7))
    assert spec_problems(spec) == []
    assert spec.schedule.steps == 7 and spec.schedule.max_staleness >= 1  # asynchronous
    assert spec.algorithm.mtp_regime == "occ" and spec.algorithm.mpo is not None and spec.algorithm.mpo.k == 2
    assert spec.rollout.num_speculative_tokens == 1
    assert spec.data.task_config == DEMO_TASK


def test_demo_task_config_reaches_reasoning_gym():
    from services.data import all_items

    spec = RunSpec.model_validate({"model": {"path": "hub/model"}, "data": {
        "dataset": "reasoning_gym:basic_arithmetic", "size": 20, "task_config": DEMO_TASK}})
    for it in all_items(spec):
        q = it.meta["question"]
        assert q.count("+") + q.count("-") == 1 and "(" not in q  # two single-digit terms, + or -


def test_a_cached_warm_up_is_reused_only_while_its_recipe_and_code_match(tmp_path):
    """The demo's warmed-up head is cached; a cache made by another recipe, another base or
    older pipeline code (no fingerprint) is rebuilt, not silently trained from."""
    import json

    from services.self_distill import RESULT_FILE, SelfDistillConfig, is_current, recipe_fingerprint

    base, warm = tmp_path / "base", tmp_path / "warm"
    base.mkdir()
    (base / "config.json").write_text('{"num_nextn_predict_layers": 1}')
    (base / "model.safetensors").write_bytes(b"\0" * 64)
    cfg = SelfDistillConfig()
    assert is_current(base, warm, cfg) == (False, "not built yet")
    warm.mkdir()
    (warm / "model.safetensors").write_bytes(b"\0" * 64)
    ok, why = is_current(base, warm, cfg)
    assert not ok and RESULT_FILE in why  # an older mtprl's cache
    (warm / RESULT_FILE).write_text(json.dumps({"fingerprint": recipe_fingerprint(base, cfg)}))
    assert is_current(base, warm, cfg)[0]
    assert not is_current(base, warm, SelfDistillConfig(seed=1))[0]  # another recipe
    (base / "model.safetensors").write_bytes(b"\0" * 65)  # another base checkpoint
    assert not is_current(base, warm, cfg)[0]
