"""Error classification (app/drupal/errors.py) on real errors from real SQLite, PostgreSQL and
MariaDB: by the driver's code, whatever the message says."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.drupal.bulk import fetch_all, insert_rows, select_in
from app.drupal.errors import Classified, classify
from app.drupal.readonly import read_engine
from tests.fixtures_db import DrupalSite, Server
from tests.servers import free_port


def caught(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


async def acaught(action: Callable[[], Awaitable[object]]) -> BaseException:
    try:
        await action()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_sqlite_codes(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE t (x INTEGER UNIQUE CHECK (x < 100))")
    db.execute("INSERT INTO t VALUES (1)")

    unique = caught(lambda: db.execute("INSERT INTO t VALUES (1)"))
    check = caught(lambda: db.execute("INSERT INTO t VALUES (500)"))
    missing = caught(lambda: db.execute("INSERT INTO nowhere VALUES (1)"))

    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    readonly = caught(lambda: ro.execute("INSERT INTO t VALUES (2)"))

    db.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    busy = caught(lambda: other.execute("BEGIN IMMEDIATE"))
    db.execute("ROLLBACK")

    db.execute("PRAGMA max_page_count = 3")  # the "disk" is full after 3 pages
    full = caught(lambda: _fill(db))
    cantopen = caught(lambda: sqlite3.connect(tmp_path / "no" / "such" / "dir.db"))
    for conn in (db, ro, other):
        conn.close()

    assert classify(unique) == Classified(False, False, "SQLITE_CONSTRAINT_UNIQUE")
    assert classify(check) == Classified(False, False, "SQLITE_CONSTRAINT_CHECK")
    assert classify(missing) == Classified(False, False, "SQLITE_ERROR")
    assert classify(readonly) == Classified(True, True, "SQLITE_READONLY")
    assert classify(busy) == Classified(True, False, "SQLITE_BUSY")
    assert classify(full) == Classified(True, False, "SQLITE_FULL")
    assert classify(cantopen) == Classified(True, True, "SQLITE_CANTOPEN")
    # The words that once decided: "busy" in a constraint's message is still a constraint.
    assert classify(sqlite3.IntegrityError("database is busy")).transient is False


def _fill(db: sqlite3.Connection) -> None:
    for n in range(10_000):
        db.execute("INSERT INTO t VALUES (?)", (-n - 10,))


async def _pg(server: Server, database: str = "postgres") -> AsyncEngine:
    return create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/{database}")


async def test_postgresql_sqlstates(pg_server: Server) -> None:
    engine = await _pg(pg_server)
    async with engine.connect() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS errs"))
        await conn.execute(text("CREATE TABLE errs (x int PRIMARY KEY CHECK (x < 100))"))
        await conn.execute(text("INSERT INTO errs VALUES (1)"))
        await conn.commit()

    async def in_tx(sql: str, setup: str | None = None) -> BaseException:
        async with engine.connect() as conn:

            async def run() -> None:
                if setup:
                    await conn.execute(text(setup))
                await conn.execute(text(sql))

            exc = await acaught(run)
            await conn.rollback()
            return exc

    unique = await in_tx("INSERT INTO errs VALUES (1)")
    check = await in_tx("INSERT INTO errs VALUES (500)")
    read_only = await in_tx("INSERT INTO errs VALUES (2)", "SET TRANSACTION READ ONLY")
    timeout = await in_tx("SELECT pg_sleep(5)", "SET LOCAL statement_timeout = '50ms'")
    # What asyncpg meets behind PgBouncer's transaction pooling: its statement was prepared
    # on another server connection. Never the records' fault: it was a permanent 'failed'.
    unprepared = await in_tx("EXECUTE __asyncpg_stmt_gone__")
    async with engine.connect() as holder:
        await holder.execute(text("LOCK TABLE errs IN ACCESS EXCLUSIVE MODE"))
        lock = await in_tx("SELECT * FROM errs", "SET LOCAL lock_timeout = '50ms'")
        await holder.rollback()

    async with engine.connect() as conn:
        await conn.execute(text("DROP ROLE IF EXISTS nobody_more"))
        await conn.execute(text("CREATE ROLE nobody_more LOGIN CONNECTION LIMIT 0"))
        await conn.commit()
    limited = create_async_engine(
        f"postgresql+asyncpg://nobody_more@127.0.0.1:{pg_server.port}/postgres"
    )
    too_many = await acaught(limited.connect)
    await limited.dispose()

    async with engine.connect() as victim, engine.connect() as killer:
        pid = await victim.scalar(text("SELECT pg_backend_pid()"))
        await killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        terminated = await acaught(lambda: victim.execute(text("SELECT 1")))
        await killer.rollback()

    gone = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x")
    refused = await acaught(gone.connect)
    await gone.dispose()
    await engine.dispose()

    assert classify(unique) == Classified(False, False, "23505")
    assert classify(check) == Classified(False, False, "23514")
    assert classify(read_only) == Classified(True, True, "25006")
    assert classify(timeout) == Classified(True, False, "57014")
    assert classify(unprepared) == Classified(True, True, "26000")
    assert classify(lock) == Classified(True, False, "55P03")
    assert classify(too_many) == Classified(True, False, "53300")
    assert classify(terminated).transient and classify(terminated).reconnect
    assert classify(refused).transient and classify(refused).reconnect


async def test_mariadb_error_numbers(mariadb_server: Server) -> None:
    engine = create_async_engine(
        f"mysql+aiomysql://root@127.0.0.1:{mariadb_server.port}/?charset=utf8mb4"
    )
    async with engine.connect() as conn:
        await conn.execute(text("CREATE DATABASE IF NOT EXISTS errs"))
        await conn.execute(text("DROP TABLE IF EXISTS errs.t"))
        await conn.execute(
            text("CREATE TABLE errs.t (x int PRIMARY KEY, s varchar(3)) ENGINE=InnoDB")
        )
        await conn.execute(text("INSERT INTO errs.t VALUES (1, 'a')"))
        await conn.commit()

    async def run(conn: AsyncConnection, *sql: str) -> BaseException:
        async def go() -> None:
            for statement in sql:
                await conn.execute(text(statement))

        exc = await acaught(go)
        await conn.rollback()
        return exc

    async with engine.connect() as conn:
        duplicate = await run(conn, "INSERT INTO errs.t VALUES (1, 'b')")
        too_long = await run(
            conn,
            "SET SESSION sql_mode = 'STRICT_ALL_TABLES'",
            "INSERT INTO errs.t VALUES (2, 'abcd')",
        )
        read_only = await run(
            conn, "START TRANSACTION READ ONLY", "INSERT INTO errs.t VALUES (3, 'c')"
        )
    async with engine.connect() as holder, engine.connect() as waiter:
        await holder.execute(text("UPDATE errs.t SET s = 'h' WHERE x = 1"))
        lock_wait = await run(
            waiter,
            "SET SESSION innodb_lock_wait_timeout = 1",
            "UPDATE errs.t SET s = 'w' WHERE x = 1",
        )
        await holder.rollback()
    gone = create_async_engine(f"mysql+aiomysql://root@127.0.0.1:{free_port()}/x")
    refused = await acaught(gone.connect)
    await gone.dispose()
    await engine.dispose()

    assert classify(duplicate) == Classified(False, False, "1062")
    assert classify(too_long) == Classified(False, False, "1406")
    assert classify(read_only) == Classified(True, True, "1792")
    assert classify(lock_wait) == Classified(True, False, "1205")
    assert classify(refused) == Classified(True, True, "2003")


@pytest.mark.parametrize("error", [ConnectionRefusedError(), TimeoutError(), OSError(28, "full")])
def test_network_and_file_system_errors_are_transient(error: BaseException) -> None:
    assert classify(error).transient and classify(error).reconnect


def test_anything_else_is_about_the_records() -> None:
    assert classify(ValueError("connection timed out")) == Classified(False, False, None)


async def test_sqlite_bulk_statements_raise_and_report_as_sqlalchemy_ones(tmp_path: Path) -> None:
    """app/drupal/bulk.py sends SQLite's bulk statements to aiosqlite itself: a refusal still
    comes as SQLAlchemy's error of the driver's class (the driver's code in `orig`), a locked
    file is still transient, and cursor events still see each statement."""
    path = tmp_path / "t.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE t (x INTEGER UNIQUE)")
    db.close()
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.1})
    seen: list[tuple[str, bool]] = []
    event.listen(engine.sync_engine, "after_cursor_execute", lambda *a: seen.append((a[2], a[5])))
    try:
        async with engine.begin() as conn:
            await insert_rows(conn, "t", ("x",), [(1,), (2,)])
            assert sorted(await select_in(conn, "SELECT x FROM t WHERE x {in}", [1, 2, 3])) == [
                (1,),
                (2,),
            ]
            refused = await acaught(lambda: insert_rows(conn, "t", ("x",), [(3,), (1,)]))
        assert isinstance(refused, IntegrityError)
        assert refused.orig.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE"
        assert classify(refused) == Classified(False, False, "SQLITE_CONSTRAINT_UNIQUE")
        assert seen[0] == ("INSERT INTO t (x) VALUES (?)", True)
        assert seen[1][0].startswith("SELECT x FROM t WHERE x IN (?, ?, ?")

        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            async with engine.connect() as conn:
                locked = await acaught(lambda: fetch_all(conn, "SELECT x FROM t", ()))
        finally:
            holder.close()
        assert isinstance(locked, OperationalError)
        assert classify(locked).transient
    finally:
        await engine.dispose()


async def test_sfrelays_engines_keep_users_values_out_of_their_errors(
    drupal_site: DrupalSite,
) -> None:
    """SQLAlchemy's text of a database error ends with the statement's bound values: a traceback
    that carried one (a bug, logged by the worker) would show users' emails, names and password
    hashes. The writer's and the readers' engines keep them out of it."""
    values = {"name": "Ada Lovelace", "mail": "ada@example.org", "pass": "$S$Dsecret-hash"}
    statement = text(
        "SELECT uid FROM users WHERE no_such_column = :name OR mail = :mail OR pass = :pass"
    )
    reader = read_engine(drupal_site.url)
    try:
        for engine in (drupal_site.engine, reader):
            async with engine.connect() as conn:
                refused = await acaught(partial(conn.execute, statement, values))
            shown = str(refused)
            assert "no_such_column" in shown
            assert "[SQL parameters hidden due to hide_parameters=True]" in shown
            for value in values.values():
                assert value not in shown
    finally:
        await reader.dispose()
