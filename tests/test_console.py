"""The quiet console: library INFO logs go to the run directory's log file, not the terminal,
unless --verbose. (Logging state is global: the test restores it.)"""

from __future__ import annotations

import logging
import os
import warnings

from services.console import LIBRARY_LOGGERS, route_library_logs


def test_library_logs_go_to_the_run_dir_not_the_console(tmp_path, capfd, monkeypatch):
    import torch  # noqa: F401 - installs torch's log handlers (reset again if imported after the routing)

    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in LIBRARY_LOGGERS}
    console = logging.StreamHandler()
    logging.getLogger("vllm").addHandler(console)  # as vLLM installs its own at import
    try:
        assert route_library_logs(tmp_path, verbose=True) is None
        path = route_library_logs(tmp_path)
        assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"
        logging.getLogger("vllm.v1.metrics").info("SpecDecoding metrics: Mean acceptance length: 1.5")
        logging.getLogger("ray").info("Started a local Ray instance.")
        # torch (imported before, as the CLI has it) gives its children (torch._inductor, ...)
        # console handlers of their own, which inherit the "torch" logger's level: at INFO they
        # would print "compile_threads set to 2" and compile statistics
        assert logging.getLogger("torch._inductor").handlers
        assert not logging.getLogger("torch._inductor.config").isEnabledFor(logging.INFO)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's deprecation", DeprecationWarning)
        for h in logging.getLogger("vllm").handlers:
            h.flush()
        out, err = capfd.readouterr()
        assert out == "" and err == "", (out, err)
        text = path.read_text()
        assert "SpecDecoding metrics" in text and "Started a local Ray instance" in text
        assert "a library's deprecation" in text
    finally:
        for n, (handlers, propagate, level) in saved.items():
            lg = logging.getLogger(n)
            for h in list(lg.handlers):
                if h not in handlers:
                    h.close()
            lg.handlers[:] = handlers
            lg.propagate, lg.level = propagate, level
        logging.captureWarnings(False)
