"""The async engine for a Drupal database: drivers, SQLite collation, one writer lock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from app.drupal.errors import driver_text
from app.drupal.tls import connect_options, require_tls
from app.drupal.url import async_url
from app.errors import ConfigError, RetryableError

# Any fixed number: all sfrelay workers writing one Drupal database take the same lock.
_PG_LOCK_KEY = 0x5F5E1A7
_MYSQL_LOCK = "sfrelay_apply"
_MYSQL_LOCK_WAIT_S = 60
SQLITE_BUSY_TIMEOUT_S = 30.0
# SQLAlchemy's text of a database error ends with the statement's bound values: users' emails,
# names, password hashes. sfrelay shows a driver's own words (app.drupal.errors.driver_text);
# a traceback that still carries one (a bug, logged) shows "[SQL parameters hidden ...]".
HIDE_PARAMETERS = True
# SQLite's page cache per connection. Measured (100,000 notifications into a new site; 10,000
# into a 1,000,000-user one): 2, 4 and 8 MB write equally fast (at 1M the pages a batch
# changes are far more than any of them holds; 64 and 256 MB were no faster either), and
# each MB more is a MB more of the worker's RSS.
SQLITE_CACHE_KIB = 2 * 1024


def nocase_key(value: str) -> str:
    """What NOCASE_UTF8 compares: mb_strtolower(value) (Python's full lower-casing)."""
    return value.lower()


def nocase_utf8(a: str, b: str) -> int:
    """Drupal's NOCASE_UTF8: strcmp(mb_strtolower(a), mb_strtolower(b)), by code point.

    nocase_key inlined: SQLite calls this for every step of a search in the name and uuid
    indexes, ~30 times per user written (REINDEX of 100,000 names: 0.28 s -> 0.23 s)."""
    a, b = a.lower(), b.lower()
    return 0 if a == b else (1 if a > b else -1)


def require_sqlite_file(path: str | None) -> None:
    """SQLite would create an empty file for a mistyped path; a Drupal site has one already."""
    if not path or Path(path).is_file():
        return
    where = path
    fix = "your site's file (sqlite:////path/to/sites/default/files/.ht.sqlite)"
    if not os.path.isabs(path):  # sqlite:///var/www/... is var/www/..., not /var/www/...
        where = (
            f"{path} (in {os.getcwd()}: a path after sqlite:/// is relative to the current "
            "folder; an absolute one takes four slashes)"
        )
        if Path("/", path).is_file():
            fix = f"sqlite:////{path} for /{path}"
    raise ConfigError(f"no Drupal SQLite database at {where}: set SFRELAY_DATABASE_URL to {fix}")


def existing_file(url: URL) -> URL:
    """`url` (an aiosqlite one, checked by require_sqlite_file) opening the file read-write
    and never creating it: a site's file deleted or moved away under a running worker must
    fail to open (SQLITE_CANTOPEN, retried), not come back as an empty database whose missing
    tables would fail every record."""
    path = quote(os.path.abspath(str(url.database)))
    return url.set(database=f"file:{path}").update_query_dict({"mode": "rw", "uri": "true"})


def register_nocase_utf8(dbapi_connection: Any) -> None:
    """Drupal's collation on one aiosqlite connection (aiosqlite has no create_collation:
    sqlite3's runs on aiosqlite's own thread)."""
    aio = dbapi_connection.driver_connection
    await_only(aio._execute(aio._conn.create_collation, "NOCASE_UTF8", nocase_utf8))


def create_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    parsed = async_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        require_sqlite_file(parsed.database)
        engine = create_async_engine(
            existing_file(parsed),
            hide_parameters=HIDE_PARAMETERS,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
            # sqlite3's own executemany (one prepared statement, a C loop) beats rendering
            # multi-row VALUES statements for each batch.
            use_insertmanyvalues=False,
        )
        _sqlite_events(engine)
        return engine
    options = connect_options(parsed)
    kwargs: dict[str, Any] = {
        "pool_size": pool_size,
        "pool_pre_ping": True,
        "hide_parameters": HIDE_PARAMETERS,
    }
    if backend == "mysql":
        # Each batch reads what it then writes under the writer lock: it must see the
        # rows other writers committed, not a REPEATABLE READ snapshot.
        kwargs["isolation_level"] = "READ COMMITTED"
    engine = create_async_engine(options.url, connect_args=options.connect_args, **kwargs)
    if options.require_tls:
        require_tls(engine)
    return engine


def _sqlite_events(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's implicit BEGIN (deferred, only before DML) breaks read-then-write
        # batches and savepoints: sfrelay emits BEGIN IMMEDIATE itself (below).
        dbapi_connection.isolation_level = None
        register_nocase_utf8(dbapi_connection)
        # Per connection only: Drupal's own are unaffected.
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        # Take SQLite's write lock up front: a batch that reads then writes can never
        # fail half-way with "database is locked" on lock upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@asynccontextmanager
async def writer(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One transaction holding the sfrelay writer lock, so concurrent workers never race
    on usernames, emails or uids (SQLite: BEGIN IMMEDIATE is that lock already)."""
    backend = engine.dialect.name
    conn = engine.connect()
    try:
        await conn.start()
    except DBAPIError as exc:
        # Whatever the server's reason (down, not accepting connections, too many), a
        # database that cannot be connected to is a transient state, never a record's fault.
        raise RetryableError(f"cannot connect to the Drupal database: {driver_text(exc)}") from exc
    try:
        if backend == "mysql":
            got = await conn.scalar(
                text("SELECT GET_LOCK(:name, :wait)"),
                {"name": _MYSQL_LOCK, "wait": _MYSQL_LOCK_WAIT_S},
            )
            await conn.commit()
            if got != 1:
                raise RetryableError("another sfrelay writer holds the database lock")
        try:
            async with conn.begin():
                if backend == "postgresql":
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY}
                    )
                yield conn
        finally:
            if backend == "mysql":
                # A broken connection has lost the lock with its session anyway.
                with suppress(DBAPIError):
                    await conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": _MYSQL_LOCK})
                    await conn.commit()
    finally:
        await conn.close()
