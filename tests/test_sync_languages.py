"""The user's language on every backend: a mapped preferred language, sites whose default
language is not English, and users with translations (Drupal 8+)."""

from __future__ import annotations

from pathlib import Path

from app.outcomes import Outcome
from tests.drupal_rows import base_row, open_syncer, user_ids
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
