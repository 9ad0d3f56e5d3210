"""The one Settings class: every setting is an SFRELAY_ environment variable (or .env line)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.durability import AckDurability
from app.errors import ConfigError
from app.sfid import canonical_id

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WSDL_DIR = PROJECT_ROOT / "wsdl"

# Salesforce retries a failed delivery for 24 hours: remember notification ids for longer.
MIN_DEDUPE_TTL_S = 25 * 3600

_PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "token", "example", "xxx"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All of sfrelay's settings. Build it once at start-up and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="SFRELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    env: Literal["development", "production"] = "production"

    # --- receiver -----------------------------------------------------------------------------
    org_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    endpoint_token: SecretStr | None = None
    allowed_networks: Annotated[list[Network], NoDecode] = Field(default_factory=list)
    trusted_proxies: Annotated[list[Network], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    wsdl_dir: Path = DEFAULT_WSDL_DIR
    handled_objects: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Contact", "Lead"]
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # --- queue --------------------------------------------------------------------------------
    redis_url: str = "redis://localhost:6379/0"
    queue_name: str = "arq:queue"
    dedupe_ttl_seconds: int = Field(default=26 * 3600, ge=MIN_DEDUPE_TTL_S)
    # A queued job must outlive any backlog: arq's own default (1 day) would silently drop
    # work that waited longer than that.
    job_ttl_seconds: int = Field(default=14 * 24 * 3600, ge=24 * 3600)
    # What an ack promises: fsync (on Redis's disk), replica (and on a replica), memory.
    ack_durability: AckDurability = "fsync"

    # --- workers / Drupal ---------------------------------------------------------------------
    database_url: str = "sqlite:///drupal.sqlite"
    drupal_version: Literal["auto", "7", "8", "9", "10", "11"] = "auto"
    match_by_email: bool = True
    field_map: Path | None = None
    max_tries: int = Field(default=5, ge=1)
    worker_max_rss_mb: int = Field(default=512, ge=32)
    worker_batch_size: int = Field(default=2000, ge=1)
    # arq's job timeout; a killed worker's job is re-run by another once its in-progress mark
    # expires (this + 10 s), and a stopping worker waits this long for its running jobs (give
    # the container at least this stop grace period). A job normally takes well under 1 s.
    job_timeout_seconds: float = Field(default=60, ge=1)
    # First retry delay; each further attempt waits twice as long (capped at one hour).
    retry_backoff_seconds: float = Field(default=30, ge=0)

    @field_validator("org_ids", "handled_objects", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("allowed_networks", "trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list):
            try:
                return [ipaddress.ip_network(str(v), strict=False) for v in value]
            except ValueError as exc:
                raise ValueError(f"not a CIDR network: {exc}") from exc
        return value

    @field_validator("org_ids")
    @classmethod
    def _org_ids(cls, value: list[str]) -> list[str]:
        for org in value:
            if len(org) not in (15, 18) or not org.isalnum() or not org.isascii():
                raise ValueError(
                    f"{org!r} is not a Salesforce organization id (15 or 18 letters and digits; "
                    "Setup > Company Information shows it)"
                )
        return value

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        token = self.endpoint_token
        if (
            self.env != "development"
            and token is not None
            and token.get_secret_value().strip().lower() in _PLACEHOLDER_SECRETS
        ):
            raise ValueError(
                "SFRELAY_ENDPOINT_TOKEN is a placeholder: set a long random value "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return self

    @property
    def canonical_org_ids(self) -> frozenset[str]:
        return frozenset(canonical_id(org) for org in self.org_ids)

    def require_receiver_ready(self) -> None:
        """Refuse to serve an endpoint that would accept anyone's messages."""
        if not self.org_ids and self.env != "development":
            raise ConfigError(
                "SFRELAY_ORG_IDS is not set: set it to your Salesforce organization id "
                "(Setup > Company Information), or SFRELAY_ENV=development to accept any org"
            )
