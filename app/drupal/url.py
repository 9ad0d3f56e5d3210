"""Turn the database URL a Drupal admin knows into an async SQLAlchemy URL."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from app.errors import ConfigError

# Drupal's settings.php drivers (and common spellings) -> the async driver sfrelay uses.
_DRIVERS = {
    "mysql": "mysql+aiomysql",
    "mariadb": "mysql+aiomysql",
    "pgsql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def _malformed(wrong: str) -> str:
    return (
        f"SFRELAY_DATABASE_URL is not a URL such as mysql://user:password@host:3306/database: "
        f"{wrong}; write a /, ?, #, @ or : in the password as %2F, %3F, %23, %40 or %3A"
    )


def async_url(url: str) -> URL:
    """`mysql://`, `pgsql://`/`postgresql://`, `sqlite:///path` (or an async URL) -> URL."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            "SFRELAY_DATABASE_URL is not a database URL: write mysql://user:password@host/"
            "database, pgsql://user:password@host/database or sqlite:////path/to/.ht.sqlite"
        ) from exc
    except ValueError as exc:  # int() of the port: the URL (its password) is never shown
        raise ConfigError(_malformed("its port is not a number from 1 to 65535")) from exc
    backend = parsed.get_backend_name()
    if backend not in _DRIVERS:
        raise ConfigError(
            f"SFRELAY_DATABASE_URL: unsupported database {backend!r} "
            "(use mysql://, pgsql:// or postgresql://, or sqlite:///path)"
        )
    parsed = parsed.set(drivername=_DRIVERS[backend])
    if backend != "sqlite":
        if parsed.port is not None and not 1 <= parsed.port <= 65535:
            raise ConfigError(_malformed("its port is not a number from 1 to 65535"))
        if parsed.database and ("@" in parsed.database or "/" in parsed.database):
            # A / in the password ended the host: the rest was read as the database name.
            raise ConfigError(_malformed("what follows the host is not a database name"))
    if backend == "sqlite":
        if parsed.host:  # sqlite://var/www/x.sqlite: SQLAlchemy reads no host, "www/x.sqlite"
            raise ConfigError(
                f"SFRELAY_DATABASE_URL: sqlite://{parsed.host}/... names a host, which an SQLite "
                f"URL has none of: for the file /{parsed.host}/{parsed.database}, write "
                f"sqlite:////{parsed.host}/{parsed.database} (a path after sqlite:/// is "
                "relative to the current folder; an absolute one takes four slashes)"
            )
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError("SFRELAY_DATABASE_URL: give the path of the Drupal SQLite file")
    elif backend in ("mysql", "mariadb") and "charset" not in parsed.query:
        # Drupal's tables are utf8mb4; the driver's default charset would mangle names.
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed
