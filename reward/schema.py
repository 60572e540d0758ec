"""Shared value types of the reward package: verdicts, test specifications, dataset items.

A `Verdict` is what every grader returns, one per item, and it never hides a failure of the
grader itself: `timeout` and `error` are their own outcomes (the learner decides whether to drop
those samples), distinct from `wrong` (the policy's answer was checked and is wrong) and
`sandbox_violation` (the program tried something the sandbox forbids or exceeded a limit).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["ok", "wrong", "timeout", "error", "sandbox_violation"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "wrong", "timeout", "error", "sandbox_violation")

#: Outcomes that are a failure of the *grader*, not a judgement of the answer, per item kind: the
#: run loop drops such samples (`services.spec.RewardSpec.on_error`). Math: `timeout` (math-verify
#: or its worker ran past a deadline) and `error` (an exception, a dead worker, an unparsable gold).
#: Code: `error` only (the sandbox or harness failed); a program's `timeout` and a
#: `sandbox_violation` are the program's doing, graded with the failure reward so that a policy
#: cannot escape a penalty by looping forever.
GRADER_FAILURES: dict[str, tuple[Outcome, ...]] = {"math": ("timeout", "error"), "code": ("error",),
                                                   "reasoning_gym": ("error",)}


def grader_failed(kind: str, outcome: str) -> bool:
    """Whether a verdict of an item of ``kind`` says the grader failed (see `GRADER_FAILURES`)."""
    return outcome in GRADER_FAILURES.get(kind, ("timeout", "error"))


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """One graded item. `reward` is already shaped (format bonus, length penalty) for `ok`/`wrong`;
    for `timeout`/`error`/`sandbox_violation` it is the configured failure reward, and the outcome
    says why, so that nothing is ever a silent zero."""

    outcome: Outcome
    reward: float
    detail: str = ""
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reward": self.reward, "detail": self.detail,
                "latency_s": round(self.latency_s, 6)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


class StdioCase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field("", description="Bytes fed to the program's stdin (UTF-8 text).")
    output: str = Field(description="Expected stdout; compared after normalising line ends and "
                                    "trailing whitespace of each line and of the whole output.")


class StdioTests(BaseModel):
    """Competitive-programming style: run the program once per case, compare stdout in the parent."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["stdio"] = "stdio"
    cases: list[StdioCase] = Field(min_length=1, description="Input/expected-output pairs.")


class AssertTests(BaseModel):
    """HumanEval/MBPP style: `test` defines `check(candidate)`; it is run by the trusted harness
    against the program's `entry_point` (see `reward/code_grader.py` for how)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["assert"] = "assert"
    entry_point: str = Field(description="Name of the function under test, defined by the program.",
                             pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    test: str = Field(description="Python source defining `check(candidate)` (HumanEval) or a body "
                                  "of asserts calling `entry_point` by name (MBPP, wrapped by the loader).")
    prelude: str = Field("", description="Trusted code run in the checker's namespace before `test`, "
                                         "e.g. HumanEval helper functions the check calls (`poly`, "
                                         "`encode_cyclic`). Taken from the dataset, never from the program.")


CodeTests = Annotated[Union[StdioTests, AssertTests], Field(discriminator="type")]

RewardKind = Literal["math", "code", "reasoning_gym"]  # reasoning_gym: the task's own scorer (reward.task_scorer)
REWARD_KINDS: tuple[RewardKind, ...] = get_args(RewardKind)


@dataclasses.dataclass(frozen=True, slots=True)
class RewardItem:
    """A dataset item: the prompt shown to the policy, the gold answer (a string for math, a test
    specification for code) and which grader scores it."""

    prompt: str
    gold: str | StdioTests | AssertTests
    kind: RewardKind
    id: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
