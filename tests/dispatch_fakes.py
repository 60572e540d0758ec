"""Unit-test fakes for `services.dispatch.Dispatcher` (no Ray, no vLLM): an engine group that
records each submitted call and each cancel and hands back opaque references, and a dispatcher
built on it over a one-row dataset. Used by test_dispatch.py and test_dispatch_stragglers.py."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from services.dispatch import Dispatcher
from services.run_context import RunContext
from services.spec import RunSpec


class FakeEngine:
    def __init__(self, log: list, i: int) -> None:
        self.cancel = SimpleNamespace(remote=lambda: log.append(i))
        self.info = SimpleNamespace(remote=lambda: ("probe", i))  # a down engine's probe


class FakeEngines:
    """What `Dispatcher` uses of `rollout.group.EngineGroup`."""

    def __init__(self, n: int) -> None:
        self.cancels: list[int] = []
        self.engines = [FakeEngine(self.cancels, i) for i in range(n)]
        self.loaded_version = [0] * n
        self.calls: list[tuple[int, list[int]]] = []  # (engine, seeds) per call
        self._ref = itertools.count()

    def submit(self, i, prompts, sampling, seeds):
        self.calls.append((i, list(seeds)))
        return ("ref", next(self._ref))

    def accept(self, i, batch) -> bool:
        return True

    def confirm(self, i, version, ok) -> None:
        pass


def make_dispatcher(tmp_path, engines: int, prompts: int, samples: int = 2, staleness: int = 1,
                    **rollout) -> tuple[Dispatcher, FakeEngines]:
    """A dispatcher over ``engines`` fake engines; ``rollout`` adds `RolloutSpec` fields."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    spec = RunSpec.model_validate({
        "model": {"path": "some/model"}, "data": {"dataset": f"jsonl:{data}", "seed": 0},
        "rollout": {"engines": engines, "prompts_per_step": prompts, "samples_per_prompt": samples,
                    "max_tokens": 8, **rollout},
        "schedule": {"steps": 10, "max_staleness": staleness}})
    items = [SimpleNamespace(prompt=f"p{i}") for i in range(50)]
    tok = SimpleNamespace(encode=lambda text, add_special_tokens=False: [len(text)])
    fake = FakeEngines(engines)
    return Dispatcher(RunContext(spec, items, tok), fake, lambda *a: None), fake
