"""Drupal cache invalidation from outside Drupal: cache tags (D8+) and cache rows."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import column, delete, literal_column, table
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal.schema import has_table

cachetags = table("cachetags", column("tag"), column("invalidations"))


async def invalidate_tags(conn: AsyncConnection, tags: Iterable[str]) -> None:
    """Increment each tag's invalidation counter (insert it with 1 if absent), as
    Drupal's DatabaseCacheTagsChecksum does; one executemany upsert."""
    rows = [{"tag": tag, "invalidations": 1} for tag in sorted(set(tags))]
    if not rows:
        return
    dialect = conn.dialect.name
    # A literal 1, not a bound one: aiomysql's executemany cannot bind in the ON DUPLICATE part.
    incremented = cachetags.c.invalidations + literal_column("1")
    if dialect == "mysql":
        my = mysql.insert(cachetags)
        stmt = my.on_duplicate_key_update(invalidations=incremented)
    else:
        module = postgresql if dialect == "postgresql" else sqlite
        ins = module.insert(cachetags)
        stmt = ins.on_conflict_do_update(
            index_elements=[cachetags.c.tag],
            set_={"invalidations": incremented},
        )
    await conn.execute(stmt, rows)


async def delete_cache_rows(conn: AsyncConnection, bin_table: str, cids: Iterable[str]) -> None:
    """Delete cache entries; a bin Drupal has not created yet holds nothing to delete."""
    wanted = sorted(set(cids))
    if not wanted or not await has_table(conn, bin_table):
        return
    bin_ = table(bin_table, column("cid"))
    for start in range(0, len(wanted), 500):
        await conn.execute(delete(bin_).where(bin_.c.cid.in_(wanted[start : start + 500])))
