"""The policy model and its checkpoints (unit tests on tiny random models; no fakes needed)."""

from __future__ import annotations

import json

import pytest
import torch

from learner.checkpoint import CheckpointError, export_state_dict, load_policy, save_policy
from learner.model import PolicyModel
from learner.tiny import make_tiny_model, write_tiny_checkpoint


@pytest.fixture(scope="module")
def model() -> PolicyModel:
    return make_tiny_model(num_mtp=3, seed=1).eval()


def _ids(B=3, T=14, seed=0, vocab=400):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


def test_main_head_equals_backbone_logits(model):
    ids = _ids()
    with torch.no_grad():
        out = model.token_logprobs(ids, num_mtp=0)
        ref = torch.log_softmax(model.backbone(ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert out.logprobs.shape == (1, 3, 14)
    assert torch.allclose(out.logprobs[0, :, 1:], ref, atol=1e-5)
    assert not out.valid[0, :, 0].any() and out.valid[0, :, 1:].all()


def test_mtp_head_alignment_matches_a_manual_forward(model):
    """Head k's log-prob of token t comes from position t-1-k with Emb(x_{p+k}) teacher-forced."""
    ids = _ids(B=1, T=10)
    with torch.no_grad():
        out = model.token_logprobs(ids, num_mtp=2)
        h0 = model.backbone_hidden(ids)  # pre-norm, as vLLM's MiMo hands it to the drafter
        emb = model.backbone.model.embed_tokens(ids)
        pos = torch.arange(10).unsqueeze(0)
        rot = model.backbone.model.rotary_emb(h0, pos)
        h1 = model.mtp[0].mtp_forward(h0[:, :8], emb[:, 1:9], pos[:, :8], (rot[0][:, :8], rot[1][:, :8]), None)
        lp1 = torch.log_softmax(model.backbone.lm_head(h1), -1)  # predicts x_{p+2}
    # position p = 3 predicts token t = 5
    assert torch.allclose(out.logprobs[1, 0, 5], lp1[0, 3, ids[0, 5]], atol=1e-5)
    assert out.valid[1, 0, 2:].all() and not out.valid[1, 0, :2].any()
    assert out.valid[2, 0, 3:].all() and not out.valid[2, 0, :3].any()


def test_heads_are_causal_in_the_prefix(model):
    """Changing tokens after t leaves every head's log-prob of token t unchanged."""
    a = _ids(B=1, T=12, seed=3)
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 7) % 400 + 3
    with torch.no_grad():
        la = model.token_logprobs(a).logprobs
        lb = model.token_logprobs(b).logprobs
    assert torch.allclose(la[:, :, :8], lb[:, :, :8], atol=1e-5)
    assert not torch.allclose(la[:, :, 8:], lb[:, :, 8:], atol=1e-5)


def test_right_padding_does_not_change_real_tokens(model):
    short = _ids(B=1, T=7, seed=5)
    padded = torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        a = model.token_logprobs(short)
        b = model.token_logprobs(padded, mask)
    assert torch.allclose(a.logprobs, b.logprobs[:, :, :7], atol=1e-5)
    assert not b.valid[:, :, 7:].any()
    assert (b.logprobs[:, :, 7:] == 0).all()


def test_bad_inputs_raise_clear_errors(model):
    ids = _ids()
    with pytest.raises(ValueError, match="right-padded"):
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        model.token_logprobs(ids, mask)
    with pytest.raises(ValueError, match="shape"):
        model.token_logprobs(ids, torch.ones(3, 5))
    with pytest.raises(ValueError, match="model has 3"):
        model.token_logprobs(ids, num_mtp=4)


def test_detached_mtp_leaves_backbone_gradients_untouched():
    m = make_tiny_model(num_mtp=2, seed=2)
    ids = _ids(B=2, T=9)
    out = m.token_logprobs(ids, mtp_backbone_grad=False)
    (-out.logprobs[1:].sum()).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in m.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.mtp.parameters())
    m.zero_grad(set_to_none=True)
    out = m.token_logprobs(ids, mtp_backbone_grad=True)
    (-out.logprobs[1:].sum()).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.backbone.parameters())


def test_mtp_init_copies_the_last_layer():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    bb = Qwen2ForCausalLM(cfg)
    m = PolicyModel.from_backbone(bb, 2)
    last = bb.model.layers[-1].state_dict()
    for mod in m.mtp:
        for k, v in last.items():
            assert torch.equal(mod.state_dict()[k], v)
        assert torch.equal(mod.final_layernorm.weight, bb.model.norm.weight)
        w = mod.input_proj.weight
        assert torch.equal(w[:, 64:], torch.eye(64)) and (w[:, :64] == 0).all()
    assert m.config.num_nextn_predict_layers == 2
    with pytest.raises(ValueError, match="1..4"):
        PolicyModel.from_backbone(bb, 5)


def test_checkpoint_round_trip_in_mimo_layout(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ck", num_mtp=2, seed=4)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["MiMoForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["num_nextn_predict_layers"] == 2
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" in names  # vLLM's MTP loader needs the head even when tied
    assert {"model.mtp_layers.1.input_proj.weight", "model.mtp_layers.0.self_attn.q_proj.bias",
            "model.mtp_layers.0.token_layernorm.weight", "model.mtp_layers.0.final_layernorm.weight"} <= names
    a = make_tiny_model(num_mtp=2, seed=4)
    b = load_policy(path)
    for (n, x), (_, y) in zip(export_state_dict(a).items(), export_state_dict(b).items()):
        assert torch.equal(x, y), n
    # Shared weights stay tied after loading.
    assert b.backbone.lm_head.weight.data_ptr() == b.backbone.model.embed_tokens.weight.data_ptr()


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="mtprl model"):
        load_policy(tmp_path / "nothing-here")
    good = write_tiny_checkpoint(tmp_path / "good", num_mtp=1)

    def variant(name, mutate):
        import shutil

        d = tmp_path / name
        shutil.copytree(good, d)
        mutate(d)
        return d

    def set_cfg(**kw):
        def f(d):
            c = json.loads((d / "config.json").read_text())
            c.update(kw)
            (d / "config.json").write_text(json.dumps(c))
        return f

    with pytest.raises(CheckpointError, match="MiMoForCausalLM"):
        load_policy(variant("arch", set_cfg(architectures=["LlamaForCausalLM"])))
    with pytest.raises(CheckpointError, match="num_nextn_predict_layers"):
        load_policy(variant("n", set_cfg(num_nextn_predict_layers=9)))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_policy(variant("corrupt", lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage")))
    with pytest.raises(CheckpointError, match="missing"):
        load_policy(variant("noweights", lambda d: (d / "model.safetensors").unlink()))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_policy(variant("json", lambda d: (d / "config.json").write_text("{")))
    with pytest.raises(CheckpointError, match="does not match"):
        load_policy(variant("mismatch", set_cfg(num_nextn_predict_layers=2)))


def test_failed_save_leaves_the_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    path = write_tiny_checkpoint(tmp_path / "ck", num_mtp=1, seed=0)
    before = (path / "model.safetensors").read_bytes()
    import learner.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_policy(make_tiny_model(num_mtp=1, seed=9), path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_entropy_is_a_metric_unless_asked_to_carry_gradient():
    m = make_tiny_model(num_mtp=1, seed=5)
    ids = _ids(B=2, T=8)
    assert not m.token_logprobs(ids, with_entropy=True).entropy.requires_grad
    ent = m.token_logprobs(ids, with_entropy=True, entropy_grad=True).entropy
    assert ent.requires_grad
    ent.sum().backward()
    assert m.backbone.lm_head.weight.grad.abs().max() > 0
