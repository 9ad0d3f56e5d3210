"""sfrelay's ledger of records in the Drupal database (`sfrelay_*` tables) and its migrations.

sfrelay_record       one row per Salesforce record seen: Salesforce Id (18-character) <-> uid
                     and who that user is beyond its uid (user_key: its uuid; Drupal 7: its
                     created time), object, last applied modstamp, notification and digest
                     (what that version says: app.records.version_digest), the Contact a
                     converted Lead became, and the outcomes of the last N attempts (JSON)
sfrelay_dead_letter  notifications that kept failing (defined and used by app/dead.py)
sfrelay_cursor       reconcile watermarks and backfill checkpoints (app/drupal/cursors.py)
sfrelay_block        the users sfrelay blocked, and for which record (app/lifecycle.py)
sfrelay_schema       the migration version

and, on Drupal's own user table, indexes named sfrelay_* for the case-insensitive look-ups
Drupal's schema has no index for (see `ensure_indexes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.drupal.bulk import insert_rows, select_in, update_rows
from app.drupal.engine import writer
from app.drupal.errors import is_transient
from app.errors import ConfigError
from app.records import json_within_bmp, version_digest

logger = logging.getLogger("sfrelay.worker")

metadata = MetaData()
_LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql")

records = Table(
    "sfrelay_record",
    metadata,
    Column("sf_id", String(18), primary_key=True),
    Column("object", String(40), nullable=False),
    Column("uid", BigInteger, nullable=True, index=True),
    Column("modstamp", BigInteger, nullable=True),  # microseconds since the epoch, UTC
    Column("notification_id", String(40), nullable=True),
    Column("converted_to", String(18), nullable=True),
    Column("history", _LongText, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("digest", String(16), nullable=True),  # None: applied before sfrelay kept it
    # Who the mapped user is beyond its uid (app.drupal.users.ExistingUser.key): a uid deleted
    # in Drupal and given again to someone else (MySQL before 8.0 forgets its AUTO_INCREMENT
    # at a restart) has another. None: mapped before sfrelay kept it.
    Column("user_key", String(128), nullable=True),
)

schema_version = Table(
    "sfrelay_schema",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", Integer, nullable=False),
)


def _create(sync_conn: Connection, tables: list[Table]) -> None:
    """The tables and their indexes, each unless it exists. MySQL commits every CREATE on
    its own: a worker killed between a table's CREATE TABLE and CREATE INDEX left the table
    without the index, which create_all's checkfirst (by table) never made afterwards."""
    metadata.create_all(sync_conn, tables=tables, checkfirst=True)
    found = inspect(sync_conn)
    for table in tables:
        names = {index["name"] for index in found.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in names:
                index.create(sync_conn)


def _v1(sync_conn: Connection) -> None:
    from app.dead import table as dead_letters  # the dead-letter module owns its table

    _create(sync_conn, [records, dead_letters])


def _v2(sync_conn: Connection) -> None:
    from app.drupal.cursors import cursors  # reconcile watermarks, backfill checkpoints
    from app.lifecycle import blocks  # the users sfrelay blocked

    _create(sync_conn, [cursors, blocks])


def _v3(sync_conn: Connection) -> None:
    # (_v1 creates the table with it today)
    if "digest" not in {c["name"] for c in inspect(sync_conn).get_columns(records.name)}:
        sync_conn.execute(text(f"ALTER TABLE {records.name} ADD COLUMN digest VARCHAR(16)"))


def _v4(sync_conn: Connection) -> None:
    # (_v1 creates the table with it today)
    if "user_key" not in {c["name"] for c in inspect(sync_conn).get_columns(records.name)}:
        sync_conn.execute(text(f"ALTER TABLE {records.name} ADD COLUMN user_key VARCHAR(128)"))


def _tables() -> list[Table]:
    """Every table the steps create, as they are now."""
    from app.dead import table as dead_letters
    from app.drupal.cursors import cursors
    from app.lifecycle import blocks

    return [records, dead_letters, cursors, blocks]


def _missing_index(sync_conn: Connection) -> bool:
    """Whether an index of the tables is missing: a first start on MySQL killed between a
    CREATE TABLE and its CREATE INDEX before _create made them too left a ledger at the
    newest version without it."""
    found = inspect(sync_conn)
    for table in _tables():
        names = {index["name"] for index in found.get_indexes(table.name)}
        if any(index.name not in names for index in table.indexes):
            return True
    return False


# Append only: each step takes the schema from version i to i + 1.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4]


def refuse_newer(version: int | None) -> None:
    """A ledger a newer sfrelay migrated (the operator rolled back a release) is refused:
    this release would write rows without what the newer one keeps, and cannot tell what
    its steps changed."""
    if version is not None and version > len(MIGRATIONS):
        raise ConfigError(
            f"the sfrelay_* tables in this database are at schema version {version}, newer "
            f"than this sfrelay knows (up to {len(MIGRATIONS)}): a newer sfrelay release "
            "upgraded them; run that release (or a later one) again, or restore the database "
            "backup taken before the upgrade to run this one"
        )


async def migrate(engine: AsyncEngine) -> int:
    """Bring sfrelay's tables to the newest version (safe with several workers starting).
    Up to date (every start but the first): a read, no write lock. A ledger newer than
    this release is refused (`refuse_newer`), never changed."""
    async with engine.connect() as conn:
        if await conn.run_sync(lambda sync: inspect(sync).has_table(schema_version.name)):
            current = await conn.scalar(
                select(schema_version.c.version).where(schema_version.c.id == 1)
            )
            refuse_newer(current)
            if current == len(MIGRATIONS) and not await conn.run_sync(_missing_index):
                return len(MIGRATIONS)
    async with writer(engine) as conn:
        await conn.run_sync(metadata.create_all, tables=[schema_version], checkfirst=True)
        current = await conn.scalar(
            select(schema_version.c.version).where(schema_version.c.id == 1)
        )
        refuse_newer(current)
        version = int(current or 0)
        for step in MIGRATIONS[version:]:
            await conn.run_sync(step)
        await conn.run_sync(_create, _tables())  # what an interrupted step left out
        if current is None:
            await conn.execute(insert(schema_version).values(id=1, version=len(MIGRATIONS)))
        elif version < len(MIGRATIONS):
            await conn.execute(
                update(schema_version)
                .where(schema_version.c.id == 1)
                .values(version=len(MIGRATIONS))
            )
    return len(MIGRATIONS)


@dataclass(slots=True)
class RecordState:
    """sfrelay_record for one Salesforce record, changed in memory during a batch."""

    sf_id: str
    object: str
    uid: int | None = None
    modstamp: int | None = None
    notification_id: str | None = None
    converted_to: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    digest: str | None = None  # of the version at `modstamp`
    user_key: str | None = None  # the mapped user's ExistingUser.key (None: not known)
    stored: bool = False  # a row exists already
    dirty: bool = False
    # The stored row's (object, uid, converted_to, user_key): a save that leaves them as they
    # were writes the other columns only, and the uid index is not touched.
    mapping: tuple[str, int | None, str | None, str | None] | None = None

    def mapped(self) -> tuple[str, int | None, str | None, str | None]:
        return (self.object, self.uid, self.converted_to, self.user_key)

    def same_version(self, fields: dict[str, Any], sources: tuple[str, ...]) -> bool:
        """A version stamped as the one applied last is that version again unless its values
        differ: the second change within one second (Salesforce stamps to the second). A
        version applied before sfrelay kept digests counts as the same."""
        return self.digest is None or self.digest == version_digest(fields, sources)


_LOAD = (
    "SELECT sf_id, object, uid, modstamp, notification_id, converted_to, history, digest,"
    " user_key FROM sfrelay_record WHERE sf_id {in}"
)
_OWNERS = "SELECT uid, sf_id, user_key FROM sfrelay_record WHERE converted_to IS NULL AND uid {in}"


async def load(conn: AsyncConnection, sf_ids: Iterable[str]) -> dict[str, RecordState]:
    rows = await select_in(conn, _LOAD, sorted(set(sf_ids)))
    return {
        sf_id: RecordState(
            sf_id,
            sobject,
            uid,
            stamp,
            nid,
            converted,
            orjson.loads(history),
            digest,
            key,
            stored=True,
            mapping=(sobject, uid, converted, key),
        )
        for sf_id, sobject, uid, stamp, nid, converted, history, digest, key in rows
    }


async def owners(conn: AsyncConnection, uids: Iterable[int]) -> dict[int, tuple[str, str | None]]:
    """uid -> (the Salesforce Id it is mapped to, its user_key); converted Leads no longer
    own theirs."""
    rows = await select_in(conn, _OWNERS, sorted(set(uids)))
    return {int(uid): (sf_id, key) for uid, sf_id, key in rows}


_COLUMNS = (
    "object",
    "uid",
    "modstamp",
    "notification_id",
    "converted_to",
    "history",
    "updated_at",
    "digest",
    "user_key",
)


def _history(state: RecordState) -> str:
    return json_within_bmp(orjson.dumps(state.history))


def _values(state: RecordState, now: float) -> tuple[Any, ...]:
    """The _COLUMNS of a state's row."""
    history = _history(state)
    return (
        state.object,
        state.uid,
        state.modstamp,
        state.notification_id,
        state.converted_to,
        history,
        now,
        state.digest,
        state.user_key,
    )


_ROUTINE = ("modstamp", "notification_id", "history", "updated_at", "digest")


async def save(conn: AsyncConnection, states: Iterable[RecordState]) -> None:
    """Write every changed state: one executemany INSERT, and one executemany UPDATE per
    kind of change (most updates leave the mapping as it was: modstamp and history only)."""
    now = time.time()
    new: list[tuple[Any, ...]] = []
    changed: list[tuple[Any, ...]] = []
    routine: list[tuple[Any, ...]] = []
    for state in states:
        if not state.dirty:
            continue
        if not state.stored:
            new.append((state.sf_id, *_values(state, now)))
        elif state.mapping == state.mapped():
            routine.append(
                (
                    state.modstamp,
                    state.notification_id,
                    _history(state),
                    now,
                    state.digest,
                    state.sf_id,
                )
            )
        else:
            changed.append((*_values(state, now), state.sf_id))
    # In Id order, as the UPDATEs (bulk.update_rows): the primary key's pages once each.
    await insert_rows(conn, records.name, ("sf_id", *_COLUMNS), sorted(new, key=lambda r: r[0]))
    await update_rows(conn, records.name, _COLUMNS, ("sf_id",), changed)
    await update_rows(conn, records.name, _ROUTINE, ("sf_id",), routine)


# (Drupal major, dialect) -> sfrelay_* expression indexes on Drupal's user table, serving
# the look-ups of app.drupal.users.Equality. MySQL needs none: its *_ci collations make the
# plain mail and name indexes serve them, as does NOCASE_UTF8 for name on Drupal 8+ SQLite.
# PostgreSQL's name index is text_pattern_ops: equality, and the `_<n>` suffix ranges in
# code point order whatever the database's locale.
_LOOKUP_INDEXES = {
    (10, "sqlite"): [("users_field_data", "mail", ""), ("users_field_data", "name", "")],
    (10, "postgresql"): [("users_field_data", "mail", ""), ("users_field_data", "name", "pattern")],
    (7, "sqlite"): [("users", "mail", ""), ("users", "name", "")],
    (7, "postgresql"): [("users", "mail", ""), ("users", "name", "pattern")],
}


# PostgreSQL: how long creating a missing index may wait for Drupal's open transactions.
# CREATE INDEX CONCURRENTLY never blocks Drupal's reads and writes, but it waits for every
# transaction that touched the table; past this it gives up until the next start.
PG_INDEX_LOCK_TIMEOUT = "2s"
# Session advisory lock of the worker creating them (any fixed number, not the writer lock's):
# workers starting together would otherwise both build an index (the second fails, "already
# exists"), or one would drop the other's, still invalid while it is being built.
_PG_INDEX_LOCK_KEY = 0x5F5E1A8


async def ensure_indexes(engine: AsyncEngine, major: int) -> None:
    """Indexes on lower(mail) / lower(name), so linking by email and picking usernames
    stay index look-ups instead of a scan of every user per batch. Checked at every start in
    the catalog (a Drupal schema update that rebuilds the table drops them), created only when
    missing: on PostgreSQL CONCURRENTLY, outside any transaction, with a short lock_timeout,
    so a start never queues Drupal's user saves behind it; if it cannot, it says so and the
    next start tries again (sfrelay works without them, only slower)."""
    wanted = _LOOKUP_INDEXES.get((major, engine.dialect.name), [])
    if not wanted:
        return
    names: dict[str, tuple[str, str]] = {}  # index name -> (table, indexed expression)
    for table, column, kind in wanted:
        opclass = " text_pattern_ops" if kind == "pattern" else ""
        suffix = "_pattern" if kind == "pattern" else ""
        names[f"sfrelay_{table}_{column}_lower{suffix}"] = (table, f"lower({column}){opclass}")
    if engine.dialect.name == "postgresql":
        await _ensure_pg_indexes(engine, names)
        return
    async with engine.connect() as conn:
        found = set(
            await conn.scalars(
                text(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'sfrelay_%'"
                )
            )
        )
        missing = {name: spec for name, spec in names.items() if name not in found}
    if missing:
        async with writer(engine) as conn:
            for name, (table, expression) in missing.items():
                await conn.execute(
                    text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({expression})")
                )


async def _pg_index_validity(auto: AsyncConnection, names: list[str]) -> dict[str, bool]:
    rows = await auto.execute(
        text(
            "SELECT c.relname, i.indisvalid FROM pg_class c "
            "JOIN pg_index i ON i.indexrelid = c.oid "
            "WHERE c.relnamespace = current_schema()::regnamespace "
            "AND c.relname = ANY(:names)"
        ),
        {"names": names},
    )
    return {name: bool(ok) for name, ok in rows}


async def _ensure_pg_indexes(engine: AsyncEngine, names: dict[str, tuple[str, str]]) -> None:
    async with engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        valid = await _pg_index_validity(auto, list(names))
        if all(valid.get(name) for name in names):
            return
        # Not waited for: a worker waiting for this lock would hold a snapshot that the
        # other's CREATE INDEX CONCURRENTLY waits for in turn.
        lock = {"key": _PG_INDEX_LOCK_KEY}
        if not await auto.scalar(text("SELECT pg_try_advisory_lock(:key)"), lock):
            logger.info("another worker is creating sfrelay's indexes; starting without waiting")
            return
        try:
            # Read again under the lock: another worker may have built them meanwhile.
            valid = await _pg_index_validity(auto, list(names))
            await _create_pg_indexes(auto, names, valid)
        finally:
            await auto.execute(text("SELECT pg_advisory_unlock(:key)"), lock)


async def _create_pg_indexes(
    auto: AsyncConnection, names: dict[str, tuple[str, str]], valid: dict[str, bool]
) -> None:
    missing = [name for name in names if not valid.get(name)]
    if not missing:
        return
    await auto.execute(text(f"SET lock_timeout = '{PG_INDEX_LOCK_TIMEOUT}'"))
    try:
        for name in missing:
            table, expression = names[name]
            if name in valid:  # left invalid by an earlier start that gave up
                await auto.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            await auto.execute(text(f"CREATE INDEX CONCURRENTLY {name} ON {table} ({expression})"))
    except DBAPIError as exc:
        if not is_transient(exc):
            raise
        logger.warning(
            "index %s not created yet: Drupal's open transactions on %s kept it waiting "
            "(%s); the worker runs without it (look-ups are slower) and tries again at "
            "its next start",
            name,
            table,
            PG_INDEX_LOCK_TIMEOUT,
        )
    finally:
        await auto.execute(text("RESET lock_timeout"))
