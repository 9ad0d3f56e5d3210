"""app/drupal/bulk.py: the bulk statements' own rules (their errors: tests/test_db_errors.py)."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from app.drupal import bulk
from app.drupal.bulk import fetch_all, update_rows
from app.drupal.engine import create_engine
from tests.fixtures_db import Server


async def test_updates_go_in_key_order_and_a_repeated_key_keeps_its_last_values(
    tmp_path: Path,
) -> None:
    """Rows are applied in the order of their keys (the table's pages are visited in order),
    stably: of two rows for one key, the later one's values stay, as given. A NULL key among
    them leaves the order as given, and is no error."""
    path = tmp_path / "t.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        """
        CREATE TABLE t (k INTEGER, v TEXT);
        CREATE TABLE seen (k INTEGER, v TEXT);
        CREATE TRIGGER t_seen AFTER UPDATE ON t BEGIN INSERT INTO seen VALUES (new.k, new.v); END;
        INSERT INTO t VALUES (3, 'a'), (1, 'a'), (2, 'a');
        """
    )
    db.close()
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as conn:
            rows = [("x", 3), ("y", 1), ("z", 2), ("w", 1)]
            await update_rows(conn, "t", ("v",), ("k",), rows)
            seen = await fetch_all(conn, "SELECT k, v FROM seen ORDER BY rowid", ())
            assert [tuple(r) for r in seen] == [(1, "y"), (1, "w"), (2, "z"), (3, "x")]
            stored = await fetch_all(conn, "SELECT k, v FROM t ORDER BY k", ())
            assert [tuple(r) for r in stored] == [(1, "w"), (2, "z"), (3, "x")]

            await update_rows(conn, "t", ("v",), ("k",), [("n", None), ("m", 2)])
            stored = await fetch_all(conn, "SELECT k, v FROM t ORDER BY k", ())
            assert [tuple(r) for r in stored] == [(1, "w"), (2, "m"), (3, "x")]
    finally:
        await engine.dispose()


async def test_mysql_updates_are_joined_and_leave_the_rows_executemany_would(
    mariadb_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MySQL: update_rows sends one UPDATE joined to the rows per chunk (aiomysql runs an
    executemany UPDATE row by row); the table ends as the row-by-row UPDATEs leave it: keys
    compared by the column's collation, the last of two rows for a key kept, a NULL key
    matching nothing, values converted as assigned directly, strict mode's errors alike."""
    admin = mariadb_server.admin_engine()
    async with admin.connect() as conn:
        await conn.execute(text("CREATE DATABASE IF NOT EXISTS bulk_joined"))
    await admin.dispose()
    engine = create_engine(mariadb_server.url("bulk_joined"))
    columns = ("v", "n", "d")
    rows = [
        ("x", 1, "1.005", "A", "en"),  # the general_ci key matches 'a'
        ("y", None, 2.5, "b", "EN"),  # ascii_general_ci: 'EN' is 'en'
        ("ü", 3, None, "c", "en"),
        ("first", 4, 4, "d", "en"),
        ("last", 5, 5, "d", "en"),  # the later row for one key wins
        ("none", 6, 6, None, "en"),  # no row has a NULL key
        ("gone", 7, 7, "zz", "en"),  # no such row
        ("7", "8", "9.999", "e", "en"),  # text into int and decimal, as assigned directly
    ]
    try:
        for name in ("joined", "one_by_one"):
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
                await conn.exec_driver_sql(
                    f"CREATE TABLE {name} (k varchar(2) COLLATE utf8mb4_general_ci, "
                    "lc varchar(12) CHARACTER SET ascii COLLATE ascii_general_ci, "
                    "v varchar(5), n int, d decimal(10,2), PRIMARY KEY (k, lc))"
                )
                await conn.exec_driver_sql(
                    f"INSERT INTO {name} (k, lc) VALUES "
                    "('a', 'en'), ('b', 'en'), ('c', 'en'), ('d', 'en'), ('e', 'en'), ('f', 'en')"
                )
        monkeypatch.setattr(bulk, "JOINED_ROWS", 3)  # three statements
        async with engine.begin() as conn:
            await update_rows(conn, "joined", columns, ("k", "lc"), rows)
            sql = bulk.update_sql(conn.dialect, "one_by_one", columns, ("k", "lc"))
            await conn.exec_driver_sql(sql, rows)  # aiomysql: one UPDATE per row
        async with engine.connect() as conn:
            joined = (await conn.exec_driver_sql("SELECT * FROM joined ORDER BY k")).all()
            each = (await conn.exec_driver_sql("SELECT * FROM one_by_one ORDER BY k")).all()
        assert joined == each
        assert [tuple(r) for r in joined][3] == ("d", "en", "last", 5, Decimal("5.00"))
        with pytest.raises(DBAPIError) as caught:
            async with engine.begin() as conn:
                await update_rows(conn, "joined", ("v",), ("k", "lc"), [("toolong", "a", "en")])
        assert caught.value.orig.args[0] == 1406  # Data too long, as the direct UPDATE's
    finally:
        await engine.dispose()
