"""Process-level helpers every actor kind uses (rollout, reward, learner, the control plane).

Standard library only and importing nothing else of the project, so `rollout/` and `reward/` can
use it without depending on `services/` (tests/test_layering.py enforces the direction).
"""
