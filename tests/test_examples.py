"""examples/: every run spec parses as a `RunSpec`, passes the model cross-checks, its local
references resolve, its resource requests fit `deploy/cluster.yaml`, and the paper settings say
what examples/README.md says they do.

References: the GPU specs name files on the cluster's shared filesystem under /mnt/mtprl (see
examples/README.md). The test maps that prefix to a temporary directory and creates each file
there as README describes it — a model directory's config.json with its number of MTP modules, a
few JSONL rows in the layout the README names — so `DataSpec`'s existence check stays strict, the
K-vs-heads checks run against the documented model, and the data loader must accept the layout.
Relative paths (the compare set's `.cache/models/…`) are created under the temporary working
directory the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from services.plan import INSTANCE_TYPES, load_cluster, plan_spec
from services.spec import SKIP_FILE_CHECKS, RunSpec, is_local_path, spec_problems

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SPECS = sorted(EXAMPLES.rglob("*.yaml"))
SHARED = "/mnt/mtprl"

# What each local reference is, as examples/README.md documents it.
MODELS = {  # path -> num_nextn_predict_layers
    f"{SHARED}/models/MiMo-7B-RL": 1,
    f"{SHARED}/models/r1-distill-1.5b-mtp4": 4,
    ".cache/models/smollm2-mtp1-warm": 1,
    ".cache/models/smollm2-demo-t1": 1,
}
DATA_ROWS = {  # path -> a row in its documented layout
    f"{SHARED}/data/dapo-math-17k.jsonl": {
        "data_source": "math_dapo", "prompt": [{"role": "user", "content": "Compute 2+3."}], "ability": "MATH",
        "reward_model": {"ground_truth": "5", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a1"}},
    f"{SHARED}/data/gsm8k-train.jsonl": {"question": "Tom has 2 apples and gets 3 more. How many?",
                                         "answer": "2 + 3 = 5\n#### 5"},
    f"{SHARED}/data/math-train.jsonl": {"problem": "What is $2+3$?", "solution": "It is $\\boxed{5}$.",
                                        "level": "Level 1", "type": "Prealgebra"},
}
# AWS instance types of deploy/cluster.yaml: what Ray sees on such a node (vCPUs, GPUs), from the
# planner's one table of them.
INSTANCES = {name: {"CPU": t.cpus, "GPU": t.gpus} for name, t in INSTANCE_TYPES.items()}


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _refs(raw: dict) -> tuple[str, str | None]:
    ds = raw["data"]["dataset"]
    return raw["model"]["path"], ds.removeprefix("jsonl:") if ds.startswith("jsonl:") else None


def _relocate(obj, root: Path):
    """The spec with /mnt/mtprl mapped to ``root``."""
    if isinstance(obj, dict):
        return {k: _relocate(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, root) for v in obj]
    return obj.replace(SHARED, str(root)) if isinstance(obj, str) else obj


@pytest.fixture
def shared_fs(tmp_path, monkeypatch) -> Path:
    """The documented files, created under a temporary /mnt/mtprl and working directory."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "mnt"
    for path, n_mtp in MODELS.items():
        d = Path(path.replace(SHARED, str(root)))
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"architectures": ["MiMoForCausalLM"],
                                                   "num_nextn_predict_layers": n_mtp}))
    for path, row in DATA_ROWS.items():
        p = Path(path.replace(SHARED, str(root)))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps({**row, "id": i}) + "\n" for i in range(3)))
    return root


def test_there_are_examples_and_the_readme_lists_each():
    readme = (EXAMPLES / "README.md").read_text()
    assert len(SPECS) >= 7
    for spec in SPECS:
        rel = spec.relative_to(EXAMPLES).as_posix()
        assert rel in readme, f"{rel} is not in examples/README.md's table"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_spec_parses_and_its_references_resolve(path, shared_fs):
    raw = _raw(path)
    model, data = _refs(raw)
    readme = (EXAMPLES / "README.md").read_text()
    assert model in MODELS and f"`{model}`" in readme, f"model {model!r} is not documented in examples/README.md"
    assert is_local_path(model.replace(SHARED, str(shared_fs)))  # so RunSpec checks its config.json
    if data is not None:
        assert data in DATA_ROWS and f"`{data}`" in readme, f"data {data!r} is not documented"
    spec = RunSpec.model_validate(_relocate(raw, shared_fs))
    assert spec_problems(spec) == []
    from services.data import all_items

    items = all_items(spec)  # the loader accepts the documented layout (or builds the reasoning-gym task)
    assert items and all(it.kind == "math" and it.gold for it in items)
    if data is not None:
        assert {it.gold for it in items} == {"5"}


def test_a_missing_reference_fails_validation(shared_fs):
    raw = _relocate(_raw(EXAMPLES / "occ/mimo7b-dapo-occ.yaml"), shared_fs)
    raw["data"]["dataset"] = f"jsonl:{shared_fs}/data/nope.jsonl"
    with pytest.raises(ValueError, match="does not exist"):
        RunSpec.model_validate(raw)
    raw = _relocate(_raw(EXAMPLES / "mpo/r1-distill-1.5b-gsm8k-mpo.yaml"), shared_fs)
    (shared_fs / "models/r1-distill-1.5b-mtp4/config.json").write_text(json.dumps({"num_nextn_predict_layers": 2}))
    assert [p["loc"] for p in spec_problems(RunSpec.model_validate(raw))] == [("algorithm", "mpo", "k")]


# ---- resources against deploy/cluster.yaml -------------------------------------------------------
def _nodes() -> dict[str, dict]:
    """Node type -> {CPU, GPU, max}: Ray's resources per node and how many the cluster may have."""
    cluster = yaml.safe_load((ROOT / "deploy/cluster.yaml").read_text())
    out = {}
    for name, t in cluster["available_node_types"].items():
        res = dict(INSTANCES[t["node_config"]["InstanceType"]])
        accel = [v for k, v in t.get("resources", {}).items() if k.startswith("accelerator_type")]
        assert not accel or accel == [res["GPU"]], f"{name}: accelerator count {accel} vs {res['GPU']} GPUs"
        res.update({k: v for k, v in t.get("resources", {}).items() if k in ("CPU", "GPU")})
        res["max"] = 1 if name == cluster["head_node_type"] else t.get("max_workers", 0)
        out[name] = res
    return out


def _bundles(spec: RunSpec) -> list[dict[str, float]]:
    """The run's placement-group bundles (docs/scale.md): one per learner rank, then one per
    engine, then one per reward actor."""
    r = spec.resources
    return ([{"CPU": r.cpus_per_learner, "GPU": r.gpus_per_learner}] * int(r.learner_workers)
            + [{"CPU": r.cpus_per_engine, "GPU": r.gpus_per_engine * r.tensor_parallel}] * spec.rollout.engines
            + [{"CPU": r.cpus_per_reward_worker, "GPU": 0}] * spec.reward.actors)


def _pack(bundles: list[dict[str, float]], nodes: dict[str, dict]) -> bool:
    """First-fit decreasing of the bundles into the largest cluster the config allows."""
    free = [dict(CPU=n["CPU"], GPU=n["GPU"]) for n in nodes.values() for _ in range(n["max"])]
    free.sort(key=lambda n: (n["GPU"], n["CPU"]))  # small nodes first: keep big ones for big bundles
    for b in sorted(bundles, key=lambda b: (b["GPU"], b["CPU"]), reverse=True):
        for n in free:
            if n["CPU"] >= b["CPU"] and n["GPU"] >= b["GPU"]:
                n["CPU"] -= b["CPU"]
                n["GPU"] -= b["GPU"]
                break
        else:
            return False
    return True


CPU_DIRS = ("compare/", "drafting/")  # sized for the two-core machine of `make demo`
GPU_SPECS = [p for p in SPECS if not p.relative_to(EXAMPLES).as_posix().startswith(CPU_DIRS)]


@pytest.mark.parametrize("path", GPU_SPECS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_gpu_spec_fits_the_cluster_node_types(path, shared_fs):
    spec = RunSpec.model_validate(_relocate(_raw(path), shared_fs))
    nodes = _nodes()
    r = spec.resources
    assert r.learner_gpus >= 1 and r.gpus_per_engine >= 1, "a paper setting runs on GPUs"
    for b in _bundles(spec):
        assert any(n["CPU"] >= b["CPU"] and n["GPU"] >= b["GPU"] for n in nodes.values()), \
            f"bundle {b} fits no node type of deploy/cluster.yaml ({nodes})"
    assert _pack(_bundles(spec), nodes), f"{path.name}: {_bundles(spec)} do not fit the cluster at its maximum size"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_spec_fits_in_memory_on_the_cluster(path):
    """`mtprl plan`: every learner rank and engine fits the GPU (or host) memory of a node type of
    deploy/cluster.yaml, and the bundles pack into the cluster at its maximum size with that memory.
    The /mnt/mtprl models are sized from the planner's built-in table of their real configs."""
    spec = RunSpec.model_validate(_raw(path), context={SKIP_FILE_CHECKS: True})
    plan = plan_spec(spec, load_cluster(ROOT / "deploy/cluster.yaml"))
    assert plan.fits, f"{path.name}: {plan.problems}; {plan.suggestions}"
    assert not plan.placement["unplaced"]
    gpu_learner = spec.resources.learner_gpus > 0
    placed = [d for n in plan.placement["nodes"] for d in n["gpus"] if d["what"].startswith("learner")]
    assert len(placed) == (spec.resources.learner_workers if gpu_learner else 0)
    assert all(d["used_gib"] <= d["capacity_gib"] for n in plan.placement["nodes"] for d in n["gpus"])


def test_the_7b_occ_learner_is_sharded_over_its_eight_gpus():
    spec = RunSpec.model_validate(_raw(EXAMPLES / "occ/mimo7b-dapo-occ.yaml"), context={SKIP_FILE_CHECKS: True})
    assert spec.resources.learner_workers == 8 and spec.resources.gpus_per_learner == 1
    assert len(_bundles(spec)) == 8 + spec.rollout.engines + spec.reward.actors
    plan = plan_spec(spec, load_cluster(ROOT / "deploy/cluster.yaml"))
    assert plan.model["config_source"].startswith("built-in") and plan.model["hidden_size"] == 4096
    assert plan.learner["ranks"] == 8 and plan.learner["activation_checkpointing"]


def test_fit_check_can_fail():
    nodes = _nodes()
    assert not _pack([{"CPU": 1, "GPU": 9}], nodes)  # more GPUs than any node has
    assert not _pack([{"CPU": 90, "GPU": 8}] * 3, nodes)  # three full A100 nodes; the cluster has two
    assert _pack([{"CPU": 90, "GPU": 8}] * 2 + [{"CPU": 8, "GPU": 1}] * 4, nodes)


# ---- the paper settings ----------------------------------------------------------------------------
def _without(raw: dict, *paths: tuple[str, ...]) -> dict:
    out = json.loads(json.dumps(raw))
    for p in paths:
        d = out
        for k in p[:-1]:
            d = d[k]
        d.pop(p[-1])
    return out


def test_occ_main_setting(shared_fs):
    raws = {p.stem.rsplit("-", 1)[1]: _raw(p) for p in sorted((EXAMPLES / "occ").glob("*.yaml"))}
    assert set(raws) == {"detach", "ce", "policy", "occ"}
    for regime, raw in raws.items():
        spec = RunSpec.model_validate(_relocate(raw, shared_fs))
        assert spec.model.path.endswith("/MiMo-7B-RL") and spec.data.dataset.endswith("/dapo-math-17k.jsonl")
        a = spec.algorithm
        assert (a.algorithm, a.mtp_regime, a.lr) == ("dapo", regime, 1e-6)
        assert (a.clip_low, a.clip_high, a.dapo.dynamic_sampling) == (0.2, 0.28, True)
        assert a.occ.fixed_lambda == 0.1 and a.occ.lambda_plus == 1.0
        assert spec.rollout.prompts_per_step == 128 and spec.rollout.temperature == 1.0
        assert spec.schedule.steps == 200
    # the four differ in nothing but the regime (and the name)
    assert len({json.dumps(_without(r, ("name",), ("algorithm", "mtp_regime")), sort_keys=True)
                for r in raws.values()}) == 1


def test_mpo_setting(shared_fs):
    specs = {p.stem: RunSpec.model_validate(_relocate(_raw(p), shared_fs))
             for p in sorted((EXAMPLES / "mpo").glob("*.yaml"))}
    assert {s.data.dataset.rsplit("/", 1)[1] for s in specs.values()} == {"gsm8k-train.jsonl", "math-train.jsonl"}
    for spec in specs.values():
        a = spec.algorithm
        assert spec.model.path.endswith("/r1-distill-1.5b-mtp4")
        assert a.algorithm == "ppo" and (a.mpo.k, a.mpo.mtp_share, a.mpo.decay, a.mpo.form) == (5, 0.2, 0.8, "logsum")


def test_compare_base_spec_runs_every_regime(shared_fs):
    """`mtprl compare`'s base spec can be turned into each regime's run (`regime_specs` validates
    them all, e.g. occ needs more than one optimiser step per update)."""
    from services.compare import REGIMES, regime_specs

    spec = RunSpec.model_validate(_raw(EXAMPLES / "compare" / "smollm2-arith.yaml"))
    assert set(regime_specs(spec, list(REGIMES))) == set(REGIMES)


def test_drafting_example_is_spec_rls_measured_occ_distill_row(shared_fs):
    """examples/drafting quotes the acceptance of `benchmarks/spec_rl.py`'s best occ+distill row
    (docs/benchmarks.md, session 21): it must be that row's run, but for its name, model path and
    checkpoints. The row is rebuilt the way spec_rl builds it (its base spec through
    `services.compare.regime_specs`) with that session's arguments."""
    import argparse
    import importlib.util

    from services.compare import regime_specs

    mod_spec = importlib.util.spec_from_file_location("spec_rl", ROOT / "benchmarks" / "spec_rl.py")
    spec_rl = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(spec_rl)
    args = argparse.Namespace(steps=40, seed=0, lr=1e-5, prompts_per_step=4, samples_per_prompt=4, max_tokens=64,
                              distill_kind="kl", distill_coef=1.0, head_steps=8, replay=1, mtp_lr=3e-3,
                              draft_method="auto")
    example = RunSpec.model_validate(_raw(EXAMPLES / "drafting" / "smollm2-occ-distill.yaml"))
    row = regime_specs(RunSpec.model_validate(spec_rl.base_spec(Path(example.model.path), args)),
                       ["occ+distill"])["occ+distill"]

    def comparable(spec: RunSpec) -> dict:
        d = spec.model_dump()
        d.pop("name"), d.pop("model"), d["schedule"].pop("checkpoint_every")
        return d

    assert comparable(example) == comparable(row)
    assert example.algorithm.mtp.distill.head_steps == 8 and example.rollout.temperature == 1.0
