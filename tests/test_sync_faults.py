"""Faults at the database: a record the site's own constraint refuses, a read-only SQLite file,
a privilege the database user lacks, and a worker starting beside an open Drupal transaction
on PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.drupal.engine import create_engine
from app.errors import RetryableError
from app.sync import Syncer
from tests.drupal_rows import open_syncer, uids_with_mail, user_ids
from tests.drupal_schemas import site_copy
from tests.factories import note, sf
from tests.fixtures_db import SITES, DrupalSite, Server, start_mariadb

POISON = "poison@example.org"


class Transactions:
    """Counts the transactions that did work (MySQL's GET_LOCK round trips are not theirs)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        self._working: set[int] = set()
        sync = engine.sync_engine
        event.listen(sync, "before_cursor_execute", self._statement)
        event.listen(sync, "commit", self._end)
        event.listen(sync, "rollback", self._end)

    def _statement(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not re.match(r"\s*SELECT (GET|RELEASE)_LOCK", statement):
            self._working.add(id(conn))

    def _end(self, conn: Any) -> None:
        if id(conn) in self._working:
            self._working.discard(id(conn))
            self.count += 1


async def refuse_mail(site: DrupalSite, mail: str) -> None:
    """The site's own rule, which no validation of sfrelay can foresee: this mail is refused."""
    table = "users_field_data" if site.major == 10 else "users"
    if site.backend == "sqlite":
        await site.execute(
            f"CREATE TRIGGER refuse_poison BEFORE INSERT ON {table} WHEN NEW.mail = '{mail}' "
            "BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: refuse_poison'); END"
        )
    else:
        await site.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT refuse_poison CHECK (mail <> '{mail}')"
        )


async def test_a_refused_record_costs_log_n_transactions_and_the_others_land(
    drupal_site: DrupalSite,
) -> None:
    site = drupal_site
    await refuse_mail(site, POISON)
    before = await user_ids(site)
    n = 64
    batch = [note(sf(i), f"user{i}@example.org", "U", f"N{i}") for i in range(n)]
    batch[37] = note(sf(37), POISON, "Poison", "Pill")
    syncer = await open_syncer(site)
    transactions = Transactions(syncer.engine)
    outcomes = await syncer.apply(batch)
    await syncer.close()

    # The whole batch, two halves per level down to the record, and its history: 14.
    assert transactions.count <= 2 * math.log2(n) + 2
    poison = outcomes[37]
    # A constraint is "retry" (another writer may have taken the row meanwhile) where the
    # driver calls it an integrity error; MariaDB's CHECK error (4025) is not one: "failed".
    expected = "failed" if site.backend == "mariadb" else "retry"
    assert (poison.kind, poison.uid, poison.record_id) == (expected, None, sf(37))
    assert poison.detail is not None and "refuse_poison" in poison.detail
    assert [o.kind for i, o in enumerate(outcomes) if i != 37] == ["created"] * (n - 1)
    assert len(await user_ids(site)) == len(before) + n - 1
    assert await uids_with_mail(site, POISON) == []
    for i in (0, 36, 38, 63):
        assert len(await uids_with_mail(site, f"user{i}@example.org")) == 1
    (row,) = await site.rows("SELECT uid, history FROM sfrelay_record WHERE sf_id = :s", s=sf(37))
    assert row["uid"] is None
    assert [entry["o"] for entry in orjson.loads(row["history"])] == [expected]


def make_read_only(path: Path) -> None:
    """Read-only for every writer, root included: the file mode, and the SQLite header's
    write version (byte 18 > 2: "the database file must be treated as read-only"); the change
    counter moves so that open connections read the header again."""
    path.chmod(0o444)
    _set_write_version(path, 3)


def make_writable(path: Path) -> None:
    path.chmod(0o644)
    _set_write_version(path, 1)


def _set_write_version(path: Path, version: int) -> None:
    with path.open("r+b") as f:
        f.seek(18)
        f.write(bytes([version]))
        f.seek(24)
        counter = int.from_bytes(f.read(4), "big")
        f.seek(24)
        f.write(((counter + 1) % 2**32).to_bytes(4, "big"))


@pytest.fixture(params=[k for k, v in SITES.items() if v[0] == "sqlite"])
async def sqlite_site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DrupalSite]:
    backend, major, filename = SITES[request.param]
    assert filename is not None
    url = f"sqlite:///{site_copy(filename, tmp_path)}"
    engine = create_engine(url)
    yield DrupalSite(request.param, backend, major, url, engine)
    await engine.dispose()


async def test_a_read_only_sqlite_file_is_retryable_and_writable_again_just_works(
    sqlite_site: DrupalSite,
) -> None:
    site = sqlite_site
    path = Path(site.url.removeprefix("sqlite:///"))
    syncer = await open_syncer(site)
    (first,) = await syncer.apply([note(sf(1), "ada@example.org", "Ada", "Byron")])
    assert first.kind == "created"
    make_read_only(path)
    try:
        with pytest.raises(RetryableError, match="attempt to write a readonly database"):
            await syncer.apply([note(sf(2), "grace@example.org", "Grace", "Hopper")])
        with pytest.raises(RetryableError, match="readonly"):
            await syncer.apply([note(sf(3), "alan@example.org", "Alan", "Turing")])
    finally:
        make_writable(path)
    outcomes = await syncer.apply(
        [
            note(sf(2), "grace@example.org", "Grace", "Hopper"),
            note(sf(3), "alan@example.org", "Alan", "Turing"),
        ]
    )
    await syncer.close()
    assert [o.kind for o in outcomes] == ["created", "created"]
    assert await site.rows("SELECT * FROM sfrelay_dead_letter") == []
    for mail in ("ada@example.org", "grace@example.org", "alan@example.org"):
        assert len(await uids_with_mail(site, mail)) == 1


async def test_a_sqlite_file_deleted_under_the_worker_is_retried_never_recreated_empty(
    tmp_path: Path,
) -> None:
    """A site's file removed (a restore: delete, then copy back) while the worker runs: each
    try is retryable and sfrelay never creates a file in its place (SQLite would, empty: every
    record would fail on its missing tables, and Drupal would find an empty database)."""
    directory = tmp_path / "sites #1 100% default"  # the path goes into a SQLite URI
    directory.mkdir()
    path = site_copy("drupal10-standard.sqlite", directory)
    syncer = await Syncer.open(Settings(_env_file=None, database_url=f"sqlite:///{path}"))
    backup = path.read_bytes()  # with sfrelay's tables
    try:
        (first,) = await syncer.apply([note(sf(1), "ada@example.org", "Ada", "Byron")])
        assert first.kind == "created"
        path.unlink()
        grace = [note(sf(2), "grace@example.org", "Grace", "Hopper")]
        with pytest.raises(RetryableError):  # the open file was unlinked: SQLite refuses
            await syncer.apply(grace)
        with pytest.raises(RetryableError, match="unable to open database file"):
            await syncer.apply(grace)  # the next try opens the path anew: nothing there
        assert not path.exists()
        path.write_bytes(backup)  # restored
        (second,) = await syncer.apply(grace)
    finally:
        await syncer.close()
    assert second.kind == "created"
    with closing(sqlite3.connect(path)) as db:
        mails = db.execute("SELECT mail FROM users_field_data WHERE uid > 1 ORDER BY uid")
        assert mails.fetchall() == [("grace@example.org",)]  # the backup predates Ada


@pytest.fixture(scope="module")
def mariadb_with_grants() -> Iterator[Server]:
    """A MariaDB of its own that checks privileges (the session's skips its grant tables;
    FLUSH PRIVILEGES loads them, for good)."""
    server = start_mariadb()
    yield server
    server.stop()


async def _without_insert_on_users(server: Server, database: str) -> tuple[str, str]:
    """A database user that may do everything on the site but INSERT into `users`: its URL,
    and the GRANT that gives it the rest."""
    user = f"limited_{database}"
    admin = server.admin_engine()
    try:
        async with admin.connect() as conn:
            if server.kind == "postgresql":
                await conn.execute(text(f"CREATE ROLE {user} LOGIN"))
                grant = f"GRANT INSERT ON users TO {user}"
            else:
                await conn.execute(text("FLUSH PRIVILEGES"))
                accounts = [f"{user}@'{host}'" for host in ("localhost", "127.0.0.1")]
                for account in accounts:
                    await conn.execute(text(f"CREATE USER {account}"))
                grant = f"GRANT INSERT ON users TO {', '.join(accounts)}"
        site = create_engine(server.url(database))
        async with site.begin() as conn:
            if server.kind == "postgresql":
                for what in ("TABLES", "SEQUENCES"):
                    await conn.execute(text(f"GRANT ALL ON ALL {what} IN SCHEMA public TO {user}"))
                await conn.execute(text(f"REVOKE INSERT ON users FROM {user}"))
            else:
                tables = await conn.execute(text("SHOW TABLES"))
                for (table,) in tables.all():
                    rights = "SELECT, UPDATE, DELETE" if table == "users" else "ALL"
                    for account in accounts:
                        await conn.execute(text(f"GRANT {rights} ON {table} TO {account}"))
        await site.dispose()
    finally:
        await admin.dispose()
    return server.url(database).replace("//postgres@", f"//{user}@").replace(
        "//root@", f"//{user}@"
    ), grant


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_a_missing_privilege_is_retryable_never_the_records_fault(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Every record would be refused alike: no per-record `failed` (a dead letter each, at
    once), but a retryable error with nothing written; once granted, the same batch lands."""
    server: Server = request.getfixturevalue(
        "pg_server" if backend == "postgresql" else "mariadb_with_grants"
    )
    name = await server.fresh(10)
    await (await Syncer.open(Settings(_env_file=None, database_url=server.url(name)))).close()
    url, grant = await _without_insert_on_users(server, name)
    site = DrupalSite(backend, backend, 10, server.url(name), create_engine(server.url(name)))
    syncer = await Syncer.open(Settings(_env_file=None, database_url=url))
    batch = [note(sf(i), f"user{i}@example.org", "U", f"N{i}") for i in range(3)]
    before = await user_ids(site)
    try:
        refused = "permission denied for table users" if backend == "postgresql" else "(1142, "
        with pytest.raises(RetryableError, match=re.escape(refused)):
            await syncer.apply(batch)
        assert await user_ids(site) == before
        assert await site.rows("SELECT sf_id FROM sfrelay_record") == []
        await site.execute(grant)
        outcomes = await syncer.apply(batch)
        assert [o.kind for o in outcomes] == ["created"] * 3
        assert len(await user_ids(site)) == len(before) + 3
    finally:
        await syncer.close()
        await site.engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_tables_missing_mid_restore_are_retryable_never_the_records_fault(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """A restore (drush sql-drop, then the dump) under a running worker: while the tables are
    gone, every record would be refused alike; retryable, and applied once they are back."""
    server: Server = request.getfixturevalue(
        f"{'pg' if backend == 'postgresql' else backend}_server"
    )
    url = server.url(await server.fresh(10))
    site = DrupalSite(backend, backend, 10, url, create_engine(url))
    syncer = await Syncer.open(Settings(_env_file=None, database_url=url))
    tables = ("users_field_data", "sfrelay_record")
    batch = [note(sf(i), f"user{i}@example.org", "U", f"N{i}") for i in range(3)]
    try:
        for table in tables:
            await site.execute(f"ALTER TABLE {table} RENAME TO restoring_{table}")
        with pytest.raises(RetryableError):
            await syncer.apply(batch)
        assert await site.rows("SELECT sf_id FROM restoring_sfrelay_record") == []
        for table in tables:
            await site.execute(f"ALTER TABLE restoring_{table} RENAME TO {table}")
        assert [o.kind for o in await syncer.apply(batch)] == ["created"] * 3
    finally:
        await syncer.close()
        await site.engine.dispose()


async def _waiting_locks(admin: AsyncEngine, database: str) -> list[dict[str, Any]]:
    async with admin.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT l.locktype, l.mode, a.query FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND a.datname = :d"
            ),
            {"d": database},
        )
        return [dict(r._mapping) for r in rows]


VALID_INDEXES = [
    ("sfrelay_users_field_data_mail_lower", True),
    ("sfrelay_users_field_data_name_lower_pattern", True),
]


async def sfrelay_indexes(engine: AsyncEngine) -> list[tuple[str, bool]]:
    """sfrelay's indexes on users_field_data (PostgreSQL), each with whether it is valid."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.relname, i.indisvalid FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname LIKE 'sfrelay_users_field_data_%' ORDER BY c.relname"
            )
        )
        return [(str(name), bool(ok)) for name, ok in rows]


@pytest.mark.parametrize("indexes", ["missing", "present"])
async def test_a_worker_starting_never_waits_for_or_blocks_drupal_on_postgresql(
    pg_server: Server, indexes: str
) -> None:
    name = await pg_server.fresh(10)
    url = pg_server.url(name)
    settings = Settings(_env_file=None, database_url=url)
    if indexes == "present":
        await (await Syncer.open(settings)).close()
    drupal = create_engine(url)
    admin = pg_server.admin_engine()
    try:
        async with drupal.connect() as open_tx, drupal.connect() as later:
            # Drupal, mid-request: a transaction that saved a user and is still open.
            await open_tx.execute(text("UPDATE users_field_data SET access = 1 WHERE uid = 1"))
            # The worker starts while it is open: it must neither wait nor make others wait.
            syncer = await asyncio.wait_for(Syncer.open(settings), timeout=60)
            assert await _waiting_locks(admin, name) == []
            # Another Drupal request saving a user: no lock queue behind the worker.
            await later.execute(text("SET statement_timeout = '3s'"))
            await later.execute(text("UPDATE users_field_data SET access = 2 WHERE uid = 0"))
            await later.commit()
            # And the open transaction's own later writes go through.
            await open_tx.execute(text("SET LOCAL statement_timeout = '3s'"))
            await open_tx.execute(text("UPDATE users_field_data SET login = 1 WHERE uid = 1"))
            await open_tx.commit()
            # The worker works.
            (created,) = await syncer.apply([note(sf(1), "ada@example.org", "Ada", "Byron")])
            assert created.kind == "created"
            await syncer.close()
        # Once nothing holds the table, the next start creates what was missing, concurrently.
        await (await Syncer.open(settings)).close()
        assert await sfrelay_indexes(drupal) == VALID_INDEXES
    finally:
        await drupal.dispose()
        await admin.dispose()


async def test_workers_starting_together_on_postgresql_all_start_and_build_each_index_once(
    pg_server: Server,
) -> None:
    """A fresh database and four workers starting at once (a deploy): none fails on an index
    another is building ("already exists"), none drops another's index while it is built, and
    the indexes end up valid."""
    name = await pg_server.fresh(10)
    settings = Settings(_env_file=None, database_url=pg_server.url(name))
    syncers = await asyncio.wait_for(
        asyncio.gather(*(Syncer.open(settings) for _ in range(4))), timeout=120
    )
    (created,) = await syncers[-1].apply([note(sf(1), "ada@example.org", "Ada", "Byron")])
    assert created.kind == "created"
    for syncer in syncers:
        await syncer.close()
    drupal = create_engine(pg_server.url(name))
    try:
        assert await sfrelay_indexes(drupal) == VALID_INDEXES
    finally:
        await drupal.dispose()
