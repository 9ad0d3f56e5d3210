"""sfrelay's poll positions in the Drupal database (`sfrelay_cursor`): reconcile watermarks (the
queryAll pass's and the delete log's) and backfill checkpoints, each a named text value (ISO
8601 times on Salesforce's clock)."""

from __future__ import annotations

import time

from sqlalchemy import Column, Double, String, Table, Text, delete, select, update
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncEngine

from app.drupal.engine import writer
from app.drupal.ledger import metadata

cursors = Table(
    "sfrelay_cursor",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text().with_variant(mysql.MEDIUMTEXT(), "mysql"), nullable=False),
    Column("updated_at", Double, nullable=False),
)


def watermark_name(sobject: str) -> str:
    """The reconcile watermark of one object."""
    return f"reconcile:{sobject}"


def deleted_name(sobject: str) -> str:
    """Where the next reconcile reads one object's delete log (sobjects/<Object>/deleted)."""
    return f"deleted:{sobject}"


def checkpoint_name(sobject: str) -> str:
    """Where an unfinished backfill of one object stopped."""
    return f"backfill:{sobject}"


async def get(engine: AsyncEngine, name: str) -> str | None:
    async with engine.connect() as conn:
        value = await conn.scalar(select(cursors.c.value).where(cursors.c.name == name))
    return None if value is None else str(value)


async def put(engine: AsyncEngine, name: str, value: str) -> None:
    async with writer(engine) as conn:
        now = time.time()
        done = await conn.execute(
            update(cursors).where(cursors.c.name == name).values(value=value, updated_at=now)
        )
        if not done.rowcount:
            await conn.execute(cursors.insert().values(name=name, value=value, updated_at=now))


async def drop(engine: AsyncEngine, name: str) -> None:
    async with writer(engine) as conn:
        await conn.execute(delete(cursors).where(cursors.c.name == name))
