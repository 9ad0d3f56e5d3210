"""The user's language on every backend: a mapped preferred language, sites whose default
language is not English, and users with translations (Drupal 8+)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import ConfigError
from app.outcomes import Outcome
from tests.drupal_rows import base_row, enable_languages, field_values, open_syncer, user_ids
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite

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
