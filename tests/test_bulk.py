"""app/drupal/bulk.py: the bulk statements' own rules (their errors: tests/test_db_errors.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.ext.asyncio import create_async_engine

from app.drupal.bulk import fetch_all, update_rows


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
