"""The control plane's REST API (FastAPI). Build it with :func:`create_app`."""

from services.api.main import app_from_env, create_app

__all__ = ["create_app", "app_from_env"]
