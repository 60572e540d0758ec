"""FastAPI dependencies: `TokenDep` (bearer auth), `RegistryDep`, `LauncherDep`, `SettingsDep`."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.launcher import RunLauncher
from services.registry import RunRegistry
from services.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="The token of MTPRL_API_TOKEN or <data_dir>/api_token.")


def get_registry(request: Request) -> RunRegistry:
    return request.app.state.registry


def get_launcher(request: Request) -> RunLauncher:
    return request.app.state.launcher


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def verify_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    expected: str = request.app.state.api_token
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return creds.credentials


TokenDep = Annotated[str, Depends(verify_token)]
RegistryDep = Annotated[RunRegistry, Depends(get_registry)]
LauncherDep = Annotated[RunLauncher, Depends(get_launcher)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
