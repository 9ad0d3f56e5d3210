"""Executemany of plain rows straight through the driver: the SQL is built once per table and
columns in the driver's own paramstyle, each row is a tuple. SQLAlchemy's `execute(stmt,
[dicts])` costs a `construct_params` per row, more than sqlite3 takes to write the row."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection


def _placeholders(paramstyle: str, count: int, first: int = 1) -> list[str]:
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
    marks = _placeholders(str(dialect.paramstyle), len(columns))
    # Identifiers are sfrelay's own (quoted as the dialect does); values are always bound.
    names = ", ".join(quote(c) for c in columns)
    return f"INSERT INTO {quote(table)} ({names}) VALUES ({', '.join(marks)})"  # noqa: S608


@lru_cache(maxsize=256)
def update_sql(
    dialect: Dialect, table: str, columns: tuple[str, ...], keys: tuple[str, ...]
) -> str:
    """UPDATE table SET columns... WHERE keys... (each row: the columns' values, then the keys')."""
    quote = dialect.identifier_preparer.quote
    marks = _placeholders(str(dialect.paramstyle), len(columns) + len(keys))
    pairs = [f"{quote(name)} = {mark}" for name, mark in zip(columns + keys, marks, strict=True)]
    sets, where = ", ".join(pairs[: len(columns)]), " AND ".join(pairs[len(columns) :])
    return f"UPDATE {quote(table)} SET {sets} WHERE {where}"  # noqa: S608


async def insert_rows(
    conn: AsyncConnection, table: str, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
) -> None:
    if rows:
        await conn.exec_driver_sql(insert_sql(conn.dialect, table, columns), list(rows))


async def update_rows(
    conn: AsyncConnection,
    table: str,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
) -> None:
    """Each row: the new values of `columns`, then the values of `keys` that pick the row."""
    if rows:
        await conn.exec_driver_sql(update_sql(conn.dialect, table, columns, keys), list(rows))


SELECT_CHUNK = 1000  # values per IN (...): far below every backend's bound-parameter limit


@lru_cache(maxsize=256)
def in_sql(dialect: Dialect, sql: str, count: int) -> str:
    """`sql` with its `{in}` (as in `WHERE uid {in}`) made a membership test of `count`
    bound values: `IN (?, ?, ...)`, or `= ANY($1)` with one array on PostgreSQL (asyncpg),
    one prepared statement whatever the count."""
    if dialect.paramstyle == "numeric_dollar":
        return sql.replace("{in}", "= ANY($1)")
    marks = ", ".join(_placeholders(str(dialect.paramstyle), count))
    return sql.replace("{in}", f"IN ({marks})")


async def select_in(conn: AsyncConnection, sql: str, values: Sequence[Any]) -> list[Any]:
    """The rows of `sql`, a SELECT whose only bound value is its `{in}` (see in_sql), for
    every value of `values`, a chunk per statement, straight through the driver: the
    statement text is one per chunk size, so no SQL is compiled per batch."""
    rows: list[Any] = []  # Rows
    array = conn.dialect.paramstyle == "numeric_dollar"
    for start in range(0, len(values), SELECT_CHUNK):
        chunk = list(values[start : start + SELECT_CHUNK])
        statement = in_sql(conn.dialect, sql, 0 if array else len(chunk))
        result = await conn.exec_driver_sql(statement, (chunk,) if array else tuple(chunk))
        rows.extend(result.all())
    return rows
