"""`mtprl model ...` on bad input: one clear error that says what to do, and nothing left behind."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from services.cli import _mount, app

_mount()
runner = CliRunner()


def test_import_rejects_mtp_layers_out_of_range(tmp_path):
    res = runner.invoke(app, ["model", "import-smollm2", "--out", str(tmp_path / "m"), "--mtp-layers", "7"])
    assert res.exit_code == 2
    assert "1..4" in res.output
    assert not (tmp_path / "m").exists()


def test_import_with_a_missing_gguf_says_what_to_pass(tmp_path):
    res = runner.invoke(app, ["model", "import-smollm2", "--out", str(tmp_path / "m"), "--gguf", str(tmp_path / "nope.gguf")])
    assert res.exit_code == 2
    assert "not found" in res.output and "SmolLM2-135M-Instruct.Q4_1.gguf" in res.output
    assert list(tmp_path.iterdir()) == []


def test_tiny_writes_a_mimo_checkpoint_and_warmup_refuses_a_bad_one(tmp_path):
    res = runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "t"), "--mtp-layers", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["architectures"] == ["MiMoForCausalLM"] and cfg["num_nextn_predict_layers"] == 1
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["model", "warmup", "--model", str(tmp_path / "t"), "--out", str(tmp_path / "w")])
    assert res.exit_code == 2
    assert "MiMoForCausalLM" in res.output
    assert not (tmp_path / "w").exists()


def test_warmup_refuses_several_greedy_answers_per_prompt(tmp_path):
    # Greedy answers to one prompt are identical: asking for two would train on duplicates.
    assert runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "t"), "--mtp-layers", "1"]).exit_code == 0
    res = runner.invoke(app, ["model", "warmup", "--model", str(tmp_path / "t"), "--out", str(tmp_path / "w"),
                              "--temperature", "0", "--samples-per-prompt", "2"])
    assert res.exit_code == 2
    assert "--samples-per-prompt 1" in res.output
    assert not (tmp_path / "w").exists()


def test_warmup_refuses_bad_loss_settings_before_starting(tmp_path):
    assert runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "t"), "--mtp-layers", "1"]).exit_code == 0
    base = ["model", "warmup", "--model", str(tmp_path / "t"), "--out", str(tmp_path / "w")]
    res = runner.invoke(app, base + ["--ce-weight", "-1"])
    assert res.exit_code == 2 and "ce_weight" in res.output
    res = runner.invoke(app, base + ["--ce-vocab", "1024"])
    assert res.exit_code == 2 and "--ce-weight" in res.output
    assert not (tmp_path / "w").exists()


def test_warmup_refuses_a_task_config_reasoning_gym_refuses_before_starting(tmp_path):
    assert runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "t"), "--mtp-layers", "1"]).exit_code == 0
    base = ["model", "warmup", "--model", str(tmp_path / "t"), "--out", str(tmp_path / "w"), "--task-config"]
    res = runner.invoke(app, base + ["{not json"])
    assert res.exit_code == 2 and "JSON object" in res.output
    res = runner.invoke(app, base + ["[1, 2]"])
    assert res.exit_code == 2 and "got list" in res.output
    res = runner.invoke(app, base + ['{"bogus": 1}'])
    assert res.exit_code == 2 and "reasoning-gym refuses it" in res.output and "bogus" in res.output
    res = runner.invoke(app, base + ['{"min_terms": 3, "max_terms": 2}'])
    assert res.exit_code == 2 and "max_terms must be >= min_terms" in res.output
    res = runner.invoke(app, base[:-1] + ["--temperature", "0", "--samples-per-prompt", "1", "--sampled-eval", "2"])
    assert res.exit_code == 2 and "sampled_eval measures acceptance at `temperature`" in res.output
    assert not (tmp_path / "w").exists()


def _run_dir_with_policy(run_dir, policy_src):
    """A run directory whose latest complete checkpoint holds ``policy_src`` as its policy."""
    import shutil

    from services import run_checkpoint

    tmp = run_checkpoint.begin(run_dir, 5)
    shutil.copytree(policy_src, tmp / "policy")
    return run_checkpoint.commit(run_dir, tmp, run_checkpoint.LoopState(step=5), keep_last=1)


def test_warmup_starts_from_a_run_directorys_latest_policy_and_refuses_one_without_a_checkpoint(tmp_path):
    assert runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "t"), "--mtp-layers", "1"]).exit_code == 0
    ckpt = _run_dir_with_policy(tmp_path / "run", tmp_path / "t")
    # Stopped by a refusal that comes after the model is resolved and read: nothing is trained.
    res = runner.invoke(app, ["model", "warmup", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "w"),
                              "--temperature", "0", "--samples-per-prompt", "2"])
    assert res.exit_code == 2 and "--samples-per-prompt 1" in res.output
    assert f"starting from {ckpt / 'policy'}" in res.output
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    res = runner.invoke(app, ["model", "warmup", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "w")])
    assert res.exit_code == 2 and "neither a policy directory" in res.output and "complete checkpoint" in res.output
    assert not (tmp_path / "w").exists()
