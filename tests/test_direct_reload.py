"""The direct CPU weight reload (`rollout.direct_reload`, ``weight_reload: direct_cpu``) against
vLLM's own reload path and against an engine started from the new weights: same log-probs, same
drafts and acceptance; a bad update is refused whole (the engine keeps serving the old weights);
the engine keeps no reference to the tensors it was given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner.checkpoint import iter_export_tensors, load_policy, save_policy
from parity import max_logprob_error
from rollout.actor import create_engine_actor

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(6)]
GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 24}
SAMPLED = {"n": 2, "temperature": 1.0, "max_tokens": 16, "seed": 5}
CFG = {"num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1}


def _perturbed(ckpt, seed: int = 11, scale: float = 0.05):
    policy = load_policy(ckpt)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * scale)
    return policy


@pytest.fixture(scope="module")
def new_policy(tiny_ckpt):
    return _perturbed(tiny_ckpt)


@pytest.fixture(scope="module")
def engines(ray_session, tiny_ckpt, new_policy, tmp_path_factory):
    """direct: the default (auto) path; vllm: vLLM's reload; fresh: started from the new weights."""
    fresh_ckpt = save_policy(new_policy, tmp_path_factory.mktemp("direct-reload") / "perturbed")
    actors = {
        "direct": create_engine_actor({"model": str(tiny_ckpt), **CFG}),
        "vllm": create_engine_actor({"model": str(tiny_ckpt), **CFG, "weight_reload": "vllm"}),
        "fresh": create_engine_actor({"model": str(fresh_ckpt), **CFG}),
    }
    infos = ray_session.get([a.info.remote() for a in actors.values()])  # waits for all three
    yield actors, dict(zip(actors, infos))
    for a in actors.values():
        ray_session.kill(a)


def _drafter_logits(ray, engine, prompt) -> torch.Tensor:
    """The drafter's logits right after prefill (its first draft)."""
    ray.get(engine.start_drafter_capture.remote())
    ray.get(engine.generate.remote([prompt], {"n": 1, "temperature": 0.0, "max_tokens": 2}))
    return ray.get(engine.take_drafter_capture.remote())[0][-1]


def _max_lp_diff(a, b) -> float:
    return max((torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max().item()
               for x, y in zip(a.samples, b.samples))


def test_auto_picks_the_direct_reload_on_cpu(engines):
    _, info = engines
    assert info["direct"]["weight_reload"] == "direct_cpu", info["direct"]
    assert info["vllm"]["weight_reload"] == "vllm"
    # tiny model: 2 layers + 2 MTP layers, 4 packed linears each; the tied head is repacked
    assert "linears 16" in info["direct"]["weight_reload_note"] and "heads 1" in info["direct"]["weight_reload_note"]


def test_direct_reload_equals_vllm_reload_and_a_fresh_engine(ray_session, engines, new_policy):
    actors, _ = engines
    direct, vllm, fresh = actors["direct"], actors["vllm"], actors["fresh"]
    weights = list(iter_export_tensors(new_policy))
    seconds = ray_session.get([direct.update_weights.remote(1, weights), vllm.update_weights.remote(1, weights)])
    print(f"tiny update: direct {seconds[0]:.3f}s, vLLM {seconds[1]:.3f}s")
    greedy = ray_session.get([e.generate.remote(PROMPTS, GREEDY) for e in (direct, vllm, fresh)])
    sampled = ray_session.get([e.generate.remote(PROMPTS, SAMPLED) for e in (direct, vllm, fresh)])
    for batches in (greedy, sampled):
        tokens = [[s.token_ids for s in b.samples] for b in batches]
        assert tokens[0] == tokens[1] == tokens[2]
        assert all(s.policy_version == 1 for s in batches[0].samples)
        # the same drafts accepted: drafting with the reloaded head behaves as a freshly loaded one
        stats = [(b.spec.num_drafts, b.spec.num_accepted_tokens) for b in batches]
        assert stats[0] == stats[1] == stats[2] and stats[0][0] > 0, stats
        diffs = [_max_lp_diff(batches[0], b) for b in batches[1:]]
        err = max_logprob_error(new_policy, batches[0])
        print(f"direct vs vLLM reload {diffs[0]:.1e}, vs fresh engine {diffs[1]:.1e}, vs learner {err:.1e}")
        assert max(diffs) <= 1e-5 and err <= 1e-4
    logits = [_drafter_logits(ray_session, e, PROMPTS[0]) for e in (direct, vllm, fresh)]
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 and (logits[0] - logits[2]).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda w: w + [("model.layers.0.self_attn.q_proj.weight_typo", w[0][1])], "unknown tensor name"),
        (lambda w: [(n, t) for n, t in w if n != "model.layers.1.self_attn.v_proj.weight"],
         "needs model.layers.1.self_attn.v_proj.weight"),
        (lambda w: [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in w], "model.norm.weight has shape"),
    ],
    ids=["unknown-name", "partial-fused-group", "wrong-shape"],
)
def test_a_bad_update_is_refused_whole(ray_session, engines, tiny_ckpt, mangle, message):
    """Every other tensor of the bad update is valid (and different): none of them is loaded."""
    direct = engines[0]["direct"]
    base = load_policy(tiny_ckpt)
    ray_session.get(direct.update_weights.remote(3, list(iter_export_tensors(base))))
    before = ray_session.get(direct.generate.remote(PROMPTS, GREEDY))
    bad = mangle(list(iter_export_tensors(_perturbed(tiny_ckpt, seed=12))))
    with pytest.raises(ValueError, match=message) as info:
        ray_session.get(direct.update_weights.remote(4, bad))
    assert "nothing was loaded" in str(info.value)
    after = ray_session.get(direct.generate.remote(PROMPTS, GREEDY))
    assert [s.token_ids for s in after.samples] == [s.token_ids for s in before.samples]
    assert _max_lp_diff(after, before) == 0.0
    assert all(s.policy_version == 3 for s in after.samples)
    assert max_logprob_error(base, after) <= 1e-4


SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
from learner.checkpoint import iter_export_tensors, load_policy
from parity import max_logprob_error
from rollout.engine import RolloutEngine

engine = RolloutEngine({{"model": {model!r}, "num_speculative_tokens": 1, "max_model_len": 256,
                         "kv_cache_gib": 0.1, "num_threads": 1, "weight_reload": "direct_cpu"}})
policy = load_policy({model!r})
torch.manual_seed(3)
with torch.no_grad():
    for p in policy.parameters():
        p.add_(torch.randn_like(p) * 0.05)
given = [(n, t.clone()) for n, t in iter_export_tensors(policy)]
engine.update_weights(1, given)
prompts = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(4)]
sampling = {{"n": 1, "temperature": 1.0, "max_tokens": 12, "seed": 1}}
err_loaded = max_logprob_error(policy, engine.generate(prompts, sampling))
for _, t in given:  # the caller reuses its buffers: the engine must not see it
    t.mul_(-3.0).add_(1.0)
err_after_mutation = max_logprob_error(policy, engine.generate(prompts, sampling))
# MTP tensors only (what learner.warmup pushes): whole units, so accepted
engine.update_weights(2, list(iter_export_tensors(policy, mtp_only=True)))
err_mtp_only = max_logprob_error(policy, engine.generate(prompts, sampling))
print(json.dumps({{"loaded": err_loaded, "after_mutation": err_after_mutation, "mtp_only": err_mtp_only}}))
"""


def test_engine_keeps_no_reference_to_the_given_tensors(tiny_ckpt):
    """In-process (as `mtprl eval` and the benchmark run it): the packed handlers and in-place
    copies leave the caller's tensors free to change after update_weights returns."""
    code = SCRIPT.format(repo=str(REPO), model=str(tiny_ckpt))
    code = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n" + code  # for `parity`
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(res)
    assert res["loaded"] <= 1e-4 and res["after_mutation"] <= 1e-4 and res["mtp_only"] <= 1e-4, res
