"""A database URL's TLS parameters, as providers write them, in the form each driver takes.

Providers give libpq's and the MySQL client's spellings (`?sslmode=require`,
`?sslrootcert=...`, `?ssl-mode=REQUIRED`, `?ssl_ca=...`), while SQLAlchemy hands a URL's query
to the async drivers as keywords: asyncpg has no `sslmode` keyword and aiomysql takes only an
`ssl.SSLContext`, so each was a TypeError or AttributeError at the first connection.

PostgreSQL: the parameters asyncpg takes as keywords stay (its numbers made numbers:
`statement_cache_size=0` was a TypeError, and PgBouncer's transaction pooling needs it with
SQLAlchemy's `prepared_statement_cache_size=0`); `ssl=true|false` is
`sslmode=require|disable`; libpq's `connect_timeout` is asyncpg's `timeout`; every other
parameter goes to asyncpg in a libpq DSN (`dsn`), which reads `sslmode`, `sslrootcert`,
`sslcert`, `sslkey`, `sslcrl`, `sslpassword`, `ssl_min_protocol_version`... as libpq does and
sends the rest as server settings (`application_name`, `options`). `sslrootcert=system` is the
system's CA bundle (libpq 16). `channel_binding=require` is refused: asyncpg cannot bind.

MySQL/MariaDB, read as the MySQL client's `--ssl-mode`: DISABLED, PREFERRED (TLS when the
server offers it, unverified), REQUIRED (TLS or no connection, unverified), VERIFY_CA (the
certificate is signed by `ssl_ca`, else the system's CAs), VERIFY_IDENTITY (and names the
host). `ssl=true` is REQUIRED; `ssl_ca`/`ssl_capath` without a mode is VERIFY_IDENTITY, or
VERIFY_CA with `ssl_check_hostname=false` (PyMySQL's reading of the same URL).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import ConfigError

# asyncpg.connect's own keywords (and SQLAlchemy's): passed on as they are.
_ASYNCPG_KEYWORDS = frozenset(
    {
        "host",
        "port",
        "passfile",
        "ssl",
        "direct_tls",
        "timeout",
        "command_timeout",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "prepared_statement_cache_size",
    }
)
_ASYNCPG_NUMBERS: dict[str, type[int] | type[float]] = {
    "statement_cache_size": int,
    "max_cached_statement_lifetime": int,
    "max_cacheable_statement_size": int,
    "timeout": float,
    "command_timeout": float,
}
_PG_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# ?ssl=true (node-postgres, some providers' examples) is libpq's sslmode=require.
_PG_SSL_WORDS = {"true": "require", "1": "require", "false": "disable", "0": "disable"}
_PG_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl")

_MYSQL_MODES = ("DISABLED", "PREFERRED", "REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY")
_MYSQL_MODE_NAMES = ("ssl_mode", "ssl-mode", "sslmode")
_MYSQL_FILES = ("ssl_ca", "ssl_capath", "ssl_cert", "ssl_key")
_MYSQL_PARAMS = frozenset(
    {"ssl", *_MYSQL_MODE_NAMES, *_MYSQL_FILES, "ssl_check_hostname", "ssl_cipher"}
)
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _refuse(text: str) -> ConfigError:
    return ConfigError(f"SFRELAY_DATABASE_URL: {text}")


def _last(value: str | tuple[str, ...]) -> str:
    return value[-1] if isinstance(value, tuple) else value


def _need_file(name: str, path: str) -> None:
    if not os.path.exists(path):
        raise _refuse(f"{name}={path}: no such file (give the path of the file the provider gives)")


@dataclass(frozen=True)
class DriverOptions:
    """What create_async_engine is given: the URL without what its driver cannot take from
    the query, and the connect_args that say the same."""

    url: URL
    connect_args: dict[str, Any]
    require_tls: bool = False  # MySQL: refuse a connection the server left unencrypted


def connect_options(url: URL) -> DriverOptions:
    """`url` (from app.drupal.url.async_url) as its driver takes it. ConfigError for what
    cannot be honoured, saying what to write."""
    backend = url.get_backend_name()
    if backend == "postgresql":
        return _postgres(url)
    if backend == "mysql":
        return _mysql(url)
    return DriverOptions(url, {})


def _postgres(url: URL) -> DriverOptions:
    keep: dict[str, str | tuple[str, ...]] = {}
    libpq: dict[str, str] = {}
    args: dict[str, Any] = {}
    for name, value in url.query.items():
        if name in _ASYNCPG_KEYWORDS and name != "ssl":
            keep[name] = value
        else:
            libpq[name] = _last(value)
    if "ssl" in libpq:
        word = libpq.pop("ssl").lower()
        libpq.setdefault("sslmode", _PG_SSL_WORDS.get(word, word))
    mode = libpq.get("sslmode")
    if mode is not None and mode not in _PG_MODES:
        raise _refuse(f"sslmode must be one of {', '.join(_PG_MODES)} (not {mode!r})")
    if libpq.get("sslrootcert") == "system":
        bundle = ssl.get_default_verify_paths().cafile
        if bundle is None or not os.path.exists(bundle):
            raise _refuse(
                "sslrootcert=system: this system has no CA bundle file; give its path "
                "(sslrootcert=/etc/ssl/certs/ca-certificates.crt)"
            )
        libpq["sslrootcert"] = bundle
    for name in _PG_FILES:
        if name in libpq:
            _need_file(name, libpq[name])
    binding = libpq.pop("channel_binding", "prefer")
    if binding == "require":
        raise _refuse(
            "channel_binding=require: sfrelay's PostgreSQL driver (asyncpg) cannot bind the "
            "login to the TLS channel; remove it and keep sslmode=verify-full to be sure of "
            "the server"
        )
    for name, kind in _ASYNCPG_NUMBERS.items():
        if name in keep:  # SQLAlchemy hands them on as text: asyncpg's TypeError
            value = _last(keep.pop(name))
            try:
                args[name] = kind(value)
            except ValueError:
                raise _refuse(f"{name} must be a number (not {value!r})") from None
    if "connect_timeout" in libpq:
        seconds = libpq.pop("connect_timeout")
        try:
            args["timeout"] = float(seconds)
        except ValueError:
            raise _refuse(
                f"connect_timeout must be a number of seconds (not {seconds!r})"
            ) from None
    if libpq:
        args["dsn"] = "postgresql://?" + urlencode(libpq)
    return DriverOptions(url.set(query=keep), args)


def _mysql_mode(query: dict[str, str]) -> str:
    names = [name for name in _MYSQL_MODE_NAMES if name in query]
    if names:
        mode = query[names[0]].upper().replace("-", "_")
        if mode not in _MYSQL_MODES:
            raise _refuse(
                f"{names[0]} must be one of {', '.join(_MYSQL_MODES)} (not {query[names[0]]!r})"
            )
        return mode
    if "ssl_ca" in query or "ssl_capath" in query:
        check = query.get("ssl_check_hostname", "true").lower()
        return "VERIFY_CA" if check in _FALSE else "VERIFY_IDENTITY"
    if "ssl" in query:
        word = query["ssl"].lower()
        if word not in _TRUE + _FALSE:
            raise _refuse(f"ssl must be true or false (not {query['ssl']!r})")
        return "REQUIRED" if word in _TRUE else "DISABLED"
    if "ssl_cert" in query:  # a client certificate is only sent over TLS
        return "REQUIRED"
    return "DISABLED"


def _mysql(url: URL) -> DriverOptions:
    query = {name: _last(value) for name, value in url.query.items() if name in _MYSQL_PARAMS}
    if not query:
        return DriverOptions(url, {})
    keep = {name: value for name, value in url.query.items() if name not in _MYSQL_PARAMS}
    mode = _mysql_mode(query)
    for name in _MYSQL_FILES:
        if name in query:
            _need_file(name, query[name])
    stripped = url.set(query=keep)
    if mode == "DISABLED":
        return DriverOptions(stripped, {})
    context = ssl.create_default_context(cafile=query.get("ssl_ca"), capath=query.get("ssl_capath"))
    context.check_hostname = mode == "VERIFY_IDENTITY"
    if mode in ("PREFERRED", "REQUIRED"):
        context.verify_mode = ssl.CERT_NONE
    if "ssl_cert" in query:
        context.load_cert_chain(query["ssl_cert"], query.get("ssl_key"))
    if "ssl_cipher" in query:
        context.set_ciphers(query["ssl_cipher"])
    return DriverOptions(stripped, {"ssl": context}, require_tls=mode != "PREFERRED")


class PlainTextRefused(ConnectionError):
    """The server did not offer TLS, which the URL requires: transient (app.drupal.errors),
    as a server being reconfigured is; the message says which."""


def require_tls(engine: AsyncEngine) -> None:
    """Each new connection must be encrypted: aiomysql goes on in plain text, quietly, with a
    server that does not offer TLS (one misconfigured, or a man in the middle)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _encrypted(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = cursor.fetchone()
        cursor.close()
        if not row or not row[1]:
            dbapi_connection.close()
            raise PlainTextRefused(
                "the MySQL server did not offer TLS, which SFRELAY_DATABASE_URL requires "
                "(ssl_mode): enable TLS on the server, or ask for ssl_mode=PREFERRED"
            )
