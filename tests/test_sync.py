"""The sync rules on every backend: real Drupal SQLite sites, PostgreSQL and MariaDB."""

from __future__ import annotations

import time
import uuid

import pytest

from app.drupal.d10 import time_ordered_uuids
from app.drupal.schema import has_table
from app.outcomes import Outcome
from app.sync import Syncer
from tests.drupal_rows import (
    add_member,
    assert_new_user,
    base_row,
    field_values,
    ledger_history,
    open_syncer,
    tag,
    uids_allocated,
    uids_with_mail,
    user_ids,
    user_table,
)
from tests.drupal_schemas import DRUPAL
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite


def kinds(outcomes: list[Outcome]) -> list[str]:
    return [o.kind for o in outcomes]


async def add_cache_entry(site: DrupalSite, uid: int) -> tuple[str | None, str]:
    """Cache the user as Drupal would (D10 cache_entity, D7 cache_field). Drupal creates
    cache_entity on first use: the standard SQLite site gets it here, the minimal one not."""
    cache = "cache_entity" if site.major == 10 else "cache_field"
    cid = f"values:user:{uid}" if site.major == 10 else f"field:user:{uid}"
    async with site.engine.connect() as conn:
        exists = await has_table(conn, cache)
    if not exists and site.id == "sqlite-d10":
        ddl = (DRUPAL / "drupal10-sqlite-users-schema.sql").read_text().split(";")
        (create,) = [s for s in ddl if 'CREATE TABLE "cache_entity"' in s]
        await site.execute(create)
        exists = True
    if not exists:
        return None, cid
    columns = "cid, data, expire, created, serialized"
    values = ":cid, NULL, -1, 0, 1"
    if site.major == 10:
        columns, values = columns + ", tags, checksum", values + ", 'user_values', '0'"
    await site.execute(f"INSERT INTO {cache} ({columns}) VALUES ({values})", cid=cid)
    return cache, cid


async def first_new_uid(site: DrupalSite) -> int:
    return max(await user_ids(site)) + 1


async def test_create_writes_the_rows_drupal_writes(drupal_site: DrupalSite) -> None:
    site = drupal_site
    uid = await first_new_uid(site)
    before = {t: await tag(site, t) for t in ("user_list", "4xx-response")}
    syncer = await open_syncer(site)
    n = note(sf(1), "Jane.Doe@Example.com", "Jane", "Doe")
    assert await syncer.apply([n]) == [Outcome(n.id, sf(1), "created", uid)]
    await syncer.close()

    await assert_new_user(
        site,
        uid,
        name="Jane Doe",
        mail="Jane.Doe@Example.com",
        fields={"field_first_name": "Jane", "field_last_name": "Doe", "field_salesforce_id": sf(1)},
    )
    if site.major == 10:  # Drupal 7 has no cache tags
        for name, count in before.items():
            assert await tag(site, name) == count + 1
    (state,) = await site.rows("SELECT * FROM sfrelay_record")
    assert (state["sf_id"], state["object"], state["uid"]) == (sf(1), "Contact", uid)
    assert state["notification_id"] == n.id and state["converted_to"] is None
    assert state["modstamp"] == 1_740_830_400_000_000  # 2025-03-01T12:00Z in microseconds
    if site.major == 10:
        (row,) = await site.rows("SELECT uuid FROM users WHERE uid = :u", u=uid)
        assert uuid.UUID(row["uuid"]).version == 7


def test_new_uuids_are_version_7_unique_and_in_the_order_they_were_made() -> None:
    """RFC 9562 version 7: valid UUIDs (all Drupal asks), each batch's after the last one's,
    so that a batch's inserts land at one place of the uuid index, not one page per user."""
    start_ms = time.time_ns() // 1_000_000
    first = time_ordered_uuids(5000)
    time.sleep(0.002)
    later = time_ordered_uuids(3)
    parsed = [uuid.UUID(u) for u in first + later]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert [str(u) for u in parsed] == first + later  # lower-case, canonical: as Drupal's
    assert len(set(parsed)) == 5003
    assert max(first) < min(later)
    assert start_ms <= parsed[0].int >> 80 <= time.time_ns() // 1_000_000


async def test_a_batch_inserts_users_by_name_and_records_by_id_and_numbers_users_in_its_order(
    drupal_site: DrupalSite,
) -> None:
    """The user rows go in in the order of their names (each page of the name indexes is
    then changed by neighbours, once: app.drupal.users.in_name_order), the ledger's in the
    order of their Ids; the uids still follow the notifications, and each row holds its own
    user's values, also for names that collide under the database's own comparison (the later
    one takes the suffix, whatever the insert order)."""
    site = drupal_site
    people = [
        ("Zoe", "Adams"),
        ("Rosa", "Ødegaard"),
        ("adam", "Young"),
        ("José", "Silva"),
        ("Mia", "Brown"),
        ("ROSA", "ØDEGAARD"),
        ("Émile", "Zola"),
        ("Jose", "Silva"),  # one name with José on MariaDB (accents ignored), two elsewhere
    ]
    count = len(people)
    notes = [
        note(sf(count + 1 - i), f"p{i}@example.com", *p) for i, p in enumerate(people, start=1)
    ]
    syncer = await open_syncer(site)
    outcomes = await syncer.apply(notes)
    await syncer.close()
    assert kinds(outcomes) == ["created"] * count
    uids = [o.uid or 0 for o in outcomes]
    assert uids == sorted(uids) and len(set(uids)) == count  # in the notifications' order
    table = user_table(site)
    names = []
    for i, (uid, (first, last)) in enumerate(zip(uids, people, strict=True), start=1):
        (row,) = await site.rows(f"SELECT name, mail FROM {table} WHERE uid = :u", u=uid)
        assert row["mail"] == f"p{i}@example.com"
        assert row["name"] in (f"{first} {last}", f"{first} {last}_2")
        names.append(row["name"])
    assert names[1] == "Rosa Ødegaard" and len(set(names)) == count
    if site.id == "sqlite-d10":  # users_field_data keeps its rows in insertion order (rowid)
        rows = await site.rows(
            f"SELECT name FROM {table} WHERE uid >= :u ORDER BY rowid", u=uids[0]
        )
        # NOCASE_UTF8's order: lower-cased, by code point ("é" after "e", and after "z")
        assert [r["name"] for r in rows] == [
            "adam Young",
            "Jose Silva",
            "José Silva",
            "Mia Brown",
            "Rosa Ødegaard",
            "ROSA ØDEGAARD_2",
            "Zoe Adams",
            "Émile Zola",
        ]
        # and the ledger's rows in the order of their Ids (its primary key)
        ledger = await site.rows("SELECT sf_id FROM sfrelay_record ORDER BY rowid")
        assert [r["sf_id"] for r in ledger] == [sf(n) for n in range(1, count + 1)]


@pytest.mark.parametrize("drupal_site", ["sqlite-d7", "pg-d7", "mariadb-d7"], indirect=True)
async def test_drupal_7_users_numbered_past_the_allocator_are_numbered_past(
    drupal_site: DrupalSite,
) -> None:
    """A user whose uid did not come from Drupal 7's allocator (a migration writes its own
    uids): new users are numbered past it, as user_save() would, and so is Drupal's next."""
    site = drupal_site
    await site.execute(
        "INSERT INTO users (uid, name, pass, mail, theme, signature, created, changed, access,"
        " login, status, language, picture, init) VALUES (500, 'Migrated', '', 'm@example.org',"
        " '', '', 1, 1, 0, 0, 1, '', 0, 'm@example.org')"
    )
    syncer = await open_syncer(site)
    try:
        first = await syncer.apply([note(sf(n), f"n{n}@example.org", "N", str(n)) for n in (1, 2)])
        second = await syncer.apply([note(sf(3), "n3@example.org", "N", "3")])
    finally:
        await syncer.close()
    assert kinds(first + second) == ["created"] * 3
    assert [o.uid for o in first + second] == [501, 502, 503]
    assert await uids_allocated(site) >= 503


async def created_jane(site: DrupalSite) -> tuple[Syncer, int]:
    """A syncer, and the user it created for Contact 1 (jane@example.com, Jane Doe)."""
    syncer = await open_syncer(site)
    (created,) = await syncer.apply([note(sf(1), "jane@example.com", "Jane", "Doe")])
    assert created.uid is not None
    return syncer, created.uid


async def test_update_changes_fields_and_invalidates_caches(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer, uid = await created_jane(site)
    # Drupal-side changes sfrelay must keep: a password, an old `changed` (and on Drupal 8+
    # `created`; Drupal 7, without uuids, knows its users beyond the uid by it).
    created = 1 if site.major == 10 else (await base_row(site, uid))["created"]
    await site.execute(
        f"UPDATE {user_table(site)} SET pass = 'hash', changed = 1, created = :c WHERE uid = :u",
        u=uid,
        c=created,
    )
    cache, cid = await add_cache_entry(site, uid)
    tags = {t: await tag(site, t) for t in (f"user:{uid}", "user_list", "4xx-response")}

    n = note(sf(1), "jane.smith@example.com", "Janet", None, minutes=5)
    assert await syncer.apply([n]) == [Outcome(n.id, sf(1), "updated", uid)]
    await syncer.close()

    row = await base_row(site, uid)
    assert (row["mail"], row["pass"], row["created"]) == ("jane.smith@example.com", "hash", created)
    assert abs(row["changed"] - time.time()) < 120
    assert row["name"] == "Jane Doe"  # not renamed by default
    assert await field_values(site, uid) == {
        "field_first_name": "Janet",  # LastName was not in the message: left alone
        "field_last_name": "Doe",
        "field_salesforce_id": sf(1),
    }
    if cache is not None:
        assert await site.rows(f"SELECT cid FROM {cache} WHERE cid = :c", c=cid) == []
    if site.major == 10:
        for name, count in tags.items():
            assert await tag(site, name) == count + 1, name
    assert await uids_with_mail(site, "jane@example.com") == []


async def test_an_unchanged_mail_is_left_as_stored_and_a_changed_one_is_written(
    drupal_site: DrupalSite,
) -> None:
    """An update whose mail equals the stored one writes no mail (most updates); a mail
    changed and changed back in one batch ends as stored; a change of case is a change."""
    site = drupal_site
    syncer, uid = await created_jane(site)
    await site.execute(f"UPDATE {user_table(site)} SET changed = 1 WHERE uid = :u", u=uid)

    away = note(sf(1), "jane.doe@example.org", "Jane", "Doe", minutes=1)
    back = note(sf(1), "jane@example.com", "Janet", "Doe", minutes=2)
    assert kinds(await syncer.apply([away, back])) == ["updated", "updated"]
    row = await base_row(site, uid)
    assert (row["mail"], row["init"]) == ("jane@example.com", "jane@example.com")
    assert abs(row["changed"] - time.time()) < 120  # the save itself is still recorded
    assert (await field_values(site, uid))["field_first_name"] == "Janet"

    case = note(sf(1), "Jane@Example.com", "Janet", "Doe", minutes=3)
    assert kinds(await syncer.apply([case])) == ["updated"]
    await syncer.close()
    assert (await base_row(site, uid))["mail"] == "Jane@Example.com"
    assert await uids_with_mail(site, "jane.doe@example.org") == []


async def test_field_set_to_nil_is_removed(drupal_site: DrupalSite) -> None:
    syncer = await open_syncer(drupal_site)
    (created,) = await syncer.apply([note(sf(1), "jane@example.com", "Jane", "Doe")])
    assert created.uid is not None
    out = await syncer.apply(
        [note(sf(1), "jane@example.com", None, "Doe", minutes=1, FirstName=None)]
    )
    await syncer.close()
    assert kinds(out) == ["updated"]
    assert await field_values(drupal_site, created.uid) == {
        "field_last_name": "Doe",
        "field_salesforce_id": sf(1),
    }


async def test_link_by_email_updates_the_existing_user(drupal_site: DrupalSite) -> None:
    site = drupal_site
    uid = await add_member(site, "member", "member@example.com")  # registered in Drupal
    before = await base_row(site, uid)
    syncer = await open_syncer(site)
    n = note(sf(7), "MEMBER@example.com", "Site", "Member")
    assert await syncer.apply([n]) == [Outcome(n.id, sf(7), "linked", uid)]
    await syncer.close()
    after = await base_row(site, uid)
    assert (after["name"], after["pass"]) == ("member", before["pass"])  # never the password
    assert (after["mail"], after["status"]) == ("MEMBER@example.com", 1)
    assert await field_values(site, uid) == {
        "field_first_name": "Site",
        "field_last_name": "Member",
        "field_salesforce_id": sf(7),
    }
    (state,) = await site.rows("SELECT uid FROM sfrelay_record WHERE sf_id = :s", s=sf(7))
    assert state["uid"] == uid


async def test_without_match_by_email_an_existing_mail_is_a_conflict(
    drupal_site: DrupalSite,
) -> None:
    users = await user_ids(drupal_site)
    syncer = await open_syncer(drupal_site, match_by_email=False)
    n = note(sf(7), "admin@example.com", "Site", "Admin")
    assert await syncer.apply([n]) == [
        Outcome(n.id, sf(7), "conflict_duplicate_email", None, "uid 1")
    ]
    await syncer.close()
    assert await user_ids(drupal_site) == users


async def test_two_records_with_one_email_never_make_two_users(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    a, b = note(sf(1), "pat@example.com", "Pat", "A"), note(sf(2), "PAT@example.com", "Pat", "B")
    out = await syncer.apply([a, b])
    assert kinds(out) == ["created", "conflict_duplicate_email"]
    assert out[1].detail == sf(1) and out[1].uid is None
    # Across batches too, and for an update that would take another record's email.
    c = note(sf(3), "other@example.com", "Oth", "Er")
    out = await syncer.apply([note(sf(2), "pat@example.com", minutes=1), c])
    assert kinds(out) == ["conflict_duplicate_email", "created"]
    d = note(sf(3), "Pat@Example.com", "Oth", "Er", minutes=2)
    (conflict,) = await syncer.apply([d])
    await syncer.close()
    assert (conflict.kind, conflict.detail, conflict.uid) == (
        "conflict_duplicate_email",
        sf(1),
        out[1].uid,
    )
    assert await uids_with_mail(site, "pat@example.com") == [out[1].uid - 1]
    assert await uids_with_mail(site, "other@example.com") == [out[1].uid]


async def test_older_versions_are_stale_whatever_the_order(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    new = note(sf(1), "new@example.com", "New", "Name", minutes=10)
    old = note(sf(1), "old@example.com", "Old", "Name", minutes=5)
    out = await syncer.apply([new, old])
    assert kinds(out) == ["created", "stale"]
    assert kinds(await syncer.apply([old])) == ["stale"]
    # Without SystemModstamp, LastModifiedDate orders the versions.
    lm = note(sf(2), "lm@example.com", "L", "M", LastModifiedDate=None)
    lm.fields["LastModifiedDate"] = lm.fields.pop("SystemModstamp")
    older = note(sf(2), "lm-old@example.com", "L", "M")
    older.fields["LastModifiedDate"] = "2020-01-01T00:00:00.000Z"  # ISO text is accepted
    del older.fields["SystemModstamp"]
    assert kinds(await syncer.apply([lm, older])) == ["created", "stale"]
    await syncer.close()
    uid = out[0].uid
    assert uid is not None
    assert (await base_row(site, uid))["mail"] == "new@example.com"
    assert (await field_values(site, uid))["field_first_name"] == "New"
    assert await uids_with_mail(site, "old@example.com") == []
    assert await uids_with_mail(site, "lm-old@example.com") == []


async def test_a_version_without_a_stamp_keeps_the_one_applied(drupal_site: DrupalSite) -> None:
    """A message without SystemModstamp or LastModifiedDate (the field list is the admin's
    choice) cannot be ordered: it applies, but an older stamped version after it is still
    stale, as it was before it."""
    site = drupal_site
    syncer = await open_syncer(site)
    (made,) = await syncer.apply([note(sf(1), "v10@example.com", "V", "Ten", minutes=10)])
    bare = note(sf(1), "bare@example.com", "V", "Bare")
    del bare.fields["SystemModstamp"]
    older = note(sf(1), "v5@example.com", "V", "Five", minutes=5)
    out = await syncer.apply([bare])
    out += await syncer.apply([older])
    await syncer.close()
    assert kinds(out) == ["updated", "stale"]
    assert made.uid is not None
    assert (await base_row(site, made.uid))["mail"] == "bare@example.com"
    assert (await field_values(site, made.uid))["field_last_name"] == "Bare"


async def test_redelivery_has_no_second_effect(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    batch = [note(sf(1), "a@example.com", "A", "A"), note(sf(2), "b@example.com", "B", "B")]
    assert kinds(await syncer.apply(batch)) == ["created", "created"]
    users = await user_ids(site)
    rows = await base_row(site, users[-1])
    tags = await tag(site, "user_list")
    assert kinds(await syncer.apply(batch)) == ["duplicate", "duplicate"]
    # The same version under another notification id is the same version.
    again = note(sf(1), "a@example.com", "A", "A")
    assert kinds(await syncer.apply([again])) == ["duplicate"]
    await syncer.close()
    assert await user_ids(site) == users
    assert await base_row(site, users[-1]) == rows
    assert await tag(site, "user_list") == tags
    _, entries = await ledger_history(site, sf(1))
    assert [e["o"] for e in entries] == ["created", "duplicate", "duplicate"]


async def test_a_second_change_within_one_second_is_applied(drupal_site: DrupalSite) -> None:
    """Salesforce stamps versions to the second (`.000Z`): two changes within one second
    carry one SystemModstamp. Another notification with that stamp and other values is the
    second change, applied (Salesforce sends in order); with the same values it is the same
    version (`duplicate`)."""
    site = drupal_site
    syncer = await open_syncer(site)
    try:
        out = await syncer.apply([note(sf(1), "a@example.com", "Ann", "First")])
        out += await syncer.apply([note(sf(1), "a@example.com", "Ann", "Second")])
        out += await syncer.apply([note(sf(1), "a@example.com", "Ann", "Second")])
        # Both changes in one message: the later in it wins.
        both = [
            note(sf(2), "b@example.com", "B", "First"),
            note(sf(2), "b2@example.com", "B", "Two"),
        ]
        out += await syncer.apply(both)
        # A deletion within the second of the version applied.
        out += await syncer.apply([note(sf(1), "a@example.com", "Ann", "Second", IsDeleted=True)])
    finally:
        await syncer.close()
    assert kinds(out) == ["created", "updated", "duplicate", "created", "updated", "blocked"]
    first, second = out[0].uid, out[3].uid
    assert first is not None and second is not None
    assert (await field_values(site, first))["field_last_name"] == "Second"
    assert (await base_row(site, first))["status"] == 0
    assert (await field_values(site, second))["field_last_name"] == "Two"
    assert await uids_with_mail(site, "b2@example.com") == [second]
    assert await uids_with_mail(site, "b@example.com") == []


async def test_lead_conversion_keeps_one_account(drupal_site: DrupalSite) -> None:
    site = drupal_site
    lead, contact = sf(5, "00Q"), sf(5)
    syncer = await open_syncer(site)
    (created,) = await syncer.apply([note(lead, "lee@example.com", "Lee", "Lead")])
    uid = created.uid
    assert created.kind == "created" and uid is not None
    converted = note(lead, "lee@example.com", "Lee", "Lead", minutes=1, IsConverted=True)
    converted.fields["ConvertedContactId"] = contact
    assert await syncer.apply([converted]) == [
        Outcome(converted.id, lead, "converted", uid, contact)
    ]
    assert (await field_values(site, uid))["field_salesforce_id"] == contact
    # The Contact's own notification updates that same user; the Lead's later ones do nothing.
    out = await syncer.apply(
        [
            note(contact, "lee@example.com", "Lee", "Contact", minutes=2),
            note(lead, "lee@example.com", "Lee", "Late", minutes=3),
        ]
    )
    await syncer.close()
    assert [(o.kind, o.uid) for o in out] == [("updated", uid), ("stale", uid)]
    assert await uids_with_mail(site, "lee@example.com") == [uid]
    assert (await field_values(site, uid))["field_last_name"] == "Contact"
    states = await site.rows("SELECT sf_id, uid, converted_to FROM sfrelay_record ORDER BY sf_id")
    assert states == [
        {"sf_id": contact, "uid": uid, "converted_to": None},
        {"sf_id": lead, "uid": uid, "converted_to": contact},
    ]


async def test_missing_email_is_skipped(drupal_site: DrupalSite) -> None:
    users = await user_ids(drupal_site)
    syncer = await open_syncer(drupal_site)
    out = await syncer.apply(
        [note(sf(1), None, "No", "Mail"), note(sf(2), "   ", "Blank", "Mail"), note(sf(3))]
    )
    await syncer.close()
    assert kinds(out) == ["skipped_no_email"] * 3
    assert await user_ids(drupal_site) == users
    for n in (1, 2, 3):
        uid, entries = await ledger_history(drupal_site, sf(n))
        assert uid is None
        assert [e["o"] for e in entries] == ["skipped_no_email"]


async def test_invalid_email_is_skipped(drupal_site: DrupalSite) -> None:
    users = await user_ids(drupal_site)
    syncer = await open_syncer(drupal_site)
    bad = ["not-an-email", "a@b@example.com", "two words@example.com", "x@exa mple.com",
           ".dot@example.com", "a..b@example.com", "x@" + "a" * 250 + ".com"]  # fmt: skip
    out = await syncer.apply([note(sf(i), mail) for i, mail in enumerate(bad)])
    await syncer.close()
    assert kinds(out) == ["skipped_invalid_email"] * len(bad)
    assert [o.detail for o in out] == bad
    assert await user_ids(drupal_site) == users


def test_the_readme_names_every_outcome() -> None:
    from app.config import PROJECT_ROOT
    from app.outcomes import OutcomeKind

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What the workers write", 1)[1].split("\n## ", 1)[0]
    assert [k for k in OutcomeKind if f"`{k}`" not in section] == []


@pytest.mark.parametrize(
    ("mail", "first", "last"),
    [("jürgen@müller.de", "Jürgen", "Müller"),
     # Devanagari's vowel signs and virama are combining marks (Mc, Mn)
     ("संपर्क@डाटामेल.भारत", "संपर्क", "डाटा")],
)  # fmt: skip
async def test_an_international_email_where_drupal_takes_it(
    drupal_site: DrupalSite, mail: str, first: str, last: str
) -> None:
    """Drupal 8+ takes addresses in any script (RFC 6531); Drupal 7 only ASCII ones."""
    site = drupal_site
    syncer = await open_syncer(site)
    n = note(sf(1), mail, first, last)
    (out,) = await syncer.apply([n])
    await syncer.close()
    if site.major == 7:
        assert out == Outcome(n.id, sf(1), "skipped_invalid_email", None, mail)
        assert await uids_with_mail(site, mail) == []
    else:
        assert out.kind == "created"
        assert await uids_with_mail(site, mail) == [out.uid]
