"""A read-only engine on the Drupal database, for the commands that only look (status, why).

Nothing is migrated or locked: SQLite runs with `PRAGMA query_only` and no BEGIN IMMEDIATE,
PostgreSQL and MySQL sessions are READ ONLY, so a mistake here fails instead of writing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from app.drupal.engine import (
    HIDE_PARAMETERS,
    existing_file,
    register_nocase_utf8,
    require_sqlite_file,
)
from app.drupal.tls import connect_options, require_tls
from app.drupal.url import async_url

CONNECT_TIMEOUT_S = 3


def read_engine(url: str) -> AsyncEngine:
    """Raises ConfigError for a URL that cannot name a Drupal database."""
    parsed = async_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        require_sqlite_file(parsed.database)
        engine = create_async_engine(
            existing_file(parsed),
            connect_args={"timeout": CONNECT_TIMEOUT_S},
            poolclass=NullPool,
            hide_parameters=HIDE_PARAMETERS,
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # each SELECT its own read transaction
            register_nocase_utf8(dbapi_connection)
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only = ON")
            cursor.close()

        return engine
    options = connect_options(parsed)
    if backend == "postgresql":
        connect_args: dict[str, Any] = {
            "timeout": CONNECT_TIMEOUT_S,
            **options.connect_args,
            "server_settings": {"default_transaction_read_only": "on"},
        }
        return create_async_engine(
            options.url,
            connect_args=connect_args,
            poolclass=NullPool,
            hide_parameters=HIDE_PARAMETERS,
        )
    engine = create_async_engine(
        options.url,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, **options.connect_args},
        poolclass=NullPool,
        hide_parameters=HIDE_PARAMETERS,
    )
    if options.require_tls:
        require_tls(engine)

    @event.listens_for(engine.sync_engine, "connect")
    def _mysql(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION TRANSACTION READ ONLY")
        cursor.close()

    return engine


async def table_names(conn: AsyncConnection) -> set[str]:
    return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
