"""Drupal cache invalidation from outside Drupal: cache tags (D8+) and cache rows."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal.bulk import execute_in, executemany, upsert_counter_sql
from app.drupal.schema import has_table


async def invalidate_tags(conn: AsyncConnection, tags: Iterable[str]) -> None:
    """Increment each tag's invalidation counter (insert it with 1 if absent), as
    Drupal's DatabaseCacheTagsChecksum does; one executemany upsert through the driver."""
    rows = [(tag,) for tag in sorted(set(tags))]
    sql = upsert_counter_sql(conn.dialect, "cachetags", "tag", "invalidations")
    await executemany(conn, sql, rows)


async def delete_cache_rows(conn: AsyncConnection, bin_table: str, cids: Iterable[str]) -> None:
    """Delete cache entries; a bin Drupal has not created yet holds nothing to delete."""
    wanted = sorted(set(cids))
    if not wanted or not await has_table(conn, bin_table):
        return
    quoted = conn.dialect.identifier_preparer.quote(bin_table)
    await execute_in(conn, f"DELETE FROM {quoted} WHERE cid {{in}}", wanted)  # noqa: S608
