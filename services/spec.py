"""The run spec: what `POST /v1/runs` and `mtprl runs start SPEC.yaml` take.

`RunSpec` is a typed pydantic model (unknown fields are errors). Field-level rules (sizes ≥ 0,
known datasets, a model given) are checked by pydantic and come back as 422 with the field path;
rules that need the model directory (MPO's K against the MTP modules in `config.json`) and the
configs a run builds from the spec at start (`RunSpec.engine_config`, `RolloutSpec.sampling_config`,
`RewardSpec.actor_config`, each validated by its component's own model) are in
:func:`spec_problems`, which returns errors of the same shape so the API reports both alike. So a
value that would fail at run start is refused before the run is created (422 naming the field).
Bounds that a component owns are imported from it, never copied (`MAX_SPECULATIVE_TOKENS`,
`DEFAULT_INNER_TIMEOUT_S`). JSON has no inf/NaN: a non-finite number anywhere is a 422 too.

    model:    {path: /models/smollm2-mtp}
    data:     {dataset: "reasoning_gym:basic_arithmetic"}
    algorithm: {algorithm: grpo, mpo: {k: 3}}          # learner.config.AlgorithmConfig
    rollout:  {engines: 1, samples_per_prompt: 8, max_tokens: 512, num_speculative_tokens: 1}
    schedule: {steps: 200, max_staleness: 1, checkpoint_every: 50}
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from learner.config import AlgorithmConfig
from reward.config import DEFAULT_INNER_TIMEOUT_S
from reward.datasets import FIELD_KEYS
from rollout.adaptive_draft import AdaptiveDraftConfig
from rollout.config import (
    CPU_CHUNKED_PREFILL_BUG,
    MAX_GPU_MEMORY_UTILIZATION,
    MAX_NUM_SEQS,
    MAX_SPECULATIVE_TOKENS,
    MIN_GPU_MEMORY_UTILIZATION,
    SEED_STRIDE,
    DraftSampleMethod,
    Dtype,
)
from rollout.draft_vocab import DRAFT_VOCAB_FILE
from rollout.weight_transport import BUCKET_MIB_DEFAULT, BUCKET_MIB_MAX, BUCKET_MIB_MIN, TRANSPORTS
from services.tracking import TrackerName

#: Datasets a run can name. `jsonl:PATH` / `parquet:PATH` / `datasets:DIR` are the user's own
#: (see reward/datasets.py); `reasoning_gym:TASK` any task the installed package registers, these
#: being the ones the suite trains on.
REASONING_GYM_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
BUILTIN_DATASETS = tuple(f"reasoning_gym:{t}" for t in REASONING_GYM_TASKS) + ("human_eval",)
#: Prefix -> what it names: a user file (checked to exist) or a `datasets.save_to_disk` directory.
FILE_DATASETS = {"jsonl:": "file", "parquet:": "file", "datasets:": "directory"}


@functools.cache
def reasoning_gym_registered() -> tuple[str, ...]:
    """Every task name the installed reasoning-gym registers (imported on first need: ~1 s)."""
    from reasoning_gym.factory import DATASETS

    return tuple(sorted(DATASETS))


#: Validation context key: ``RunSpec.model_validate(raw, context={SKIP_FILE_CHECKS: True})`` checks
#: a spec's fields but not that its model directory and data file exist here (`mtprl plan` sizes a
#: cluster spec whose files live on the cluster's shared filesystem).
SKIP_FILE_CHECKS = "skip_file_checks"


def _files_checked(info: ValidationInfo) -> bool:
    return not (info.context or {}).get(SKIP_FILE_CHECKS, False)


class _Strict(BaseModel):
    # allow_inf_nan=False: `1e309` or `NaN` in a JSON body is a 422 at its field, never a spec that
    # satisfies no bound meaningfully and cannot be stored or sent back as JSON.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _non_finite_paths(value: Any, path: str = "") -> list[str]:
    """Where a free-form value (a dict of options) holds inf or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return [path or "."]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite_paths(v, f"{path}[{i}]")]
    return []


class ModelSpec(_Strict):
    """The policy checkpoint (MiMo layout: Qwen2 weights + `num_nextn_predict_layers` MTP modules)."""

    path: str = Field(
        ...,
        min_length=1,
        description="Local checkpoint directory (must exist and hold config.json) or a model name "
        "resolved by the run (e.g. a Hugging Face id; not checked here).",
    )
    name: str | None = Field(None, description="Display name; defaults to the path's last part.")

    @field_validator("path")
    @classmethod
    def _local_path_exists(cls, v: str, info: ValidationInfo) -> str:
        if is_local_path(v) and _files_checked(info):
            p = Path(os.path.expanduser(v))
            if not (p / "config.json").is_file():
                raise ValueError(f"model directory {v!r} has no config.json (or does not exist)")
        return v


class DataSpec(_Strict):
    """Where prompts come from."""

    dataset: str = Field(
        ...,
        description="One of " + ", ".join(BUILTIN_DATASETS) + ", reasoning_gym:TASK (any registered task), "
        "jsonl:PATH or parquet:PATH (an existing file), or datasets:DIR (a `datasets.save_to_disk` directory; "
        "its train split).",
    )
    size: int = Field(1000, ge=1, description="Prompts generated (reasoning_gym) or read at most.")
    seed: int = Field(0, ge=0, description="Seeds generation and the prompt order.")
    held_out_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of items kept out of training for evaluation "
        "(a stable hash split by item id).")
    template: str | None = Field(
        None, description="Prompt template with {question}; default: the task kind's (ask for \\boxed{}).")
    fields: dict[Literal[*FIELD_KEYS], str] | None = Field(
        None, description="Columns of a jsonl/parquet/datasets source: prompt (text or chat messages), and answer "
        "(the gold final answer: math rows) or tests (assert statements: code rows), id optional; dotted names reach nested ones (reward_model.ground_truth). "
        "Unset: the layout is detected (GSM8K, MATH, veRL/DAPO, MBPP).")
    system_prompt: str | None = Field(
        None, max_length=8192, description="A system turn put before every prompt (rendered by the chat template); "
        "unset: the row's own system message, if any.")
    task_config: dict[str, Any] = Field(
        default_factory=dict, description="reasoning_gym task options, e.g. {min_terms: 2, max_terms: 2, "
        "max_digits: 2, operators: ['+', '-']} for basic_arithmetic (difficulty).")

    @field_validator("task_config")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = _non_finite_paths(v)
        if bad:
            raise ValueError(f"non-finite number at {', '.join(bad)} (JSON has no inf or NaN)")
        return v

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        if v in BUILTIN_DATASETS:
            return v
        if v.startswith("reasoning_gym:"):
            task = v.removeprefix("reasoning_gym:")
            if task not in reasoning_gym_registered():
                raise ValueError(f"reasoning-gym registers no task {task!r}; it has {len(reasoning_gym_registered())}, "
                                 f"e.g. {', '.join(reasoning_gym_registered()[:8])} (reasoning_gym.factory.DATASETS)")
            return v
        for prefix, kind in FILE_DATASETS.items():
            if v.startswith(prefix):
                path = v.removeprefix(prefix)
                if not path:
                    raise ValueError(f"{prefix} needs a path, e.g. {prefix}/data/gsm8k")
                p = Path(os.path.expanduser(path))
                if _files_checked(info) and not (p.is_dir() if kind == "directory" else p.is_file()):
                    raise ValueError(f"dataset {kind} {path!r} does not exist")
                return v
        raise ValueError(f"unknown dataset {v!r}; known: {', '.join(BUILTIN_DATASETS)}, reasoning_gym:TASK, "
                         "jsonl:PATH, parquet:PATH, datasets:DIR")

    @model_validator(mode="after")
    def _fields_fit(self) -> DataSpec:
        if self.fields is not None:
            if not any(self.dataset.startswith(p) for p in FILE_DATASETS):
                raise ValueError(f"data.fields maps a table's columns; {self.dataset!r} is not jsonl:, parquet: or "
                                 "datasets:")
            if "prompt" not in self.fields:
                raise ValueError("data.fields needs prompt (the column names in your data)")
            if ("answer" in self.fields) == ("tests" in self.fields):
                raise ValueError("data.fields needs answer (math rows: the gold final answer) or tests (code rows: "
                                 "assert statements), not both")
        return self


class RolloutSpec(_Strict):
    """vLLM engines and sampling."""

    engines: int = Field(1, ge=1, description="Rollout engines (one per GPU or TP group).")
    samples_per_prompt: int = Field(8, ge=1, le=SEED_STRIDE, description=(
        "G: samples per prompt (group size). At most the distance between two groups' seeds "
        "(rollout.config.SEED_STRIDE): vLLM seeds a group's samples seed..seed+G-1."))
    prompts_per_step: int = Field(8, ge=1, description="Prompts per training step.")
    max_tokens: int = Field(512, ge=1, description="Max new tokens per sample.")
    temperature: float = Field(
        1.0, ge=0.0, le=10.0,
        description="Sampling temperature T (> 0 for training: 0 is greedy, no sampling distribution "
        "and G identical samples). The learner's policy is softmax(logits / T) too: the spec copies it "
        "into `algorithm.temperature`, and vLLM returns its log-probs after temperature.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Nucleus sampling mass. Training needs 1.0: the learner does not reproduce "
        "top-p truncation, so with < 1 the behaviour log-probs (of the truncated, renormalised "
        "distribution) and the learner's would differ.")
    num_speculative_tokens: int = Field(
        1,
        ge=0,
        le=MAX_SPECULATIVE_TOKENS,  # the engine's own bound (rollout.config)
        description="Tokens drafted per step by MTP module 1 (recursively). 0 = no speculative "
        f"decoding; > 0 needs a model with MTP modules; at most {MAX_SPECULATIVE_TOKENS} (the engine's bound).",
    )
    draft_vocab_size: int = Field(
        0, ge=0, description="Drafter scores only the N most frequent tokens of the model's draft_vocab.json "
        "(written by `mtprl model warmup`; rollout.draft_vocab). 0 = full vocabulary. Output is unchanged.")
    draft_sample_method: DraftSampleMethod = Field(
        "greedy", description="How sampled (temperature > 0) requests draft: the drafter's argmax, accepted "
        "with probability p(token), a sample from the drafter's own distribution q, accepted with "
        "min(1, p/q), or 'auto': per generation call, the one whose drafts each engine measures accepted "
        "more. Output is the policy's either way (rollout.config.EngineConfig).")
    adaptive_draft: AdaptiveDraftConfig = Field(
        default_factory=AdaptiveDraftConfig,
        description="Each engine chooses 0..num_speculative_tokens draft tokens per generation call from the step "
        "costs and per-position acceptance it measures (rollout.adaptive_draft; docs/benchmarks.md).")
    max_model_len: int = Field(1024, gt=0, description="Longest prompt + response of an engine; more than "
                               "max_tokens (a prompt needs room) and at most the model's max_position_embeddings.")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV-cache size per engine. Unset: 0.5 GiB of host memory on CPU; on GPU what "
        "gpu_memory_utilization leaves after the weights. Set on GPU: exactly this much (no memory fraction).")
    # Engine settings: unset = the engine device's default (rollout.config.DEVICE_DEFAULTS; the device
    # is GPU when resources.gpus_per_engine > 0). The bounds are the engine config's own.
    dtype: Dtype | None = Field(None, description="Engine weights/activations: float32 on CPU (log-probs "
                                "equal the learner's), bfloat16 on GPU.")
    enforce_eager: bool | None = Field(None, description="Skip CUDA graphs: True on CPU, False on GPU.")
    max_num_seqs: int | None = Field(None, gt=0, le=MAX_NUM_SEQS,
                                     description="Sequences an engine decodes together: 64 on CPU, 256 on GPU.")
    gpu_memory_utilization: float | None = Field(
        None, ge=MIN_GPU_MEMORY_UTILIZATION, le=MAX_GPU_MEMORY_UTILIZATION,
        description="Share of each engine GPU's memory vLLM takes (0.85 on GPU unless kv_cache_gib is "
        "set); GPU engines only.")
    chunked_prefill: bool | None = Field(
        None, description="Chunked prefill: on for GPU engines; refused on CPU engines ("
        + CPU_CHUNKED_PREFILL_BUG + ").")

    # Straggler mitigation (services.dispatch): a generation call still running when every other
    # engine is idle and it is past its deadline is sent once more, to an idle engine.
    straggler_factor: float = Field(
        3.0, ge=0.0, le=100.0,
        description="A call straggles once it has run longer than max(straggler_min_s, straggler_factor × "
        "the median per-group time of the recently finished calls × its groups) while another engine is "
        "idle; its groups are then also sent to an idle engine (same sampling seeds), the first result "
        "wins and the late copy is cancelled and discarded. 0 = off.")
    straggler_min_s: float = Field(
        10.0, gt=0.0, le=86400.0,
        description="Floor of the straggler deadline in seconds (a call is never duplicated sooner).")

    def sampling_config(self):
        """The `rollout.config.SamplingConfig` of the run's generation calls."""
        from rollout.config import SamplingConfig

        return SamplingConfig(n=self.samples_per_prompt, temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_tokens)


class RewardSpec(_Strict):
    """How samples are scored."""

    kind: str = Field("auto", pattern="^(auto|math|code)$", description="auto = by dataset.")
    workers: int = Field(2, ge=1, description="Verification worker processes.")
    timeout_s: float = Field(
        5.0, gt=DEFAULT_INNER_TIMEOUT_S,  # the math workers' inner timeout must fire first (reward.config)
        description="Hard deadline per verification, in seconds; more than the math workers' own "
        f"math-verify timeout ({DEFAULT_INNER_TIMEOUT_S} s), which must fire first.")
    allow_unsafe_code: bool = Field(
        False, description="Run code without a sandbox when none is available (unsafe)."
    )
    actors: int = Field(1, ge=1, description="Reward actors (each grades `max_concurrency` groups at once).")
    on_error: Literal["drop", "zero"] = Field(
        "drop",
        description="What training does with a sample whose grading failed (math `timeout`/`error`, code "
        "`error`: reward.schema.GRADER_FAILURES). `drop` (default): the sample leaves the batch, so it "
        "adds nothing to the loss and its group's GRPO mean/std are over the valid members only; a group "
        "left with fewer than 2 valid samples is dropped whole (`loop/groups_dropped_errors`, "
        "`loop/dropped_errors_total`); dropped samples are counted per outcome (`reward/dropped/<outcome>`). "
        "`zero`: train them with the grader's failure_reward (0), as if the answer were wrong — a grader "
        "outage then teaches the policy; the outcomes are still counted (`reward/outcome/*`).")
    math_fallbacks: list[Literal["answer_is", "gsm8k_hash", "last_number", "last_latex"]] | None = Field(
        None, description="Answer extractors tried when a completion has no \\boxed{} (None = the "
        "grader's defaults: answer_is, gsm8k_hash).")

    def actor_config(self) -> dict[str, Any]:
        """The `reward.config.RewardActorConfig` (as a dict) that grades this run's samples; the
        evaluation (`services.evaluate`) uses the same, so both grade alike."""
        import shutil

        from reward.config import RewardActorConfig

        math_cfg: dict[str, Any] = {"num_workers": self.workers, "deadline_s": self.timeout_s}
        if self.math_fallbacks is not None:
            math_cfg["fallbacks"] = list(self.math_fallbacks)
        code: dict[str, Any] = {}
        if self.allow_unsafe_code and shutil.which("bwrap") is None:
            code = {"sandbox": {"mode": "unsafe_local"}}
        return RewardActorConfig.model_validate(
            {"math": math_cfg, "code": code, "max_concurrency": self.workers}).model_dump()


class ResourcesSpec(_Strict):
    """What the run asks Ray for."""

    learner_gpus: int = Field(0, ge=0, description="GPUs for the learner group (0 = CPU); one learner "
                              "rank per GPU, so `learner_workers` defaults to it.")
    learner_workers: int | None = Field(
        None, ge=1, le=1024,
        description="Learner ranks: N actors in the run's placement group form one torch.distributed "
        "group (gloo on CPU, NCCL on CUDA) and shard the policy, its gradients and AdamW state with "
        "FSDP2 (docs/scale.md). 1 = the plain single-process learner. Default: `learner_gpus` when "
        "the learner has GPUs (one rank per GPU), else 1. On GPUs it must equal `learner_gpus`.")
    gpus_per_engine: int = Field(0, ge=0, description="GPUs per rollout engine (0 = CPU vLLM).")
    tensor_parallel: int = Field(1, ge=1, description="Tensor-parallel size of each engine.")
    cpus_per_reward_worker: float = Field(1.0, gt=0, description="CPUs per reward worker.")
    learner_cpus: float = Field(1.0, gt=0, description="CPUs reserved for the whole learner group, split "
                                "evenly over its ranks (each rank's torch threads: max(1, int(share))).")
    cpus_per_engine: float = Field(1.0, gt=0, description="CPUs reserved per rollout engine (its "
                                   "torch/OpenMP threads: max(1, int(cpus_per_engine))).")
    cpu_nice: int = Field(
        0, ge=0, le=19, description="Lowest CPU priority for the run: every thread of every process of "
        "the run (its controller actor, rollout engines, learner, reward actors and the processes they "
        "start) gets at least this Unix niceness. 0 = unchanged (Ray's own default applies: +15 on "
        "its workers' main threads only); 19 = the lowest priority, for a machine shared with the "
        "control plane where the API's latency suffers (see docs/control-plane.md); a dedicated "
        "training node gains nothing from it. Never raises priority.")

    @model_validator(mode="after")
    def _engine_gpus(self) -> ResourcesSpec:
        if self.gpus_per_engine > 1:
            raise ValueError(
                f"gpus_per_engine={self.gpus_per_engine}: it counts GPUs per tensor-parallel rank and vLLM "
                "uses one per rank (an engine takes gpus_per_engine x tensor_parallel GPUs); set "
                f"gpus_per_engine: 1 and tensor_parallel: {self.gpus_per_engine * self.tensor_parallel}")
        return self

    @property
    def engine_gpus(self) -> int:
        """GPUs of one rollout engine (its bundle and its actor): one per tensor-parallel rank."""
        return self.gpus_per_engine * self.tensor_parallel

    @model_validator(mode="after")
    def _learner_ranks(self) -> ResourcesSpec:
        if self.learner_workers is None:
            self.learner_workers = max(1, self.learner_gpus)
        elif self.learner_gpus and self.learner_workers != self.learner_gpus:
            raise ValueError(
                f"learner_workers={self.learner_workers} with learner_gpus={self.learner_gpus}: each "
                "learner rank takes one GPU, so set learner_workers to learner_gpus (or leave it out)")
        return self

    @property
    def gpus_per_learner(self) -> int:
        """GPUs of each learner rank's bundle (0 or 1)."""
        return 1 if self.learner_gpus else 0

    @property
    def cpus_per_learner(self) -> float:
        """CPUs of each learner rank's bundle: `learner_cpus` split over the ranks."""
        return self.learner_cpus / int(self.learner_workers or 1)


class ScheduleSpec(_Strict):
    """How long and how asynchronously to train."""

    steps: int = Field(100, ge=1, description="Optimiser steps (policy versions) to train.")
    max_staleness: int = Field(
        1, ge=0, description="Oldest behaviour version the learner accepts (0 = on-policy)."
    )
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    weight_sync_every: int = Field(1, ge=1, description="Publish weights every N steps.")
    max_refill_factor: int = Field(
        4, ge=1, description="DAPO dynamic sampling: a step waits for prompts_per_step groups with "
        "mixed rewards but dispatches at most this many times prompts_per_step groups for it, then "
        "trains on what it has (a task the policy always or never solves cannot stall the run).")


class CheckpointSpec(_Strict):
    """Where and how much to keep."""

    dir: str | None = Field(None, description="Checkpoint directory; default <data_dir>/runs/<id>.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (older ones deleted).")
    save_optimizer: bool = Field(True, description="Also save optimiser state (for resume).")


class WeightSyncSpec(_Strict):
    """How a new policy version reaches the engines (docs/weights.md)."""

    transport: Literal[TRANSPORTS] = Field(
        "auto", description="object_store: rank 0's tensors put once in Ray's object store, every engine "
        "reads them; broadcast: rank 0 sends them to every engine over a gloo (CPU) or NCCL (GPU) group "
        "in buckets; auto: object_store when the learner's rank 0 and every engine are on one node and "
        "no GPU is involved, broadcast otherwise (resolved at run start, see rollout.weight_transport.resolve).")
    bucket_mib: int = Field(BUCKET_MIB_DEFAULT, ge=BUCKET_MIB_MIN, le=BUCKET_MIB_MAX,
                            description="broadcast: largest bucket (MiB) of tensors sent in one broadcast.")


class RunSpec(_Strict):
    """A whole training run."""

    name: str | None = Field(None, max_length=200, description="Free-form label.")
    model: ModelSpec
    data: DataSpec
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    weight_sync: WeightSyncSpec = Field(default_factory=WeightSyncSpec)
    tracking: list[TrackerName] = Field(
        default_factory=list, max_length=2, description="Experiment trackers also logged to (off by default): "
        "tensorboard (<run dir>/tensorboard) and/or wandb (offline unless WANDB_API_KEY is set); "
        "see services/tracking.py.")

    @model_validator(mode="after")
    def _one_temperature(self) -> RunSpec:
        """`algorithm.temperature` is `rollout.temperature` (one definition): filled from it, and
        an explicit value that disagrees is an error. A greedy rollout (0) leaves the learner at
        its default; `component_problems` refuses training at 0."""
        t = self.rollout.temperature
        if t > 0 and "temperature" in self.algorithm.model_fields_set and self.algorithm.temperature != t:
            raise ValueError(
                f"algorithm.temperature={self.algorithm.temperature} differs from rollout.temperature={t}: "
                "the learner's policy is the sampling distribution; set rollout.temperature only")
        if t > 0:
            self.algorithm.temperature = t
        return self

    def engine_config(self):
        """The rollout engines' `rollout.config.EngineConfig` for this run (what run start builds)."""
        from rollout.config import EngineConfig

        r, res = self.rollout, self.resources
        return EngineConfig(model=self.model.path, num_speculative_tokens=r.num_speculative_tokens,
                            draft_vocab_size=r.draft_vocab_size, draft_sample_method=r.draft_sample_method,
                            adaptive_draft=r.adaptive_draft,
                            max_model_len=r.max_model_len, kv_cache_gib=r.kv_cache_gib,
                            seed=self.data.seed, num_threads=int(max(1, res.cpus_per_engine)),
                            device="cuda" if res.gpus_per_engine else "cpu",
                            tensor_parallel_size=res.tensor_parallel, dtype=r.dtype,
                            enforce_eager=r.enforce_eager, max_num_seqs=r.max_num_seqs,
                            gpu_memory_utilization=r.gpu_memory_utilization, chunked_prefill=r.chunked_prefill)


def is_local_path(path: str) -> bool:
    """A model path we can check here: absolute, ./relative, ~, or an existing directory."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def read_num_mtp(model_path: str) -> int | None:
    """`num_nextn_predict_layers` of a local checkpoint (0 when absent); None if not local."""
    if not is_local_path(model_path):
        return None
    cfg = json.loads((Path(os.path.expanduser(model_path)) / "config.json").read_text())
    return int(cfg.get("num_nextn_predict_layers", 0) or 0)


def problem_lines(problems: list[dict[str, Any]]) -> list[str]:
    """`spec_problems`' errors as ``loc.path: message`` lines (for a CLI or an exception)."""
    return [f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems]


#: Where each field of a config built at run start comes from in the spec (its errors are reported
#: there): the longest matching prefix of the error's location wins; none matching, its section.
_ENGINE_FROM = {("model",): ("model", "path"), ("num_speculative_tokens",): ("rollout", "num_speculative_tokens"),
                ("draft_vocab_size",): ("rollout", "draft_vocab_size"),
                ("draft_sample_method",): ("rollout", "draft_sample_method"),
                ("adaptive_draft",): ("rollout", "adaptive_draft"),
                ("max_model_len",): ("rollout", "max_model_len"), ("kv_cache_gib",): ("rollout", "kv_cache_gib"),
                ("seed",): ("data", "seed"), ("num_threads",): ("resources", "cpus_per_engine"),
                ("tensor_parallel_size",): ("resources", "tensor_parallel"),
                ("device",): ("resources", "gpus_per_engine"), ("dtype",): ("rollout", "dtype"),
                ("enforce_eager",): ("rollout", "enforce_eager"), ("max_num_seqs",): ("rollout", "max_num_seqs"),
                ("gpu_memory_utilization",): ("rollout", "gpu_memory_utilization"),
                ("chunked_prefill",): ("rollout", "chunked_prefill")}
_SAMPLING_FROM = {("n",): ("rollout", "samples_per_prompt"), ("temperature",): ("rollout", "temperature"),
                  ("top_p",): ("rollout", "top_p"), ("max_tokens",): ("rollout", "max_tokens")}
_REWARD_FROM = {("math", "num_workers"): ("reward", "workers"), ("math", "deadline_s"): ("reward", "timeout_s"),
                # MathConfig's only cross-field rule the spec can break: deadline_s > inner_timeout_s
                ("math",): ("reward", "timeout_s"),
                ("math", "fallbacks"): ("reward", "math_fallbacks"), ("max_concurrency",): ("reward", "workers")}


def _component_errors(build, fields: dict, section: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """Build a component config as run start does; its validation errors, located in the spec."""
    try:
        build()
        return []
    except ValidationError as e:
        out = []
        for x in e.errors(include_url=False):
            loc = tuple(str(p) for p in x["loc"])
            where = next((fields[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in fields), section)
            out.append({"type": x["type"], "loc": where,
                        "msg": f"{what}.{'.'.join(loc) or '*'}: {x['msg']}", "input": x.get("input")})
        return out


def _unencodable(value: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """Strings (values or keys) that UTF-8 cannot encode (pydantic refuses them in `str` fields; this
    covers free-form ones such as `data.task_config`): JSON's ``"\\ud800"`` escapes decode to
    unpaired surrogates, which Redis, the request hash and every response would fail on."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [(path, value)]
        return []
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in _unencodable(k, path) + _unencodable(v, (*path, str(k)))]
    if isinstance(value, (list, tuple)):
        return [bad for i, v in enumerate(value) for bad in _unencodable(v, (*path, str(i)))]
    return []


def component_problems(spec: RunSpec) -> list[dict[str, Any]]:
    """What run start would refuse, whatever the model: text that cannot be stored, the configs it
    builds from the spec (each validated by its component's own model), and cross-field rules
    between spec sections."""
    out: list[dict[str, Any]] = [
        {"type": "value_error", "loc": loc, "msg": "text with an unpaired UTF-16 surrogate cannot be "
         "stored (not encodable as UTF-8)", "input": text} for loc, text in _unencodable(spec.model_dump())]
    if out:
        return out  # the rest would only echo the same text
    out += _component_errors(spec.engine_config, _ENGINE_FROM, ("rollout",), "rollout.config.EngineConfig")
    out += _component_errors(spec.rollout.sampling_config, _SAMPLING_FROM, ("rollout",), "rollout.config.SamplingConfig")
    out += _component_errors(spec.reward.actor_config, _REWARD_FROM, ("reward",), "reward.config.RewardActorConfig")

    def err(loc: tuple[str, ...], msg: str, value: Any) -> None:
        out.append({"type": "value_error", "loc": loc, "msg": msg, "input": value})

    r, alg, gpus = spec.rollout, spec.algorithm, spec.resources.learner_gpus
    if r.max_tokens >= r.max_model_len:
        err(("rollout", "max_tokens"), f"max_tokens={r.max_tokens} leaves no room for a prompt in "
            f"max_model_len={r.max_model_len}: every prompt would be rejected as too long; raise "
            "rollout.max_model_len or lower max_tokens", r.max_tokens)
    if r.temperature == 0:
        err(("rollout", "temperature"), "temperature=0 is greedy decoding: no sampling distribution for "
            "the importance ratios, and a group's samples are all the same (zero advantages); train "
            "with temperature > 0 (evaluation may use 0)", r.temperature)
    if r.top_p < 1.0:
        err(("rollout", "top_p"), f"top_p={r.top_p} truncates the sampling distribution, which the learner "
            "does not reproduce: behaviour log-probs and every ratio would be off; use top_p=1.0", r.top_p)
    # The learner's ranks get no GPU when learner_gpus is 0 (Ray hides them), so these fail at start.
    if alg.device == "cuda" and not gpus:
        err(("algorithm", "device"), "device='cuda' but resources.learner_gpus=0 gives the learner no GPU; "
            "set resources.learner_gpus or use device='auto'|'cpu'", alg.device)
    if alg.precision == "bf16" and not gpus:
        err(("algorithm", "precision"), "precision='bf16' needs a GPU learner but resources.learner_gpus=0; "
            "use precision='fp32'|'auto' or give the learner GPUs", alg.precision)
    return out


def read_model_config(model_path: str) -> dict[str, Any] | None:
    """A local checkpoint's config.json; None if not local."""
    if not is_local_path(model_path):
        return None
    return json.loads((Path(os.path.expanduser(model_path)) / "config.json").read_text())


def spec_problems(spec: RunSpec) -> list[dict[str, Any]]:
    """What run start would refuse, as pydantic-style errors (``{"type", "loc", "msg", "input"}``,
    loc relative to the spec): `component_problems`, then cross-checks against the model directory."""
    out = component_problems(spec)
    n = read_num_mtp(spec.model.path)
    if n is None:  # a remote model name: the run checks it when it loads the config
        return out
    alg = spec.algorithm

    def err(loc: tuple[str, ...], msg: str, value: Any) -> None:
        out.append({"type": "value_error", "loc": loc, "msg": msg, "input": value})

    cfg = read_model_config(spec.model.path) or {}
    limit = cfg.get("max_position_embeddings")
    # vLLM refuses a max_model_len above the model's positions (rope scaling may extend them: skip then).
    if isinstance(limit, int) and not cfg.get("rope_scaling") and spec.rollout.max_model_len > limit:
        err(("rollout", "max_model_len"), f"max_model_len={spec.rollout.max_model_len} is more than the model's "
            f"max_position_embeddings={limit}; use max_model_len <= {limit}", spec.rollout.max_model_len)

    if alg.mpo is not None and alg.mpo.k - 1 > n:
        err(("algorithm", "mpo", "k"),
            f"mpo.k={alg.mpo.k} needs {alg.mpo.k - 1} MTP heads but the model has {n} "
            f"(num_nextn_predict_layers); use k <= {n + 1}", alg.mpo.k)
    if alg.mtp_regime != "none" and n == 0:
        err(("algorithm", "mtp_regime"),
            f"mtp_regime={alg.mtp_regime!r} trains MTP modules but the model has none; use 'none'",
            alg.mtp_regime)
    if alg.mtp_heads is not None and alg.mtp_regime != "none" and alg.mtp_heads > n:
        err(("algorithm", "mtp_heads"), f"mtp_heads={alg.mtp_heads} but the model has {n}", alg.mtp_heads)
    if alg.mtp.distill.enabled and n == 0:
        err(("algorithm", "mtp", "distill", "coef"),
            f"mtp.distill.coef={alg.mtp.distill.coef} distils MTP heads but the model has none; use 0",
            alg.mtp.distill.coef)
    if alg.mtp.lr is not None and n == 0:
        err(("algorithm", "mtp", "lr"), f"mtp.lr={alg.mtp.lr} is the MTP modules' learning rate but the model "
            "has none; leave it out", alg.mtp.lr)
    if spec.rollout.num_speculative_tokens > 0 and n == 0:
        err(("rollout", "num_speculative_tokens"),
            "speculative decoding drafts with MTP module 1 but the model has none; use 0",
            spec.rollout.num_speculative_tokens)
    if spec.rollout.draft_vocab_size and not (Path(spec.model.path) / DRAFT_VOCAB_FILE).is_file():
        err(("rollout", "draft_vocab_size"),
            f"a pruned drafter vocabulary needs the token ranking {Path(spec.model.path) / DRAFT_VOCAB_FILE} "
            "(`mtprl model warmup` writes it); use 0 for the full vocabulary", spec.rollout.draft_vocab_size)
    if not any(p["loc"][:1] == ("algorithm",) for p in out):
        try:  # the learner's own rule set, in case it grows beyond the checks above
            alg.check_against_model(n)
        except ValueError as e:
            err(("algorithm",), str(e), None)
    return out
