"""The user's language on every backend: a mapped preferred language, sites whose default
language is not English, a new user's language (Drupal 8+: the user content language
settings), and users with translations (Drupal 8+; Drupal 7 with entity_translation)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

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


D7_SITES = pytest.mark.parametrize(
    "drupal_site", ["sqlite-d7", "pg-d7", "mariadb-d7"], indirect=True
)

# Drupal 7's `system` (the installed extensions; the server sites' dumps leave it out) and
# entity_translation 7.x-1.x's table, as their hook_schema() define them.
SYSTEM_DDL = (
    "CREATE TABLE IF NOT EXISTS system (filename varchar(255) NOT NULL DEFAULT '', "
    "name varchar(255) NOT NULL DEFAULT '', type varchar(12) NOT NULL DEFAULT '', "
    "owner varchar(255) NOT NULL DEFAULT '', status integer NOT NULL DEFAULT 0, "
    "bootstrap integer NOT NULL DEFAULT 0, schema_version smallint NOT NULL DEFAULT -1, "
    "weight integer NOT NULL DEFAULT 0, info {blob}, PRIMARY KEY (filename))"
)
ENTITY_TRANSLATION_DDL = (
    "CREATE TABLE IF NOT EXISTS entity_translation (entity_type varchar(128) NOT NULL "
    "DEFAULT '', entity_id integer NOT NULL, revision_id integer NOT NULL, language "
    "varchar(32) NOT NULL DEFAULT '', source varchar(32) NOT NULL DEFAULT '', uid integer "
    "NOT NULL DEFAULT 0, status integer NOT NULL DEFAULT 1, translate integer NOT NULL "
    "DEFAULT 0, created integer NOT NULL DEFAULT 0, changed integer NOT NULL DEFAULT 0, "
    "PRIMARY KEY (entity_type, entity_id, language))"
)


def language_object(langcode: str) -> str:
    """A language as Drupal 7's variable_set('language_default', ...) stores it: a stdClass."""
    properties = {
        "language": langcode,
        "name": langcode,
        "native": langcode,
        "direction": 0,
        "enabled": 1,
        "plurals": 0,
        "formula": "",
        "domain": "",
        "prefix": langcode,
        "weight": 0,
        "javascript": "",
    }
    return 'O:8:"stdClass":' + php_serialize(properties).removeprefix("a:")


async def set_variable(site: DrupalSite, name: str, serialized: str) -> None:
    """variable_set(): the variable's PHP-serialized value."""
    await site.execute("DELETE FROM variable WHERE name = :n", n=name)
    await site.execute(
        "INSERT INTO variable (name, value) VALUES (:n, :v)",
        n=name,
        v=serialized.encode() if site.backend == "postgresql" else serialized,
    )


async def enable_entity_translation(
    site: DrupalSite,
    *,
    site_default: str = "en",
    enabled: bool = True,
    entity_types: tuple[str, ...] = ("node", "user"),
    default_language: str | None = None,
) -> None:
    """The entity_translation module installed as Drupal 7 does it (its `system` row, its
    table), users ticked (or not) on its settings page (entity_translation_entity_types,
    unticked types 0), the users' "Default language" (entity_translation_settings_user__user),
    and the site's default language (language_default)."""
    blob = "bytea" if site.backend == "postgresql" else "blob"
    await site.execute(SYSTEM_DDL.format(blob=blob))
    await site.execute(ENTITY_TRANSLATION_DDL)
    filename = "sites/all/modules/entity_translation/entity_translation.module"
    await site.execute("DELETE FROM system WHERE filename = :f", f=filename)
    await site.execute(
        "INSERT INTO system (filename, name, type, owner, status, bootstrap, schema_version, "
        "weight) VALUES (:f, 'entity_translation', 'module', '', :s, 0, 7009, 11)",
        f=filename,
        s=int(enabled),
    )
    types = {t: (t if t in entity_types else 0) for t in ("node", "comment", "user")}
    await set_variable(site, "entity_translation_entity_types", php_serialize(types))
    if default_language is not None:
        settings = {
            "default_language": default_language,
            "hide_language_selector": 1,
            "exclude_language_none": 0,
            "lock_language": 0,
            "shared_fields_original_only": 0,
        }
        await set_variable(site, "entity_translation_settings_user__user", php_serialize(settings))
    await set_variable(site, "language_default", language_object(site_default))


async def make_translatable(site: DrupalSite, field: str) -> None:
    """entity_translation's "Enable translation" of a field with no data yet."""
    await site.execute("UPDATE field_config SET translatable = 1 WHERE field_name = :f", f=field)


async def field_rows7(site: DrupalSite, uid: int, field: str) -> dict[str, str]:
    """language -> the field's value (delta 0), checking field_data_* and field_revision_*
    hold the same rows, each as Drupal 7 stores it."""
    found = []
    for kind in ("data", "revision"):
        rows = await site.rows(
            f"SELECT * FROM field_{kind}_{field} WHERE entity_id = :u ORDER BY language", u=uid
        )
        for row in rows:
            assert row == {
                **row,
                "entity_type": "user",
                "bundle": "user",
                "deleted": 0,
                "revision_id": uid,
                "delta": 0,
                f"{field}_format": None,
            }, row
        found.append({r["language"]: r[f"{field}_value"] for r in rows})
    assert found[0] == found[1], found
    return found[0]


async def translation_rows(site: DrupalSite, uid: int) -> list[dict[str, object]]:
    rows = await site.rows(
        "SELECT * FROM entity_translation WHERE entity_type = 'user' AND entity_id = :u "
        "ORDER BY source",
        u=uid,
    )
    for row in rows:
        assert abs(int(row.pop("created")) - time.time()) < 120, row
        assert row.pop("changed") is not None
    return rows


def original(uid: int, language: str) -> dict[str, object]:
    """The entity_translation row of a user's original language, as the module writes it."""
    return {
        "entity_type": "user",
        "entity_id": uid,
        "revision_id": uid,
        "language": language,
        "source": "",
        "uid": 0,
        "status": 1,
        "translate": 0,
    }


@D7_SITES
@pytest.mark.parametrize("revision_id", [True, False], ids=["table", "early-table"])
async def test_drupal7_entity_translation_a_new_users_translatable_field_is_in_its_language(
    drupal_site: DrupalSite, tmp_path: Path, revision_id: bool
) -> None:
    """With entity_translation enabled (a translation handler for users), a field whose
    field_config.translatable is 1 is stored under the user's language (entity_language():
    the module's default language for a new user, here the site's, German), not 'und'; the
    module records the user's original language (hook_field_attach_insert), in the columns
    its table has (its first 7.x-1.x releases made it without revision_id)."""
    site = drupal_site
    if not revision_id:
        await site.execute(ENTITY_TRANSLATION_DDL.replace(" revision_id integer NOT NULL,", ""))
    await enable_languages(site, "de")
    await add_role(site, "subscriber")
    await enable_entity_translation(site, site_default="de")
    await make_translatable(site, "field_first_name")
    uid = max(await user_ids(site)) + 1
    syncer = await open_syncer(site, TRANSLATED_MAP, tmp_path, handled_objects=["Contact"])
    n = note(sf(1), "ana@example.com", "Ana", "Lima")
    assert await syncer.apply([n]) == [Outcome(n.id, sf(1), "created", uid)]
    await syncer.close()
    assert await field_rows7(site, uid, "field_first_name") == {"de": "Ana"}
    assert await field_rows7(site, uid, "field_last_name") == {"und": "Lima"}
    assert await field_rows7(site, uid, "field_salesforce_id") == {"und": sf(1)}
    expected = original(uid, "de")
    if not revision_id:
        del expected["revision_id"]
    assert await translation_rows(site, uid) == [expected]
    assert (await base_row(site, uid))["language"] == ""  # no preferred language: unmapped
    assert await roles(site, uid) == ["subscriber"]


@D7_SITES
async def test_drupal7_entity_translation_an_update_writes_the_users_original_language(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """An update writes a translatable field in the user's original language (its
    entity_translation row), keeps its other translations, and writes a user registered
    before translation (its value under 'und', no row) in the module's default language,
    recording it, as Drupal's next save of that user would."""
    site = drupal_site
    await enable_languages(site, "de")
    await add_role(site, "subscriber")
    await enable_entity_translation(site, site_default="en")
    await make_translatable(site, "field_first_name")
    ana = await add_member(site, "Ana Lima", "ana@example.com")
    rui = await add_member(site, "Rui Costa", "rui@example.com")
    for kind in ("data", "revision"):
        for uid, language, value in (
            (ana, "en", "Ana"),
            (ana, "de", "Ana (de)"),
            (rui, "und", "Rui"),
        ):
            await site.execute(
                f"INSERT INTO field_{kind}_field_first_name (entity_type, bundle, deleted, "
                "entity_id, revision_id, language, delta, field_first_name_value) VALUES "
                "('user', 'user', 0, :u, :u, :l, 0, :v)",
                u=uid,
                l=language,
                v=value,
            )
    for language, source in (("en", ""), ("de", "en")):
        await site.execute(
            "INSERT INTO entity_translation (entity_type, entity_id, revision_id, language, "
            "source, uid, status, translate, created, changed) VALUES "
            "('user', :u, :u, :l, :s, 1, 1, 0, :t, :t)",
            u=ana,
            l=language,
            s=source,
            t=int(time.time()),
        )
    syncer = await open_syncer(site, TRANSLATED_MAP, tmp_path, handled_objects=["Contact"])
    notes = [
        note(sf(1), "ana@example.com", "Anna", "Lima"),
        note(sf(2), "rui@example.com", "Rui Miguel", "Costa"),
    ]
    assert await syncer.apply(notes) == [
        Outcome(notes[0].id, sf(1), "linked", ana),
        Outcome(notes[1].id, sf(2), "linked", rui),
    ]
    await syncer.close()
    assert await field_rows7(site, ana, "field_first_name") == {"de": "Ana (de)", "en": "Anna"}
    assert await field_rows7(site, rui, "field_first_name") == {"en": "Rui Miguel"}
    assert await field_rows7(site, ana, "field_last_name") == {"und": "Lima"}
    assert [(r["language"], r["source"], r["uid"]) for r in await translation_rows(site, ana)] == [
        ("en", "", 1),
        ("de", "en", 1),
    ]
    assert await translation_rows(site, rui) == [original(rui, "en")]


@D7_SITES
async def test_drupal7_entity_translation_settings_give_a_new_user_drupals_language(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """The language of a new user's translatable field, and its recorded original language,
    for each setting: the module disabled: 'und'; users not ticked for translation: the
    site's default (field_valid_language(NULL)), unrecorded; the users' default language
    the site's default, the current content language or the author's (a backend has
    neither: the site's default) or a named language."""
    site = drupal_site
    await enable_languages(site, "de", "fr")
    await add_role(site, "subscriber")
    await make_translatable(site, "field_first_name")
    settings: list[tuple[dict[str, Any], tuple[str, list[str]]]] = [
        ({"enabled": False}, ("und", [])),
        ({"entity_types": ("node",)}, ("de", [])),
        ({}, ("de", ["de"])),
        ({"default_language": "xx-et-default"}, ("de", ["de"])),
        ({"default_language": "xx-et-current"}, ("de", ["de"])),
        ({"default_language": "xx-et-author"}, ("de", ["de"])),
        ({"default_language": "fr"}, ("fr", ["fr"])),
    ]
    found = []
    for i, (setting, _) in enumerate(settings, 1):
        await site.execute("DELETE FROM variable WHERE name LIKE 'entity_translation%'")
        await enable_entity_translation(site, site_default="de", **setting)
        uid = max(await user_ids(site)) + 1
        syncer = await open_syncer(site, TRANSLATED_MAP, tmp_path, handled_objects=["Contact"])
        n = note(sf(i), f"p{i}@example.com", "Ana", f"Lima{i}")
        assert await syncer.apply([n]) == [Outcome(n.id, sf(i), "created", uid)]
        await syncer.close()
        (language,) = await field_rows7(site, uid, "field_first_name")
        assert await field_rows7(site, uid, "field_last_name") == {"und": f"Lima{i}"}
        recorded = [str(r["language"]) for r in await translation_rows(site, uid)]
        found.append((setting, (language, recorded)))
    assert found == settings
