"""The demo's run spec is a valid run for a checkpoint with one MTP head (what the demo trains)."""

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
