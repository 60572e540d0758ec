"""Unit tests (pure, no model) of `benchmarks/head_acceptance.py`'s one-token drafter counts: what
an engine's accepted / drafted counter reads, given each position's acceptance probability."""

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("head_acceptance", ROOT / "benchmarks" / "head_acceptance.py")
head_acceptance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(head_acceptance)
k1_draft_counts = head_acceptance.k1_draft_counts


def simulate(cond: list[float], runs: int, seed: int = 0) -> tuple[int, int]:
    """A one-token drafter walked through the answer: an accepted draft at t makes t + 1 a bonus token."""
    rng = random.Random(seed)
    accepted = drafted = 0
    for _ in range(runs):
        t = 0
        while t < len(cond):
            drafted += 1
            if rng.random() < cond[t]:
                accepted += 1
                t += 2
            else:
                t += 1
    return accepted, drafted


def test_every_draft_accepted_drafts_every_other_position():
    assert k1_draft_counts([1.0] * 6) == (3.0, 3.0)
    assert k1_draft_counts([1.0] * 5) == (3.0, 3.0)


def test_every_draft_rejected_drafts_every_position():
    assert k1_draft_counts([0.0] * 5) == (0.0, 5.0)


def test_a_constant_acceptance_reads_as_itself():
    accepted, drafted = k1_draft_counts([0.7] * 200)
    assert accepted / drafted == pytest.approx(0.7)


def test_runs_of_easy_tokens_are_skipped_as_bonus_tokens():
    # In a run of easy tokens every other one is a bonus token, in a run of hard ones each is
    # drafted: easy tokens are under-represented among the drafts and the counter reads below the mean.
    cond = [0.9] * 4 + [0.1] * 2
    accepted, drafted = k1_draft_counts(cond * 20)
    assert accepted / drafted < sum(cond) / len(cond) - 0.05
    # Alternating easy/hard: every easy token drafted is followed by a skipped hard one (above the mean).
    accepted, drafted = k1_draft_counts([1.0, 0.0] * 10)
    assert accepted / drafted == 1.0


def test_matches_a_walk_through_the_answer():
    rng = random.Random(1)
    cond = [rng.random() for _ in range(40)]
    accepted, drafted = k1_draft_counts(cond)
    runs = 20_000
    sim_accepted, sim_drafted = simulate(cond, runs)
    assert sim_drafted / runs == pytest.approx(drafted, rel=0.01)
    assert sim_accepted / runs == pytest.approx(accepted, rel=0.02)


def test_empty_answer():
    assert k1_draft_counts([]) == (0.0, 0.0)
