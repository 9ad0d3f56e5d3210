"""Drupal itself writing a user while a batch of sfrelay's runs (PostgreSQL, MariaDB): Drupal's
transaction holds the rows sfrelay then writes, so its save lands between sfrelay's read and
its write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal.engine import create_engine
from app.outcomes import Outcome, OutcomeKind
from app.sync import Syncer
from tests.drupal_rows import add_role, base_row, field_values, open_syncer, roles, user_table
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite

SERVERS = pytest.mark.parametrize(
    "drupal_site", ["pg-d10", "pg-d7", "mariadb-d10", "mariadb-d7"], indirect=True
)


@asynccontextmanager
async def drupal_saving(site: DrupalSite) -> AsyncIterator[AsyncConnection]:
    """Drupal's own connection, in the transaction of a user save: committed at the end."""
    engine = create_engine(site.url)
    try:
        async with engine.connect() as conn, conn.begin():
            yield conn
    finally:
        await engine.dispose()


async def blocked_on_drupal(site: DrupalSite) -> bool:
    """Whether a statement of sfrelay's waits for a row lock Drupal's transaction holds."""
    if site.backend == "postgresql":
        rows = await site.rows(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
    else:
        # (information_schema.innodb_trx lags; a statement running this long waits)
        rows = await site.rows(
            "SELECT count(*) AS n FROM information_schema.PROCESSLIST WHERE TIME_MS > 300 "
            "AND COMMAND = 'Query' AND INFO NOT LIKE '%PROCESSLIST%'"
        )
    return bool(rows[0]["n"])


async def apply_while_drupal_saves(
    site: DrupalSite, syncer: Syncer, notifications: list[Any], save: str, **params: Any
) -> list[Outcome]:
    """Apply `notifications` while Drupal's transaction has run `save` (statements split by
    ';'), uncommitted: once sfrelay waits for it, Drupal commits."""
    async with drupal_saving(site) as drupal:
        for statement in save.split(";"):
            await drupal.execute(text(statement), params)
        applying = asyncio.create_task(syncer.apply(notifications))
        deadline = time.monotonic() + 60
        while not await blocked_on_drupal(site):
            assert not applying.done(), applying.result()
            assert time.monotonic() < deadline, "sfrelay never waited for Drupal's save"
            await asyncio.sleep(0.01)
    return await asyncio.wait_for(applying, 60)


async def updated_while_drupal_saves(site: DrupalSite, save: str) -> tuple[int, Outcome]:
    """Ada Byron's user (sf(1)), then her newer version (ada.lovelace@, Lovelace) applied
    while Drupal's transaction has run `save` on that user: (uid, the newer one's outcome)."""
    syncer = await open_syncer(site)
    try:
        (created,) = await syncer.apply([note(sf(1), "ada@example.org", "Ada", "Byron")])
        assert created.uid is not None
        newer = note(sf(1), "ada.lovelace@example.org", "Ada", "Lovelace", minutes=5)
        (outcome,) = await apply_while_drupal_saves(site, syncer, [newer], save, u=created.uid)
    finally:
        await syncer.close()
    return created.uid, outcome


def drupal10_save(timezone: str, password: str, login: int) -> str:
    """Drupal 10's User::save() of Ada's user (sf(1)) as it loaded her: the base table, then
    the data table deleted and inserted again, every column (SqlContentEntityStorage)."""
    return (
        "UPDATE users SET langcode = 'en' WHERE uid = :u;"
        " DELETE FROM users_field_data WHERE uid = :u;"
        " INSERT INTO users_field_data (uid, langcode, preferred_langcode, name, pass, mail,"
        " timezone, status, created, changed, access, login, init, default_langcode) VALUES"
        f" (:u, 'en', 'en', 'Ada Byron', '{password}', 'ada@example.org', '{timezone}', 1, 1,"
        f" {login + 100}, {login + 100}, {login}, 'ada@example.org', 1)"
    )


def drupal10_roles(*roles: str) -> str:
    """The user's roles saved again (deleted and inserted, as for every multi-value field)."""
    rows = ", ".join(f"('user', 0, :u, :u, 'en', {delta}, '{r}')" for delta, r in enumerate(roles))
    return (
        "DELETE FROM user__roles WHERE entity_id = :u;"
        " INSERT INTO user__roles (bundle, deleted, entity_id, revision_id, langcode, delta,"
        f" roles_target_id) VALUES {rows}"
    )


# A user edit in Drupal: timezone, password, login and access times, and a role the admin adds.
EDIT = {
    10: f"{drupal10_save('Europe/Paris', '$2y$10$new', 1700000000)};{drupal10_roles('member')}",
    7: "UPDATE users SET timezone = 'Europe/Paris', pass = '$S$new', login = 1700000000,"
    " access = 1700000100 WHERE uid = :u;"
    " DELETE FROM users_roles WHERE uid = :u;"
    " INSERT INTO users_roles (uid, rid) SELECT :u, rid FROM role WHERE name = 'member'",
}


@SERVERS
async def test_a_drupal_user_save_between_read_and_write_keeps_what_sfrelay_does_not_map(
    drupal_site: DrupalSite,
) -> None:
    site = drupal_site
    await add_role(site, "member")
    uid, outcome = await updated_while_drupal_saves(site, EDIT[site.major])
    assert outcome.kind is OutcomeKind.UPDATED
    row = await base_row(site, uid)
    assert (row["timezone"], row["login"], row["access"]) == (
        "Europe/Paris",
        1700000000,
        1700000100,
    )
    assert row["pass"] in ("$2y$10$new", "$S$new")
    assert row["mail"] == "ada.lovelace@example.org"
    assert (await field_values(site, uid))["field_last_name"] == "Lovelace"
    assert "member" in await roles(site, uid)


# A user registering in Drupal (D10: the serial / auto-increment gives its uid; D7: nextId()).
REGISTER = {
    10: "INSERT INTO users (uuid, langcode) VALUES ('0b5f5c1e-2f55-4d38-9a3b-6d1e0f4a7c21', 'en');"
    " INSERT INTO users_field_data (uid, langcode, preferred_langcode, name, pass, mail,"
    " timezone, status, created, changed, access, login, init, default_langcode)"
    " SELECT uid, 'en', 'en', :n, '$2y$10$h', :m, 'UTC', 1, 1, 1, 0, 0, :m, 1 FROM users"
    " WHERE uuid = '0b5f5c1e-2f55-4d38-9a3b-6d1e0f4a7c21'",
    7: "INSERT INTO users (uid, name, pass, mail, theme, signature, created, changed, access,"
    " login, status, language, picture, init) SELECT max(uid) + 1000, :n, '$S$h', :m, '', '', 1,"
    " 1, 0, 0, 1, '', 0, :m FROM users",
}


@SERVERS
@pytest.mark.parametrize("others", [0, 3])
async def test_a_username_drupal_takes_between_read_and_write_is_not_the_records_failure(
    drupal_site: DrupalSite, others: int
) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    batch = [note(sf(1), "grace@example.org", "Grace", "Hopper")]
    batch += [note(sf(n), f"u{n}@example.org", "Other", f"N{n}") for n in range(2, 2 + others)]
    try:
        outcomes = await apply_while_drupal_saves(
            site, syncer, batch, REGISTER[site.major], n="Grace Hopper", m="gh@example.org"
        )
    finally:
        await syncer.close()
    table = user_table(site)
    names = {
        r["name"]: r["mail"]
        for r in await site.rows(f"SELECT name, mail FROM {table} WHERE name LIKE 'Grace%'")
    }
    assert [o.kind for o in outcomes] == [OutcomeKind.CREATED] * (1 + others)
    assert names == {"Grace Hopper": "gh@example.org", "Grace Hopper_2": "grace@example.org"}


# An administrator gives a user the site's admin role (the save writes the user's row too).
PROMOTE = {
    10: f"{drupal10_save('UTC', '', 0)};{drupal10_roles('administrator')}",
    7: "UPDATE users SET access = 1700000200 WHERE uid = :u;"
    " INSERT INTO users_roles (uid, rid) SELECT :u, rid FROM role WHERE name = 'administrator'",
}


@SERVERS
async def test_a_user_made_admin_between_read_and_write_is_never_written(
    drupal_site: DrupalSite,
) -> None:
    site = drupal_site
    uid, outcome = await updated_while_drupal_saves(site, PROMOTE[site.major])
    assert outcome.kind is OutcomeKind.CONFLICT_PROTECTED_USER
    assert (await base_row(site, uid))["mail"] == "ada@example.org"
    assert (await field_values(site, uid))["field_last_name"] == "Byron"


async def drupal7_next_id(conn: AsyncConnection, backend: str) -> int:
    """A uid as Drupal 7's user_save() takes one, db_next_id(MAX(uid)) on its driver: pgsql
    the nextval() of the sequence behind sequences.value, mysql a row of sequences by its
    AUTO_INCREMENT (each past MAX(uid) on this site)."""
    existing = int(await conn.scalar(text("SELECT MAX(uid) FROM users")) or 0)
    if backend == "postgresql":
        sequence = "pg_get_serial_sequence('sequences', 'value')"
        uid = int(await conn.scalar(text(f"SELECT nextval({sequence})")) or 0)
    else:
        uid = int((await conn.execute(text("INSERT INTO sequences () VALUES ()"))).lastrowid)
    assert uid > existing, (uid, existing)
    return uid


@pytest.mark.parametrize("drupal_site", ["pg-d7", "mariadb-d7"], indirect=True)
async def test_a_uid_drupal_7_takes_during_a_batch_is_neither_given_away_nor_waited_for(
    drupal_site: DrupalSite,
) -> None:
    """A visitor registers while a batch creates users: Drupal's transaction has taken its
    uid but not yet written the user. The batch neither gives that uid to a new user (the
    registration would fail on the duplicate) nor waits for Drupal's transaction."""
    site = drupal_site
    syncer = await open_syncer(site)
    batch = [note(sf(n), f"new{n}@example.org", "New", f"User{n}") for n in range(1, 4)]
    try:
        async with drupal_saving(site) as drupal:
            uid = await drupal7_next_id(drupal, site.backend)
            outcomes = await asyncio.wait_for(syncer.apply(batch), 30)
            await drupal.execute(
                text(
                    "INSERT INTO users (uid, name, pass, mail, theme, signature, created,"
                    " changed, access, login, status, language, picture, init) VALUES (:u,"
                    " 'Visitor', '$S$h', 'visitor@example.org', '', '', 1, 1, 0, 0, 1, '', 0,"
                    " 'visitor@example.org')"
                ),
                {"u": uid},
            )
        async with drupal_saving(site) as drupal:
            after = await drupal7_next_id(drupal, site.backend)
    finally:
        await syncer.close()
    assert [o.kind for o in outcomes] == [OutcomeKind.CREATED] * 3
    created = sorted(o.uid or 0 for o in outcomes)
    assert uid not in created and len(set(created)) == 3
    assert after > max(*created, uid)
    rows = await site.rows("SELECT uid, name FROM users WHERE uid > 2 ORDER BY uid")
    assert {r["uid"]: r["name"] for r in rows} == {
        uid: "Visitor",
        **{o.uid: f"New User{n}" for n, o in enumerate(outcomes, 1)},
    }


@pytest.mark.parametrize("drupal_site", ["mariadb-d7"], indirect=True)
async def test_drupal_7_uids_on_a_multi_primary_cluster_are_the_values_its_counter_gave(
    drupal_site: DrupalSite,
) -> None:
    """A Galera or group-replication primary hands out AUTO_INCREMENT values
    auto_increment_increment apart (another primary takes those between): a batch's new users
    get exactly the values its one INSERT into sequences was given, and the table keeps only
    the top one, as Drupal's nextId() leaves it."""
    site = drupal_site
    await site.execute("SET GLOBAL auto_increment_increment = 3")
    try:
        syncer = await open_syncer(site)  # (new connections: the global value)
        try:
            batch = [note(sf(n), f"node{n}@example.org", "Node", f"User{n}") for n in (1, 2, 3)]
            outcomes = await syncer.apply(batch)
        finally:
            await syncer.close()
    finally:
        await site.execute("SET GLOBAL auto_increment_increment = 1")
    assert [o.kind for o in outcomes] == [OutcomeKind.CREATED] * 3
    first = outcomes[0].uid or 0
    assert [o.uid for o in outcomes] == [first, first + 3, first + 6]
    rows = await site.rows("SELECT value FROM sequences WHERE value >= :v", v=first)
    assert [r["value"] for r in rows] == [first + 6]
