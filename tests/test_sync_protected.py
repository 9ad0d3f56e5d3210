"""Salesforce never gains power over a privileged Drupal account (issue 6, section 2).

The admin-takeover sequence on every backend: a Contact carrying an administrator's email,
then that Contact's Email edited. uid 0 and 1 and holders of a protected role are never
linked, updated, blocked or unblocked: `conflict_protected_user`, and their rows stay exactly
as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.drupal import ledger
from app.drupal.ledger import RecordState
from app.errors import ConfigError
from app.sync import Outcome
from tests.drupal_rows import (
    add_member,
    add_role,
    field_values,
    give_role,
    grant_permissions,
    ledger_history,
    open_syncer,
    user_ids,
    user_rows,
)
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite

DEFAULT_MAP = (Path(__file__).parent.parent / "app" / "fieldmap.default.toml").read_text()
# The default map, plus what could block, unblock or rename a user.
BLOCKING_MAP = DEFAULT_MAP.replace("update = false", "update = true").replace(
    'mail = "Email"', 'mail = "Email"\nstatus = "Active__c"'
)


async def admin_role(site: DrupalSite) -> str:
    """The site's administrator role (the minimal profile has none: made as the UI would)."""
    if site.major == 10:
        found = await site.rows(
            "SELECT name FROM config WHERE collection = '' AND name = 'user.role.administrator'"
        )
        if not found:
            await add_role(site, "administrator", is_admin=True)
    return "administrator"


async def test_admin_takeover_sequence(drupal_site: DrupalSite, tmp_path: Path) -> None:
    site = drupal_site
    admin = await user_rows(site, 1)
    anonymous = await user_rows(site, 0)
    users = await user_ids(site)
    syncer = await open_syncer(site, BLOCKING_MAP, tmp_path)
    # 1. A Contact with the administrator's email (any case): never linked.
    n = note(sf(7), "ADMIN@example.com", "Eve", "Attacker")
    assert await syncer.apply([n]) == [
        Outcome(n.id, sf(7), "conflict_protected_user", None, "uid 1")
    ]
    assert await user_rows(site, 1) == admin
    assert await user_ids(site) == users
    uid, entries = await ledger_history(site, sf(7))
    assert uid is None
    assert [(e["o"], e["d"]) for e in entries] == [("conflict_protected_user", "uid 1")]
    # 2. Its Email edited: a new user of its own; uid 1's mail, name and fields untouched.
    edit = note(sf(7), "eve@evil.example", "Eve", "Attacker", minutes=1)
    (created,) = await syncer.apply([edit])
    assert created.kind == "created" and created.uid not in (0, 1)
    assert await user_rows(site, 1) == admin
    # 3. A mapping to uid 1 left by an older sfrelay: its updates are refused as well.
    async with site.engine.begin() as conn:
        await ledger.save(conn, [RecordState(sf(8), "Contact", uid=1, dirty=True)])
    take = note(sf(8), "eve@evil.example", "Eve", "Attacker", Active__c=False)
    again = note(sf(8), "owned@evil.example", "Eve", "Owner", minutes=1)
    out = await syncer.apply([take, again])
    await syncer.close()
    assert [(o.kind, o.uid, o.detail) for o in out] == [
        ("conflict_protected_user", 1, "uid 1"),
        ("conflict_protected_user", 1, "uid 1"),
    ]
    assert await user_rows(site, 1) == admin
    assert await user_rows(site, 0) == anonymous
    assert await user_ids(site) == [*users, created.uid]
    uid, entries = await ledger_history(site, sf(8))
    assert uid == 1
    assert [(e["o"], e["uid"], e["d"]) for e in entries] == [
        ("conflict_protected_user", 1, "uid 1")
    ] * 2


async def test_admin_role_and_administer_users_holders_are_never_linked(
    drupal_site: DrupalSite,
) -> None:
    site = drupal_site
    role = await admin_role(site)
    await add_role(site, "user_manager", permissions=("access content", "administer users"))
    await add_role(site, "permission_keeper", permissions=("administer permissions",))
    await add_role(site, "editor", permissions=("access content",))
    boss = await add_member(site, "boss", "boss@example.com", roles=(role,))
    manager = await add_member(site, "manager", "manager@example.com", roles=("user_manager",))
    keeper = await add_member(site, "keeper", "keeper@example.com", roles=("permission_keeper",))
    both = await add_member(site, "both", "both@example.com", roles=("editor", "user_manager"))
    plain = await add_member(site, "plain", "plain@example.com", roles=("editor",))
    protected = [boss, manager, keeper, both]
    before = {uid: await user_rows(site, uid) for uid in protected}
    syncer = await open_syncer(site)
    batch = [
        note(sf(1), "Boss@example.com", "B", "Oss"),
        note(sf(2), "manager@example.com", "M", "Anager", Active__c=False),
        note(sf(3), "keeper@example.com", "K", "Eeper"),
        note(sf(4), "both@example.com", "B", "Oth"),
        note(sf(5), "plain@example.com", "P", "Lain"),
    ]
    out = await syncer.apply(batch)
    assert [(o.kind, o.uid, o.detail) for o in out] == [
        ("conflict_protected_user", None, f"uid {boss} has role {role}"),
        ("conflict_protected_user", None, f"uid {manager} has role user_manager"),
        ("conflict_protected_user", None, f"uid {keeper} has role permission_keeper"),
        ("conflict_protected_user", None, f"uid {both} has role user_manager"),
        ("linked", plain, None),
    ]
    # The Contacts' Email edited: each gets a user of its own; the protected ones stay as is.
    edits = [note(sf(i), f"new{i}@example.com", minutes=1) for i in range(1, 5)]
    assert [o.kind for o in await syncer.apply(edits)] == ["created"] * 4
    await syncer.close()
    for uid in protected:
        assert await user_rows(site, uid) == before[uid], uid


# A staff permission of any module (Drupal marks most "restrict access"), and what is not one.
STAFF_PERMISSIONS = [
    "administer modules",
    "administer site configuration",
    "administer url aliases",  # the standard profile's content_editor
    "bypass node access",
    "edit any article content",
    "delete any page content",
    "access administration pages",
    "use text format full_html",
    "import configuration",
]


async def test_holders_of_any_staff_permission_are_never_linked_or_re_mailed(
    drupal_site: DrupalSite,
) -> None:
    """A sales rep who edits a Contact's Email to a staff member's must not get the account
    (its password-reset mail): not only administer users / permissions protect."""
    site = drupal_site
    staff: list[int] = []
    for i, permission in enumerate(STAFF_PERMISSIONS):
        await add_role(site, f"staff{i}", permissions=("access content", permission))
        staff.append(
            await add_member(site, f"staff{i}", f"staff{i}@example.com", roles=(f"staff{i}",))
        )
    await add_role(
        site, "member", permissions=("access content", "post comments", "edit own comments")
    )
    member = await add_member(site, "member", "member@example.com", roles=("member",))
    before = {uid: await user_rows(site, uid) for uid in staff}
    syncer = await open_syncer(site)
    batch = [note(sf(i + 1), f"staff{i}@example.com", "Eve", "Rep") for i in range(len(staff))]
    out = await syncer.apply([*batch, note(sf(99), "member@example.com", "M", "Ember")])
    assert [(o.kind, o.uid, o.detail) for o in out] == [
        *(
            ("conflict_protected_user", None, f"uid {uid} has role staff{i}")
            for i, uid in enumerate(staff)
        ),
        ("linked", member, None),
    ]
    # The Contacts' Email then edited to the attacker's: new users, the staff rows untouched.
    edits = [note(sf(i + 1), f"eve{i}@evil.example", minutes=1) for i in range(len(staff))]
    assert [o.kind for o in await syncer.apply(edits)] == ["created"] * len(staff)
    await syncer.close()
    for uid in staff:
        assert await user_rows(site, uid) == before[uid], uid


async def test_a_role_made_protected_after_linking_takes_effect_at_the_next_notification(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    site = drupal_site
    role = await admin_role(site)
    await add_role(site, "editor", permissions=("access content",))
    promoted = await add_member(site, "promoted", "promoted@example.com")
    editor = await add_member(site, "editor", "editor@example.com", roles=("editor",))
    syncer = await open_syncer(site, BLOCKING_MAP, tmp_path)  # one worker, never restarted
    out = await syncer.apply(
        [note(sf(1), "promoted@example.com", "Pro"), note(sf(2), "editor@example.com", "Ed")]
    )
    assert [(o.kind, o.uid) for o in out] == [("linked", promoted), ("linked", editor)]
    # In Drupal: one user gets the administrator role, the other's role gets a permission.
    await give_role(site, promoted, role)
    await grant_permissions(site, "editor", ("administer users",))
    before = {uid: await user_rows(site, uid) for uid in (promoted, editor)}
    out = await syncer.apply(
        [
            note(sf(1), "attacker@evil.example", "Pro", minutes=1, Active__c=False),
            note(sf(2), "attacker2@evil.example", "Ed", minutes=1),
        ]
    )
    await syncer.close()
    assert [(o.kind, o.uid, o.detail) for o in out] == [
        ("conflict_protected_user", promoted, f"uid {promoted} has role {role}"),
        ("conflict_protected_user", editor, f"uid {editor} has role editor"),
    ]
    for uid in (promoted, editor):
        assert await user_rows(site, uid) == before[uid], uid
    for sf_id, uid, held in ((sf(1), promoted, role), (sf(2), editor, "editor")):
        mapped, entries = await ledger_history(site, sf_id)
        last = entries[-1]
        assert mapped == uid  # the mapping stays; nothing is written while it is protected
        assert (last["o"], last["uid"], last["d"]) == (
            "conflict_protected_user",
            uid,
            f"uid {uid} has role {held}",
        )


async def test_lead_conversion_onto_a_protected_user_is_refused(drupal_site: DrupalSite) -> None:
    site = drupal_site
    role = await admin_role(site)
    lead, contact = sf(5, "00Q"), sf(5)
    syncer = await open_syncer(site)
    (created,) = await syncer.apply([note(lead, "lee@example.com", "Lee", "Lead")])
    uid = created.uid
    assert created.kind == "created" and uid is not None
    await give_role(site, uid, role)
    before = await user_rows(site, uid)
    converted = note(lead, "lee@example.com", "Lee", "Lead", minutes=1, IsConverted=True)
    converted.fields["ConvertedContactId"] = contact
    assert await syncer.apply([converted]) == [
        Outcome(converted.id, lead, "conflict_protected_user", uid, f"uid {uid} has role {role}")
    ]
    # The Contact's own notification does not take that user either (the Lead still has it).
    (own,) = await syncer.apply([note(contact, "lee@example.com", "Lee", "Contact", minutes=2)])
    await syncer.close()
    assert (own.kind, own.uid, own.detail) == ("conflict_duplicate_email", None, lead)
    assert await user_rows(site, uid) == before
    states = await site.rows("SELECT sf_id, uid, converted_to FROM sfrelay_record ORDER BY sf_id")
    assert states == [
        {"sf_id": contact, "uid": None, "converted_to": None},
        {"sf_id": lead, "uid": uid, "converted_to": None},
    ]


async def test_protected_roles_setting_adds_to_the_sites_own(drupal_site: DrupalSite) -> None:
    site = drupal_site
    role = await admin_role(site)
    await add_role(site, "editor", permissions=("access content",))
    boss = await add_member(site, "boss", "boss@example.com", roles=(role,))
    editor = await add_member(site, "editor", "editor@example.com", roles=("editor",))
    admin, before = await user_rows(site, 1), await user_rows(site, editor)
    syncer = await open_syncer(site, protected_roles="editor")
    out = await syncer.apply(
        [
            note(sf(1), "boss@example.com", "B"),
            note(sf(2), "editor@example.com", "E"),
            note(sf(3), "admin@example.com", "A"),
        ]
    )
    await syncer.close()
    assert [(o.kind, o.uid, o.detail) for o in out] == [
        ("conflict_protected_user", None, f"uid {boss} has role {role}"),  # still protected
        ("conflict_protected_user", None, f"uid {editor} has role editor"),
        ("conflict_protected_user", None, "uid 1"),  # uid 1 is always protected
    ]
    assert await user_rows(site, editor) == before
    assert await user_rows(site, 1) == admin


async def test_protected_roles_setting_must_name_the_sites_roles(drupal_site: DrupalSite) -> None:
    with pytest.raises(
        ConfigError, match="SFRELAY_PROTECTED_ROLES: role 'no_such_role' does not exist"
    ):
        await open_syncer(drupal_site, protected_roles="no_such_role")


async def test_a_field_map_granting_a_protected_role_fails_at_start_up(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    site = drupal_site
    role = await admin_role(site)
    assert "roles = []" in DEFAULT_MAP
    field_map = DEFAULT_MAP.replace("roles = []", f'roles = ["{role}"]', 1)
    with pytest.raises(ConfigError, match=f"role '{role}' is protected"):
        await open_syncer(site, field_map, tmp_path)


async def test_never_logged_in_links_only_users_who_never_logged_in(
    drupal_site: DrupalSite,
) -> None:
    site = drupal_site
    fresh = await add_member(site, "fresh", "fresh@example.com", login=0)
    active = await add_member(site, "active", "active@example.com", login=1_740_000_000)
    before = await user_rows(site, active)
    users = await user_ids(site)
    syncer = await open_syncer(site, match_by_email="never-logged-in")
    out = await syncer.apply(
        [note(sf(1), "fresh@example.com", "F"), note(sf(2), "Active@example.com", "A")]
    )
    await syncer.close()
    assert [(o.kind, o.uid, o.detail) for o in out] == [
        ("linked", fresh, None),
        (
            "conflict_duplicate_email",
            None,
            f"uid {active} has logged in (SFRELAY_MATCH_BY_EMAIL=never-logged-in)",
        ),
    ]
    assert await user_rows(site, active) == before
    assert await user_ids(site) == users
    assert (await field_values(site, fresh))["field_salesforce_id"] == sf(1)
