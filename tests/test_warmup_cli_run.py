"""`mtprl model warmup --distill` end to end on the tiny checkpoint: a real vLLM engine answers the
run's own task (--task-config), the heads train by the RL distillation term, and acceptance is
measured where RL meets it (sampled, probabilistic drafts) as well as greedily. Integration: vLLM
runs in the CLI's subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def test_distill_warmup_answers_the_runs_task_and_measures_sampled_acceptance(tiny_ckpt, tmp_path):
    from services.cli_demo import DEMO_TASK

    report = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "services.cli", "model", "warmup", "--model", str(tiny_ckpt), "--out",
           str(tmp_path / "w"), "--distill", "kl", "--task-config", "demo", "--train-prompts", "4",
           "--heldout-prompts", "3", "--epochs", "1", "--max-tokens", "8", "--report", str(report)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(report.read_text())
    assert res["task_config"] == DEMO_TASK and res["recipe"]["warmup"]["loss"] == "kl"
    # --distill measures at its training temperature by default: 4 samples a held-out prompt
    assert res["recipe"]["sampled_eval"] == 4 and res["sampled_eval_temperature"] == 1.0
    for key in ("acceptance_sampled_before", "acceptance_sampled_after"):
        assert 0.0 <= res[key] <= 1.0
    assert res["greedy_outputs_unchanged"] is True
    # The held-out prompts are the demo's: two single-digit terms, + or −, not the task's default mix.
    for ex in res["examples"]:
        assert re.search(r"Calculate -?\d [+-] -?\d\.", ex["prompt"]), ex["prompt"]
    assert (tmp_path / "w" / "model.safetensors").is_file()
    assert "at T = 1.0" in r.stdout + r.stderr
