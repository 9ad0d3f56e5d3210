"""Field map, roles, usernames, batch isolation, concurrency and dead letters, on every backend."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from app import dead
from app.config import Settings
from app.dead import DeadLetter
from app.errors import ConfigError, RetryableError
from app.jobs import ApplyJob, Source
from app.outcomes import Outcome
from app.sync import Syncer
from tests.drupal_rows import (
    add_member,
    add_role,
    assert_new_user,
    base_row,
    field_values,
    ledger_history,
    open_syncer,
    roles,
    uids_with_mail,
    user_ids,
)
from tests.factories import ORG_ID, note, sf
from tests.fixtures_db import DrupalSite, Server
from tests.servers import free_port

ORG15 = ORG_ID[:15]

# An unprivileged extra role each site has (the minimal profile has none; D7's standard
# profile only has administrator, which sfrelay never grants: the test makes "editor").
# A role the field map grants: made as Drupal's UI would (the standard profile's content_editor
# is staff, so protected: sfrelay never grants it).
EXTRA_ROLE = {"d10": "subscriber", "d7": "editor", "sqlite-d10-minimal": None}

CUSTOM_MAP = """
[username]
template = "{{Nickname__c}}"
fallback = "{{email_local}}"

[Contact]
roles = {roles}

[Contact.fields]
mail = "Email"
status = "Active__c"
timezone = "TimeZone__c"
field_first_name = "Nickname__c"
field_salesforce_id = "Id"

[Contact.defaults]
field_last_name = "(from Salesforce)"

[Lead]
[Lead.fields]
mail = "Email"
"""


def extra_role(site: DrupalSite) -> str | None:
    if site.id in EXTRA_ROLE:
        return EXTRA_ROLE[site.id]
    return EXTRA_ROLE[f"d{site.major}"]


async def test_custom_field_map_and_roles(drupal_site: DrupalSite, tmp_path: Path) -> None:
    site = drupal_site
    role = extra_role(site)
    if role:
        await add_role(site, role, permissions=("access content",))
    await add_role(site, "member", permissions=("access content",))
    syncer = await open_syncer(
        site, CUSTOM_MAP.format(roles=f'["{role}"]' if role else "[]"), tmp_path
    )
    n = note(sf(1), "kim@example.com", Nickname__c="Kimmy", Active__c=False)
    n.fields["TimeZone__c"] = "Europe/Paris"
    (created,) = await syncer.apply([n])
    uid = created.uid
    assert created.kind == "created" and uid is not None
    row = await base_row(site, uid)
    assert (row["name"], row["status"], row["timezone"]) == ("Kimmy", 0, "Europe/Paris")
    assert await field_values(site, uid) == {
        "field_first_name": "Kimmy",
        "field_last_name": "(from Salesforce)",
        "field_salesforce_id": sf(1),
    }
    assert await roles(site, uid) == ([role] if role else [])
    # Active again; the role is not written twice; a linked user gets the role beside its own.
    member = await add_member(site, "member", "member@example.com", roles=("member",))
    again = note(sf(1), "kim@example.com", minutes=1, Nickname__c="Kim", Active__c=True)
    linked = note(sf(2), "member@example.com", Nickname__c="Boss")
    assert [o.kind for o in await syncer.apply([again, linked])] == ["updated", "linked"]
    await syncer.close()
    assert (await base_row(site, uid))["status"] == 1
    assert (await base_row(site, uid))["name"] == "Kimmy"
    assert await roles(site, uid) == ([role] if role else [])
    # D10 appends the role at the next delta (D7's roles are listed by name).
    expected = ["member", role] if role else ["member"]
    assert await roles(site, member) == (sorted(expected) if site.major == 7 else expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("field_salesforce_id", "field_nope"), "user field 'field_nope' does not exist"),
        (("roles = []", 'roles = ["no_such_role"]'), "role 'no_such_role' does not exist"),
        (("roles = []", 'roles = ["authenticated"]'), "implicit"),
        (
            ('mail = "Email"\nfield_first_name', "field_first_name"),
            "map a Salesforce field to mail",
        ),
        (("status = 1", "bogus = 1"), "cannot default 'bogus'"),
        (("[Lead", "[Account"), "no [Lead] section"),
    ],
)
async def test_a_wrong_field_map_fails_at_start_up(
    drupal_site: DrupalSite, tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    default = (Path(__file__).parent.parent / "app" / "fieldmap.default.toml").read_text()
    assert change[0] in default
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        await open_syncer(drupal_site, default.replace(*change), tmp_path)


async def test_usernames_are_valid_unique_and_kept(drupal_site: DrupalSite, tmp_path: Path) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    long_last = "Wolfeschlegelsteinhausenbergerdorff-Welchevoralternwarengewissenhaft"
    batch = [
        note(sf(1), "a1@example.com", "John", "Doe"),
        note(sf(2), "a2@example.com", "John", "Doe"),
        note(sf(3), "a3@example.com", "Admin", None),  # "admin" exists (case-insensitively)
        note(sf(4), "jdoe.x@example.com", None, None),  # no names: the email's local part
        note(sf(5), "a5@example.com", "Zoë <b>", "O'Brien-Smith\t"),
        note(sf(6), "a6@example.com", "Hubert", long_last),
    ]
    out = await syncer.apply(batch)
    assert [o.kind for o in out] == ["created"] * 6
    (third,) = await syncer.apply([note(sf(7), "a7@example.com", "john", "doe")])
    names = [(await base_row(site, o.uid or 0))["name"] for o in [*out, third]]
    assert names == [
        "John Doe",
        "John Doe_2",
        "Admin_2",
        "jdoe.x",
        "Zoë b O'Brien-Smith",
        f"Hubert {long_last}"[:60],
        "john doe_3",
    ]
    assert all(len(name) <= 60 for name in names)
    # A later update keeps the name unless [username] update = true.
    (kept,) = await syncer.apply([note(sf(1), "a1@example.com", "Johnny", "Doe", minutes=1)])
    await syncer.close()
    assert (await base_row(site, kept.uid or 0))["name"] == "John Doe"
    default = (Path(__file__).parent.parent / "app" / "fieldmap.default.toml").read_text()
    renaming = await open_syncer(site, default.replace("update = false", "update = true"), tmp_path)
    (renamed,) = await renaming.apply([note(sf(1), "a1@example.com", "John", "Doe_2", minutes=2)])
    (same,) = await renaming.apply([note(sf(2), "a2@example.com", "John", "Doe_2", minutes=2)])
    await renaming.close()
    assert (await base_row(site, renamed.uid or 0))["name"] == "John Doe_2_2"
    assert (await base_row(site, same.uid or 0))["name"] == "John Doe_2"  # its own name: kept


async def test_concurrent_workers_never_share_a_name(drupal_site: DrupalSite) -> None:
    site = drupal_site
    one, two = await open_syncer(site), await open_syncer(site)
    batches = [
        [note(sf(10 * w + i), f"sam{w}{i}@example.com", "Sam", "Lee") for i in range(3)]
        for w in (1, 2)
    ]
    results = await asyncio.gather(one.apply(batches[0]), two.apply(batches[1]))
    await one.close()
    await two.close()
    uids = [o.uid for out in results for o in out]
    assert [o.kind for out in results for o in out] == ["created"] * 6
    names = sorted([(await base_row(site, uid or 0))["name"] for uid in uids])
    assert names == ["Sam Lee", *(f"Sam Lee_{n}" for n in range(2, 7))]


_BOOM = {
    "sqlite": [
        "CREATE TRIGGER boom BEFORE INSERT ON {t} WHEN NEW.mail = 'boom@example.com' "
        "BEGIN SELECT RAISE(ABORT, 'boom'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN IF NEW.mail = 'boom@example.com' "
        "THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER boom BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION boom()",
    ],
    "mariadb": [
        "CREATE TRIGGER boom BEFORE INSERT ON {t} FOR EACH ROW BEGIN IF NEW.mail = "
        "'boom@example.com' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'boom'; END IF; END"
    ],
}


async def test_one_failing_record_does_not_block_its_batch(drupal_site: DrupalSite) -> None:
    site = drupal_site
    table = "users_field_data" if site.major == 10 else "users"
    for statement in _BOOM[site.backend]:
        await site.execute(statement.format(t=table))
    syncer = await open_syncer(site)
    (existing,) = await syncer.apply([note(sf(1), "one@example.com", "One", "Before")])
    batch = [
        note(sf(2), "two@example.com", "Two", "Ok"),
        note(sf(3), "boom@example.com", "Boom", "Bad"),
        note(sf(1), "one@example.com", "One", "After", minutes=1),
        note(sf(4), "four@example.com", "Four", "Ok"),
    ]
    out = await syncer.apply(batch)
    await syncer.close()
    assert [o.kind for o in out][::2] == ["created", "updated"] and out[3].kind == "created"
    assert out[1].kind in ("retry", "failed") and "boom" in (out[1].detail or "")
    assert out[2] == Outcome(batch[2].id, sf(1), "updated", existing.uid)
    assert await uids_with_mail(site, "boom@example.com") == []
    await assert_new_user(
        site,
        out[3].uid or 0,
        name="Four Ok",
        mail="four@example.com",
        fields={"field_first_name": "Four", "field_last_name": "Ok", "field_salesforce_id": sf(4)},
    )
    assert (await field_values(site, existing.uid or 0))["field_last_name"] == "After"
    states = await site.rows("SELECT sf_id, uid, history FROM sfrelay_record ORDER BY sf_id")
    assert [(s["sf_id"], s["uid"]) for s in states] == [
        (sf(1), existing.uid),
        (sf(2), out[0].uid),
        (sf(3), None),  # the failed attempt is in its history, nothing else
        (sf(4), out[3].uid),
    ]
    _, entries = await ledger_history(site, sf(3))
    assert [e["o"] for e in entries] == [out[1].kind]
    assert "boom" in entries[0]["d"]


async def test_dead_letters_round_trip(drupal_site: DrupalSite) -> None:
    syncer = await open_syncer(drupal_site)  # a worker's start-up creates the table
    job = ApplyJob(ORG15, Source.OUTBOUND_MESSAGE, 1000.0, ())
    first = note(sf(1), "x@example.com", "X", "Y")
    second = replace(note(sf(2), "y@example.com", "Y", "Z"), first_seen=2000.0)
    async with syncer.engine.begin() as conn:
        a = await dead.add(conn, DeadLetter.of(job, first, "boom", 5))
        b = await dead.add(conn, DeadLetter.of(job, second, "bang", 3))
    async with syncer.engine.connect() as conn:
        listed = await dead.in_database(conn)
    letters = [(d.id, d.record_id, d.error, d.attempts, d.first_seen) for d in listed]
    assert letters == [(str(a), sf(1), "boom", 5, 1000.0), (str(b), sf(2), "bang", 3, 2000.0)]
    assert [d.kept for d in listed] == [dead.Kept.DATABASE] * 2
    # Stored as it arrived: a replay applies it like the original.
    stored = listed[0].notification
    assert stored == first
    (outcome,) = await syncer.apply([stored])
    await syncer.close()
    assert outcome.kind == "created"
    assert await uids_with_mail(drupal_site, "x@example.com") == [outcome.uid]


async def test_unknown_drupal_version_or_database(drupal_site: DrupalSite, tmp_path: Path) -> None:
    wrong = "7" if drupal_site.major == 10 else "10"
    with pytest.raises(ConfigError, match=f"SFRELAY_DRUPAL_VERSION={wrong} but"):
        await open_syncer(drupal_site, drupal_version=wrong)
    syncer = await open_syncer(drupal_site, drupal_version=str(drupal_site.major))
    assert syncer.schema.major == drupal_site.major
    await syncer.close()
    users = await user_ids(drupal_site)
    assert users[:2] == [0, 1]


async def test_lead_without_a_synced_user_is_not_converted(drupal_site: DrupalSite) -> None:
    syncer = await open_syncer(drupal_site)
    lead = note(sf(9, "00Q"), "ghost@example.com", "Gh", "Ost", IsConverted=True)
    lead.fields["ConvertedContactId"] = sf(9)
    (out,) = await syncer.apply([lead])
    await syncer.close()
    assert (out.kind, out.uid) == ("skipped_converted", None)
    assert await uids_with_mail(drupal_site, "ghost@example.com") == []


def test_modstamp_counts_microseconds() -> None:
    from app.records import modstamp

    stamp = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert modstamp({"SystemModstamp": stamp}) == 1_740_830_400_123_456
    assert modstamp({"LastModifiedDate": "2025-03-01T12:00:00.123456Z"}) == 1_740_830_400_123_456
    assert modstamp({}) is None


@pytest.mark.parametrize("scheme", ["pgsql", "mysql"])
async def test_an_unreachable_database_is_retryable_at_start_up(scheme: str) -> None:
    url = f"{scheme}://drupal@127.0.0.1:{free_port()}/drupal"
    with pytest.raises(RetryableError, match="cannot use the Drupal database"):
        await Syncer.open(Settings(_env_file=None, database_url=url))


async def test_a_database_gone_mid_run_is_retryable(pg_server: Server) -> None:
    name = await pg_server.fresh(10)
    syncer = await Syncer.open(Settings(_env_file=None, database_url=pg_server.url(name)))
    (created,) = await syncer.apply([note(sf(1), "a@example.com", "A", "B")])
    admin = pg_server.admin_engine()
    async with admin.connect() as conn:
        await conn.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        await conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
            {"d": name},
        )
    try:
        with pytest.raises(RetryableError):
            await syncer.apply([note(sf(2), "b@example.com", "B", "C")])
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        await admin.dispose()
    # Back again: the same call simply succeeds.
    (later,) = await syncer.apply([note(sf(2), "b@example.com", "B", "C")])
    await syncer.close()
    assert (created.kind, later.kind) == ("created", "created")


# U+1D400 MATHEMATICAL BOLD CAPITAL A (a letter: a username keeps it) and U+1F600 (an emoji):
# 4 bytes each in UTF-8, outside the Basic Multilingual Plane.
BOLD_A, GRIN = "\U0001d400", "\U0001f600"


@pytest.mark.parametrize("drupal_site", ["mariadb-d10"], indirect=True)
async def test_an_address_a_utf8mb3_mail_column_cannot_hold_is_skipped(
    drupal_site: DrupalSite,
) -> None:
    """Drupal 8+ takes letters of any script in an address, U+1D400 too; a mail column in
    3-byte utf8 cannot hold it, and U+FFFD would make it another address: skipped."""
    site = drupal_site
    await site.execute("ALTER TABLE users_field_data CONVERT TO CHARACTER SET utf8mb3")
    users = await user_ids(site)
    syncer = await open_syncer(site)
    mail = f"{BOLD_A}nna@example.com"
    n = note(sf(1), mail, "Anna", "B")
    ok = note(sf(2), "anna@example.com", "Anna", "C")
    out = await syncer.apply([n, ok])
    await syncer.close()
    assert out[0] == Outcome(n.id, sf(1), "skipped_invalid_email", None, mail)
    assert out[1].kind == "created"
    assert await user_ids(site) == [*users, out[1].uid]


async def test_characters_outside_the_bmp(drupal_site: DrupalSite) -> None:
    """Drupal 7 on MySQL/MariaDB keeps its tables in 3-byte utf8 (utf8mb3): a 4-byte character
    is refused there (error 1366), so sfrelay writes U+FFFD instead (and leaves it out of the
    username) and says so; every other backend stores the characters as they came."""
    site = drupal_site
    narrow = site.id == "mariadb-d7"
    syncer = await open_syncer(site)
    batch = [
        note(sf(1), "bold@example.com", f"{BOLD_A}nna", f"Smith {GRIN}"),
        note(sf(2), "plain@example.com", "nna", "Smith"),  # the same username without U+1D400
    ]
    out = await syncer.apply(batch)
    (again,) = await syncer.apply([note(sf(1), "bold@example.com", "Anna", GRIN, minutes=1)])
    await syncer.close()
    assert [o.kind for o in out] == ["created", "created"] and again.kind == "updated"
    uid = out[0].uid or 0
    if narrow:
        detail = "utf8mb3 column: characters outside the BMP replaced with U+FFFD in "
        assert out[0].detail == detail + "field_first_name, field_last_name; dropped from name"
        assert again.detail == detail + "field_last_name"
    else:
        assert out[0].detail is None and again.detail is None
    assert out[1].detail is None
    names = [(await base_row(site, o.uid or 0))["name"] for o in out]
    # Unique as the column's collation compares (the emoji is never part of a username).
    assert names == (
        ["nna Smith", "nna Smith_2"] if narrow else [f"{BOLD_A}nna Smith", "nna Smith"]
    )
    assert await field_values(site, uid) == {
        "field_first_name": "Anna",
        "field_last_name": "\ufffd" if narrow else GRIN,
        "field_salesforce_id": sf(1),
    }
    if site.backend == "mariadb":  # the exact bytes stored
        for table in ("field_data", "field_revision") if site.major == 7 else ("user_",):
            (stored,) = await site.rows(
                f"SELECT HEX(field_last_name_value) AS h FROM {table}_field_last_name"
                " WHERE entity_id = :u",
                u=uid,
            )
            assert stored["h"] == ("EFBFBD" if narrow else "F09F9880")
        table = "users" if site.major == 7 else "users_field_data"
        (stored,) = await site.rows(f"SELECT HEX(name) AS h FROM {table} WHERE uid = :u", u=uid)
        assert (
            stored["h"] == ("nna Smith" if narrow else f"{BOLD_A}nna Smith").encode().hex().upper()
        )
    _, entries = await ledger_history(site, sf(1))
    assert [e.get("d") for e in entries] == [out[0].detail, again.detail]


async def test_sfrelay_tables_in_3_byte_utf8_keep_every_character(drupal_site: DrupalSite) -> None:
    """sfrelay's own tables take the database's default character set: on a MySQL database
    made with utf8 (utf8mb3) their JSON carries a character outside the BMP as a \\u escape
    pair, the same JSON, so that a history or dead letter with an emoji is still written."""
    site = drupal_site
    syncer = await open_syncer(site)  # creates the sfrelay_* tables
    if site.backend == "mariadb":
        for table in ("sfrelay_record", "sfrelay_dead_letter"):
            await site.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb3")
    invalid = note(sf(1), f"{GRIN}@example.com", "Emoji", "Mail")
    (skipped,) = await syncer.apply([invalid])
    assert (skipped.kind, skipped.detail) == ("skipped_invalid_email", f"{GRIN}@example.com")
    _, entries = await ledger_history(site, sf(1))
    assert [(e["o"], e["d"]) for e in entries] == [("skipped_invalid_email", skipped.detail)]
    job = ApplyJob(ORG15, Source.OUTBOUND_MESSAGE, 1000.0, ())
    async with syncer.engine.begin() as conn:
        await dead.add(conn, DeadLetter.of(job, invalid, "boom", 5))
    async with syncer.engine.connect() as conn:
        (letter,) = await dead.in_database(conn)
    await syncer.close()
    assert letter.notification == invalid
