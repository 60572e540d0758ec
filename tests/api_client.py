"""A real control plane for the spec-bound tests (test_api_spec_bounds.py, test_mtp_distill.py)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def api_test_client(data, mtp_layers: int):
    """A real control plane (embedded Redis, no launcher) over ``data`` with a model directory
    whose config declares ``mtp_layers`` MTP modules (``client.model_dir``): what the spec-bound
    tests submit against."""
    import json

    from fastapi.testclient import TestClient

    from services.api import create_app
    from services.launcher import NullLauncher
    from services.registry import EmbeddedRedis
    from services.settings import Settings

    model = data / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_nextn_predict_layers": mtp_layers,
                                                   "max_position_embeddings": 512}))
    app = create_app(Settings(data_dir=data, api_token="t"), launcher=NullLauncher())
    try:
        # raise_server_exceptions=False: a handler's crash must show as the 500 a client gets.
        with TestClient(app, raise_server_exceptions=False) as c:
            c.model_dir = str(model)
            yield c
    finally:
        EmbeddedRedis(data).stop()
