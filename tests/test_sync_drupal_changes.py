"""What Drupal's administrators do while sfrelay runs, on every backend: users deleted in
Drupal (and their uid given again to someone else), user fields and roles deleted, a field's
allowed values changed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from app import sync, why
from app.config import Settings
from app.errors import ConfigError, SiteChanged
from app.outcomes import Outcome
from app.sync import Syncer
from tests.drupal_fields import TypedField, add_field, redefine_field, stored
from tests.drupal_rows import (
    add_member,
    add_role,
    base_row,
    delete_role,
    delete_user,
    field_values,
    ledger_history,
    open_syncer,
    roles,
    user_ids,
    user_rows,
)
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite
from tests.servers import RedisServer
from tests.test_sync_protected import DEFAULT_MAP

MEMBER_MAP = DEFAULT_MAP.replace("roles = []", 'roles = ["member"]')


async def create(syncer: Syncer, n: int, minutes: int = 0) -> int:
    """Contact `n` synced: its new user's uid."""
    (out,) = await syncer.apply([note(sf(n), f"p{n}@example.org", "P", f"L{n}", minutes=minutes)])
    assert out.kind == "created" and out.uid is not None
    return out.uid


async def uid_given_again(site: DrupalSite, syncer: Syncer) -> int:
    """Contact 1 synced, its user deleted in Drupal, and its uid given to a newcomer (as MySQL
    before 8.0 does after a restart): that uid."""
    old = await create(syncer, 1)
    await delete_user(site, old)
    assert await add_member(site, "newcomer", "newcomer@example.org", uid=old) == old
    return old


async def test_a_user_deleted_in_drupal_comes_back_as_a_new_user_saying_why(
    drupal_site: DrupalSite,
) -> None:
    """Salesforce is the master: the record's next version makes it a user again (not an
    UPDATE of rows that are gone), and its outcome says the old one was deleted in Drupal."""
    site = drupal_site
    syncer = await open_syncer(site)
    old = await create(syncer, 1)
    await delete_user(site, old)
    before = await user_ids(site)
    n = note(sf(1), "p1@example.org", "P", "New", minutes=1)
    out = await syncer.apply([n])
    await syncer.close()
    new = old + 1  # the uid is not given again (Drupal's own counters)
    assert out == [Outcome(n.id, sf(1), "created", new, f"uid {old} was deleted in Drupal")]
    assert await user_ids(site) == [*before, new]
    assert await user_rows(site, old) == await user_rows(site, -1)  # nothing left for it
    assert await field_values(site, new) == {
        "field_first_name": "P",
        "field_last_name": "New",
        "field_salesforce_id": sf(1),
    }
    uid, entries = await ledger_history(site, sf(1))
    assert uid == new
    assert [(e["o"], e["uid"], e.get("d")) for e in entries] == [
        ("created", old, None),
        ("created", new, f"uid {old} was deleted in Drupal"),
    ]


async def test_a_uid_drupal_gives_again_never_hands_its_new_owner_to_the_record(
    drupal_site: DrupalSite,
) -> None:
    """MySQL before 8.0 forgets its AUTO_INCREMENT at a restart: a user deleted in Drupal can
    leave its uid to the next person who registers. The record's next version must not write
    that person's account (its mail: the password-reset address)."""
    site = drupal_site
    syncer = await open_syncer(site)
    old = member = await uid_given_again(site, syncer)
    theirs = await user_rows(site, member)
    n = note(sf(1), "p1@example.org", "P", "Again", minutes=1)
    out = await syncer.apply([n])
    await syncer.close()
    why = f"uid {old} was deleted in Drupal (uid {old} is another user now)"
    assert out == [Outcome(n.id, sf(1), "created", old + 1, why)]
    assert await user_rows(site, member) == theirs
    assert (await base_row(site, old + 1))["mail"] == "p1@example.org"
    assert (await ledger_history(site, sf(1)))[0] == old + 1


async def test_a_user_whose_record_lost_its_user_in_drupal_links_to_another_record(
    drupal_site: DrupalSite,
) -> None:
    """The uid given again belongs to its new owner, not to the record whose user was
    deleted: another record with that person's email links it (not a conflict naming the
    record of the deleted user)."""
    site = drupal_site
    syncer = await open_syncer(site)
    member = await uid_given_again(site, syncer)
    n = note(sf(2), "newcomer@example.org", "New", "Comer", minutes=1)
    out = await syncer.apply([n])
    await syncer.close()
    assert out == [Outcome(n.id, sf(2), "linked", member)]
    assert (await ledger_history(site, sf(2)))[0] == member


async def test_a_salesforce_deletion_never_blocks_the_new_owner_of_a_uid_given_again(
    drupal_site: DrupalSite,
) -> None:
    """SFRELAY_ON_DELETE=block blocks the record's user: not the person who got its uid after
    the record's user was deleted in Drupal."""
    site = drupal_site
    syncer = await open_syncer(site)
    old = member = await uid_given_again(site, syncer)
    theirs = await user_rows(site, member)
    n = note(sf(1), "p1@example.org", minutes=1, IsDeleted=True)
    out = await syncer.apply([n])
    await syncer.close()
    why = f"the record has no Drupal user; uid {old} was deleted in Drupal"
    assert out == [Outcome(n.id, sf(1), "deleted", None, f"{why} (uid {old} is another user now)")]
    assert await user_rows(site, member) == theirs
    assert await site.rows("SELECT uid FROM sfrelay_block") == []
    assert (await ledger_history(site, sf(1)))[0] is None


async def delete_field(site: DrupalSite, name: str) -> None:
    """Delete a user field as Drupal does: its definition gone, its tables kept aside for
    purging (Drupal 8+ field_deleted_data_<hash>; Drupal 7 field_deleted_*_<id>)."""
    if site.major == 10:
        await site.execute(
            "DELETE FROM config WHERE collection = '' AND name IN (:storage, :field)",
            storage=f"field.storage.user.{name}",
            field=f"field.field.user.user.{name}",
        )
        await site.execute(f"ALTER TABLE user__{name} RENAME TO field_deleted_data_5e1f0a3b9c")
        return
    for table in ("field_config", "field_config_instance"):
        await site.execute(f"UPDATE {table} SET deleted = 1 WHERE field_name = :n", n=name)
    for kind in ("data", "revision"):
        await site.execute(f"ALTER TABLE field_{kind}_{name} RENAME TO field_deleted_{kind}_9")


async def test_a_field_deleted_in_drupal_stops_the_worker_never_failing_its_records(
    drupal_site: DrupalSite,
) -> None:
    """A mapped field deleted while the worker runs: every record would fail alike (dead
    letters for all, at once on SQLite, after the retries elsewhere). The batch raises
    SiteChanged (the worker stops, its jobs wait) with what a restart would say, and writes
    nothing, not even the records' history."""
    site = drupal_site
    syncer = await open_syncer(site)
    uid = await create(syncer, 1)
    before = (await user_ids(site), await base_row(site, uid), await ledger_history(site, sf(1)))
    await delete_field(site, "field_first_name")
    batch = [
        note(sf(1), "p1@example.org", "P", "Changed", minutes=1),
        note(sf(2), "p2@example.org", "Q", "New"),
    ]
    gone = "the user field 'field_first_name' does not exist on this Drupal site"
    with pytest.raises(
        SiteChanged, match=f"^the Drupal site changed while the worker ran: field map: {gone}"
    ):
        await syncer.apply(batch)
    await syncer.close()
    assert (
        await user_ids(site),
        await base_row(site, uid),
        await ledger_history(site, sf(1)),
    ) == before
    assert await site.rows("SELECT sf_id FROM sfrelay_record WHERE sf_id = :s", s=sf(2)) == []
    with pytest.raises(ConfigError, match=f"^field map: {gone}"):
        await open_syncer(site)  # a restarted worker: refused, saying what to do


async def test_a_role_the_field_map_grants_deleted_in_drupal_stops_the_worker(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """A role the field map grants, deleted in Drupal while the worker runs: granted still, it
    would be a grant of a role the site no longer has (Drupal 8+ keeps returning it, and
    gives it whatever a role made later under that name may do). SiteChanged, as a field
    deleted: nothing written; a restart refuses the field map."""
    site = drupal_site
    await add_role(site, "member", permissions=("access content",))
    syncer = await open_syncer(site, MEMBER_MAP, tmp_path)
    uid = await create(syncer, 1)
    assert await roles(site, uid) == ["member"]
    await delete_role(site, "member")
    before = await user_ids(site)
    gone = "field map [Contact]: role 'member' does not exist on this Drupal site"
    changed = f"the Drupal site changed while the worker ran: {gone}"
    with pytest.raises(SiteChanged, match=f"^{re.escape(changed)}"):
        await syncer.apply([note(sf(2), "p2@example.org", "Q", "New")])
    await syncer.close()
    assert await user_ids(site) == before
    assert await site.rows("SELECT sf_id FROM sfrelay_record WHERE sf_id = :s", s=sf(2)) == []
    with pytest.raises(ConfigError, match=f"^{re.escape(gone)}"):
        await open_syncer(site, MEMBER_MAP, tmp_path)


async def test_a_role_made_again_in_drupal_is_granted_as_the_site_has_it_now(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """The role deleted and made again under its name while the worker runs (Drupal 7: a new
    rid; the old one here another role's, "editor"): new users get it as the site numbers it
    now, never by its old id (which granted "editor")."""
    site = drupal_site
    await add_role(site, "member", permissions=("access content",))
    syncer = await open_syncer(site, MEMBER_MAP, tmp_path)
    await create(syncer, 1)
    await delete_role(site, "member")
    await add_role(site, "editor", permissions=("access content",))
    await add_role(site, "member", permissions=("access content",))
    uid = await create(syncer, 2)
    await syncer.close()
    assert await roles(site, uid) == ["member"]


async def test_an_allowed_value_added_in_drupal_is_written_without_a_restart(
    drupal_site: DrupalSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new picklist value in Salesforce, added to the list field's allowed values in Drupal
    while the worker runs: refused before (the version applied, the value lost until the
    record changed again), written once the worker read the field again (SITE_REFRESH_S)."""
    site = drupal_site
    # Drupal 8+: a list of value and label; Drupal 7: value -> label.
    allowed: Any = [{"value": "gold", "label": "Gold"}]
    more: Any = [*allowed, {"value": "platinum", "label": "Platinum"}]
    kind = "list_string"
    if site.major == 7:
        kind, allowed, more = "list_text", {"gold": "Gold"}, {"gold": "Gold", "platinum": "P"}
    level = TypedField("field_level", kind, {"value": "varchar(255)"}, {"allowed_values": allowed})
    await add_field(site, level)
    mapped = DEFAULT_MAP.replace(
        'field_salesforce_id = "Id"', 'field_salesforce_id = "Id"\nfield_level = "Level__c"'
    )
    syncer = await open_syncer(site, mapped, tmp_path)
    (first,) = await syncer.apply([note(sf(1), "p1@example.org", "P", "L1", Level__c="platinum")])
    refused = (
        "field_level not written (Level__c: 'platinum' is not one of the field's allowed values)"
    )
    assert (first.kind, first.detail) == ("created", refused)
    level.settings["allowed_values"] = more
    await redefine_field(site, level)
    monkeypatch.setattr(sync, "SITE_REFRESH_S", 0.0, raising=False)
    n = note(sf(1), "p1@example.org", "P", "L1", minutes=1, Level__c="platinum")
    out = await syncer.apply([n])
    await syncer.close()
    assert out == [Outcome(n.id, sf(1), "updated", first.uid)]
    assert await stored(site, "field_level", first.uid or 0) == {"value": "platinum"}


async def test_why_says_a_mapped_uid_is_another_users_now(
    drupal_site: DrupalSite, redis_server: RedisServer
) -> None:
    """Until the record's next version forgets it, the ledger still names the uid: `sfrelay
    why` says the record's user was deleted and its uid given again, and the newcomer's email
    lists no record of its own."""
    site = drupal_site
    syncer = await open_syncer(site)
    old = await uid_given_again(site, syncer)
    second = await create(syncer, 2)
    await syncer.close()
    await delete_user(site, second)
    settings = Settings(_env_file=None, database_url=site.url, redis_url=redis_server.url)
    given_again = await why.answer(settings, why.parse_query(sf(1)))
    assert why.render(given_again)[0] == (
        f"Contact {sf(1)} -> Drupal user {old} (deleted in Drupal since; that uid is another "
        "user's now)"
    )
    assert given_again.records[0]["drupal_user_exists"] is False
    assert given_again.records[0]["drupal_uid_given_again"] is True
    deleted = await why.answer(settings, why.parse_query(sf(2)))
    assert why.render(deleted)[0] == (
        f"Contact {sf(2)} -> Drupal user {second} (deleted in Drupal since)"
    )
    assert deleted.records[0]["drupal_uid_given_again"] is False
    newcomer = await why.answer(settings, why.parse_query("newcomer@example.org"))
    assert newcomer.users == [{"uid": old, "records": []}]
    assert newcomer.records == []
