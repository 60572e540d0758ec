"""`mtprl model import HF_DIR` and `mtprl model export`: round trips of tiny random Qwen2 and Llama
models that transformers saved sharded (tied and untied embeddings, fp32 and bf16), through the
MiMo layout and back to a plain Hugging Face model; and the one-line errors for bad directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from learner.checkpoint import MTP_PREFIX, load_policy
from learner.tiny import make_tokenizer
from services.cli import _mount, app

_mount()
runner = CliRunner()
SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROBE = torch.tensor([[3, 17, 99, 250, 7, 401, 12, 88]])


def _save_hf(tmp_path, kind: str, tied: bool, dtype: torch.dtype):
    torch.manual_seed(1)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=tied))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tied))
    with torch.no_grad():  # transformers' init leaves biases and norms trivial; make them count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    src = tmp_path / f"hf-{kind}"
    model.to(dtype).save_pretrained(str(src), max_shard_size="300KB")
    make_tokenizer().save_pretrained(str(src))
    return src


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


CASES = {"qwen2": ("qwen2", True, torch.float32), "llama": ("llama", False, torch.bfloat16)}


@pytest.fixture(scope="module", params=sorted(CASES))
def round_trip(request, tmp_path_factory):
    """(original HF dir, imported MiMo dir, exported HF dir) of one tiny model."""
    kind, tied, dtype = CASES[request.param]
    tmp = tmp_path_factory.mktemp(f"rt-{kind}")
    src = _save_hf(tmp, kind, tied, dtype)
    assert (src / "model.safetensors.index.json").is_file()  # really sharded
    res = _invoke("model", "import", src, "--out", tmp / "mimo", "--mtp-layers", 2)
    assert res.exit_code == 0, res.output
    res = _invoke("model", "export", tmp / "mimo", "--out", tmp / "hf", "--format", "hf")
    assert res.exit_code == 0, res.output
    yield src, tmp / "mimo", tmp / "hf", tied
    shutil.rmtree(tmp, ignore_errors=True)


def test_import_adds_mtp_modules_as_mpo_a1_says(round_trip):
    src, mimo, _, tied = round_trip
    policy = load_policy(mimo)
    assert policy.num_mtp == 2 and policy.config.tie_word_embeddings == tied
    # each new module starts as the last decoder layer, its input projection [0 | I]
    last = policy.backbone.model.layers[-1].state_dict()
    for name, t in policy.mtp[1].state_dict().items():
        if name in last:
            assert torch.equal(t, last[name]), name
    hidden = policy.config.hidden_size
    assert torch.equal(policy.mtp[0].input_proj.weight[:, hidden:], torch.eye(hidden))
    saved = json.loads((mimo / "tokenizer_config.json").read_text())
    assert saved.get("chat_template") or (mimo / "chat_template.jinja").is_file()


def test_export_hf_loads_in_transformers_with_the_originals_logits(round_trip):
    src, _, hf, _ = round_trip
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and "num_nextn_predict_layers" not in cfg
    exported, info = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any(MTP_PREFIX in n for n in exported.state_dict())
    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (original(PROBE).logits - exported.eval()(PROBE).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.integration
@pytest.mark.parametrize("round_trip", ["llama"], indirect=True)
def test_vllm_serves_the_export_with_the_originals_greedy_tokens(ray_session, round_trip):
    from rollout.actor import create_engine_actor

    src, _, hf, _ = round_trip
    prompts = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(3)]
    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        want = [original.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    engine = create_engine_actor({"model": str(hf), "num_speculative_tokens": 0, "max_model_len": 128,
                                  "kv_cache_gib": 0.05, "dtype": "float32"})
    try:
        batch = ray_session.get(engine.generate.remote(prompts, {"n": 1, "temperature": 0.0, "max_tokens": 12,
                                                                  "ignore_eos": True}))
    finally:
        ray_session.kill(engine)
    assert [s.token_ids for s in batch.samples] == want


def test_mimo_import_keeps_its_modules_and_export_mimo_keeps_them(tmp_path, tiny_ckpt):
    res = _invoke("model", "import", tiny_ckpt, "--out", tmp_path / "m3", "--mtp-layers", 3)
    assert res.exit_code == 0, res.output
    before, after = load_policy(tiny_ckpt), load_policy(tmp_path / "m3")
    assert after.num_mtp == 3
    for i in range(2):
        for (n, a), b in zip(before.mtp[i].state_dict().items(), after.mtp[i].state_dict().values()):
            assert torch.equal(a, b), (i, n)
    res = _invoke("model", "import", tiny_ckpt, "--out", tmp_path / "m1", "--mtp-layers", 1)
    assert res.exit_code == 2 and "--mtp-layers 2" in res.output and not (tmp_path / "m1").exists()
    res = _invoke("model", "export", tmp_path / "m3", "--out", tmp_path / "back", "--format", "mimo")
    assert res.exit_code == 0, res.output
    again = load_policy(tmp_path / "back")
    for a, b in zip(after.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_directories_give_one_line_that_says_what_is_supported(tmp_path):
    src = _save_hf(tmp_path, "qwen2", True, torch.float32)
    cfg = json.loads((src / "config.json").read_text())

    def fails(path, *needles):
        res = _invoke("model", "import", path, "--out", tmp_path / "out")
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert line.startswith("error:") and "\n" not in line, line
        for needle in needles:
            assert needle in line, line
        assert not (tmp_path / "out").exists()

    fails(tmp_path / "nowhere", "not a directory")
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(src, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    fails(gpt2, "GPT2LMHeadModel", "Qwen2ForCausalLM", "LlamaForCausalLM", "MiMoForCausalLM")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (src / shard).rename(tmp_path / "moved")
    fails(src, shard, "fetch")
    (src / shard).write_bytes(b"\0" * 64)  # truncated
    fails(src, shard, "corrupt")


def test_export_of_a_run_directory_takes_its_latest_checkpoint_or_step_n(tmp_path, tiny_ckpt):
    from learner.tiny import write_tiny_checkpoint
    from services import run_checkpoint

    run = tmp_path / "run"
    for step, seed in ((2, 5), (4, 6)):  # two checkpoints of different weights
        tmp = run_checkpoint.begin(run, step)
        write_tiny_checkpoint(tmp / "policy", num_mtp=2, seed=seed)
        run_checkpoint.commit(run, tmp, run_checkpoint.LoopState(step=step), keep_last=2)
    assert _invoke("model", "export", run, "--out", tmp_path / "latest").exit_code == 0
    assert _invoke("model", "export", run, "--out", tmp_path / "s2", "--step", 2).exit_code == 0
    latest = AutoModelForCausalLM.from_pretrained(str(tmp_path / "latest"))
    s2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s2"))
    want4 = load_policy(run / "checkpoints" / "step-000004" / "policy").backbone
    assert torch.equal(latest.model.embed_tokens.weight, want4.model.embed_tokens.weight)
    assert not torch.equal(s2.model.embed_tokens.weight, want4.model.embed_tokens.weight)
    res = _invoke("model", "export", run, "--out", tmp_path / "s3", "--step", 3)
    assert res.exit_code == 2 and "no checkpoint of step 3" in res.output and "step-000002" in res.output
    res = _invoke("model", "export", tmp_path / "nothing", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "neither a checkpoint" in res.output
