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


def _grads(named_params):
    """{name: |grad|.max()} (0.0 where autograd left no gradient)."""
    return {n: (0.0 if p.grad is None else float(p.grad.abs().max())) for n, p in named_params}


def _trunk(m):
    """The backbone without its LM head: decoder layers, final norm, embedding table."""
    return [(n, p) for n, p in m.backbone.named_parameters() if not n.startswith("lm_head")]


def test_detached_mtp_reaches_mtp_modules_and_lm_head_but_not_the_trunk():
    """The `detach` route (OCC authors' semantics): MTP log-probs put no gradient on the decoder
    layers, the final norm or the embedding lookup; the MTP modules and the shared LM head learn.
    `mtp_lm_head_grad=False` detaches the head too; `mtp_backbone_grad=True` reaches the trunk."""
    m = make_tiny_model(num_mtp=2, seed=2, tie_word_embeddings=False)
    ids = _ids(B=2, T=9)

    def mtp_grads(**flags):  # (trunk, LM head, MTP modules) gradients of the MTP log-probs
        m.zero_grad(set_to_none=True)
        (-m.token_logprobs(ids, **flags).logprobs[1:].sum()).backward()
        head = _grads(m.backbone.lm_head.named_parameters())["weight"]
        return _grads(_trunk(m)), head, _grads(m.mtp.named_parameters())

    trunk, head, mtp = mtp_grads(mtp_backbone_grad=False)
    assert all(g == 0.0 for g in trunk.values()), {n: g for n, g in trunk.items() if g}
    assert head > 0 and all(g > 0 for n, g in mtp.items() if "norm" not in n)
    trunk, head, mtp = mtp_grads(mtp_backbone_grad=False, mtp_lm_head_grad=False)
    assert all(g == 0.0 for g in trunk.values()) and head == 0.0 and max(mtp.values()) > 0
    trunk, head, _ = mtp_grads(mtp_backbone_grad=True)
    assert trunk["model.embed_tokens.weight"] > 0 and head > 0
    assert all(g > 0 for n, g in trunk.items() if ".layers." in n and "norm" not in n)


def test_detach_with_tied_embeddings_moves_the_shared_matrix_only_as_lm_head():
    """Tied LM head / embedding (SmolLM2): under detach the shared matrix gets exactly the
    gradient an untied model's LM head gets (its output-layer role, as in the authors' Megatron
    code), none through the embedding lookup; the decoder layers get none."""
    tied = make_tiny_model(num_mtp=2, seed=2, tie_word_embeddings=True)
    untied = make_tiny_model(num_mtp=2, seed=2, tie_word_embeddings=False)
    untied.load_state_dict(tied.state_dict())  # same values, separate head and embedding
    assert tied.backbone.lm_head.weight is tied.backbone.model.embed_tokens.weight
    assert untied.backbone.lm_head.weight is not untied.backbone.model.embed_tokens.weight
    ids = _ids(B=2, T=9)
    for m in (tied, untied):
        (-m.token_logprobs(ids, mtp_backbone_grad=False).logprobs[1:].sum()).backward()
    shared = tied.backbone.lm_head.weight.grad
    assert shared.abs().max() > 0
    assert torch.allclose(shared, untied.backbone.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
    assert _grads(_trunk(untied))["model.embed_tokens.weight"] == 0.0
    assert all(g == 0.0 for n, g in _grads(_trunk(tied)).items() if n != "model.embed_tokens.weight")


def test_one_shared_lm_head_matmul_equals_per_head_projections(model):
    """All heads' log-probs come from one vocabulary projection over the stacked hidden states;
    it equals projecting each head's hidden states on its own."""
    ids = _ids(B=2, T=11, seed=7)
    with torch.no_grad():
        out = model.token_logprobs(ids, num_mtp=3, with_entropy=True)
        h0 = model.backbone_hidden(ids)
        hs = [model.backbone.model.norm(h0)] + model.mtp_hidden(h0, ids, 3)
        for k, hk in enumerate(hs):
            lp = torch.log_softmax(model.backbone.lm_head(hk), -1)  # (B, T, V) at position p
            n = 11 - k - 1  # position p predicts token p+k+1
            ref = lp[:, :n].gather(-1, ids[:, k + 1 :, None]).squeeze(-1)
            assert torch.allclose(out.logprobs[k, :, k + 1 :], ref, atol=1e-5), k
        p0 = torch.softmax(model.backbone.lm_head(hs[0]), -1)[:, :-1]
        ent = -(p0 * p0.log()).sum(-1)
        assert torch.allclose(out.entropy[:, 1:], ent, atol=1e-4)


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


@pytest.mark.parametrize("lm_head_grad", [True, False])
def test_needed_positions_give_the_same_logprobs_entropy_and_gradients(lm_head_grad):
    """``needed`` (the learner passes the response mask) skips the LM-head projection elsewhere:
    at needed tokens every head's log-prob, the entropy and all gradients equal the full
    computation; elsewhere the log-probs are 0."""
    ids = _ids()
    needed = torch.zeros_like(ids, dtype=torch.bool)
    needed[:, 6:] = True
    needed[1, 11:] = False  # a shorter response
    outs = []
    for need in (None, needed):
        m = make_tiny_model(num_mtp=2, seed=3)
        out = m.token_logprobs(ids, num_mtp=2, with_entropy=True, entropy_grad=True,
                               mtp_lm_head_grad=lm_head_grad, needed=need)
        keep = out.valid & needed.unsqueeze(0)
        loss = out.logprobs[keep].sum() + out.entropy[needed].sum()
        loss.backward()
        outs.append((out, keep, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (full, keep, g_full), (part, keep2, g_part) = outs
    assert torch.equal(keep, keep2)
    assert torch.allclose(full.logprobs[keep], part.logprobs[keep], atol=1e-6)
    assert (part.logprobs[~keep] == 0).all() and (full.logprobs[1:, 0, 7:13] != 0).all()
    assert torch.allclose(full.entropy[needed], part.entropy[needed], atol=1e-6)
    assert g_full.keys() == g_part.keys()
    for k in g_full:
        assert torch.allclose(g_full[k], g_part[k], atol=1e-6), k


@pytest.mark.parametrize("needed", [False, True])
def test_temperature_gives_every_heads_tempered_distribution(needed):
    """token_logprobs(temperature=T) is softmax(logits / T) for the main head and every MTP head (the
    drafter proposes for the tempered target): with an untied LM head, dividing the head weight by T
    divides every head's logits by T and nothing else, so the two must agree; T = 1 is bit for bit
    the untempered path, and the entropy is the tempered distribution's."""
    m = make_tiny_model(num_mtp=2, seed=3, tie_word_embeddings=False).eval()
    ids = _ids(B=2, T=12, seed=4)
    need = torch.zeros_like(ids, dtype=torch.bool)
    need[:, 5:] = True
    kw = {"num_mtp": 2, "with_entropy": True, "needed": need if needed else None}
    scaled = make_tiny_model(num_mtp=2, seed=3, tie_word_embeddings=False).eval()
    with torch.no_grad():
        scaled.backbone.lm_head.weight.div_(0.7)
        hot = m.token_logprobs(ids, temperature=0.7, **kw)
        ref = scaled.token_logprobs(ids, **kw)
        cold = m.token_logprobs(ids, **kw)
        one = m.token_logprobs(ids, temperature=1.0, **kw)
    assert torch.allclose(hot.logprobs, ref.logprobs, atol=1e-5)
    assert torch.allclose(hot.entropy, ref.entropy, atol=1e-5)
    assert (hot.logprobs - cold.logprobs).abs().max() > 1e-2  # really tempered
    assert torch.equal(one.logprobs, cold.logprobs) and torch.equal(one.entropy, cold.entropy)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        m.token_logprobs(ids, temperature=0.0)
