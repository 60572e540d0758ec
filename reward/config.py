"""Typed configuration of the reward package (math verification, code sandbox, reward actors).

Every field has a description; cross-field rules are checked at construction and name the
offending values. Defaults are the ones the tests and `benchmarks/reward_throughput.py` use.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# DAPO's overlong shaping is defined once, for the learner and this grader alike (learner.shaping is
# pydantic only: importing it here pulls in no torch).
from learner.shaping import OverlongShaping

Fallback = Literal["answer_is", "gsm8k_hash", "last_number", "last_latex"]

#: math-verify's own SIGALRM timeout inside a verifier worker (`MathConfig.inner_timeout_s`'s
#: default). The parent's hard deadline must be longer so the inner one fires first; the run spec
#: (`services.spec.RewardSpec.timeout_s`) imports it.
DEFAULT_INNER_TIMEOUT_S = 3


class MathConfig(BaseModel):
    """Math answer extraction, verification and reward shaping."""

    model_config = ConfigDict(extra="forbid")
    fallbacks: list[Fallback] = Field(
        default_factory=lambda: ["answer_is", "gsm8k_hash"],
        description="Extractors tried in order when the completion has no `\\boxed{}`: "
                    "`answer_is` ('the answer is X', 'Answer: X'; a 'final answer is/: X' line after the last box "
                    "also beats the box), `gsm8k_hash` ('#### X'), "
                    "`last_number` (the last number in the text; lenient, rewards unformatted answers), "
                    "`last_latex` (the last $...$ or \\[...\\] span). Empty list = boxed answers only.")
    multiple_boxed: Literal["last_group", "last", "first", "all"] = Field(
        "last_group", description="With several `\\boxed{}`: `last_group` (math-verify's rule: the last box with "
                                  "the boxes just before it that are < 10 characters apart, or < 70 apart with "
                                  "and/or/,/; between; graded as a set; see docs/rewards.md), `last` (the last box "
                                  "alone), `first`, or `all` (every box, joined with commas).")
    correct_reward: float = Field(1.0, description="Reward of a verified answer.")
    wrong_reward: float = Field(0.0, description="Reward of a checked, wrong (or missing) answer.")
    failure_reward: float = Field(0.0, description="Reward reported with `timeout`/`error` outcomes (always counted "
                                                   "per outcome, `reward/outcome/*`). A training run drops those "
                                                   "samples from the loss by default (`reward.on_error: drop` in the "
                                                   "run spec: removed from their group, GRPO statistics over the "
                                                   "group's valid members, a group left with < 2 dropped whole and "
                                                   "counted); with `on_error: zero` it trains them with this reward.")
    format_reward: float = Field(0.0, description="Added when the answer came from a `\\boxed{}` (format shaping; "
                                                  "0 disables).")
    overlong: OverlongShaping | None = Field(None, description="Length shaping; None disables.")
    deadline_s: float = Field(5.0, gt=0, description="Hard parent-side wall-clock deadline per item; past it the "
                                                      "worker is killed and replaced and the item is a `timeout`.")
    inner_timeout_s: int = Field(DEFAULT_INNER_TIMEOUT_S, ge=1, description="math-verify's own SIGALRM timeout per parse/compare, inside "
                                                      "the worker (must be below deadline_s so it fires first when "
                                                      "the stuck code is interruptible Python).")
    num_workers: int = Field(2, ge=1, description="Verifier processes.")
    cache_size: int = Field(65536, ge=0, description="Verdicts remembered per (gold, extracted answer) pair, for "
                                                     "checked outcomes only (ok/wrong); GRPO groups repeat answers. "
                                                     "0 disables.")
    float_rounding: int = Field(6, ge=0, description="math-verify float_rounding.")
    strict: bool = Field(True, description="math-verify strict mode (variables matter; sets != tuples).")
    max_completion_chars: int = Field(
        16_000, gt=0, description="Only the last this-many characters of a completion are searched; bounds "
                                  "the cost of adversarially long completions.")
    max_answer_chars: int = Field(
        512, gt=0, description="Extracted answers longer than this are `wrong` without parsing (no real final "
                               "answer is that long; parsing one can take unbounded time).")

    @model_validator(mode="after")
    def _check(self) -> "MathConfig":
        if self.inner_timeout_s >= self.deadline_s:
            raise ValueError(f"inner_timeout_s ({self.inner_timeout_s}) must be < deadline_s ({self.deadline_s})")
        return self


class SandboxConfig(BaseModel):
    """Isolation and limits of the code sandbox (see `reward/sandbox.py` for what each one stops)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["bwrap", "unsafe_local"] = Field(
        "bwrap", description="`bwrap`: bubblewrap namespaces (required for untrusted code; the runner refuses "
                             "to start without bwrap). `unsafe_local`: plain subprocesses with rlimits only; "
                             "no filesystem/network isolation — for trusted code or debugging only.")
    python: str = Field("/usr/bin/python3", description="Interpreter inside the sandbox; must live under a "
                                                        "read-only bound system directory (not under /root).")
    python_flags: list[str] = Field(default_factory=lambda: ["-I", "-S"],
                                    description="Interpreter flags. -I ignores PYTHON* env and user site; -S skips "
                                                "site-packages (faster start; stdlib only).")
    ro_binds: list[str] = Field(default_factory=lambda: ["/usr", "/etc/alternatives"],
                                description="Host directories bound read-only (existing ones only).")
    wall_timeout_s: float = Field(10.0, gt=0, description="Wall-clock deadline per program run (all cases), "
                                                          "enforced by the parent.")
    cpu_seconds: int = Field(10, ge=1, description="RLIMIT_CPU per process.")
    address_space_bytes: int = Field(1 << 30, ge=64 << 20, description="RLIMIT_AS per process.")
    file_size_bytes: int = Field(16 << 20, ge=0, description="RLIMIT_FSIZE: largest file a program may write.")
    open_files: int = Field(64, ge=16, description="RLIMIT_NOFILE.")
    nproc: int = Field(512, ge=8, description="RLIMIT_NPROC fallback (counts all processes of the sandbox uid, "
                                              "host-wide); the pids cgroup is the precise limit where writable.")
    tmpfs_bytes: int = Field(64 << 20, ge=1 << 20, description="Size of the private tmpfs work dir (disk-fill bound).")
    memory_bytes: int = Field(1 << 30, ge=64 << 20, description="cgroup memory limit for the whole sandbox, where a "
                                                                "memory cgroup is writable.")
    pids_max: int = Field(64, ge=8, description="cgroup pids limit for the whole sandbox, where writable.")
    max_output_bytes: int = Field(1 << 20, ge=1024, description="Most bytes read from a program's stdout (per case) "
                                                                "and from its stderr; more is a violation.")
    uid: int = Field(65534, description="Unprivileged uid the sandbox runs as on the host (and inside).")
    gid: int = Field(65534, description="Unprivileged gid.")
    max_parallel: int = Field(2, ge=1, description="Programs run at once (one sandbox process each); callers "
                                                   "beyond that wait. Match the cores given to grading.")
    jobs_per_sandbox: int = Field(
        256, ge=1, description="Programs one sandbox process serves, one at a time, before it is replaced. Between "
                               "programs the harness kills every other process of the sandbox and empties /tmp, "
                               "/dev/shm and SysV IPC; a run that timed out, hit a limit or misbehaved always "
                               "retires its sandbox. 1 = a fresh sandbox per program (slowest, strictest).")
    use_cgroups: bool = Field(True, description="Use writable cgroups (v2, or v1 memory/pids) for limits and kill.")


class CodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Sandbox limits and mode.")
    correct_reward: float = Field(1.0, description="Reward when every test passes.")
    wrong_reward: float = Field(0.0, description="Reward when a test fails.")
    failure_reward: float = Field(0.0, description="Reward reported with timeout/error/sandbox_violation. A "
                                                   "program's timeout or violation is the program's doing and is "
                                                   "trained with this reward; an `error` (the sandbox or harness "
                                                   "failed) is dropped by a training run with `reward.on_error: "
                                                   "drop` (the default; reward.schema.GRADER_FAILURES).")
    partial_credit: bool = Field(False, description="Stdio only: reward = fraction of cases passed (still `wrong` "
                                                     "unless all pass).")


class RewardActorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    math: MathConfig = Field(default_factory=MathConfig, description="Math grading.")
    code: CodeConfig = Field(default_factory=CodeConfig, description="Code grading.")
    max_concurrency: int = Field(2, ge=1, description="Items graded at once per actor (sandbox runs / math "
                                                      "workers); the rest queue.")
