"""RunActor: the real run controller as the control plane's detached, named Ray actor.

`services.launcher.RayLauncher(RunActor, sink_config)` creates one per run (``launcher:
controller`` in the API settings). It wraps `services.controller.RunController`, which runs in a
thread of the actor; the actor's methods (``start``, ``pause``, ``resume``, ``cancel``, ``status``)
follow the contract in docs/control-plane.md. The registry's state wins: the controller reads it
(through the Redis sink) at every loop iteration, so a pause or cancel whose actor call was lost
(API crash) still takes effect. Run directories: ``<runs_dir>/<run_id>`` unless the spec's
``checkpointing.dir`` says otherwise; a restarted actor resumes from the latest checkpoint there.
With ``resources.cpu_nice`` the actor lowers its own CPU priority first, and so does every actor
it starts (`runtime.cpu_priority`).
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Any

import ray

from runtime.cpu_priority import lower_cpu_priority
from services.registry import CANCELLED, COMPLETED, FAILED, PAUSED, RUNNING, TERMINAL_STATES, RedisSink


#: How long a finished run's actor waits for an unreachable Redis to take its buffered reports.
SINK_FLUSH_TIMEOUT_S = 600.0


@ray.remote(num_cpus=0, max_restarts=3)
class RunActor:
    def __init__(self, run_id: str, spec: dict[str, Any], sink_config: dict[str, Any]):
        # Before the controller's imports (torch) start any thread pool; the actors the
        # controller creates lower their own priority (resources.cpu_nice reaches them too).
        lower_cpu_priority(int((spec.get("resources") or {}).get("cpu_nice", 0)))
        from services.controller import RunController

        self.run_id = run_id
        self.sink = RedisSink(sink_config["redis_url"],
                              metrics_history_cap=sink_config.get("metrics_history_cap", 5000),
                              events_cap=sink_config.get("events_cap", 10000))
        self._flush_timeout_s = float(sink_config.get("sink_flush_timeout_s", SINK_FLUSH_TIMEOUT_S))
        ck = (spec.get("checkpointing") or {}).get("dir")
        run_dir = Path(ck) if ck else Path(sink_config.get("runs_dir", "runs")) / run_id
        self.ctl = RunController(run_id, spec, run_dir, sink=self.sink, control=self._control)
        self._thread: threading.Thread | None = None

    def _control(self) -> str | None:
        state = self.sink.get_state(self.run_id)
        if state is None or state in TERMINAL_STATES:
            return "cancel"
        return "pause" if state == PAUSED else None

    async def start(self) -> bool:
        """Start training in a thread and return at once (the caller may go away)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=f"run-{self.run_id}", daemon=True)
            self._thread.start()
        return True

    def _main(self) -> None:
        try:
            if not self.sink.set_state(self.run_id, RUNNING):
                return  # cancelled before it started
            res = self.ctl.run()
            if res.state == "completed":
                self.sink.set_state(self.run_id, COMPLETED)
            elif self.sink.get_state(self.run_id) not in TERMINAL_STATES:
                self.sink.set_state(self.run_id, CANCELLED)
        except Exception as e:  # noqa: BLE001 - the run failed: say so in the registry
            self.sink.set_state(self.run_id, FAILED, error=f"{type(e).__name__}: {e}")
            self.sink.event(self.run_id, "log", {"message": traceback.format_exc()[-2000:]})
        finally:
            # A run that ends while Redis is away waits for it (reports and the final state are
            # buffered in the sink), else the reconciler would fail a run that completed.
            self.sink.close(flush_timeout_s=self._flush_timeout_s)
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def pause(self) -> None:
        self.ctl.pause()

    async def resume(self) -> None:
        self.ctl.resume()

    async def cancel(self) -> None:
        self.ctl.cancel()

    async def status(self) -> dict[str, Any]:
        return {"run_id": self.run_id, **self.ctl.status,
                "done": self._thread is not None and not self._thread.is_alive()}


__all__ = ["RunActor"]
