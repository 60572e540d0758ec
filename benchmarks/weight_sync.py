"""Weight sync: time from the learner's state dict to a rollout engine generating with it.

    nice -n 10 .venv/bin/python benchmarks/weight_sync.py --ray    # SmolLM2-135M + 1 MTP head, CPU
    nice -n 10 .venv/bin/python benchmarks/weight_sync.py --transport both   # object store and broadcast
    .venv/bin/python benchmarks/weight_sync.py --reload direct_cpu --profile   # one path, + cProfile

The learner (`learner.checkpoint.load_policy`, fp32) and vLLM engines with MTP drafting (n = 1)
live in one process, as on a one-machine deployment where the learner hands tensors over without
serialisation. ``--reload both`` (the default) starts two engines, one per reload path
(``EngineConfig.weight_reload``): ``direct_cpu`` (`rollout.direct_reload`: copy and repack each
module) and ``vllm`` (vLLM's layer-wise ``reload_weights``), and times them side by side. Each repeat
perturbs the learner's weights, then times, on each engine in turn,
``RolloutEngine.update_weights(version, iter_export_tensors(policy))`` (reload, prefix-cache reset)
— ``seconds`` — and, separately, the first generated token on the new weights
(``seconds_to_first_token`` includes the load). The log-probs of that token are checked against the
learner's, so the time is for an engine really serving the new policy. ``--pool-threads 2`` also
times the direct reload packing its linear layers on 2 threads (``weight_reload_threads``; the
engine itself computes on ``--threads``).

The reference is one plain copy of the same bytes (the tensors the engine loads) into
preallocated buffers, timed in the same run, interleaved with the loads: ``over_memcpy =
seconds / memcpy_seconds`` (medians; ``over_memcpy_best`` divides the minima, the least disturbed
by other jobs on shared cores; ``over_memcpy_paired`` is the median of each load over its own
repeat's copy). The 2-thread reload is also divided by a 2-thread copy (two Python
threads copying alternate tensors; ``copy_`` releases the GIL): ``over_memcpy_2threads``. Keys
without a suffix are the first path of ``--reload`` (direct_cpu for both); ``*_vllm`` are vLLM's,
``*_direct_2threads`` the pooled direct reload. With ``--ray`` the transfer a multi-process
deployment pays is added: ``ray.put`` of the tensors (as numpy arrays, `rollout.group.to_transport`:
one copy into the object store, zero-copy reads) plus an engine actor's ``update_weights`` (its
default path, ``weight_reload: auto``) from the object reference (``ray_seconds``;
``ray_update_inside_seconds`` is the actor's own timing of its reload; ``--transport
object_store`` is the same). ``--transport broadcast`` times the broadcast path instead
(`rollout.weight_transport`, gloo): this process sends as the learner's rank 0 would, in buckets of
``--bucket-mib``, and the engine actor receives and loads (``broadcast_seconds`` until the actor
has loaded, ``broadcast_over_memcpy``); ``--transport both`` times both. ``--profile``
runs cProfile over one more load of the first path and prints the top functions. The last line is
a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.checkpoint import iter_export_tensors, load_policy  # noqa: E402
from rollout.engine import RolloutEngine  # noqa: E402
from rollout.weight_transport import BUCKET_MIB_DEFAULT  # noqa: E402


def memcpy_seconds(tensors: list[torch.Tensor], dst: list[torch.Tensor], threads: int = 1) -> float:
    def part(i: int) -> None:
        for d, t in zip(dst[i::threads], tensors[i::threads]):
            d.copy_(t)

    t0 = time.perf_counter()
    if threads == 1:
        part(0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, range(threads)))
    return time.perf_counter() - t0


def first_token(engine: RolloutEngine, policy, prompt: list[int]) -> tuple[float, float]:
    """Seconds of a one-token greedy generation, and |its log-prob - the learner's| (the learner's
    forward is not timed)."""
    t0 = time.perf_counter()
    batch = engine.generate([prompt], {"n": 1, "temperature": 0.0, "max_tokens": 1})
    seconds = time.perf_counter() - t0
    s = batch.samples[0]
    with torch.no_grad():
        ours = policy.token_logprobs(torch.tensor([s.prompt_token_ids + s.token_ids]), num_mtp=0).logprobs[0, 0, -1]
    return seconds, abs(ours.item() - s.logprobs[0])


def summarise(loads: list[float], firsts: list[float], errors: list[float], copies: list[float], suffix: str) -> dict:
    seconds, memcpy = statistics.median(loads), statistics.median(copies)
    return {
        f"seconds{suffix}": round(seconds, 4),
        f"over_memcpy{suffix}": round(seconds / memcpy, 3),
        f"over_memcpy_best{suffix}": round(min(loads) / min(copies), 3),  # least-disturbed of each
        # each load over the memcpy of its own repeat (same moment's contention), median
        f"over_memcpy_paired{suffix}": round(statistics.median(x / c for x, c in zip(loads, copies)), 3),
        f"seconds_to_first_token{suffix}": round(statistics.median(firsts), 4),
        f"first_token_over_memcpy{suffix}": round(statistics.median(firsts) / memcpy, 3),
        f"max_logprob_error{suffix}": max(errors),
        f"loads{suffix}": [round(x, 4) for x in loads],
    }


def broadcast_over(policy, actor, args, memcpy: float) -> dict:
    """This process as the sender (learner rank 0) and the engine actor as member 1 of a gloo
    weight group (`rollout.weight_transport`): per repeat, from the start of the send until the
    engine has received and loaded (``broadcast_seconds``), the send alone, and the engine's own
    receive and load timings."""
    import ray

    from rollout.weight_transport import BroadcastGroup, free_address, send

    address = free_address()
    joined = actor.join_weight_group.remote(address, 1, 2, "gloo")
    group = BroadcastGroup(address, 0, 2, "gloo")
    dtype = ray.get(joined)["dtype"]
    totals, sends, inside_recv, inside_load, sent = [], [], [], [], {}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        recv = actor.receive_weights.remote()
        sent = send(group, 200 + r, iter_export_tensors(policy), dtype, args.bucket_mib << 20)
        sends.append(time.perf_counter() - t0)
        got = ray.get(recv)
        totals.append(time.perf_counter() - t0)
        inside_recv.append(got["receive_seconds"])
        inside_load.append(got["seconds"])
    ray.get(actor.leave_weight_group.remote())
    group.close()
    seconds = statistics.median(totals)
    return {
        "broadcast_seconds": round(seconds, 4),
        "broadcast_send_seconds": round(statistics.median(sends), 4),
        "broadcast_receive_inside_seconds": round(statistics.median(inside_recv), 4),
        "broadcast_load_inside_seconds": round(statistics.median(inside_load), 4),
        "broadcast_over_memcpy": round(seconds / memcpy, 3),
        "broadcast_buckets": sent.get("buckets"),
        "broadcast_bucket_mib": args.bucket_mib,
        "broadcast_loads": [round(x, 4) for x in totals],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".cache/models/smollm2-mtp1"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="engine torch threads (1 = a Ray actor's default)")
    ap.add_argument("--reload", choices=["both", "direct_cpu", "vllm"], default="both",
                    help="reload path(s) to time (EngineConfig.weight_reload)")
    ap.add_argument("--pool-threads", type=int, default=1,
                    help="also time the direct reload packing on this many threads (> 1)")
    ap.add_argument("--profile", action="store_true", help="cProfile one more load of the first path")
    ap.add_argument("--ray", action="store_true", help="also time ray.put + an engine actor's update "
                    "(the same as --transport object_store)")
    ap.add_argument("--transport", choices=["none", "object_store", "broadcast", "both"], default="none",
                    help="also time the transfer to an engine actor: the object store (ray_*), a gloo "
                    "broadcast (broadcast_*), or both")
    ap.add_argument("--bucket-mib", type=int, default=BUCKET_MIB_DEFAULT, help="broadcast bucket size")
    args = ap.parse_args()

    policy = load_policy(args.model)
    paths = ["direct_cpu", "vllm"] if args.reload == "both" else [args.reload]
    cfg = {"model": args.model, "num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1,
           "num_threads": args.threads}
    engines = {p: RolloutEngine({**cfg, "weight_reload": p, "weight_reload_threads": 1}) for p in paths}
    first = engines[paths[0]]
    prompt = first.apply_chat_template([{"role": "user", "content": "Calculate 17 + 25."}])
    variants = [(p, engines[p], 1) for p in paths]  # (name, engine, packing threads)
    if args.pool_threads > 1 and "direct_cpu" in engines:
        variants.insert(1, ("direct_2threads", engines["direct_cpu"], args.pool_threads))

    # The bytes the engine loads: every exported tensor once (the drafter shares the target's
    # embedding and head, so update_weights does not load those twice).
    for e in engines.values():
        e.update_weights(0, iter_export_tensors(policy))
        first_token(e, policy, prompt)  # one-off costs of a first generation (also the learner's)
    plain_token = []  # the same generation without an update (prefix cache reset as by an update)
    for _ in range(3):
        first.llm.reset_prefix_cache()
        plain_token.append(first_token(first, policy, prompt)[0])
    nbytes = first.last_update_bytes
    loaded = [t for _, t in iter_export_tensors(policy)]
    assert sum(t.numel() * t.element_size() for t in loaded) == nbytes, "memcpy reference must copy the same bytes"
    dst = [torch.empty_like(t) for t in loaded]
    memcpy_seconds(loaded, dst)  # fault the destination pages in

    loads = {v[0]: [] for v in variants}
    firsts = {v[0]: [] for v in variants}
    errors = {v[0]: [] for v in variants}
    copies, copies2 = [], []
    gen = torch.Generator().manual_seed(0)
    for r in range(args.repeats):
        with torch.no_grad():  # a new policy version: every weight changes
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        copies.append(memcpy_seconds(loaded, dst))
        if args.pool_threads > 1:
            copies2.append(memcpy_seconds(loaded, dst, args.pool_threads))
        line = [f"repeat {r}: memcpy {copies[-1]:.3f}s"] + ([f"2-thread memcpy {copies2[-1]:.3f}s"] if copies2 else [])
        for name, engine, threads in variants:
            engine.config.weight_reload_threads = threads
            t0 = time.perf_counter()
            engine.update_weights(r + 1, iter_export_tensors(policy))
            loads[name].append(time.perf_counter() - t0)
            token_seconds, error = first_token(engine, policy, prompt)
            firsts[name].append(loads[name][-1] + token_seconds)
            errors[name].append(error)
            line.append(f"{name} load {loads[name][-1]:.3f}s (+first token {firsts[name][-1]:.3f}s, "
                        f"log-prob error {errors[name][-1]:.1e})")
        print("; ".join(line), flush=True)

    memcpy = statistics.median(copies)
    result = {
        "reload": paths[0],
        "seconds": None,  # filled below: the first path's keys come first
        "bytes": nbytes,
        "memcpy_seconds": round(memcpy, 4),
        "gb_per_s": None,
        "memcpy_gb_per_s": round(nbytes / memcpy / 1e9, 3),
    }
    for i, (name, engine, threads) in enumerate(variants):
        suffix = "" if i == 0 else f"_{name}"
        result.update(summarise(loads[name], firsts[name], errors[name], copies, suffix))
    result["gb_per_s"] = round(nbytes / result["seconds"] / 1e9, 3)
    if copies2:
        m2 = statistics.median(copies2)
        result.update(memcpy_2threads_seconds=round(m2, 4),
                      over_memcpy_2threads=round(result["seconds_direct_2threads"] / m2, 3))
    result.update(token_seconds_without_update=round(statistics.median(plain_token), 4))
    result.update(memcpys=[round(x, 4) for x in copies], load_average=[round(x, 1) for x in os.getloadavg()])

    if args.profile:
        import cProfile
        import io
        import pstats

        first.config.weight_reload_threads = 1
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        first.update_weights(1000, iter_export_tensors(policy))
        prof.disable()
        result["profiled_seconds"] = round(time.perf_counter() - t0, 4)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue(), flush=True)

    object_store = args.ray or args.transport in ("object_store", "both")
    broadcast = args.transport in ("broadcast", "both")
    if object_store or broadcast:
        import ray

        from rollout.actor import create_engine_actor

        from services.local_ray import start_local_ray
        start_local_ray(2)
        actor = create_engine_actor({"model": args.model, "num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1})
        result["ray_weight_reload"] = ray.get(actor.info.remote())["weight_reload"]
    if object_store:
        from rollout.group import to_transport

        puts, updates, inside = [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            ref = ray.put(to_transport(iter_export_tensors(policy)))
            t1 = time.perf_counter()
            inside.append(ray.get(actor.update_weights.remote(100 + r, ref)))  # the engine's own timing
            puts.append(t1 - t0)
            updates.append(time.perf_counter() - t1)
            del ref
        ray_seconds = statistics.median([p + u for p, u in zip(puts, updates)])
        result.update(
            ray_seconds=round(ray_seconds, 4),
            ray_put_seconds=round(statistics.median(puts), 4),
            ray_update_seconds=round(statistics.median(updates), 4),
            ray_update_inside_seconds=round(statistics.median(inside), 4),  # reload + prefix reset in the actor
            ray_over_memcpy=round(ray_seconds / memcpy, 3),
            ray_updates_inside=[round(x, 4) for x in inside],
        )
    if broadcast:
        result.update(broadcast_over(policy, actor, args, memcpy))
    if object_store or broadcast:
        ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
