"""An engine the group starts to replace a dead one (Ray's restarts exhausted) is started in the
dead engine's placement-group bundle, with the group's other actor options. Unit test with a fake
`create_engine_actor` (records its arguments; no Ray, no vLLM): tests/test_multinode.py covers
the real re-placement after a node is lost."""

from __future__ import annotations

import rollout.group as group_mod
from rollout.group import EngineGroup


def test_a_replacement_engine_is_started_in_the_dead_engines_bundle(monkeypatch):
    started: list[dict] = []

    def fake_create(config, **opts):
        started.append(opts)
        return f"engine-{len(started)}"

    monkeypatch.setattr(group_mod, "create_engine_actor", fake_create)
    bundles = ["bundle-0", "bundle-1"]  # stand-ins for PlacementGroupSchedulingStrategy objects
    opts = {"num_cpus": 1, "num_gpus": 0, "cpu_nice": 5}
    g = EngineGroup({"model": "/m"}, engines=["a", "b"], actor_options=opts, strategies=bundles)
    g._replace(1)
    assert started == [{**opts, "scheduling_strategy": "bundle-1"}] and g.engines == ["a", "engine-1"]
    assert g.recreated == 1

    fresh = EngineGroup({"model": "/m"}, 2, actor_options=opts, strategies=bundles)  # started by the group
    assert [s["scheduling_strategy"] for s in started[1:]] == bundles and len(fresh.engines) == 2
    EngineGroup({"model": "/m"}, 1, actor_options=opts)  # no placement group: Ray's default placement
    assert "scheduling_strategy" not in started[-1]
