"""A run's checkpoints on disk: ``<run dir>/checkpoints/step-000010/``, a ``LATEST`` pointer.

Each checkpoint directory holds ``policy/`` (MiMo layout: ``mtprl eval`` and vLLM serve it as it
is), ``trainer.pt`` (optimiser, learner version, RNG; written by the learner actor) and
``state.json`` (the controller's `LoopState`: step, data cursor, groups to redo, counters, metric
history length). It is written into ``.tmp-step-…`` and renamed into place, then ``LATEST`` is
replaced atomically, so a crash at any point leaves the previous checkpoint as the latest.

``LATEST`` never names a directory that is being deleted or replaced. Re-checkpointing a step
that already has a checkpoint (pausing twice with no step between, a pause right after a learner
rollback) replaces ``step-N`` while ``LATEST`` may name it: the old ``step-N`` is first hard-linked
into ``.old-step-N`` (no data copied) and ``LATEST`` pointed there, and only then is ``step-N``
deleted and the new one renamed in. Pruning never deletes what ``LATEST`` names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

LATEST = "LATEST"
STATE = "state.json"


class LoopState(BaseModel):
    """What the controller needs to continue a run exactly where a checkpoint left it."""

    step: int = 0  # optimiser steps done (the next step is step + 1)
    version: int = 0  # learner policy version at the checkpoint
    next_cursor: int = 0  # first data cursor never dispatched
    pending: list[int] = Field(default_factory=list)  # dispatched but not yet trained: redone first
    counters: dict[str, int] = Field(default_factory=dict)  # exact accounting (see controller)
    trained: list[int] = Field(default_factory=list)  # cursors trained on, in order
    history_len: int = 0  # metric history records written up to here


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = checkpoint_root(run_dir) / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: str | Path, tmp: Path, state: LoopState, keep_last: int) -> Path:
    """Write the state, move ``tmp`` into place, point LATEST at it, prune old ones.

    At every instant (so after a crash at any point) ``LATEST`` names a complete checkpoint: the
    previous one until the new one is in place, then the new one.
    """
    root = checkpoint_root(run_dir)
    (tmp / STATE).write_text(state.model_dump_json(indent=1))
    final = root / f"step-{state.step:06d}"
    aside = root / f".old-{final.name}"
    if final.exists():
        if _pointed(root) == final.name:
            # Give LATEST an identical complete copy to name while ``final`` is deleted (hard links:
            # no data copied; a copy where the filesystem has none). A crash from here on leaves
            # LATEST on ``aside``, which the next commit of this step reuses and any commit prunes.
            shutil.rmtree(aside, ignore_errors=True)
            shutil.copytree(final, aside, copy_function=_link_or_copy)
            _point(root, aside.name)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point(root, final.name)
    _prune(root, final, keep_last)
    return final


def _pointed(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def _point(root: Path, name: str) -> None:
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(name)
    os.replace(pointer, root / LATEST)  # atomic: a reader sees the old name or the new one


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _prune(root: Path, final: Path, keep_last: int) -> None:
    """Keep ``final`` and the ``keep_last - 1`` newest before it; delete the rest.

    Checkpoints of a later step than ``final`` are deleted too: they belong to a timeline the run
    abandoned (written just before a crash that left LATEST on an earlier one, from which the run
    resumed), and ordering by name would otherwise keep them and prune ``final`` itself.
    """
    done = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=_step_of)
    older = [p for p in done if _step_of(p) < _step_of(final)]
    newer = [p for p in done if _step_of(p) > _step_of(final)]
    stale = [p for p in root.glob(".old-step-*") if p.is_dir()]  # LATEST names ``final`` now
    for old in older[: max(len(older) - (keep_last - 1), 0)] + newer + stale:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: str | Path) -> Path | None:
    """The latest complete checkpoint, or None."""
    root = checkpoint_root(run_dir)
    name = _pointed(root)
    if name is None:
        return None
    path = root / name
    return path if (path / STATE).is_file() else None


def policy_dir(path: str | Path) -> Path:
    """The policy that ``path`` names: a policy directory itself (``config.json``), or a run
    directory's latest complete checkpoint's ``policy/``. Raises ValueError saying which it is not."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    ckpt = latest(path)
    if ckpt is None or not (ckpt / "policy" / "config.json").is_file():
        raise ValueError(f"{path}: neither a policy directory (config.json) nor a run directory with a complete "
                         "checkpoint (`mtprl demo` prints its run directory)")
    return ckpt / "policy"


def read_state(ckpt: str | Path) -> LoopState:
    return LoopState.model_validate(json.loads((Path(ckpt) / STATE).read_text()))


class Checkpoints:
    """One run directory's checkpoints: the only place that turns the run directory into
    checkpoint paths (the loop hands it over once and then deals in `LoopState`s)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def latest(self) -> tuple[Path | None, LoopState | None]:
        """The latest complete checkpoint and its loop state, or ``(None, None)``."""
        path = latest(self.run_dir)
        return (path, read_state(path)) if path is not None else (None, None)

    def write(self, state: LoopState, keep_last: int, save) -> Path | None:
        """A new checkpoint of ``state``: ``save(tmp_dir)`` writes the learner's part (it may
        raise, and then nothing is committed); returns the committed directory."""
        tmp = begin(self.run_dir, state.step)
        save(tmp)
        return commit(self.run_dir, tmp, state, keep_last)
