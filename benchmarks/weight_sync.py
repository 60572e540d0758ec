"""Weight sync: time from the learner's state dict to a rollout engine generating with it.

    .venv/bin/python benchmarks/weight_sync.py                 # SmolLM2-135M + 1 MTP head, CPU
    .venv/bin/python benchmarks/weight_sync.py --ray           # also through the Ray object store

The learner (`learner.checkpoint.load_policy`, fp32) and a vLLM engine with MTP drafting (n = 1)
live in one process, as on a one-machine deployment where the learner hands tensors over without
serialisation. Each repeat perturbs the learner's weights, then times
``RolloutEngine.update_weights(version, iter_export_tensors(policy))`` (target reload, drafter
reload, prefix-cache reset) — ``seconds`` — and, separately, the first generated token on the
new weights (``seconds_to_first_token`` includes the load). The log-probs of that token are checked
against the learner's, so the time is for an engine really serving the new policy.

The reference is one plain copy of the same bytes (the tensors the engine loads) into
preallocated buffers, timed in the same run, interleaved with the loads: ``over_memcpy =
seconds / memcpy_seconds`` (medians; ``over_memcpy_best`` divides the minima, the least disturbed
by other jobs on shared cores). With ``--ray`` the transfer a multi-process deployment
pays is added: ``ray.put`` of the tensors (as numpy arrays, `rollout.group.to_transport`: one copy
into the object store, zero-copy reads) plus an engine actor's ``update_weights`` from the object
reference (``ray_seconds``). The last line is a JSON object.
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


def memcpy_seconds(tensors: list[torch.Tensor], dst: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for d, t in zip(dst, tensors):
        d.copy_(t)
    return time.perf_counter() - t0


def first_token_logprob_error(engine: RolloutEngine, policy, prompt: list[int]) -> float:
    batch = engine.generate([prompt], {"n": 1, "temperature": 0.0, "max_tokens": 1})
    s = batch.samples[0]
    with torch.no_grad():
        ours = policy.token_logprobs(torch.tensor([s.prompt_token_ids + s.token_ids]), num_mtp=0).logprobs[0, 0, -1]
    return abs(ours.item() - s.logprobs[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".cache/models/smollm2-mtp1"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="engine torch threads (1 = a Ray actor's default)")
    ap.add_argument("--ray", action="store_true", help="also time ray.put + an engine actor's update")
    args = ap.parse_args()

    policy = load_policy(args.model)
    engine = RolloutEngine(
        {"model": args.model, "num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1, "num_threads": args.threads}
    )
    prompt = engine.apply_chat_template([{"role": "user", "content": "Calculate 17 + 25."}])

    # The bytes the engine loads: every exported tensor once (the drafter shares the target's
    # embedding and head, so update_weights does not load those twice).
    engine.update_weights(0, iter_export_tensors(policy))
    nbytes = engine.last_update_bytes
    loaded = [t for _, t in iter_export_tensors(policy)]
    assert sum(t.numel() * t.element_size() for t in loaded) == nbytes, "memcpy reference must copy the same bytes"
    dst = [torch.empty_like(t) for t in loaded]
    memcpy_seconds(loaded, dst)  # fault the destination pages in

    loads, firsts, copies, errors = [], [], [], []
    gen = torch.Generator().manual_seed(0)
    for r in range(args.repeats):
        with torch.no_grad():  # a new policy version: every weight changes
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        copies.append(memcpy_seconds(loaded, dst))
        t0 = time.perf_counter()
        engine.update_weights(r + 1, iter_export_tensors(policy))
        loads.append(time.perf_counter() - t0)
        errors.append(first_token_logprob_error(engine, policy, prompt))
        firsts.append(time.perf_counter() - t0)
        print(f"repeat {r}: load {loads[-1]:.3f}s, +first token {firsts[-1]:.3f}s, memcpy {copies[-1]:.3f}s, "
              f"log-prob error {errors[-1]:.2e}", flush=True)

    seconds, memcpy = statistics.median(loads), statistics.median(copies)
    result = {
        "seconds": round(seconds, 4),
        "bytes": nbytes,
        "memcpy_seconds": round(memcpy, 4),
        "over_memcpy": round(seconds / memcpy, 3),
        "over_memcpy_best": round(min(loads) / min(copies), 3),  # least-disturbed of each
        "seconds_to_first_token": round(statistics.median(firsts), 4),
        "first_token_over_memcpy": round(statistics.median(firsts) / memcpy, 3),
        "max_logprob_error": max(errors),
        "gb_per_s": round(nbytes / seconds / 1e9, 3),
        "memcpy_gb_per_s": round(nbytes / memcpy / 1e9, 3),
        "loads": [round(x, 4) for x in loads],
        "memcpys": [round(x, 4) for x in copies],
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }

    if args.ray:
        import ray

        from rollout.actor import create_engine_actor
        from rollout.group import to_transport

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        actor = create_engine_actor({"model": args.model, "num_speculative_tokens": 1, "max_model_len": 256, "kv_cache_gib": 0.1})
        ray.get(actor.info.remote())
        puts, updates = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            ref = ray.put(to_transport(iter_export_tensors(policy)))
            t1 = time.perf_counter()
            ray.get(actor.update_weights.remote(100 + r, ref))
            puts.append(t1 - t0)
            updates.append(time.perf_counter() - t1)
            del ref
        ray_seconds = statistics.median([p + u for p, u in zip(puts, updates)])
        result.update(
            ray_seconds=round(ray_seconds, 4),
            ray_put_seconds=round(statistics.median(puts), 4),
            ray_update_seconds=round(statistics.median(updates), 4),
            ray_over_memcpy=round(ray_seconds / memcpy, 3),
        )
        ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
