"""The user's language on every backend: a mapped preferred language, sites whose default
language is not English, and users with translations (Drupal 8+)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.drupal.php import php_serialize, php_unserialize
from app.errors import ConfigError
from app.outcomes import Outcome
from tests.drupal_rows import (
    add_member,
    add_role,
    base_row,
    enable_languages,
    field_values,
    open_syncer,
    roles,
    user_ids,
)
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite

D10_SITES = pytest.mark.parametrize(
    "drupal_site", ["sqlite-d10", "pg-d10", "mariadb-d10"], indirect=True
)

LANGUAGE_MAP = """
[username]
template = "{FirstName} {LastName}"
fallback = "{email_local}"

[Contact]
roles = []

[Contact.fields]
mail = "Email"
langcode = "Language__c"
field_first_name = "FirstName"
"""


def preferred(site: DrupalSite, row: dict[str, object]) -> object:
    """The user's preferred language as stored: D10 preferred_langcode, D7 users.language."""
    return row["preferred_langcode" if site.major == 10 else "language"]


async def test_a_language_sent_empty_is_no_preferred_language(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    site = drupal_site
    uid = max(await user_ids(site)) + 1
    syncer = await open_syncer(site, LANGUAGE_MAP, tmp_path, handled_objects=["Contact"])
    first = note(sf(1), "ana@example.com", "Ana", "Lima", Language__c="en")
    assert await syncer.apply([first]) == [Outcome(first.id, sf(1), "created", uid)]
    # Drupal 7 keeps "no language" as '' (users.language is NOT NULL), Drupal 8+ as NULL.
    for minutes, value in ((1, None), (2, "")):
        n = note(sf(1), "ana@example.com", "Ana", "Lima", minutes=minutes, Language__c=value)
        assert await syncer.apply([n]) == [Outcome(n.id, sf(1), "updated", uid)]
        assert preferred(site, await base_row(site, uid)) == ("" if site.major == 7 else None)
    await syncer.close()


async def test_a_language_is_written_as_one_of_the_sites_or_not_at_all(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    site = drupal_site
    await enable_languages(site, "de", "pt-br")
    uid = max(await user_ids(site)) + 1
    syncer = await open_syncer(site, LANGUAGE_MAP, tmp_path, handled_objects=["Contact"])
    none = "" if site.major == 7 else "en"  # what a new user gets without one
    sent = [("de", "de"), ("pt_BR", "pt-br"), ("en_US", "en"), ("Portuguese (Brazil)", none)]
    notes = [
        note(sf(i), f"p{i}@example.com", "Ana", f"Lima{i}", Language__c=value)
        for i, (value, _) in enumerate(sent, 1)
    ]
    outcomes = await syncer.apply(notes)
    languages = "(de, en, pt-br)"
    refused = (
        f"langcode not written (Language__c: 'Portuguese (Brazil)' is not one of the site's "
        f"languages {languages})"
    )
    assert outcomes == [
        Outcome(n.id, sf(i), "created", uid + i - 1, refused if i == 4 else None)
        for i, n in enumerate(notes, 1)
    ]
    for i, (_, stored) in enumerate(sent):
        assert preferred(site, await base_row(site, uid + i)) == stored
    # An update: the language as it was, the rest of the record applied.
    n = note(sf(1), "p1@example.com", "Anna", "Lima1", minutes=1, Language__c="Deutsch")
    refused = refused.replace("'Portuguese (Brazil)'", "'Deutsch'")
    assert await syncer.apply([n]) == [Outcome(n.id, sf(1), "updated", uid, refused)]
    assert preferred(site, await base_row(site, uid)) == "de"
    assert (await field_values(site, uid))["field_first_name"] == "Anna"
    await syncer.close()


async def test_a_default_language_the_site_does_not_have_is_refused_at_start(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    await enable_languages(drupal_site, "de")
    field_map = LANGUAGE_MAP + '\n[Contact.defaults]\nlangcode = "fr"\n'
    with pytest.raises(ConfigError) as caught:
        await open_syncer(drupal_site, field_map, tmp_path, handled_objects=["Contact"])
    assert str(caught.value) == (
        "field map [Contact.defaults]: langcode 'fr' is not one of the site's languages "
        "(de, en): give one of them, or leave langcode out of [Contact.defaults]"
    )


TRANSLATED_MAP = """
[username]
template = "{FirstName} {LastName}"
fallback = "{email_local}"

[Contact]
roles = ["subscriber"]

[Contact.fields]
mail = "Email"
field_first_name = "FirstName"
field_last_name = "LastName"
field_salesforce_id = "Id"
"""


async def set_untranslatable(site: DrupalSite, field: str) -> None:
    """Untick the field's "Users translatable" on Drupal's content language page."""
    name = f"field.field.user.user.{field}"
    (row,) = await site.rows("SELECT data FROM config WHERE collection = '' AND name = :n", n=name)
    config = php_unserialize(row["data"])
    config["translatable"] = False
    data = php_serialize(config)
    await site.execute(
        "UPDATE config SET data = :d WHERE collection = '' AND name = :n",
        d=data.encode() if site.backend == "postgresql" else data,
        n=name,
    )


async def add_translation(site: DrupalSite, uid: int, langcode: str, **fields: str) -> None:
    """A translation of a user, as Drupal's content translation saves it: a users_field_data
    row (default_langcode 0) with the shared values, and the translatable fields' values."""
    (row,) = await site.rows(
        "SELECT * FROM users_field_data WHERE uid = :u AND default_langcode = 1", u=uid
    )
    row.update(langcode=langcode, default_langcode=0)
    columns = ", ".join(row)
    values = ", ".join(f":{c}" for c in row)
    await site.execute(f"INSERT INTO users_field_data ({columns}) VALUES ({values})", **row)
    for field, value in fields.items():
        await site.execute(
            f"INSERT INTO user__{field} (bundle, deleted, entity_id, revision_id, langcode, "
            f"delta, {field}_value) VALUES ('user', 0, :u, :u, :l, 0, :v)",
            u=uid,
            l=langcode,
            v=value,
        )


async def field_rows(site: DrupalSite, uid: int, field: str) -> dict[str, str]:
    """langcode -> the field's value (delta 0) in that language."""
    rows = await site.rows(
        f"SELECT langcode, delta, {field}_value AS v FROM user__{field} WHERE entity_id = :u",
        u=uid,
    )
    assert all(r["delta"] == 0 for r in rows), rows
    return {r["langcode"]: r["v"] for r in rows}


@D10_SITES
async def test_a_translated_user_is_written_as_drupal_saves_its_original(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """Drupal's save (SqlContentEntityStorage::saveToDedicatedTables) keeps an untranslatable
    field (and roles) in the original language only, a translatable one per translation; the
    base fields sfrelay writes are untranslatable: the same in every users_field_data row."""
    site = drupal_site
    await enable_languages(site, "de")
    await add_role(site, "subscriber")
    await set_untranslatable(site, "field_salesforce_id")
    uid = await add_member(site, "Ana Lima", "ana@example.com")
    await site.execute(
        "INSERT INTO user__field_first_name (bundle, deleted, entity_id, revision_id, langcode, "
        "delta, field_first_name_value) VALUES ('user', 0, :u, :u, 'en', 0, 'Ana')",
        u=uid,
    )
    await add_translation(site, uid, "de", field_first_name="Ana (de)")
    syncer = await open_syncer(site, TRANSLATED_MAP, tmp_path, handled_objects=["Contact"])
    n = note(sf(1), "ANA@example.com", "Ana Maria", "Lima")
    assert await syncer.apply([n]) == [Outcome(n.id, sf(1), "linked", uid)]
    await syncer.close()

    data = await site.rows(
        "SELECT langcode, default_langcode, name, mail FROM users_field_data WHERE uid = :u "
        "ORDER BY langcode",
        u=uid,
    )
    assert data == [
        {"langcode": lc, "default_langcode": d, "name": "Ana Lima", "mail": "ANA@example.com"}
        for lc, d in (("de", 0), ("en", 1))
    ]
    assert await field_rows(site, uid, "field_first_name") == {"en": "Ana Maria", "de": "Ana (de)"}
    assert await field_rows(site, uid, "field_last_name") == {"en": "Lima"}
    assert await field_rows(site, uid, "field_salesforce_id") == {"en": sf(1)}
    assert await roles(site, uid) == ["subscriber"]  # (checks langcode 'en' on each row)


D10_EVERY_SITE = pytest.mark.parametrize(
    "drupal_site", ["sqlite-d10", "sqlite-d10-minimal", "pg-d10", "mariadb-d10"], indirect=True
)

# TRANSLATED_MAP, with a preferred language.
NEW_USER_MAP = TRANSLATED_MAP.replace(
    "[Contact.fields]\n", '[Contact.fields]\nlangcode = "Language__c"\n'
)


async def set_user_language_settings(site: DrupalSite, default_langcode: str) -> None:
    """The user entity's "Default language" on Drupal's content language page
    (/admin/config/regional/content-language), saved as the language module saves it: the
    config entity `language.content_settings.user.user`."""
    config = {
        "uuid": str(uuid.uuid4()),
        "langcode": "en",
        "status": True,
        "dependencies": {"module": ["user"]},
        "id": "user.user",
        "target_entity_type_id": "user",
        "target_bundle": "user",
        "default_langcode": default_langcode,
        "language_alterable": False,
    }
    data = php_serialize(config)
    name = "language.content_settings.user.user"
    await site.execute("DELETE FROM config WHERE collection = '' AND name = :n", n=name)
    await site.execute(
        "INSERT INTO config (collection, name, data) VALUES ('', :n, :d)",
        n=name,
        d=data.encode() if site.backend == "postgresql" else data,
    )


async def langcodes10(site: DrupalSite, uid: int) -> dict[str, list[object]]:
    """Every langcode Drupal 8+ keeps for a user: table -> its rows' langcodes (by delta),
    users_field_data's as (langcode, default_langcode, preferred, preferred_admin)."""
    found: dict[str, list[object]] = {}
    (users,) = await site.rows("SELECT langcode FROM users WHERE uid = :u", u=uid)
    found["users"] = [users["langcode"]]
    data = await site.rows(
        "SELECT langcode, default_langcode, preferred_langcode, preferred_admin_langcode "
        "FROM users_field_data WHERE uid = :u",
        u=uid,
    )
    found["users_field_data"] = [tuple(r.values()) for r in data]
    for table in ("user__field_first_name", "user__field_last_name", "user__roles"):
        rows = await site.rows(
            f"SELECT langcode FROM {table} WHERE entity_id = :u ORDER BY delta", u=uid
        )
        found[table] = [r["langcode"] for r in rows]
    return found


@D10_EVERY_SITE
async def test_a_new_user_is_in_the_language_of_the_user_content_language_settings(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """User::create() takes the user's langcode (and preferred language, unless given) from
    the language module's content language settings of the user entity
    (DefaultLanguageItem::applyDefaultValue, language_get_default_langcode()), not from the
    site's default language; the user's fields and roles are stored in it."""
    site = drupal_site
    await enable_languages(site, "de", "pt-br")
    await add_role(site, "subscriber")
    await set_user_language_settings(site, "de")
    uid = max(await user_ids(site)) + 1
    syncer = await open_syncer(site, NEW_USER_MAP, tmp_path, handled_objects=["Contact"])
    notes = [
        note(sf(1), "ana@example.com", "Ana", "Lima", Language__c="pt_BR"),
        note(sf(2), "rui@example.com", "Rui", "Costa"),
    ]
    assert await syncer.apply(notes) == [
        Outcome(n.id, sf(i), "created", uid + i - 1) for i, n in enumerate(notes, 1)
    ]
    for user, preferred_langcode in ((uid, "pt-br"), (uid + 1, "de")):
        assert await langcodes10(site, user) == {
            "users": ["de"],
            "users_field_data": [("de", 1, preferred_langcode, None)],
            "user__field_first_name": ["de"],
            "user__field_last_name": ["de"],
            "user__roles": ["de"],
        }
    (row,) = await site.rows("SELECT * FROM user__field_first_name WHERE entity_id = :u", u=uid)
    assert row == {
        "bundle": "user",
        "deleted": 0,
        "entity_id": uid,
        "revision_id": uid,
        "langcode": "de",
        "delta": 0,
        "field_first_name_value": "Ana",
    }
    # An update keeps the user's own language: its values go to its one translation.
    n = note(sf(1), "ana@example.com", "Anna", "Lima", minutes=1, Language__c="de")
    assert await syncer.apply([n]) == [Outcome(n.id, sf(1), "updated", uid)]
    await syncer.close()
    assert await langcodes10(site, uid) == {
        "users": ["de"],
        "users_field_data": [("de", 1, "de", None)],
        "user__field_first_name": ["de"],
        "user__field_last_name": ["de"],
        "user__roles": ["de"],
    }
    assert (await field_rows(site, uid, "field_first_name")) == {"de": "Anna"}


@D10_EVERY_SITE
async def test_each_content_language_setting_gives_a_new_user_what_drupal_gives_it(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """language_get_default_langcode() for a backend, which has no interface language and
    no author: `current_interface` and `authors_default` are the site's default language
    (here German), a named language (even the locked `und` and `zxx`) is taken as it is."""
    site = drupal_site
    await enable_languages(site, "de", "fr", default="de")
    await add_role(site, "subscriber")
    expected = {
        "site_default": "de",
        "current_interface": "de",
        "authors_default": "de",
        "fr": "fr",
        "und": "und",
        "zxx": "zxx",
    }
    stored = {}
    for i, setting in enumerate(expected, 1):
        await set_user_language_settings(site, setting)
        uid = max(await user_ids(site)) + 1
        syncer = await open_syncer(site, NEW_USER_MAP, tmp_path, handled_objects=["Contact"])
        n = note(sf(i), f"p{i}@example.com", "Ana", f"Lima{i}")
        assert await syncer.apply([n]) == [Outcome(n.id, sf(i), "created", uid)]
        await syncer.close()
        found = await langcodes10(site, uid)
        (langcode,) = found["users"]
        assert found == {
            "users": [langcode],
            "users_field_data": [(langcode, 1, langcode, None)],
            "user__field_first_name": [langcode],
            "user__field_last_name": [langcode],
            "user__roles": [langcode],
        }
        stored[setting] = langcode
    assert stored == expected
