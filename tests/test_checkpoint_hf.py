"""`load_policy` reads real MiMo releases: Hugging Face's sharded layout (an index + shards), bf16
tensors, ``"model_type": "mimo"``, and gives the same policy as the project's own layout.

The tiny checkpoint is written the way XiaomiMiMo/MiMo-7B-RL is published: the config carries the
release's fields (model_type mimo, MiMoForCausalLM, num_nextn_predict_layers, auto_map to its remote
code, torch_dtype bfloat16, untied head, q/k/v biases, rope_theta 640000), the backbone is sharded by
`transformers`' own `save_pretrained(max_shard_size=...)`, and the MTP tensors
(`model.mtp_layers.0.*`, the names vLLM's mimo_mtp.py loads) sit in a shard of their own that the
index names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from learner.checkpoint import (
    INDEX_NAME,
    MTP_PREFIX,
    CheckpointError,
    export_state_dict,
    load_policy,
    save_policy,
)
from learner.tiny import make_tiny_model

# MiMo-7B-RL's config.json fields (the values that do not set the tiny shape are the release's).
MIMO_FIELDS = {
    "architectures": ["MiMoForCausalLM"],
    "model_type": "mimo",
    "auto_map": {"AutoConfig": "configuration_mimo.MiMoConfig",
                 "AutoModel": "modeling_mimo.MiMoModel",
                 "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"},
    "attention_bias": True,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "rope_theta": 640000,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "num_nextn_predict_layers": 1,
}


def _policy():
    """A tiny untied MiMo-shaped policy whose weights are exactly bf16 values, so the fp32 project
    layout and the bf16 release layout hold the same numbers."""
    model = make_tiny_model(num_mtp=1, seed=3, tie_word_embeddings=False, num_layers=3)
    # the release's rotary base and norm epsilon, so both layouts describe one model
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": float(MIMO_FIELDS["rope_theta"])}
    model.config.rms_norm_eps = MIMO_FIELDS["rms_norm_eps"]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def write_mimo_release(model, out: Path, shard_bytes: str = "200KB") -> Path:
    """``model`` in MiMo's published layout: bf16 shards written by save_pretrained plus an MTP
    shard, one index naming them all, MiMo's config.json."""
    model.backbone.to(torch.bfloat16).save_pretrained(str(out), max_shard_size=shard_bytes)
    model.backbone.float()
    index = json.loads((out / INDEX_NAME).read_text())
    mtp = {n: t.detach().to(torch.bfloat16).contiguous()
           for n, t in export_state_dict(model).items() if n.startswith(MTP_PREFIX)}
    save_file(mtp, str(out / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({n: "model-mtp.safetensors" for n in mtp})
    (out / INDEX_NAME).write_text(json.dumps(index))
    cfg = {k: v for k, v in json.loads((out / "config.json").read_text()).items()
           if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                    "bos_token_id", "eos_token_id")}
    (out / "config.json").write_text(json.dumps({**cfg, **MIMO_FIELDS}))
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = _policy()
    ours = save_policy(model, root / "ours")
    release = write_mimo_release(model, root / "release")
    return ours, release


def _logprobs(model):
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 11, 4], [3, 8, 21, 6, 0, 0, 0, 0]])
    attn = (torch.arange(8) < torch.tensor([[8], [4]])).long()
    with torch.no_grad():
        return model.token_logprobs(ids, attn).logprobs


def test_release_layout_is_really_sharded_bf16_mimo(layouts):
    _, release = layouts
    index = json.loads((release / INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and not (release / "model.safetensors").exists()
    assert index["weight_map"]["model.mtp_layers.0.input_proj.weight"] == "model-mtp.safetensors"
    from safetensors import safe_open

    with safe_open(str(release / "model-mtp.safetensors"), "pt") as f:
        assert f.get_tensor("model.mtp_layers.0.token_layernorm.weight").dtype == torch.bfloat16
    assert json.loads((release / "config.json").read_text())["model_type"] == "mimo"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_layout_gives_the_same_logprobs_as_our_layout(layouts, dtype):
    ours, release = layouts
    a, b = load_policy(ours, dtype=dtype), load_policy(release, dtype=dtype)
    assert (b.config.rope_parameters["rope_theta"], b.config.rms_norm_eps) == (640000, 1e-5)
    assert a.config.rope_parameters == b.config.rope_parameters and a.config.rms_norm_eps == b.config.rms_norm_eps
    assert next(b.parameters()).dtype == dtype
    for (n, x), (m, y) in zip(export_state_dict(a).items(), export_state_dict(b).items()):
        assert n == m and torch.equal(x, y), n
    la, lb = _logprobs(a), _logprobs(b)
    assert la.shape[0] == 2  # main head and the MTP head
    assert torch.equal(la, lb)


def test_a_policy_loaded_from_the_release_saves_in_our_layout(layouts, tmp_path):
    """Round trip: release → load → save_policy writes model_type qwen2 in one file, without the
    release's auto_map (its remote-code files are not copied)."""
    _, release = layouts
    out = save_policy(load_policy(release), tmp_path / "converted")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and "auto_map" not in cfg and (out / "model.safetensors").is_file()
    assert torch.equal(_logprobs(load_policy(out)), _logprobs(load_policy(release)))


def _variant(release: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(release, d)
    return d


def _index(d: Path) -> dict:
    return json.loads((d / INDEX_NAME).read_text())


def _a_backbone_shard(d: Path) -> str:
    return _index(d)["weight_map"]["model.layers.0.self_attn.q_proj.weight"]


def test_a_missing_shard_is_named(layouts, tmp_path):
    d = _variant(layouts[1], tmp_path, "noshard")
    shard = _a_backbone_shard(d)
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*not in .*fetch the missing files"):
        load_policy(d)


def test_a_shard_without_a_tensor_the_index_names(layouts, tmp_path):
    d = _variant(layouts[1], tmp_path, "lacking")
    from safetensors.torch import load_file

    shard = _a_backbone_shard(d)
    tensors = load_file(str(d / shard))
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, str(d / shard))
    with pytest.raises(CheckpointError, match=r"lacks \['model.layers.0.self_attn.q_proj.weight'\].*fetch it again"):
        load_policy(d)


def test_a_corrupt_shard(layouts, tmp_path):
    d = _variant(layouts[1], tmp_path, "corrupt")
    shard = _a_backbone_shard(d)
    (d / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=f"{shard} is corrupt"):
        load_policy(d)


def test_an_index_without_weight_map(layouts, tmp_path):
    d = _variant(layouts[1], tmp_path, "badindex")
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_policy(d)


def test_an_unknown_model_type_names_what_is_supported(layouts, tmp_path):
    d = _variant(layouts[1], tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'; supported: 'qwen2'.*'mimo'"):
        load_policy(d)


def _add_to_mtp_shard(d: Path, name: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(d / "model-mtp.safetensors"))
    tensors[name] = torch.ones(16)
    save_file(tensors, str(d / "model-mtp.safetensors"))
    index = _index(d)
    index["weight_map"][name] = "model-mtp.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(index))


def test_rotary_caches_are_ignored_other_extras_fail(layouts, tmp_path):
    """Old transformers versions saved rotary inv_freq buffers (vLLM drops them too): harmless,
    ignored. A tensor the policy has no place for is an error, never silently dropped."""
    d = _variant(layouts[1], tmp_path, "inv_freq")
    _add_to_mtp_shard(d, "model.mtp_layers.0.self_attn.rotary_emb.inv_freq")
    assert torch.equal(_logprobs(load_policy(d)), _logprobs(load_policy(layouts[0])))
    d = _variant(layouts[1], tmp_path, "extra")
    _add_to_mtp_shard(d, "model.mtp_layers.0.eh_proj.weight")
    with pytest.raises(CheckpointError, match=r"does not match its config.*unexpected \['model.mtp_layers.0.eh_proj"):
        load_policy(d)


def test_a_config_that_does_not_fit_the_weights(layouts, tmp_path):
    d = _variant(layouts[1], tmp_path, "shape")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(CheckpointError, match="has shape .* does not belong"):
        load_policy(d)
