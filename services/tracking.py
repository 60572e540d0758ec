"""Experiment trackers a run also logs to: ``tracking: [tensorboard, wandb]`` in the run spec (off
by default; Prometheus and ``metrics.jsonl`` are always written).

Per step every metric the controller reports (the catalog's keys and the per-head ones); at the
start the run spec as hyperparameters (flattened ``section.key`` names, as veRL's
``utils/tracking.py`` passes its config); at the end the run report's plots as images.

TensorBoard writes event files to ``<run dir>/tensorboard/`` (`torch.utils.tensorboard`).
W&B writes ``<run dir>/wandb/``: online when ``WANDB_API_KEY`` is set (or ``WANDB_MODE=online``),
else offline (no network needed; ``wandb sync`` uploads later); project ``WANDB_PROJECT`` or
"mtprl". A tracker that fails logs one warning and is dropped for the rest of the run: a
tracker never stops or slows down training beyond its own call.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

TrackerName = Literal["tensorboard", "wandb"]
TENSORBOARD_DIR = "tensorboard"


def flat_hparams(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"algorithm.lr": 1e-4, ...}``: scalars as they are, lists and None as JSON text (what
    TensorBoard's hparams plugin and W&B's config table show)."""
    out: dict[str, Any] = {}
    for k, v in spec.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{name}."))
        elif isinstance(v, (bool, int, float, str)):
            out[name] = v
        else:
            out[name] = json.dumps(v)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, run_id: str, spec: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        self.writer.add_text("run_spec", "```\n" + json.dumps(spec, indent=1, sort_keys=True) + "\n```", 0)
        hp = {k: v for k, v in flat_hparams(spec).items()}
        # run_name "." keeps the hparams in this event directory (not a sub-run per call)
        self.writer.add_hparams(hp, {}, run_name=".")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def images(self, pngs: list[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for p in pngs:
            self.writer.add_image(f"report/{p.stem}", np.asarray(Image.open(p).convert("RGB")), step,
                                  dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, run_id: str, spec: dict[str, Any]):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mtprl"), name=run_id, id=_wandb_id(run_id),
                              dir=str(run_dir), mode=mode, config=spec, resume="allow", reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def images(self, pngs: list[Path], step: int) -> None:
        import wandb

        self.run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in pngs}, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_id: str) -> str:
    # W&B ids allow letters, digits, '-' and '_' only; a resumed run (same id) continues its W&B run
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)[:64] or "run"


_KINDS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class Tracking:
    """The run's trackers; every call is guarded (a failure warns once and drops that tracker)."""

    def __init__(self, names: list[str], run_dir: str | Path, run_id: str, spec: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.trackers: dict[str, Any] = {}
        self.last_step = 0
        for name in dict.fromkeys(names):
            try:
                self.trackers[name] = _KINDS[name](self.run_dir, run_id, spec)
            except Exception as e:  # noqa: BLE001 - any tracker failure must not stop the run
                log.warning("tracking: %s could not start (%s: %s); the run goes on without it",
                            name, type(e).__name__, e)

    def _call(self, method: str, *args: Any) -> None:
        for name, t in list(self.trackers.items()):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001
                log.warning("tracking: %s failed in %s (%s: %s); dropped for the rest of the run",
                            name, method, type(e).__name__, e)
                self.trackers.pop(name, None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.trackers:
            return
        finite = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.last_step = step
        self._call("log", finite, step)

    def finish(self, with_report: bool = True) -> None:
        """Log the run report's plots (written here) and close every tracker."""
        if not self.trackers:
            return
        if with_report:
            try:
                from services.report import write_report

                pngs = sorted((write_report(self.run_dir)).glob("*.png"))
            except Exception as e:  # noqa: BLE001 - e.g. a run that logged no step
                log.warning("tracking: no report plots (%s: %s)", type(e).__name__, e)
                pngs = []
            if pngs:
                self._call("images", pngs, self.last_step)
        self._call("close")
        self.trackers.clear()
