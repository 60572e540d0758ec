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


def test_latest_demo_run_is_the_newest_finished_demo(tmp_path):
    """`make rl-drafter` starts from it: only runs whose summary names the `demo` spec and whose
    checkpoint is complete count; none is a clear error."""
    import json
    import os

    import pytest

    from services import run_checkpoint
    from services.cli_demo import latest_demo_run

    def run(name: str, spec: str, mtime: int, checkpoint: bool = True):
        d = tmp_path / name
        d.mkdir()
        if checkpoint:
            run_checkpoint.commit(d, run_checkpoint.begin(d, 5), run_checkpoint.LoopState(step=5), keep_last=1)
        (d / "summary.json").write_text(json.dumps({"run_id": name, "spec": {"name": spec}}))
        os.utime(d / "summary.json", (mtime, mtime))

    with pytest.raises(ValueError, match="make demo"):
        latest_demo_run(tmp_path)
    run("old-demo", "demo", 1_000)
    run("new-demo", "demo", 2_000)
    run("newer-compare", "compare-smollm2-arith", 3_000)
    run("newest-demo-unfinished", "demo", 4_000, checkpoint=False)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "summary.json").write_text("{half")
    assert latest_demo_run(tmp_path) == tmp_path / "new-demo"
