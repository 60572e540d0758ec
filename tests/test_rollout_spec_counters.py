"""Spec-decode counters are per engine, also with several engines in one process (issue 4).

vLLM's own counters live in prometheus_client's process-global registry, and each new engine
unregisters the ones before it: read from there, every engine reported the counters of the engine
created last (benchmarks/spec_decode.py showed acceptance 0.000 for its second engine). The engines
run in a subprocess so the test process holds no vLLM engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from rollout.engine import RolloutEngine

cfg = {{"model": {model!r}, "max_model_len": 256, "kv_cache_gib": 0.1, "num_threads": 1}}
prompts = [[1, 40 + i, 70 + 3 * i, 120 + i, 9, 200 - i] for i in range(6)]
greedy = {{"n": 1, "temperature": 0.0, "max_tokens": 24}}
spec = RolloutEngine({{**cfg, "num_speculative_tokens": 1}})
alone = spec.generate(prompts, greedy).spec
plain = RolloutEngine({{**cfg, "num_speculative_tokens": 0}})  # created after: vLLM re-registers its metrics
beside = spec.generate(prompts, greedy).spec
cum = spec.spec_stats()
plain_batch = plain.generate(prompts, greedy).spec
print(json.dumps({{"alone": alone.__dict__, "beside": beside.__dict__, "plain": plain_batch.__dict__,
                  "unchanged_by_plain": spec.spec_stats().__dict__ == cum.__dict__}}))
"""


def test_each_engine_counts_its_own_drafts_with_several_engines_in_one_process(tiny_ckpt):
    code = SCRIPT.format(repo=str(REPO), model=str(tiny_ckpt))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["alone"]["num_drafts"] > 0
    # The drafting engine still counts its drafts once a second engine exists in the process...
    assert res["beside"]["num_drafts"] > 0, res
    assert res["beside"]["num_draft_tokens"] == res["beside"]["num_drafts"]  # one token per draft (n = 1)
    # ...and the second engine's generation neither shows drafts nor moves the first one's counters.
    assert res["plain"]["num_drafts"] == 0 and res["unchanged_by_plain"], res
