"""Deletes, undeletes and merges on real Drupal 10 and Drupal 7 SQLite copies (app/lifecycle.py)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from app.drupal import ledger
from app.drupal.ledger import RecordState
from app.jobs import JobNotification
from app.outcomes import Outcome, OutcomeKind
from app.sync import Syncer
from tests.drupal_rows import (
    add_member,
    base_row,
    field_values,
    give_role,
    note,
    open_syncer,
    sf,
    tag,
    uids_with_mail,
    user_rows,
)
from tests.fixtures_db import DrupalSite
from tests.test_sync_protected import DEFAULT_MAP, admin_role

SITES = pytest.mark.parametrize("drupal_site", ["sqlite-d10", "sqlite-d7"], indirect=True)


def kinds(outcomes: list[Outcome]) -> list[str]:
    return [o.kind.value for o in outcomes]


async def status(site: DrupalSite, uid: int) -> int:
    return int((await base_row(site, uid))["status"])


async def mapping(site: DrupalSite, sf_id: str) -> tuple[int | None, list[str]]:
    rows = await site.rows("SELECT uid, history FROM sfrelay_record WHERE sf_id = :s", s=sf_id)
    if not rows:
        return None, []
    return rows[0]["uid"], [h["o"] for h in orjson.loads(rows[0]["history"])]


async def blocked_rows(site: DrupalSite) -> list[dict[str, object]]:
    return await site.rows("SELECT uid, sf_id FROM sfrelay_block ORDER BY uid")


def converted(lead: str, mail: str, contact: str, minutes: int, **extra: object) -> JobNotification:
    """The Lead's version that says it was converted to `contact`."""
    return note(lead, mail, minutes=minutes, IsConverted=True, ConvertedContactId=contact, **extra)


async def create(syncer: Syncer, site: DrupalSite, n: int, minutes: int = 0) -> int:
    outcomes = await syncer.apply([note(sf(n), f"p{n}@example.org", "P", f"L{n}", minutes=minutes)])
    assert kinds(outcomes) == ["created"]
    (uid,) = await uids_with_mail(site, f"p{n}@example.org")
    return uid


@SITES
async def test_delete_blocks_then_undelete_unblocks(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    try:
        uid = await create(syncer, site, 1)
        before = await tag(site, f"user:{uid}")
        outcomes = await syncer.apply([note(sf(1), "p1@example.org", minutes=5, IsDeleted=True)])
        assert kinds(outcomes) == ["blocked"] and outcomes[0].uid == uid
        assert await status(site, uid) == 0
        if site.major == 10:
            assert await tag(site, f"user:{uid}") == before + 1  # Drupal's cache invalidation
        assert await blocked_rows(site) == [{"uid": uid, "sf_id": sf(1)}]
        # The same deletion again, and an older live version: nothing changes.
        again = await syncer.apply(
            [
                note(sf(1), "p1@example.org", minutes=5, IsDeleted=True),
                note(sf(1), "p1@example.org", minutes=3),
            ]
        )
        assert kinds(again) == ["duplicate", "stale"]
        assert await status(site, uid) == 0
        # Undeleted in Salesforce: a newer live version.
        back = await syncer.apply([note(sf(1), "p1@example.org", "P", "Back", minutes=9)])
        assert kinds(back) == ["unblocked"]
        assert await status(site, uid) == 1
        assert (await field_values(site, uid))["field_last_name"] == "Back"
        assert await blocked_rows(site) == []
        assert (await mapping(site, sf(1)))[1] == [
            "created",
            "blocked",
            "duplicate",
            "stale",
            "updated",
            "unblocked",
        ]
    finally:
        await syncer.close()


@SITES
async def test_a_user_an_administrator_blocked_is_never_unblocked(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    table = "users_field_data" if site.major == 10 else "users"
    try:
        uid = await create(syncer, site, 2)
        await site.execute(f"UPDATE {table} SET status = 0 WHERE uid = :u", u=uid)
        outcomes = await syncer.apply([note(sf(2), "p2@example.org", minutes=5, IsDeleted=True)])
        assert kinds(outcomes) == ["deleted"]
        assert outcomes[0].detail == f"uid {uid} was already blocked (not by sfrelay)"
        back = await syncer.apply([note(sf(2), "p2@example.org", minutes=9)])
        assert kinds(back) == ["updated"]
        assert await status(site, uid) == 0
        assert await blocked_rows(site) == []
    finally:
        await syncer.close()


@SITES
async def test_unlink_and_ignore_leave_the_user(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site, on_delete="unlink")
    try:
        uid = await create(syncer, site, 3)
        outcomes = await syncer.apply([note(sf(3), "p3@example.org", minutes=5, IsDeleted=True)])
        assert kinds(outcomes) == ["unlinked"] and outcomes[0].uid == uid
        assert await status(site, uid) == 1
        assert (await mapping(site, sf(3)))[0] is None
    finally:
        await syncer.close()
    syncer = await open_syncer(site, on_delete="ignore")
    try:
        uid = await create(syncer, site, 4)
        outcomes = await syncer.apply([note(sf(4), "p4@example.org", minutes=5, IsDeleted=True)])
        assert kinds(outcomes) == ["deleted"] and outcomes[0].detail == "SFRELAY_ON_DELETE=ignore"
        assert await status(site, uid) == 1
        assert (await mapping(site, sf(4)))[0] == uid
    finally:
        await syncer.close()


@SITES
async def test_protected_users_are_never_blocked_unlinked_or_handed_over(
    drupal_site: DrupalSite,
) -> None:
    """The planner's guard (uid 0, 1, a protected role) holds for deletions and merges."""
    site = drupal_site
    role = await admin_role(site)
    syncer = await open_syncer(site)
    try:
        # uid 1 mapped by an older sfrelay, and members given the admin role once linked.
        async with site.engine.begin() as conn:
            await ledger.save(conn, [RecordState(sf(5), "Contact", uid=1, dirty=True)])
        boss, lost, kept = [await create(syncer, site, n) for n in (6, 7, 8)]
        survivor = await create(syncer, site, 9)
        for uid in (boss, lost, kept):
            await give_role(site, uid, role)
        before = {uid: await user_rows(site, uid) for uid in (1, boss, lost, kept, survivor)}
        gone = await syncer.apply(
            [
                note(sf(5), "x5@example.org", minutes=5, IsDeleted=True),
                note(sf(6), "p6@example.org", minutes=5, IsDeleted=True),
                note(sf(7), "p7@example.org", minutes=5, IsDeleted=True, MasterRecordId=sf(12)),
                note(sf(8), "p8@example.org", minutes=5, IsDeleted=True, MasterRecordId=sf(9)),
            ]
        )
        has_role = f"has role {role}"
        assert [(o.kind, o.uid, o.detail) for o in gone] == [
            ("conflict_protected_user", 1, "uid 1"),
            ("conflict_protected_user", boss, f"uid {boss} {has_role}"),
            (
                "conflict_protected_user",
                lost,
                f"{sf(7)} merged into {sf(12)}; uid {lost} {has_role}",
            ),
            (
                "conflict_protected_user",
                kept,
                f"{sf(8)} merged into {sf(9)}, which has uid {survivor}; uid {kept} {has_role}",
            ),
        ]
        assert {uid: await user_rows(site, uid) for uid in before} == before
        assert await blocked_rows(site) == []
        assert [(await mapping(site, sf(n)))[0] for n in (5, 6, 7, 8, 9)] == [
            1,
            boss,
            lost,
            kept,
            survivor,
        ]
        assert (await mapping(site, sf(12)))[0] is None
        assert (await mapping(site, sf(6)))[1] == ["created", "conflict_protected_user"]
    finally:
        await syncer.close()
    syncer = await open_syncer(site, on_delete="unlink")
    try:
        out = await syncer.apply([note(sf(6), "p6@example.org", minutes=6, IsDeleted=True)])
        assert [(o.kind, o.uid) for o in out] == [("conflict_protected_user", boss)]
        assert (await mapping(site, sf(6)))[0] == boss
    finally:
        await syncer.close()


@SITES
async def test_a_user_blocked_by_sfrelay_then_protected_stays_blocked(
    drupal_site: DrupalSite,
) -> None:
    site = drupal_site
    role = await admin_role(site)
    syncer = await open_syncer(site)
    try:
        uid = await create(syncer, site, 13)
        out = await syncer.apply([note(sf(13), "p13@example.org", minutes=5, IsDeleted=True)])
        assert kinds(out) == ["blocked"]
        await give_role(site, uid, role)
        before = await user_rows(site, uid)
        back = await syncer.apply([note(sf(13), "p13@example.org", "P", "Back", minutes=9)])
        assert [(o.kind, o.uid) for o in back] == [("conflict_protected_user", uid)]
        assert await status(site, uid) == 0
        assert await user_rows(site, uid) == before
        assert await blocked_rows(site) == [{"uid": uid, "sf_id": sf(13)}]
    finally:
        await syncer.close()


@SITES
async def test_merges_hand_over_or_block_and_name_both_ids(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    try:
        loser_uid = await create(syncer, site, 10)
        # The survivor has no user: the loser's user becomes the survivor's.
        outcomes = await syncer.apply(
            [note(sf(10), "p10@example.org", minutes=5, IsDeleted=True, MasterRecordId=sf(11))]
        )
        assert kinds(outcomes) == ["merged"] and outcomes[0].uid == loser_uid
        assert (
            outcomes[0].detail == f"{sf(10)} merged into {sf(11)}: its user now belongs to {sf(11)}"
        )
        assert await status(site, loser_uid) == 1
        assert (await mapping(site, sf(11)))[0] == loser_uid
        assert (await mapping(site, sf(10)))[0] is None
        assert (await field_values(site, loser_uid))["field_salesforce_id"] == sf(11)
        # The survivor's next version updates that user.
        survivor = await syncer.apply([note(sf(11), "p10@example.org", "P", "Kept", minutes=6)])
        assert kinds(survivor) == ["updated"] and survivor[0].uid == loser_uid
        # Both have users: the loser's is blocked and the outcome names both Ids.
        a, b = await create(syncer, site, 20), await create(syncer, site, 21)
        both = await syncer.apply(
            [note(sf(20), "p20@example.org", minutes=5, IsDeleted=True, MasterRecordId=sf(21))]
        )
        assert kinds(both) == ["blocked"] and both[0].uid == a
        assert both[0].detail == f"{sf(20)} merged into {sf(21)}, which has uid {b}"
        assert (await status(site, a), await status(site, b)) == (0, 1)
    finally:
        await syncer.close()


@SITES
async def test_a_deleted_record_without_a_user_writes_nothing(drupal_site: DrupalSite) -> None:
    site = drupal_site
    syncer = await open_syncer(site)
    try:
        users_before = await site.rows(
            "SELECT count(*) AS n FROM " + ("users_field_data" if site.major == 10 else "users")
        )
        outcomes = await syncer.apply([note(sf(30), "p30@example.org", minutes=5, IsDeleted=True)])
        assert (
            kinds(outcomes) == ["deleted"] and outcomes[0].detail == "the record has no Drupal user"
        )
        users_after = await site.rows(
            "SELECT count(*) AS n FROM " + ("users_field_data" if site.major == 10 else "users")
        )
        assert users_after == users_before
        assert await blocked_rows(site) == []
        assert OutcomeKind.DELETED == "deleted"
    finally:
        await syncer.close()


@pytest.mark.parametrize("drupal_site", ["sqlite-d10", "pg-d10", "mariadb-d10"], indirect=True)
async def test_a_version_1_ledger_upgrades_in_order(drupal_site: DrupalSite) -> None:
    """A database an earlier sfrelay migrated (version 1: records without digests, dead
    letters) gains sfrelay_cursor, sfrelay_block and the digest and user_created columns; its
    rows stay, a version applied before digests keeps the rule of then (its stamp again is
    `duplicate`), and a user mapped before user_created is still the record's (then noted)."""
    site = drupal_site
    syncer = await open_syncer(site)
    (made,) = await syncer.apply([note(sf(40), "p40@example.org", "P", "Old")])
    await syncer.close()
    async with site.engine.begin() as conn:  # back to what version 1 made
        for table in ("sfrelay_cursor", "sfrelay_block"):
            await conn.execute(text(f"DROP TABLE {table}"))
        for column in ("digest", "user_key"):
            await conn.execute(text(f"ALTER TABLE sfrelay_record DROP COLUMN {column}"))
        await conn.execute(text("UPDATE sfrelay_schema SET version = 1"))
    tables = "SELECT count(*) AS n FROM sfrelay_cursor UNION ALL SELECT count(*) FROM sfrelay_block"
    with pytest.raises(Exception, match="sfrelay_cursor"):
        await site.rows(tables)
    assert await ledger.migrate(site.engine) == len(ledger.MIGRATIONS) == 4
    assert await site.rows("SELECT id, version FROM sfrelay_schema") == [{"id": 1, "version": 4}]
    assert [r["n"] for r in await site.rows(tables)] == [0, 0]
    assert await site.rows("SELECT uid, digest, user_key FROM sfrelay_record") == [
        {"uid": made.uid, "digest": None, "user_key": None}
    ]
    syncer = await open_syncer(site)
    try:
        again = await syncer.apply([note(sf(40), "p40@example.org", "P", "Other")])
        later = await syncer.apply([note(sf(40), "p40@example.org", "P", "New", minutes=1)])
    finally:
        await syncer.close()
    assert kinds(again + later) == ["duplicate", "updated"]
    assert made.uid is not None
    assert (await field_values(site, made.uid))["field_last_name"] == "New"
    (row,) = await site.rows("SELECT digest, user_key FROM sfrelay_record")
    assert row["digest"] is not None
    (user,) = await site.rows("SELECT uuid FROM users WHERE uid = :u", u=made.uid)
    assert row["user_key"] == user["uuid"]


@SITES
async def test_a_converted_leads_deletion_or_merge_leaves_the_contacts_user(
    drupal_site: DrupalSite,
) -> None:
    """The user went to the Contact at the conversion: the Lead's later deletion (or a merge
    naming it the loser) neither blocks it nor hands it to a third record."""
    site = drupal_site
    lead, contact, other = sf(5, "00Q"), sf(5), sf(6)
    syncer = await open_syncer(site)
    try:
        (created,) = await syncer.apply([note(lead, "lee@example.org", "Lee", "Lead")])
        uid = created.uid
        conversion = converted(lead, "lee@example.org", contact, 1)
        assert kinds(await syncer.apply([conversion])) == ["converted"]
        assert kinds(
            await syncer.apply([note(contact, "lee@example.org", "Lee", "Contact", minutes=2)])
        ) == ["updated"]
        before = await user_rows(site, uid)
        gone = converted(lead, "lee@example.org", contact, 3, IsDeleted=True)
        merged = note(lead, "lee@example.org", minutes=4, IsDeleted=True, MasterRecordId=other)
        out = await syncer.apply([gone])
        out += await syncer.apply([merged])
        why = f"the Lead was converted to {contact}, whose user it is"
        assert [(o.kind, o.uid, o.detail) for o in out] == [("deleted", None, why)] * 2
        assert await user_rows(site, uid) == before
        assert await status(site, uid) == 1
        assert await blocked_rows(site) == []
        assert (await mapping(site, contact))[0] == uid
        assert (await mapping(site, other))[0] is None
        # The Contact's own versions still apply to its user.
        again = await syncer.apply([note(contact, "lee@example.org", "Lee", "Again", minutes=5)])
        assert kinds(again) == ["updated"] and again[0].uid == uid
        assert (await field_values(site, uid))["field_last_name"] == "Again"
    finally:
        await syncer.close()


STATUS_MAP = DEFAULT_MAP.replace('mail = "Email"', 'mail = "Email"\nstatus = "Active__c"')


@SITES
async def test_a_mapped_status_never_lifts_a_block_made_in_drupal(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """With `status` mapped, Salesforce blocks and unblocks its users, but a user an
    administrator blocked in Drupal (a banned spammer whose email a Lead carries, or a synced
    user banned since) stays blocked whatever the record says."""
    site = drupal_site
    table = "users_field_data" if site.major == 10 else "users"
    banned = await add_member(site, "spammer", "spam@example.org", login=1_700_000_000)
    await site.execute(f"UPDATE {table} SET status = 0 WHERE uid = :u", u=banned)
    syncer = await open_syncer(site, STATUS_MAP, tmp_path)
    stays = "status stays 0: the user was blocked in Drupal, not by sfrelay"
    try:
        # A Lead carrying the banned user's email, active: linked, still blocked.
        out = await syncer.apply([note(sf(1, "00Q"), "spam@example.org", "S", "P", Active__c=True)])
        assert [(o.kind, o.uid, o.detail) for o in out] == [("linked", banned, stays)]
        assert await status(site, banned) == 0
        # Inactive then active again in Salesforce: the block is still not sfrelay's to lift.
        out = await syncer.apply(
            [note(sf(1, "00Q"), "spam@example.org", minutes=1, Active__c=False)]
        )
        out += await syncer.apply(
            [note(sf(1, "00Q"), "spam@example.org", minutes=2, Active__c=True)]
        )
        assert [(o.kind, o.detail) for o in out] == [("updated", None), ("updated", stays)]
        assert await status(site, banned) == 0
        # sfrelay's own: created inactive, then active: Salesforce lifts its own block.
        (made,) = await syncer.apply([note(sf(2), "kim@example.org", "K", "Im", Active__c=False)])
        uid = made.uid
        assert made.kind == "created" and await status(site, uid) == 0
        assert await blocked_rows(site) == [{"uid": uid, "sf_id": sf(2)}]
        out = await syncer.apply([note(sf(2), "kim@example.org", minutes=1, Active__c=True)])
        assert [(o.kind, o.detail) for o in out] == [("updated", None)]
        assert await status(site, uid) == 1 and await blocked_rows(site) == []
        # ... until an administrator bans it in Drupal: then it stays banned.
        await site.execute(f"UPDATE {table} SET status = 0 WHERE uid = :u", u=uid)
        out = await syncer.apply([note(sf(2), "kim@example.org", minutes=2, Active__c=True)])
        assert [(o.kind, o.uid, o.detail) for o in out] == [("updated", uid, stays)]
        assert await status(site, uid) == 0
        assert await blocked_rows(site) == []
    finally:
        await syncer.close()


@SITES
@pytest.mark.parametrize("path", ["converted", "merged", "unlinked", "lifted in Drupal"])
async def test_a_mapped_status_lifts_sfrelays_block_whichever_record_it_was_for(
    drupal_site: DrupalSite, tmp_path: Path, path: str
) -> None:
    """A user sfrelay created (or blocked) inactive, then the user's record changes (a Lead
    converted, a merge's loser handing over, a record unlinked then linked again): the active
    record lifts sfrelay's block. A block lifted in Drupal meanwhile is no longer sfrelay's:
    an administrator's later one stays."""
    site = drupal_site
    table = "users_field_data" if site.major == 10 else "users"
    first = sf(5, "00Q") if path == "converted" else sf(5)
    then = {"converted": sf(5), "merged": sf(6)}.get(path, first)
    on_delete = "unlink" if path == "unlinked" else "block"
    syncer = await open_syncer(site, STATUS_MAP, tmp_path, on_delete=on_delete)
    try:
        (made,) = await syncer.apply([note(first, "lee@example.org", "L", "E", Active__c=False)])
        uid = made.uid
        assert uid is not None and await status(site, uid) == 0
        if path == "converted":
            changes = [converted(first, "lee@example.org", then, 1)]
        elif path == "merged":
            changes = [
                note(first, "lee@example.org", minutes=1, IsDeleted=True, MasterRecordId=then)
            ]
        elif path == "unlinked":
            changes = [note(first, "lee@example.org", minutes=1, IsDeleted=True)]
        else:  # an administrator unblocks it, then blocks it again
            await site.execute(f"UPDATE {table} SET status = 1 WHERE uid = :u", u=uid)
            changes = [note(first, "lee@example.org", minutes=1, Active__c=True)]
            assert [o.kind for o in await syncer.apply(changes)] == ["updated"]
            await site.execute(f"UPDATE {table} SET status = 0 WHERE uid = :u", u=uid)
            changes = []
        expected = {"converted": ["converted"], "merged": ["merged"], "unlinked": ["unlinked"]}
        assert [o.kind for o in await syncer.apply(changes)] == expected.get(path, [])
        live = note(then, "lee@example.org", "L", "Ee", minutes=2, Active__c=True)
        (out,) = await syncer.apply([live])
        if path == "lifted in Drupal":
            stays = "status stays 0: the user was blocked in Drupal, not by sfrelay"
            assert (out.kind, out.uid, out.detail) == ("updated", uid, stays)
            assert await status(site, uid) == 0
        else:
            assert (out.kind, out.uid, out.detail) == (
                "linked" if path == "unlinked" else "updated",
                uid,
                None,
            )
            assert await status(site, uid) == 1
        assert await blocked_rows(site) == []
    finally:
        await syncer.close()


@SITES
@pytest.mark.parametrize("conversion_seen", [False, True], ids=["unseen", "same batch"])
async def test_a_converted_lead_deleted_before_its_conversion_was_applied_converts(
    drupal_site: DrupalSite, conversion_seen: bool
) -> None:
    """A clean-up of converted Leads deletes them; reconcile reads the deletion with
    IsConverted and ConvertedContactId. When sfrelay has not applied the conversion (never
    saw it, or it is in the same batch, where deletions are decided first), the deletion
    hands the user to the Contact instead of blocking it."""
    site = drupal_site
    lead, contact = sf(7, "00Q"), sf(7)
    syncer = await open_syncer(site)
    try:
        (made,) = await syncer.apply([note(lead, "kai@example.org", "Kai", "Lead")])
        uid = made.uid
        conversion = converted(lead, "kai@example.org", contact, 1)
        gone = converted(lead, "kai@example.org", contact, 2, IsDeleted=True)
        out = await syncer.apply([conversion, gone] if conversion_seen else [gone])
        assert kinds(out) == (["stale", "converted"] if conversion_seen else ["converted"])
        assert out[-1].uid == uid and out[-1].detail == contact
        assert await status(site, uid) == 1
        assert await blocked_rows(site) == []
        assert (await mapping(site, contact))[0] == uid
        (again,) = await syncer.apply(
            [note(contact, "kai@example.org", "Kai", "Contact", minutes=3)]
        )
        assert (again.kind, again.uid) == ("updated", uid)
    finally:
        await syncer.close()


@SITES
async def test_a_user_created_blocked_replaces_a_block_row_left_for_its_uid(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """A uid given again (a restored database, MySQL < 8 after the last user was deleted)
    may still have sfrelay's old block row: the new user's replaces it."""
    site = drupal_site
    syncer = await open_syncer(site, STATUS_MAP, tmp_path)  # creates sfrelay_block
    try:
        (top,) = await site.rows("SELECT MAX(uid) AS uid FROM users")
        uid = int(top["uid"]) + 1
        await site.execute(
            "INSERT INTO sfrelay_block (uid, sf_id, blocked_at) VALUES (:u, :s, 0)", u=uid, s=sf(99)
        )
        (made,) = await syncer.apply([note(sf(1), "new@example.org", "N", "Ew", Active__c=False)])
        assert (made.kind, made.uid) == ("created", uid)
        assert await blocked_rows(site) == [{"uid": uid, "sf_id": sf(1)}]
    finally:
        await syncer.close()
