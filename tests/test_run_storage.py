"""Shared run storage (`services.run_storage`): a learner on a node that does not see the run
directory the controller marked refuses to start, saying what to mount. The real `LearnerWorker`
class is constructed in this process (no Ray: the check is the first thing it does); the
multi-node test (tests/test_multinode.py) covers the passing case across Ray nodes."""

from __future__ import annotations

import json

import pytest

from services import run_storage
from services.learner_worker import LearnerWorker


def test_mark_keeps_its_nonce_and_check_passes_where_the_directory_is_shared(tmp_path):
    storage = run_storage.mark(tmp_path / "run")
    assert run_storage.mark(tmp_path / "run")["nonce"] == storage["nonce"]  # a restarted controller
    run_storage.check(storage)
    assert json.loads((tmp_path / "run" / run_storage.MARKER).read_text())["nonce"] == storage["nonce"]


@pytest.mark.parametrize("case", ["missing", "unmarked", "other"])
def test_a_learner_that_does_not_see_the_marked_run_directory_fails_at_start(tmp_path, case):
    storage = run_storage.mark(tmp_path / "run")
    # what another node sees at the same path: nothing, a local directory of that name, or the
    # directory of another storage
    local = tmp_path / "elsewhere"
    if case != "missing":
        local.mkdir()
    if case == "other":
        run_storage.mark(local)
    with pytest.raises(run_storage.RunStorageMissing) as e:
        LearnerWorker("/no/model", {}, storage={**storage, "run_dir": str(local)})
    msg = str(e.value)
    assert "learner rank 0" in msg and str(local) in msg and "MTPRL_RUNS_DIR" in msg and "Mount" in msg
    assert {"missing": "does not exist", "unmarked": "no run marker", "other": "another"}[case] in msg
