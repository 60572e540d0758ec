"""rollout.draft_vocab's ranking and reading (unit; the engine side is in test_vllm_integration)."""

from __future__ import annotations

import json

import pytest

from rollout.draft_vocab import coverage, rank_tokens, read_draft_vocab, write_draft_vocab


def test_rank_tokens_orders_by_frequency_then_id():
    ids, counts = rank_tokens([[5, 3, 5], [9, 3, 5], [1]])
    assert ids == [5, 3, 1, 9] and counts == [3, 2, 1, 1]


def test_coverage_counts_tokens_inside_the_subset():
    assert coverage([1, 2], [[1, 2, 3], [4]]) == pytest.approx(0.5)
    assert coverage([1], []) == 0.0


def test_write_then_read_keeps_the_top_n_sorted(tmp_path):
    path = write_draft_vocab(tmp_path, [[7, 7, 7, 2, 2, 40]], source="unit")
    assert json.loads(path.read_text())["tokens_counted"] == 6
    assert read_draft_vocab(tmp_path, 2) == [2, 7]
    assert read_draft_vocab(tmp_path, 100) == [2, 7, 40]  # shorter than asked: every token seen


def test_bad_rankings_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="draft_vocab_size: 0"):
        read_draft_vocab(tmp_path, 10)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"token_ids": [1, -3]}))
    with pytest.raises(ValueError, match="token ids"):
        read_draft_vocab(tmp_path, 10, bad)
