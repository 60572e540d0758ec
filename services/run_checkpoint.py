"""A run's checkpoints on disk: ``<run dir>/checkpoints/step-000010/``, a ``LATEST`` pointer.

Each checkpoint directory holds ``policy/`` (MiMo layout: ``mtprl eval`` and vLLM serve it as it
is), ``trainer.pt`` (optimiser, learner version, RNG; written by the learner actor) and
``state.json`` (the controller's `LoopState`: step, data cursor, groups to redo, counters, metric
history length). It is written into ``.tmp-step-…`` and renamed into place, then ``LATEST`` is
replaced atomically, so a crash at any point leaves the previous checkpoint as the latest.
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
    """Write the state, move ``tmp`` into place, point LATEST at it, prune old ones."""
    root = checkpoint_root(run_dir)
    (tmp / STATE).write_text(state.model_dump_json(indent=1))
    final = root / f"step-{state.step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The latest complete checkpoint, or None."""
    root = checkpoint_root(run_dir)
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if (path / STATE).is_file() else None


def read_state(ckpt: str | Path) -> LoopState:
    return LoopState.model_validate(json.loads((Path(ckpt) / STATE).read_text()))
