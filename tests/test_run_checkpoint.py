"""The run's checkpoint directory: LATEST always names a complete checkpoint (services.run_checkpoint).

A crash is simulated after every file-system mutation `commit` makes (rename, unlink, rmdir, link,
mkdir); what a crash leaves on disk is also what a concurrent reader of LATEST can see at that
instant, so the same enumeration covers readers (``mtprl eval`` of the latest policy, a resuming
controller).
"""

from __future__ import annotations

import os

import pytest

from services import run_checkpoint as rc


class _Crash(BaseException):
    """Not an OSError, so ``rmtree(ignore_errors=True)`` cannot swallow it."""


_MUTATIONS = ("replace", "rename", "unlink", "rmdir", "link", "mkdir")


def _arm(monkeypatch, crash_at: int) -> list[int]:
    """Make the ``crash_at``-th file-system mutation from now on raise `_Crash`."""
    count = [0]
    for name in _MUTATIONS:
        real = getattr(os, name)

        def wrapped(*a, _real=real, **kw):
            count[0] += 1
            if count[0] == crash_at:
                raise _Crash
            return _real(*a, **kw)

        monkeypatch.setattr(os, name, wrapped)
    return count


def _write(run_dir, step: int, tag: int, keep_last: int = 3):
    tmp = rc.begin(run_dir, step)
    (tmp / "policy").mkdir()
    for i in range(3):
        (tmp / "policy" / f"shard-{i}.safetensors").write_text(str(tag))
    (tmp / "trainer.pt").write_text(str(tag))
    return rc.commit(run_dir, tmp, rc.LoopState(step=step, counters={"tag": tag}), keep_last)


def _complete_tag(run_dir) -> int:
    """The tag of the checkpoint LATEST names; fails unless every file of it is there and agrees."""
    ckpt = rc.latest(run_dir)
    assert ckpt is not None, f"LATEST names no complete checkpoint: {sorted(p.name for p in rc.checkpoint_root(run_dir).iterdir())}"
    tag = rc.read_state(ckpt).counters["tag"]
    files = [ckpt / "trainer.pt"] + [ckpt / "policy" / f"shard-{i}.safetensors" for i in range(3)]
    assert [f.read_text() for f in files] == [str(tag)] * 4, f"{ckpt.name} is not one whole checkpoint"
    return tag


@pytest.mark.parametrize("keep_last", [1, 3])
def test_latest_is_complete_at_every_point_of_replacing_the_same_step(tmp_path, monkeypatch, keep_last):
    """Re-checkpointing step 10 while LATEST names step-10 (a second pause, a pause after a rollback)."""
    crashed_somewhere = False
    for crash_at in range(1, 200):
        run_dir = tmp_path / f"run-{keep_last}-{crash_at}"
        _write(run_dir, 5, tag=5, keep_last=keep_last)
        _write(run_dir, 10, tag=1, keep_last=keep_last)
        count = _arm(monkeypatch, crash_at)
        try:
            _write(run_dir, 10, tag=2, keep_last=keep_last)
            crashed = False
        except _Crash:
            crashed = crashed_somewhere = True
        monkeypatch.undo()
        assert _complete_tag(run_dir) in ({1, 2} if crashed else {2}), f"crash at mutation {crash_at}"
        # The restarted run checkpoints again (this step, then a later one): whole, and no leftovers.
        _write(run_dir, 10, tag=3, keep_last=keep_last)
        assert _complete_tag(run_dir) == 3
        _write(run_dir, 11, tag=4, keep_last=keep_last)
        assert _complete_tag(run_dir) == 4
        names = sorted(p.name for p in rc.checkpoint_root(run_dir).iterdir())
        want = {1: ["LATEST", "step-000011"], 3: ["LATEST", "step-000005", "step-000010", "step-000011"]}
        assert names == want[keep_last], f"crash at mutation {crash_at}"
        if not crashed:
            break
    assert crashed_somewhere and count[0] < crash_at  # the enumeration reached the end of commit


def test_latest_is_complete_at_every_point_of_a_new_step(tmp_path, monkeypatch):
    for crash_at in range(1, 200):
        run_dir = tmp_path / f"run-{crash_at}"
        _write(run_dir, 1, tag=1, keep_last=1)
        _arm(monkeypatch, crash_at)
        try:
            _write(run_dir, 2, tag=2, keep_last=1)
            crashed = False
        except _Crash:
            crashed = True
        monkeypatch.undo()
        assert _complete_tag(run_dir) in ({1, 2} if crashed else {2})
        if not crashed:
            break


def test_prune_keeps_the_newest_and_never_the_checkpoint_latest_names(tmp_path):
    for step in range(1, 6):
        _write(tmp_path, step, tag=step, keep_last=2)
    assert sorted(p.name for p in rc.checkpoint_root(tmp_path).glob("step-*")) == ["step-000004", "step-000005"]
    assert _complete_tag(tmp_path) == 5


def test_an_abandoned_later_checkpoint_neither_survives_nor_prunes_latest(tmp_path):
    """step-20 was renamed in but a crash kept LATEST on step-10; the run resumed from 10 and now
    checkpoints step 15 (a pause): step-20 is of the abandoned timeline and goes, step-15 stays."""
    _write(tmp_path, 10, tag=10, keep_last=1)
    _write(tmp_path, 20, tag=20, keep_last=1)
    (rc.checkpoint_root(tmp_path) / rc.LATEST).write_text("step-000010")  # the crash's leftover
    _write(tmp_path, 15, tag=15, keep_last=1)
    assert _complete_tag(tmp_path) == 15
    assert sorted(p.name for p in rc.checkpoint_root(tmp_path).glob("step-*")) == ["step-000015"]
