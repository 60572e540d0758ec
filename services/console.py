"""A quiet console for the CLI: the libraries' INFO logs (vLLM's spec-decode line every 10 s per
engine, Ray's start-up, transformers') go to a log file in the run directory; the commands print
their own progress lines. ``--verbose`` keeps everything on the console (and Ray's worker logs on
the driver's)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

#: Loggers whose records go to the file: the libraries the CLI drives, and Python warnings.
LIBRARY_LOGGERS = ("vllm", "ray", "transformers", "torch", "datasets", "httpx", "urllib3", "py.warnings")
LOG_NAME = "mtprl.log"


def route_library_logs(log_dir: str | Path, verbose: bool = False) -> Path | None:
    """Send `LIBRARY_LOGGERS` (INFO and up) to ``log_dir/mtprl.log`` instead of the console;
    returns the file, or None when ``verbose``. Call it before vLLM is imported where possible
    (vLLM then installs no console handler of its own); handlers already installed are removed."""
    if verbose:
        return None
    # vLLM configures its own stdout handler at import unless told not to (also in the Ray
    # actors this process starts: they inherit the environment)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    path = Path(log_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for old in list(lg.handlers):
            if not isinstance(old, logging.FileHandler):  # console handlers
                lg.removeHandler(old)
        lg.addHandler(handler)
        # torch's own children (torch._inductor, torch._dynamo) carry console handlers of their
        # own and inherit this level: at INFO they would print their INFO lines; torch's default
        # (WARNING) keeps them quiet.
        lg.setLevel(logging.WARNING if name == "torch" else logging.INFO)
        lg.propagate = False
    return path
