"""Rewards: math answer verification and sandboxed code execution; datasets.
Imports nothing of ours outside itself but `learner.shaping` (DAPO's overlong bounds, one
definition shared with the learner; pydantic only, see docs/rewards.md).

- `extract`, `math_verify_worker`: final-answer extraction and math-verify in worker processes
  with hard parent-side deadlines (`MathVerifierPool`).
- `sandbox`, `_sandbox_harness`, `code_grader`: bubblewrap sandbox with a trusted in-sandbox
  harness; verdicts decided in the parent (`Sandbox`, `CodeGrader`).
- `actors`: `RewardScorer` and the Ray `RewardActor` (bounded concurrency, outcome metrics).
- `datasets`: reasoning-gym, HumanEval and user JSONL loaders producing `RewardItem`s.
- `config`, `schema`: pydantic configs, `Verdict`, test specifications.
"""
