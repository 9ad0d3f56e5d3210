"""Fresh planner statistics on PostgreSQL while sfrelay bulk-loads users."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.drupal.schema import DrupalSchema

# Analyze again once this many users (and at least this share of the table) were added.
MIN_GROWTH = 1000


def user_tables(schema: DrupalSchema) -> list[str]:
    if schema.major == 10:
        fields = [f"user__{name}" for name in schema.fields]
        return ["users", "users_field_data", "user__roles", *fields, "sfrelay_record"]
    fields = [f"field_{kind}_{name}" for name in schema.fields for kind in ("data", "revision")]
    return ["users", "users_roles", *fields, "sfrelay_record"]


class Statistics:
    """Autovacuum analyzes a table a minute or more after it grew; a bulk load of users
    outruns it, and with statistics of a nearly empty table PostgreSQL scans the whole user
    table for every batch's email and name look-ups. So sfrelay runs ANALYZE itself whenever
    the users it created since the last one reach the size the table had then (1k, 2k,
    4k, ...: a handful of runs per load). SQLite needs no statistics to use its indexes, and
    InnoDB refreshes its own after 10 % of a table changed."""

    def __init__(self, engine: AsyncEngine, schema: DrupalSchema) -> None:
        self._engine = engine
        self._tables = user_tables(schema)
        self._enabled = engine.dialect.name == "postgresql"
        self._created = 0
        self._size = MIN_GROWTH

    async def created(self, count: int) -> None:
        if not self._enabled or not count:
            return
        self._created += count
        if self._created < self._size:
            return
        async with self._engine.begin() as conn:
            await conn.execute(text(f"ANALYZE {', '.join(self._tables)}"))
        self._size += self._created
        self._created = 0
