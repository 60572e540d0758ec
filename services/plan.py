"""`mtprl plan SPEC`: will a run spec fit its resources and the cluster's node types?

    plan = plan_spec(spec, load_cluster())          # services.spec.RunSpec, deploy/cluster.yaml
    plan.fits, plan.learner["total_gib"], plan.problems, plan.suggestions

Sizes every learner rank and engine with `learner.memory_plan` (formulas there), places the run's
placement-group bundles (one per learner rank, one per engine, one per reward actor, as
docs/scale.md describes) on the node types of ``deploy/cluster.yaml`` by first-fit decreasing
(resources and GPU memory), and when something does not fit re-plans with single changes
(activation checkpointing, micro_batch_size 1, bf16, twice the learner ranks, a smaller KV cache,
a node type with larger GPUs) to say which would make it fit.

`INSTANCE_TYPES` is the one table of what each AWS instance type brings (Ray sees vCPUs and GPUs;
the GPU memory is not in the YAML); deploy/cluster.yaml's comments agree with it and
tests/test_examples.py reads it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from learner.memory_plan import (
    GIB,
    LearnerSizing,
    ModelShape,
    auto_micro_batch,
    engine_bytes,
    gib,
    known_config,
    kv_bytes_per_token,
    learner_rank_bytes,
    param_count,
)
from services.spec import RunSpec, is_local_path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "deploy" / "cluster.yaml"


class InstanceType(BaseModel):
    """What a node of one AWS instance type brings."""

    model_config = ConfigDict(frozen=True)

    cpus: int = Field(..., description="vCPUs (what Ray counts as CPU).")
    ram_gib: float = Field(..., description="Host memory.")
    gpus: int = 0
    gpu_model: str | None = None
    gpu_gib: float = Field(0.0, description="Memory per GPU as the driver reports it (nvidia-smi total).")


#: AWS instance types (vCPUs, memory and GPUs from AWS's instance-type pages). A10G: 23028 MiB;
#: A100-SXM4-40GB: 40960 MiB; A100-SXM4-80GB: 81920 MiB; H100-SXM5-80GB: 81559 MiB.
INSTANCE_TYPES: dict[str, InstanceType] = {
    "m5.2xlarge": InstanceType(cpus=8, ram_gib=32),
    "g5.2xlarge": InstanceType(cpus=8, ram_gib=32, gpus=1, gpu_model="A10G", gpu_gib=22.49),
    "p4d.24xlarge": InstanceType(cpus=96, ram_gib=1152, gpus=8, gpu_model="A100-SXM4-40GB", gpu_gib=40.0),
    "p4de.24xlarge": InstanceType(cpus=96, ram_gib=1152, gpus=8, gpu_model="A100-SXM4-80GB", gpu_gib=80.0),
    "p5.48xlarge": InstanceType(cpus=192, ram_gib=2048, gpus=8, gpu_model="H100-SXM5-80GB", gpu_gib=79.65),
}


class NodeType(BaseModel):
    """A node type of the cluster: its instance and how many such nodes the cluster may have."""

    name: str
    instance: str
    cpus: float
    gpus: int
    gpu_gib: float
    ram_gib: float
    max_count: int


def load_cluster(path: str | Path = CLUSTER_YAML) -> list[NodeType]:
    """The node types of a ``ray up`` cluster YAML (the head counts once; workers up to max_workers)."""
    cluster = yaml.safe_load(Path(path).read_text())
    out = []
    for name, t in cluster["available_node_types"].items():
        inst = t["node_config"]["InstanceType"]
        if inst not in INSTANCE_TYPES:
            raise ValueError(f"{path}: node type {name} uses {inst}, which services.plan.INSTANCE_TYPES "
                             "does not know; add its vCPUs, memory and GPUs there")
        it = INSTANCE_TYPES[inst]
        res = t.get("resources", {})
        out.append(NodeType(
            name=name, instance=inst, cpus=res.get("CPU", it.cpus), gpus=res.get("GPU", it.gpus),
            gpu_gib=it.gpu_gib, ram_gib=it.ram_gib,
            max_count=1 if name == cluster["head_node_type"] else int(t.get("max_workers", 0))))
    return out


# ---- the inputs a plan is made of (what a suggestion changes) ----------------------------------------
class PlanInputs(BaseModel):
    """The spec's settings the memory depends on, resolved (auto values decided)."""

    model_config = ConfigDict(extra="forbid")

    learner_ranks: int
    learner_on_gpu: bool
    learner_cpus: float
    precision: Literal["fp32", "bf16"]
    micro_batch_size: int | Literal["auto"]
    micro_batch_logits: int
    activation_checkpointing: bool
    seq_len: int
    response_len: int
    train_heads: int
    kl_reference: bool
    engines: int
    engine_gpus: int
    tensor_parallel: int
    cpus_per_engine: float
    engine_dtype_bytes: int
    kv_cache_gib: float
    drafter: bool
    max_model_len: int
    reward_actors: int
    cpus_per_reward: float


def engine_dtype_bytes(spec: RunSpec) -> int:
    """Element size of the engines' weights: the dtype of the run's engine config (the spec's, else
    the engine device's default: float32 on CPU, bfloat16 on GPU; rollout.config.DEVICE_DEFAULTS)."""
    return {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}[spec.engine_config().dtype]


def inputs_from_spec(spec: RunSpec, shape: ModelShape, prompt_tokens: int | None = None) -> PlanInputs:
    """Resolve the spec: learner ranks, precision (auto → bf16 on a GPU, fp32 on the CPU), the
    sample length (prompt + max_tokens bounded by max_model_len; max_model_len when the prompt
    length is not given: the longest sample an engine can return) and the training forward's heads
    (main + max(MPO's K − 1, the regime's trained heads, the distilled heads), plus mtp.distill's
    full-vocabulary rows, as `learner.step.Learner` counts them)."""
    alg, ro, res = spec.algorithm, spec.rollout, spec.resources
    on_gpu = res.learner_gpus > 0 and alg.device != "cpu"
    precision = alg.precision if alg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    seq = min(prompt_tokens + ro.max_tokens, ro.max_model_len) if prompt_tokens else ro.max_model_len
    k = 1 if alg.mpo is None or alg.mpo.mtp_share == 0.0 else alg.mpo.k
    n_heads = max(k - 1, alg.trained_mtp_heads(shape.num_mtp), alg.distill_heads(shape.num_mtp))
    n_distill = alg.distill_heads(shape.num_mtp)
    # mtp.distill's full-vocabulary rows: the teacher's and one per distilled head (Learner.step)
    n_heads += n_distill + 1 if n_distill else 0
    return PlanInputs(
        learner_ranks=int(res.learner_workers or 1), learner_on_gpu=on_gpu, learner_cpus=res.learner_cpus,
        precision=precision, micro_batch_size=alg.micro_batch_size, micro_batch_logits=alg.micro_batch_logits,
        activation_checkpointing=alg.activation_checkpointing, seq_len=seq,
        response_len=max(1, min(ro.max_tokens, seq - 1)), train_heads=1 + n_heads,
        kl_reference=alg.advantage.kl_coef > 0, engines=ro.engines,
        engine_gpus=res.engine_gpus, tensor_parallel=res.tensor_parallel,
        cpus_per_engine=res.cpus_per_engine, engine_dtype_bytes=engine_dtype_bytes(spec),
        kv_cache_gib=spec.engine_config().kv_cache_gib or 0.0, drafter=ro.num_speculative_tokens > 0, max_model_len=ro.max_model_len,
        reward_actors=spec.reward.actors, cpus_per_reward=res.cpus_per_reward_worker)


def learner_sizing(x: PlanInputs, shape: ModelShape) -> LearnerSizing:
    """Samples per rank: a fixed micro_batch_size is global (split over the ranks: ⌈size/N⌉ on the
    fullest rank); 'auto' is the learner's logits budget per rank (docs/scale.md)."""
    if x.micro_batch_size == "auto":
        micro = auto_micro_batch(x.micro_batch_logits, x.seq_len, shape.vocab_size, x.train_heads)
    else:
        micro = math.ceil(x.micro_batch_size / x.learner_ranks)
    e = 2 if x.precision == "bf16" else 4
    return LearnerSizing(ranks=x.learner_ranks, compute_bytes=e, micro_batch=micro, seq_len=x.seq_len,
                         response_len=x.response_len, train_heads=x.train_heads,
                         activation_checkpointing=x.activation_checkpointing, kl_reference=x.kl_reference,
                         autocast=x.learner_on_gpu and e == 2)


# ---- the plan ------------------------------------------------------------------------------------
class Plan(BaseModel):
    """`mtprl plan --json`'s object."""

    fits: bool
    model: dict[str, Any]
    learner: dict[str, Any]
    engines: list[dict[str, Any]]
    placement: dict[str, Any]
    problems: list[str]
    suggestions: list[str]
    warnings: list[str] = Field(default_factory=list)


def _parts(d: dict[str, int]) -> dict[str, Any]:
    return {"bytes": d, "gib": {k: gib(v) for k, v in d.items()}, "total_bytes": sum(d.values()),
            "total_gib": gib(sum(d.values()))}


def _bundles(x: PlanInputs, rank_bytes: int, engine_gpu_bytes: int) -> list[dict[str, Any]]:
    """The placement group's bundles (docs/scale.md): one per learner rank, per engine, per reward
    actor; ``gpu_bytes`` per GPU of a GPU bundle, ``host_bytes`` for a CPU-resident process."""
    out = []
    for r in range(x.learner_ranks):
        gpu = 1 if x.learner_on_gpu else 0
        out.append({"what": f"learner rank {r}", "CPU": x.learner_cpus / x.learner_ranks, "GPU": gpu,
                    "gpu_bytes": rank_bytes if gpu else 0, "host_bytes": 0 if gpu else rank_bytes})
    for i in range(x.engines):
        g = x.engine_gpus
        out.append({"what": f"engine {i}", "CPU": x.cpus_per_engine, "GPU": g,
                    "gpu_bytes": engine_gpu_bytes if g else 0, "host_bytes": 0 if g else engine_gpu_bytes})
    for i in range(x.reward_actors):
        out.append({"what": f"reward {i}", "CPU": x.cpus_per_reward, "GPU": 0, "gpu_bytes": 0, "host_bytes": 0})
    return out


def _pack(bundles: list[dict[str, Any]], nodes: list[NodeType]) -> tuple[list[dict[str, Any]], list[str]]:
    """First-fit decreasing into the largest cluster the node types allow: a bundle goes on the
    first node (smallest first, so big nodes stay free for big bundles) with the CPUs, free GPUs
    with enough memory each, and host memory for a CPU-resident process. Returns the used nodes
    with what they hold, and the bundles that found no place."""
    free = [{"node_type": n.name, "instance": n.instance, "CPU": n.cpus, "GPU": n.gpus, "gpu_gib": n.gpu_gib,
             "ram_free": n.ram_gib * GIB, "ram_gib": n.ram_gib, "devices": [], "host": []}
            for n in nodes for _ in range(n.max_count)]
    free.sort(key=lambda n: (n["gpu_gib"], n["GPU"], n["CPU"]))
    unplaced = []
    for b in sorted(bundles, key=lambda b: (b["GPU"], b["gpu_bytes"], b["CPU"], b["host_bytes"]), reverse=True):
        for n in free:
            if (n["CPU"] + 1e-9 >= b["CPU"] and n["GPU"] >= b["GPU"] and n["ram_free"] >= b["host_bytes"]
                    and (b["GPU"] == 0 or b["gpu_bytes"] <= n["gpu_gib"] * GIB)):
                n["CPU"] -= b["CPU"]
                n["GPU"] -= b["GPU"]
                n["ram_free"] -= b["host_bytes"]
                for _ in range(b["GPU"]):
                    n["devices"].append({"what": b["what"], "used_gib": gib(b["gpu_bytes"]),
                                         "capacity_gib": n["gpu_gib"]})
                if not b["GPU"]:
                    n["host"].append({"what": b["what"], "used_gib": gib(b["host_bytes"])})
                break
        else:
            unplaced.append(b["what"])
    used = [{"node_type": n["node_type"], "instance": n["instance"], "gpus": n["devices"], "host": n["host"],
             "host_used_gib": round(sum(h["used_gib"] for h in n["host"]), 2), "host_capacity_gib": n["ram_gib"]}
            for n in free if n["devices"] or n["host"]]
    return used, unplaced


def evaluate(x: PlanInputs, shape: ModelShape, nodes: list[NodeType]) -> Plan:
    """Size, place and check one set of inputs (no suggestions)."""
    s = learner_sizing(x, shape)
    rank = learner_rank_bytes(shape, s)
    kv_bytes = int(x.kv_cache_gib * GIB)
    e_eng = x.engine_dtype_bytes
    eng = engine_bytes(shape, e_eng, x.tensor_parallel if x.engine_gpus else 1, kv_bytes, x.drafter)
    per_token = kv_bytes_per_token(shape, e_eng, 1 if x.drafter and shape.num_mtp else 0)
    rank_total, eng_total = sum(rank.values()), sum(eng.values())
    learner = {**_parts(rank), "ranks": x.learner_ranks, "device": "gpu" if x.learner_on_gpu else "cpu",
               "precision": x.precision, "micro_batch_per_rank": s.micro_batch, "seq_len": s.seq_len,
               "response_len": s.response_len, "train_heads": s.train_heads,
               "activation_checkpointing": s.activation_checkpointing}
    engines = [{**_parts(eng), "engines": x.engines, "device": "gpu" if x.engine_gpus else "cpu",
                "gpus_per_engine": x.engine_gpus, "tensor_parallel": x.tensor_parallel,
                "dtype_bytes": e_eng, "kv_cache_gib": x.kv_cache_gib, "kv_bytes_per_token": per_token,
                "kv_tokens": kv_bytes // per_token,
                "full_length_sequences": kv_bytes // (per_token * x.max_model_len)}]
    used, unplaced = _pack(_bundles(x, rank_total, eng_total), nodes)
    problems = []
    biggest_gpu = max((n.gpu_gib for n in nodes if n.gpus), default=0.0)
    biggest_ram = max((n.ram_gib for n in nodes), default=0.0)
    for what, total, on_gpu in (("a learner rank", rank_total, x.learner_on_gpu),
                                ("an engine" + (" GPU" if x.engine_gpus else ""), eng_total, bool(x.engine_gpus))):
        cap = biggest_gpu if on_gpu else biggest_ram
        if total > cap * GIB:
            problems.append(f"{what} needs {gib(total)} GiB; the largest {'GPU' if on_gpu else 'node memory'} "
                            f"of the cluster has {cap} GiB")
    if unplaced and not problems:
        problems.append(f"{len(unplaced)} bundle(s) find no place on the cluster at its maximum size "
                        f"(first: {unplaced[0]})")
    warnings = []
    for what, total, need in (("a learner rank", rank_total, 1 if x.learner_on_gpu else 0),
                              ("an engine", eng_total, x.engine_gpus)):
        for n in nodes:
            if need and n.gpus >= need and total > n.gpu_gib * GIB:
                warnings.append(f"Ray places bundles by resources only: {what} ({gib(total)} GiB) may land on "
                                f"{n.name} ({n.instance}, {n.gpu_gib} GiB GPUs) and run out of memory there; "
                                f"set its max_workers to 0 for this run")
    return Plan(fits=not problems and not unplaced,
                model={"params": param_count(shape), "params_billions": round(param_count(shape) / 1e9, 3),
                       **shape.model_dump()},
                learner=learner, engines=engines,
                placement={"nodes": used, "unplaced": unplaced}, problems=problems, suggestions=[],
                warnings=warnings)


def _variants(x: PlanInputs, nodes: list[NodeType]) -> list[tuple[str, PlanInputs, list[NodeType]]]:
    """Single changes that may make a plan fit, each with the inputs and node types it implies."""
    out = []
    if not x.activation_checkpointing:
        out.append(("enable algorithm.activation_checkpointing", x.model_copy(update={"activation_checkpointing": True}), nodes))
    if x.micro_batch_size == "auto" or math.ceil(x.micro_batch_size / x.learner_ranks) > 1:
        out.append((f"algorithm.micro_batch_size {x.micro_batch_size} → {x.learner_ranks} (one sample per rank)",
                    x.model_copy(update={"micro_batch_size": x.learner_ranks}), nodes))
    if x.learner_on_gpu and x.precision == "fp32":
        out.append(("algorithm.precision fp32 → bf16", x.model_copy(update={"precision": "bf16"}), nodes))
    if x.learner_on_gpu:
        n2 = 2 * x.learner_ranks
        per_node = max(n.gpus for n in nodes)
        extra = " (spans more than one node)" if n2 > per_node else ""
        out.append((f"resources.learner_gpus {x.learner_ranks} → {n2}{extra}",
                    x.model_copy(update={"learner_ranks": n2, "learner_cpus": x.learner_cpus * 2}), nodes))
    if x.kv_cache_gib > 1:
        out.append((f"rollout.kv_cache_gib {x.kv_cache_gib} → {x.kv_cache_gib / 2}",
                    x.model_copy(update={"kv_cache_gib": x.kv_cache_gib / 2}), nodes))
    gpu_nodes = [n for n in nodes if n.gpus]
    if gpu_nodes:
        big = max(gpu_nodes, key=lambda n: (n.gpu_gib, n.gpus))
        for inst, it in INSTANCE_TYPES.items():
            if it.gpus >= big.gpus and it.gpu_gib > big.gpu_gib:
                swapped = [n.model_copy(update={"instance": inst, "gpu_gib": it.gpu_gib, "cpus": it.cpus,
                                                "ram_gib": it.ram_gib}) if n.name == big.name else n for n in nodes]
                out.append((f"deploy/cluster.yaml {big.name}: {big.instance} → {inst} "
                            f"({it.gpus}×{it.gpu_model})", x, swapped))
    return out


def plan_inputs(x: PlanInputs, shape: ModelShape, nodes: list[NodeType]) -> Plan:
    """`evaluate`, plus, when it does not fit, the single changes that would make it fit (or, when
    none alone does, all spec changes together)."""
    p = evaluate(x, shape, nodes)
    if p.fits:
        return p
    for label, xv, nv in _variants(x, nodes):
        q = evaluate(xv, shape, nv)
        if q.fits:
            p.suggestions.append(f"{label}: learner rank {q.learner['total_gib']} GiB, engine "
                                 f"{q.engines[0]['total_gib']} GiB — fits")
    if not p.suggestions:
        combined, swaps = x, []
        for label, xv, nv in _variants(x, nodes):
            if nv is nodes and not label.startswith("resources."):  # keep the declared GPUs
                combined = combined.model_copy(update={k: v for k, v in xv.model_dump().items()
                                                       if v != getattr(x, k)})
            elif nv is not nodes:
                swaps.append((label, nv))
        for label, nv in [("all algorithm/rollout changes above together", nodes)] + [
                (f"all algorithm/rollout changes together with {lab}", nv) for lab, nv in swaps]:
            q = evaluate(combined, shape, nv)
            p.suggestions.append(f"no single change fits; {label}: learner rank {q.learner['total_gib']} GiB, "
                                 f"engine {q.engines[0]['total_gib']} GiB — {'fits' if q.fits else 'does not fit'}")
    return p


# ---- from a spec ------------------------------------------------------------------------------------
def model_config(spec: RunSpec, config_file: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """The policy's config.json and where it came from: ``config_file`` when given, else the spec's
    local model directory when it holds a full config, else the built-in table
    (`learner.memory_plan.known_config`) by the spec's model name or directory name."""
    if config_file is not None:
        return json.loads(Path(config_file).read_text()), str(config_file)
    path = spec.model.path
    local = Path(os.path.expanduser(path)) / "config.json"
    if is_local_path(path) and local.is_file():
        cfg = json.loads(local.read_text())
        if "hidden_size" in cfg:
            return cfg, str(local)
    for name in filter(None, (spec.model.name, path)):
        cfg = known_config(name)
        if cfg is not None:
            return cfg, f"built-in table ({name.rstrip('/').rsplit('/', 1)[-1]})"
    raise ValueError(f"no config.json for model {path!r} here and it is not in the built-in table "
                     f"(learner.memory_plan.KNOWN_MODELS); pass --model-config FILE")


def plan_spec(spec: RunSpec, nodes: list[NodeType], config_file: str | Path | None = None,
              prompt_tokens: int | None = None) -> Plan:
    """The whole plan of a run spec on the cluster's node types."""
    cfg, source = model_config(spec, config_file)
    shape = ModelShape.from_config(cfg)
    p = plan_inputs(inputs_from_spec(spec, shape, prompt_tokens), shape, nodes)
    p.model = {"name": spec.model.name or spec.model.path.rstrip("/").rsplit("/", 1)[-1],
               "config_source": source, **p.model}
    return p
