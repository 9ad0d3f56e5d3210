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
    4k, ...: a handful of runs per load). The first threshold is the table's size as the
    catalog estimates it (read once, when the first 1,000 are created): on a site of
    1,000,000 users an ANALYZE every few thousand users created would sample the big
    tables for nothing (their statistics barely move), a cost growing with the site.
    SQLite needs no statistics to use its indexes, and InnoDB refreshes its own after 10 %
    of a table changed."""

    def __init__(self, engine: AsyncEngine, schema: DrupalSchema) -> None:
        self._engine = engine
        self._tables = user_tables(schema)
        self._enabled = engine.dialect.name == "postgresql"
        self._created = 0
        self._size = MIN_GROWTH
        self._sized = False

    async def created(self, count: int) -> None:
        if not self._enabled or not count:
            return
        self._created += count
        if self._created < self._size:
            return
        async with self._engine.begin() as conn:
            if not self._sized:  # the first time only
                self._sized = True
                query = "SELECT reltuples FROM pg_class WHERE oid = 'users'::regclass"
                rows = int(await conn.scalar(text(query)) or 0)  # -1, 0: never analyzed
                if rows > self._size:
                    self._size = rows
                    return
            await conn.execute(text(f"ANALYZE {', '.join(self._tables)}"))
        self._size += self._created
        self._created = 0
