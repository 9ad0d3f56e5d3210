"""Drupal cache invalidation from outside Drupal: cache tags (D8+) and cache rows."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal.bulk import execute_in, upsert_counters
from app.drupal.schema import has_table


async def invalidate_tags(conn: AsyncConnection, tags: Iterable[str]) -> None:
    """Increment each tag's invalidation counter (insert it with 1 if absent), as
    Drupal's DatabaseCacheTagsChecksum does; one executemany upsert through the driver."""
    await upsert_counters(conn, "cachetags", "tag", "invalidations", sorted(set(tags)))


async def delete_cache_rows(conn: AsyncConnection, bin_table: str, cids: Iterable[str]) -> None:
    """Delete cache entries; a bin Drupal has not created yet holds nothing to delete."""
    wanted = sorted(set(cids))
    if not wanted or not await has_table(conn, bin_table):
        return
    quoted = conn.dialect.identifier_preparer.quote(bin_table)
    await execute_in(conn, f"DELETE FROM {quoted} WHERE cid {{in}}", wanted)  # noqa: S608
