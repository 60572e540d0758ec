"""Shared run storage: every node of a run must see the same run directory.

The controller writes checkpoints' metadata, metrics and reports into ``<runs_dir>/<run id>`` and
the learner writes the checkpoints themselves, on its own node; both must be one directory (an
NFS/EFS mount at the same path on every node: ``MTPRL_RUNS_DIR``, docs/cluster.md). A directory
that merely exists is not proof (every node has its own ``/mnt/mtprl-runs`` once created), so the
controller writes a marker holding a random nonce at run start (:func:`mark`) and each component
that writes there checks it sees that nonce before it does anything else (:func:`check`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

MARKER = ".mtprl-storage"


class RunStorageMissing(RuntimeError):
    """This node does not see the run directory the controller writes."""


def mark(run_dir: str | Path) -> dict[str, Any]:
    """Write (or keep) the run directory's marker; what a component needs to `check` it. The nonce
    survives controller restarts (a learner started by an earlier controller checks the same one)."""
    path = Path(run_dir).absolute()
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    try:
        nonce = json.loads(marker.read_text())["nonce"]
    except (OSError, ValueError, KeyError):
        nonce = secrets.token_hex(16)
        tmp = marker.with_name(f"{MARKER}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"nonce": nonce, "host": socket.gethostname()}))
        os.replace(tmp, marker)
    return {"run_dir": str(path), "nonce": nonce, "host": socket.gethostname()}


def check(storage: dict[str, Any], what: str = "this component") -> None:
    """Raise `RunStorageMissing` unless this node sees the marker `mark` wrote."""
    path = Path(storage["run_dir"])
    here = socket.gethostname()
    try:
        seen = json.loads((path / MARKER).read_text()).get("nonce")
    except (OSError, ValueError):
        seen = None
    if seen == storage["nonce"]:
        return
    found = "does not exist" if not path.exists() else (
        "exists but holds no run marker" if seen is None else "holds another run storage's marker")
    raise RunStorageMissing(
        f"{what} on node {here!r} cannot use the run directory {path}: it {found} here, so this is not the "
        f"directory the run controller (node {storage.get('host')!r}) writes. Mount the shared runs directory "
        f"at the same path on every node (MTPRL_RUNS_DIR, e.g. NFS/EFS at /mnt/mtprl-runs as deploy/cluster.yaml "
        f"does; see docs/cluster.md), or set checkpointing.dir to a path every node shares.")
