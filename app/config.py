"""The one Settings class: every setting is an SFRELAY_ environment variable (or .env line)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.durability import AckDurability
from app.errors import ConfigError
from app.sfid import canonical_id

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WSDL_DIR = PROJECT_ROOT / "wsdl"
# Written by `sfrelay up` (its local Redis, the demo site): read before .env, below the
# environment, so commands typed in the same folder find what `up` runs (app/up.py).
LOCAL_ENV_FILE = "var/sfrelay.env"

# Salesforce retries a failed delivery for 24 hours: remember notification ids for longer.
MIN_DEDUPE_TTL_S = 25 * 3600
# Upper bounds of durations: a larger one (or inf) would fail at run time, not at start, e.g.
# Redis refuses an expiry that overflows its millisecond clock, so every ack would fault.
HOUR_S = 3600
DAY_S = 24 * HOUR_S
YEAR_S = 365 * DAY_S

_PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "token", "example", "xxx"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MatchByEmail = Literal["true", "false", "never-logged-in"]
# The spellings pydantic accepts for a boolean, as the setting accepted them before.
_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


# Settings whose value an error never shows: secrets, and URLs that may carry a password.
_UNSHOWN = frozenset(
    {
        "endpoint_token",
        "sf_password",
        "sf_security_token",
        "sf_consumer_secret",
        "redis_url",
        "database_url",
    }
)
# What a setting must be, per pydantic error type (its ctx fills the braces).
_MUST_BE = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "greater_than_equal": "at least {ge}",
    "greater_than": "more than {gt}",
    "less_than_equal": "at most {le}",
    "less_than": "less than {lt}",
    "literal_error": "{expected}",
}


def describe_invalid(exc: ValidationError) -> list[str]:
    """One line per refused setting, named as it is set (SFRELAY_PORT) and saying what it must
    be; the value given is shown, except a secret's or a URL's (it may hold a password)."""
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        name = f"SFRELAY_{field.upper()}"
        if error["type"] == "value_error":  # our validators' own words: already say what to do
            text = error["msg"].removeprefix("Value error, ")
            lines.append(text if not field or text.startswith(name) else f"{name}: {text}")
            continue
        must = _MUST_BE.get(error["type"])
        if must is None:
            text = f"{name}: {error['msg'].replace('Input should be', 'must be')}"
        else:
            ctx = {  # 0, not 0.0, for a float setting's bound
                key: int(value) if isinstance(value, float) and value.is_integer() else value
                for key, value in error.get("ctx", {}).items()
            }
            text = f"{name} must be {must.format(**ctx)}"
        if field not in _UNSHOWN:
            text += f" (not {error['input']!r})"
        lines.append(text)
    return lines


# The query parameters of SFRELAY_REDIS_URL that the receiver's and CLI's client (redis-py)
# and the worker's (arq, workers.main.redis_settings) both read; redis-py passes any other
# name to its connection as a keyword, a TypeError at the first command.
REDIS_TLS_PARAMS: tuple[str, ...] = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile")
REDIS_TLS_PARAMS += ("ssl_keyfile", "ssl_check_hostname")
_REDIS_CERT_REQS = ("none", "optional", "required")


def _redis_query(scheme: str, query: str) -> None:
    """Refuse a query parameter of SFRELAY_REDIS_URL that not every sfrelay process reads."""
    params = parse_qs(query)
    for name, values in params.items():
        if name == "db":
            continue
        if name not in REDIS_TLS_PARAMS:
            raise ValueError(
                f"SFRELAY_REDIS_URL: ?{name}= is not read by sfrelay; a rediss:// URL is TLS, "
                "and its query may give db, " + ", ".join(REDIS_TLS_PARAMS)
            )
        if scheme != "rediss":
            raise ValueError(
                f"SFRELAY_REDIS_URL: ?{name}= is for TLS: write the URL with rediss://"
            )
        if name == "ssl_cert_reqs" and values[-1].lower() not in _REDIS_CERT_REQS:
            raise ValueError(
                "SFRELAY_REDIS_URL: ssl_cert_reqs must be none, optional or required "
                f"(not {values[-1]!r})"
            )
        if name == "ssl_check_hostname" and values[-1].lower() not in ("true", "false"):
            raise ValueError(
                f"SFRELAY_REDIS_URL: ssl_check_hostname must be true or false (not {values[-1]!r})"
            )


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All of sfrelay's settings. Build it once at start-up and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="SFRELAY_",
        env_file=(LOCAL_ENV_FILE, ".env"),  # later files win; the environment wins over both
        env_file_encoding="utf-8",
        extra="ignore",
    )

    env: Literal["development", "production"] = "production"
    # Log lines as text (default) or one JSON object per line (app/logs.py).
    log_format: Literal["text", "json"] = "text"

    # --- receiver -----------------------------------------------------------------------------
    org_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    endpoint_token: SecretStr | None = None
    allowed_networks: Annotated[list[Network], NoDecode] = Field(default_factory=list)
    trusted_proxies: Annotated[list[Network], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=1 << 30)
    # A client has this long for its request head, then as long again for its body.
    read_timeout_seconds: float = Field(default=30, gt=0, le=HOUR_S)
    # Open connections per receiver process; beyond it the oldest idle or slow one is closed.
    max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    wsdl_dir: Path = DEFAULT_WSDL_DIR
    handled_objects: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Contact", "Lead"]
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # On SIGTERM the receiver answers /readyz with 503 and goes on serving for this long, so
    # that the load balancer stops sending to it before its listener closes (app/server.py).
    shutdown_drain_seconds: float = Field(default=5, ge=0, le=HOUR_S)

    # --- queue --------------------------------------------------------------------------------
    redis_url: str = "redis://localhost:6379/0"
    queue_name: str = "arq:queue"
    dedupe_ttl_seconds: int = Field(default=26 * 3600, ge=MIN_DEDUPE_TTL_S, le=YEAR_S)
    # A queued job must outlive any backlog: arq's own default (1 day) would silently drop
    # work that waited longer than that.
    job_ttl_seconds: int = Field(default=14 * 24 * 3600, ge=24 * 3600, le=YEAR_S)
    # What an ack promises: fsync (on Redis's disk), replica (and on a replica), memory.
    ack_durability: AckDurability = "fsync"

    # --- workers / Drupal ---------------------------------------------------------------------
    database_url: str = "sqlite:///drupal.sqlite"
    drupal_version: Literal["auto", "7", "8", "9", "10", "11"] = "auto"
    # true: link a new record to the one Drupal user with its email; never-logged-in: only
    # if that user never logged in (login = 0); false: never link (a conflict instead).
    match_by_email: MatchByEmail = "true"
    # Role ids (D10 machine names, D7 role names) whose holders sfrelay never links, updates,
    # blocks or unblocks; empty: the site's admin roles and those granting `administer users`
    # or `administer permissions` (uid 0 and 1 are always protected).
    protected_roles: Annotated[list[str], NoDecode] = Field(default_factory=list)
    field_map: Path | None = None
    max_tries: int = Field(default=5, ge=1, le=1000)
    worker_max_rss_mb: int = Field(default=512, ge=32, le=1 << 20)
    # Notifications per database transaction. Measured (tests/bench/worker.py, one worker,
    # 100,000 notifications): 1,000 / 2,000 / 3,000 / 4,000 made 7,955 / 9,450 / 10,571 /
    # 11,163 users/s on SQLite (PostgreSQL: 2,000 7,130, 3,000 8,474) for an RSS growth of
    # +15.5 / +18 / +18-20 / +22 MB (two batches of jobs are held: one gathers while the other
    # is written); a batch holds SQLite's write lock ~0.3 s at 3,000.
    worker_batch_size: int = Field(default=3000, ge=1, le=100_000)
    # A worker serves Prometheus metrics on this port (0.0.0.0); unset: none.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # arq's job timeout; a killed worker's job is re-run by another once its in-progress mark
    # expires (this + 10 s), and a stopping worker waits this long for its running jobs (give
    # the container at least this stop grace period). A job normally takes well under 1 s.
    job_timeout_seconds: float = Field(default=60, ge=1, le=DAY_S)
    # First retry delay; each further attempt waits twice as long (capped at one hour).
    retry_backoff_seconds: float = Field(default=30, ge=0, le=HOUR_S)

    # --- Salesforce API (app/salesforce/) -----------------------------------------------------
    # The part of the login host before .salesforce.com: login, test (sandboxes) or a My Domain
    # such as acme.my. The flow follows from what is set (app/salesforce/auth.py).
    sf_domain: str = "login"
    sf_username: str | None = None
    sf_password: SecretStr | None = None
    sf_security_token: SecretStr | None = None
    sf_consumer_key: str | None = None
    sf_consumer_secret: SecretStr | None = None
    sf_private_key_file: Path | None = None
    sf_api_version: str = "62.0"
    # Polls refuse to start when the org has fewer daily API requests left than this.
    sf_min_api_remaining: int = Field(default=1000, ge=0, le=1_000_000_000)
    # How often the worker reconciles with Salesforce (0: never); needs the SF_* credentials.
    reconcile_every_seconds: int = Field(default=900, ge=0, le=30 * DAY_S)
    # What a record deleted in Salesforce does to its Drupal user (never deletes the row).
    on_delete: Literal["block", "unlink", "ignore"] = "block"
    # message: apply the Outbound Message's values; refetch: read the record's current values.
    payload_mode: Literal["message", "refetch"] = "message"

    @field_validator("org_ids", "handled_objects", "protected_roles", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("handled_objects")
    @classmethod
    def _some_objects(cls, value: list[str]) -> list[str]:
        if not value:
            # Every notification would be acked and skipped: Salesforce never sends it again.
            raise ValueError(
                "SFRELAY_HANDLED_OBJECTS is empty, so every notification would be acked and "
                "dropped: name the objects to sync (Contact,Lead), or leave it unset"
            )
        return value

    @field_validator("match_by_email", mode="before")
    @classmethod
    def _match_by_email(cls, value: object) -> object:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE:
                return "true"
            if word in _FALSE:
                return "false"
            if word.replace("_", "-") == "never-logged-in":
                return "never-logged-in"
        raise ValueError(
            f"SFRELAY_MATCH_BY_EMAIL must be true, false or never-logged-in (not {value!r})"
        )

    @field_validator("allowed_networks", "trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list):
            try:
                return [ipaddress.ip_network(str(v), strict=False) for v in value]
            except ValueError as exc:
                raise ValueError(
                    f"not a CIDR network: {exc} (write networks such as 13.108.0.0/14, "
                    "comma-separated)"
                ) from exc
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

    @field_validator("sf_domain")
    @classmethod
    def _sf_domain(cls, value: str) -> str:
        value = value.strip()
        if (
            not value
            or "/" in value
            or ":" in value
            or value.endswith(".salesforce.com")
            or not re.fullmatch(r"[A-Za-z0-9.-]+", value)
        ):
            raise ValueError(
                f"{value!r} is not a Salesforce login domain: give the part before "
                ".salesforce.com (login, test for a sandbox, or your My Domain such as acme.my)"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        """What redis-py and arq would refuse with a traceback, or read otherwise than meant
        (a / in the password ends the host). The URL itself is never shown: its password."""
        value = value.strip()
        scheme = value.partition("://")[0] if "://" in value else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "SFRELAY_REDIS_URL must start with redis://, rediss:// (TLS) or unix:// "
                "(a socket), as in redis://localhost:6379/0"
            )
        url = urlsplit(value)
        _redis_query(scheme, url.query)
        if scheme == "unix":
            if not url.path:
                raise ValueError(
                    "SFRELAY_REDIS_URL names no socket file: write unix:///path/to/redis.sock"
                )
            return value
        try:
            port = url.port
        except ValueError:
            port = -1
        wrong = ""
        if port is not None and not 1 <= port <= 65535:
            wrong = "its port is not a number from 1 to 65535"
        elif not url.hostname:
            wrong = "it names no host"
        elif not re.fullmatch(r"/?\d*", url.path) or not all(
            db.isdigit() for db in parse_qs(url.query).get("db", [])
        ):
            wrong = "its database is not a number (/0)"
        if wrong:
            raise ValueError(
                f"SFRELAY_REDIS_URL is not a Redis URL such as redis://:password@host:6379/0: "
                f"{wrong}; write a /, ?, #, @ or : in the password as %2F, %3F, %23, %40 or %3A"
            )
        return value

    @field_validator("sf_api_version")
    @classmethod
    def _sf_api_version(cls, value: str) -> str:
        if not re.fullmatch(r"\d{2,3}\.0", value.strip()):
            raise ValueError(
                f"{value!r} is not a Salesforce API version: write it like 62.0 (no leading v)"
            )
        return value.strip()

    @field_validator("sf_username", "sf_consumer_key", "sf_private_key_file", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

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
        # The org id is no secret (every Web-to-Lead form carries it as `oid`): without a
        # token or an address check, anyone could post notifications that block or re-mail users.
        if self.endpoint_token is None and not self.allowed_networks and self.env != "development":
            raise ConfigError(
                "neither SFRELAY_ENDPOINT_TOKEN nor SFRELAY_ALLOWED_NETWORKS is set, so anyone "
                "could post notifications: set SFRELAY_ENDPOINT_TOKEN to a long random secret "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))') and end the "
                "endpoint URL in Salesforce with ?token=<it>, or set SFRELAY_ALLOWED_NETWORKS "
                "to Salesforce's IP ranges"
            )
