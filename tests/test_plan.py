"""`mtprl plan`: the memory arithmetic (`learner.memory_plan`) against real torch models, and the
planner (`services.plan`) on specs that fit and specs that do not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from learner.memory_plan import (
    LearnerSizing,
    ModelShape,
    known_config,
    layer_params,
    learner_rank_bytes,
    mtp_params,
    param_count,
    root_params,
)
from learner.tiny import make_tiny_model
from services.plan import load_cluster, plan_spec
from services.spec import SKIP_FILE_CHECKS, RunSpec

ROOT = Path(__file__).resolve().parents[1]


def _shape(model) -> ModelShape:
    return ModelShape.from_config({**model.config.to_dict(), "num_nextn_predict_layers": model.num_mtp})


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_the_torch_model(tied):
    model = make_tiny_model(num_mtp=2, num_layers=3, tie_word_embeddings=tied)
    shape = _shape(model)
    assert param_count(shape) == sum(p.numel() for p in model.parameters())
    assert layer_params(shape) == sum(p.numel() for p in model.backbone.model.layers[0].parameters())
    assert mtp_params(shape) == sum(p.numel() for p in model.mtp[0].parameters())
    assert root_params(shape) == param_count(shape) - 3 * layer_params(shape) - 2 * mtp_params(shape)


def test_the_built_in_mimo_is_the_7_8b_model():
    shape = ModelShape.from_config(known_config("/mnt/mtprl/models/MiMo-7B-RL"))
    assert (shape.hidden_size, shape.num_hidden_layers, shape.vocab_size, shape.num_mtp) == (4096, 36, 151680, 1)
    assert 7.8e9 < param_count(shape) < 7.9e9
    assert known_config("r1-distill-1.5b-mtp4")["num_nextn_predict_layers"] == 4
    assert known_config("no-such-model") is None


def _sizing(**kw) -> LearnerSizing:
    return LearnerSizing(**{"compute_bytes": 2, "seq_len": 512, "response_len": 256, "train_heads": 2, **kw})


def test_two_ranks_hold_half_the_state_plus_the_unsharded_unit():
    shape = _shape(make_tiny_model(num_mtp=1))
    one, two = learner_rank_bytes(shape, _sizing(ranks=1)), learner_rank_bytes(shape, _sizing(ranks=2))
    for part in ("weights", "grads", "adam"):
        assert two[part] == pytest.approx(one[part] / 2, abs=1)
    assert one["unsharded_units"] == 0 and two["unsharded_units"] > 0 and two["reduce_buffer"] > 0
    assert two["activations"] == one["activations"] and two["logits"] == one["logits"]


def test_activation_checkpointing_lowers_activation_memory():
    shape = ModelShape.from_config(known_config("MiMo-7B-RL"))
    off = learner_rank_bytes(shape, _sizing(ranks=8, seq_len=8192, response_len=4096))
    on = learner_rank_bytes(shape, _sizing(ranks=8, seq_len=8192, response_len=4096, activation_checkpointing=True))
    assert on["activations"] < off["activations"] / 5
    assert {k: v for k, v in on.items() if k != "activations"} == {k: v for k, v in off.items() if k != "activations"}


def _spec(path: str, **changes) -> RunSpec:
    import yaml

    raw = yaml.safe_load((ROOT / path).read_text())
    for dotted, value in changes.items():
        d = raw
        *keys, last = dotted.split(".")
        for k in keys:
            d = d.setdefault(k, {})
        d[last] = value
    return RunSpec.model_validate(raw, context={SKIP_FILE_CHECKS: True})


def test_a_spec_that_does_not_fit_says_so_and_what_would_fit():
    spec = _spec("examples/occ/mimo7b-dapo-occ.yaml", **{"algorithm.activation_checkpointing": False})
    plan = plan_spec(spec, load_cluster(ROOT / "deploy/cluster.yaml"))
    assert not plan.fits
    assert any("learner rank needs" in p for p in plan.problems)
    assert any(s.startswith("enable algorithm.activation_checkpointing") and s.endswith("fits")
               for s in plan.suggestions), plan.suggestions


def test_the_old_40gb_node_type_cannot_hold_the_7b_run(tmp_path):
    """The reason deploy/cluster.yaml's 8-GPU node type is an A100-80GB (p4de): on p4d's 40 GB
    GPUs a MiMo-7B rank does not fit whatever the spec, and the planner points at the node type."""
    text = (ROOT / "deploy/cluster.yaml").read_text().replace("p4de.24xlarge", "p4d.24xlarge")
    (tmp_path / "cluster.yaml").write_text(text)
    plan = plan_spec(_spec("examples/occ/mimo7b-dapo-occ.yaml"), load_cluster(tmp_path / "cluster.yaml"))
    assert not plan.fits
    assert any("p4d.24xlarge → p4de.24xlarge" in s and s.endswith("fits") for s in plan.suggestions), plan.suggestions


def test_a_bigger_micro_batch_needs_more_memory():
    small = plan_spec(_spec("examples/mpo/r1-distill-1.5b-gsm8k-mpo.yaml"), load_cluster())
    big = plan_spec(_spec("examples/mpo/r1-distill-1.5b-gsm8k-mpo.yaml", **{"algorithm.micro_batch_size": 4}),
                    load_cluster())
    assert big.learner["bytes"]["logits"] == 4 * small.learner["bytes"]["logits"]
    assert small.fits and not big.fits


def test_an_unknown_remote_model_asks_for_its_config(tmp_path):
    spec = _spec("examples/occ/mimo7b-dapo-occ.yaml", **{"model.path": "someorg/some-model"})
    with pytest.raises(ValueError, match="--model-config"):
        plan_spec(spec, load_cluster())
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(known_config("DeepSeek-R1-Distill-Qwen-1.5B") | {"num_nextn_predict_layers": 1}))
    assert plan_spec(spec, load_cluster(), config_file=cfg).model["num_mtp"] == 1


def test_cli_plan_json_is_one_parseable_object():
    out = subprocess.run([sys.executable, "-c", "from services.cli import main; main()", "plan",
                          "examples/occ/mimo7b-dapo-occ.yaml", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert p["fits"] is True and set(p) >= {"fits", "learner", "engines", "placement", "problems", "suggestions"}
    assert p["learner"]["ranks"] == 8 and p["learner"]["total_gib"] < 80
    assert p["learner"]["total_bytes"] == sum(p["learner"]["bytes"].values())


def test_cli_plan_exit_status_says_whether_it_fits(tmp_path):
    import yaml

    raw = yaml.safe_load((ROOT / "examples/occ/mimo7b-dapo-occ.yaml").read_text())
    raw["algorithm"]["activation_checkpointing"] = False
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-c", "from services.cli import main; main()", "plan",
                          str(tmp_path / "s.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "does not fit" in out.stdout and "activation_checkpointing" in out.stdout
