"""Executemany of plain rows straight through the driver: the SQL is built once per table and
columns in the driver's own paramstyle, each row is a tuple. SQLAlchemy's `execute(stmt,
[dicts])` costs a `construct_params` per row, more than sqlite3 takes to write the row.

On SQLite these statements go to aiosqlite's connection itself (the one under the
SQLAlchemy connection, in its transaction): one hop to aiosqlite's thread and back per
statement, where SQLAlchemy's adapter makes three or four (open a cursor, execute, fetch,
close), each a wake-up of both threads. SQLAlchemy's cursor events still see every statement
and its errors are still SQLAlchemy's (DBAPIError by the driver's class, the driver's error
in `orig`), so app.drupal.errors and the rules read them as any other.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import suppress
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection


def placeholders(paramstyle: str, count: int, first: int = 1) -> list[str]:
    if paramstyle == "qmark":
        return ["?"] * count
    if paramstyle == "numeric_dollar":  # asyncpg
        return [f"${i}" for i in range(first, first + count)]
    if paramstyle == "numeric":
        return [f":{i}" for i in range(first, first + count)]
    if paramstyle in ("format", "pyformat"):  # aiomysql, psycopg
        return ["%s"] * count
    raise ValueError(f"unsupported paramstyle {paramstyle!r}")


@lru_cache(maxsize=256)
def insert_sql(dialect: Dialect, table: str, columns: tuple[str, ...]) -> str:
    quote = dialect.identifier_preparer.quote
    marks = placeholders(str(dialect.paramstyle), len(columns))
    # Identifiers are sfrelay's own (quoted as the dialect does); values are always bound.
    names = ", ".join(quote(c) for c in columns)
    return f"INSERT INTO {quote(table)} ({names}) VALUES ({', '.join(marks)})"  # noqa: S608


@lru_cache(maxsize=256)
def update_sql(
    dialect: Dialect, table: str, columns: tuple[str, ...], keys: tuple[str, ...]
) -> str:
    """UPDATE table SET columns... WHERE keys... (each row: the columns' values, then the keys')."""
    quote = dialect.identifier_preparer.quote
    marks = placeholders(str(dialect.paramstyle), len(columns) + len(keys))
    pairs = [f"{quote(name)} = {mark}" for name, mark in zip(columns + keys, marks, strict=True)]
    sets, where = ", ".join(pairs[: len(columns)]), " AND ".join(pairs[len(columns) :])
    return f"UPDATE {quote(table)} SET {sets} WHERE {where}"  # noqa: S608


async def _sqlite(conn: AsyncConnection) -> Any:
    """aiosqlite's connection under `conn` (None: not SQLite)."""
    if conn.dialect.name != "sqlite":
        return None
    return (await conn.get_raw_connection()).driver_connection


def _executemany(db: sqlite3.Connection, sql: str, params: Any) -> None:
    db.executemany(sql, params).close()


async def _on_sqlite(
    conn: AsyncConnection, aio: Any, sql: str, params: Any, *, many: bool = False
) -> list[Any]:
    """`sql` on aiosqlite's connection in one hop: the rows of a SELECT, [] otherwise."""
    sync = conn.sync_connection
    assert sync is not None  # an AsyncConnection in use has its Connection
    sync.dispatch.before_cursor_execute(sync, None, sql, params, None, many)
    try:
        if many:
            # In aiosqlite's thread, its cursor closed there too (aiosqlite's own executemany
            # hands the cursor back, to be freed on this thread); as engine.py, aiosqlite's
            # _execute, the call its public helpers make.
            await aio._execute(_executemany, aio._conn, sql, params)
            rows: list[Any] = []
        else:
            rows = list(await aio.execute_fetchall(sql, params))
    except sqlite3.Error as exc:
        raise DBAPIError.instance(
            sql,
            params,
            exc,
            sqlite3.Error,
            hide_parameters=sync.engine.hide_parameters,  # as the engine would
            dialect=conn.dialect,
            ismulti=many,
        ) from exc
    sync.dispatch.after_cursor_execute(sync, None, sql, params, None, many)
    return rows


async def executemany(conn: AsyncConnection, sql: str, rows: Sequence[Any]) -> None:
    """`sql` (in the driver's paramstyle) once per row of parameters, in one statement."""
    if not rows:
        return
    if (aio := await _sqlite(conn)) is not None:
        await _on_sqlite(conn, aio, sql, rows, many=True)
    else:
        await conn.exec_driver_sql(sql, list(rows))


async def fetch_all(conn: AsyncConnection, sql: str, params: Sequence[Any]) -> list[Any]:
    """The rows of `sql` (in the driver's paramstyle) with `params` bound ([] for a
    statement that returns none)."""
    if (aio := await _sqlite(conn)) is not None:
        return await _on_sqlite(conn, aio, sql, params)
    result = await conn.exec_driver_sql(sql, tuple(params))
    return list(result.all()) if result.returns_rows else []


async def insert_rows(
    conn: AsyncConnection, table: str, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
) -> None:
    await executemany(conn, insert_sql(conn.dialect, table, columns), rows)


# MySQL: rows per joined UPDATE, and the bytes of their values (aiomysql's own bound for the
# multi-row INSERTs it makes of an executemany, far under max_allowed_packet: 4 MB on MySQL
# 5.7, 16 MB on MariaDB 10.2+, 64 MB on MySQL 8).
JOINED_ROWS = 1000
JOINED_BYTES = 1_000_000


async def update_rows(
    conn: AsyncConnection,
    table: str,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
) -> None:
    """Each row: the new values of `columns`, then the values of `keys` that pick the row.

    The rows go in the order of their keys (stably: a key given twice keeps its last values),
    so the pages of the table and of its key's index are visited in order, each once, not
    read again after the small page cache dropped them.

    MySQL: one UPDATE joined to the rows per chunk (joined_update_sql). The driver (aiomysql,
    as PyMySQL) runs an executemany UPDATE as one statement and one round trip per row; it
    makes only INSERTs multi-row. Of two rows for one key the last one's values are written,
    as the executemany leaves the row; a NULL key matches nothing, as `= NULL` does."""
    count = len(keys)
    with suppress(TypeError):  # a NULL key beside values: the given order
        rows = sorted(rows, key=lambda row: row[-count:])
    if conn.dialect.name != "mysql":
        await executemany(conn, update_sql(conn.dialect, table, columns, keys), rows)
        return
    last = {tuple(row[-count:]): index for index, row in enumerate(rows)}
    if len(last) < len(rows):
        rows = [row for index, row in enumerate(rows) if last[tuple(row[-count:])] == index]
    start = 0
    while start < len(rows):
        stop, size = start, 0
        while stop < len(rows) and stop - start < JOINED_ROWS and size < JOINED_BYTES:
            size += sum(len(v) if isinstance(v, str) else 8 for v in rows[stop])
            stop += 1
        params = tuple(value for row in rows[start:stop] for value in row)
        sql = joined_update_sql(conn.dialect, table, columns, keys, stop - start)
        await conn.exec_driver_sql(sql, params)
        start = stop


@lru_cache(maxsize=64)
def joined_update_sql(
    dialect: Dialect, table: str, columns: tuple[str, ...], keys: tuple[str, ...], count: int
) -> str:
    """MySQL: UPDATE table JOIN (`count` rows of bound values: the columns', then the keys')
    ON keys SET columns. The bound values keep the coercibility of literals (a key compares
    by the column's collation, as in `WHERE key = %s`) and each is assigned as it would be
    directly (strict mode's errors alike)."""
    quote = dialect.identifier_preparer.quote
    names = columns + keys
    mark = placeholders(str(dialect.paramstyle), 1)[0]  # format: %s, the same each time
    marks = ", ".join([mark] * len(names))
    first = ", ".join(f"{mark} AS {quote(name)}" for name in names)
    given = f"SELECT {first}" + f" UNION ALL SELECT {marks}" * (count - 1)
    on = " AND ".join(f"t.{quote(k)} = v.{quote(k)}" for k in keys)
    sets = ", ".join(f"t.{quote(c)} = v.{quote(c)}" for c in columns)
    return f"UPDATE {quote(table)} AS t JOIN ({given}) AS v ON {on} SET {sets}"  # noqa: S608


# Values per IN (...): padded (below) to at most 512, under SQLite's oldest bound-parameter
# limit (999) and every other backend's.
SELECT_CHUNK = 512


def padded(values: Sequence[Any]) -> tuple[Any, ...]:
    """`values` with the last one repeated up to a power of two (16 at least): an IN list or
    a row of keys has a few statement texts, not one per count; each is prepared once and
    stays in the driver's statement cache (128 per connection on SQLite: one text per count
    kept ~10 MB of prepared statements, and SQLAlchemy's compiled cache more, growing batch
    by batch). The repeated value matches nothing more."""
    size = max(16, 1 << (len(values) - 1).bit_length())
    return (*values, *[values[-1]] * (size - len(values)))


@lru_cache(maxsize=256)
def in_sql(dialect: Dialect, sql: str, count: int, value: str = "{}") -> str:
    """`sql` with its `{in}` (as in `WHERE uid {in}`) made a membership test of `count`
    bound values: `IN (?, ?, ...)`, or `= ANY($1)` with one array on PostgreSQL (asyncpg),
    one prepared statement whatever the count. `value`: each item of the list, `{}` standing
    for its placeholder (not on PostgreSQL)."""
    if dialect.paramstyle == "numeric_dollar":
        return sql.replace("{in}", "= ANY($1)")
    marks = ", ".join(value.format(m) for m in placeholders(str(dialect.paramstyle), count))
    return sql.replace("{in}", f"IN ({marks})")


async def select_in(
    conn: AsyncConnection, sql: str, values: Sequence[Any], value: str = "{}"
) -> list[Any]:
    """The rows of `sql`, a SELECT whose only bound value is its `{in}` (see in_sql, and its
    `value`), for every value of `values`, a chunk per statement, straight through the
    driver: no SQL is compiled per batch."""
    rows: list[Any] = []  # Rows (tuples on SQLite)
    for statement, params in _in_chunks(conn.dialect, sql, values, value):
        rows.extend(await fetch_all(conn, statement, params))
    return rows


async def execute_in(conn: AsyncConnection, sql: str, values: Sequence[Any]) -> None:
    """`sql` (a DELETE or UPDATE whose only bound value is its `{in}`) for every value."""
    for statement, params in _in_chunks(conn.dialect, sql, values):
        await fetch_all(conn, statement, params)


def _in_chunks(
    dialect: Dialect, sql: str, values: Sequence[Any], value: str = "{}"
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """(statement, parameters) per SELECT_CHUNK of `values`: one array on PostgreSQL, else
    the chunk padded to one of a few sizes."""
    for start in range(0, len(values), SELECT_CHUNK):
        chunk = list(values[start : start + SELECT_CHUNK])
        if dialect.paramstyle == "numeric_dollar":
            yield in_sql(dialect, sql, 0), (chunk,)
        else:
            bound = padded(chunk)
            yield in_sql(dialect, sql, len(bound), value), bound


@lru_cache(maxsize=64)
def upsert_counter_sql(dialect: Dialect, table: str, key: str, counter: str) -> str:
    """INSERT (key, counter = 1), or counter + 1 where the key exists: one row per key.

    MySQL: the 1 is bound too (each row is (key, 1)): aiomysql (as PyMySQL) makes an
    executemany INSERT one multi-row INSERT only when its VALUES holds placeholders alone,
    else it sends one statement per row."""
    quote = dialect.identifier_preparer.quote
    t, k, c = quote(table), quote(key), quote(counter)
    if dialect.name == "mysql":
        key_mark, one = placeholders(str(dialect.paramstyle), 2)
        head = f"INSERT INTO {t} ({k}, {c}) VALUES ({key_mark}, {one})"  # noqa: S608
        return f"{head} ON DUPLICATE KEY UPDATE {c} = {c} + 1"
    (mark,) = placeholders(str(dialect.paramstyle), 1)
    head = f"INSERT INTO {t} ({k}, {c}) VALUES ({mark}, 1)"  # noqa: S608
    return f"{head} ON CONFLICT ({k}) DO UPDATE SET {c} = {t}.{c} + 1"


async def upsert_counters(
    conn: AsyncConnection, table: str, key: str, counter: str, values: Sequence[Any]
) -> None:
    """upsert_counter_sql for each of `values` (distinct), in one executemany."""
    sql = upsert_counter_sql(conn.dialect, table, key, counter)
    rows = [(v, 1) for v in values] if conn.dialect.name == "mysql" else [(v,) for v in values]
    await executemany(conn, sql, rows)
