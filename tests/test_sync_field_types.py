"""Typed user fields (boolean, integer, decimal, date, list, long text, ...) written as Drupal
stores each type, on every backend; a value a field cannot take is not written and is
reported; a field sfrelay cannot write is refused at start-up."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from app.errors import ConfigError
from tests.drupal_fields import TypedField, add_field, stored
from tests.drupal_rows import field_values, ledger_history, open_syncer
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite

LEVELS10 = [{"value": "gold", "label": "Gold"}, {"value": "silver", "label": "Silver"}]
FIELDS = {
    10: [
        TypedField("field_opt_out", "boolean", {"value": "tinyint"}),
        TypedField(
            "field_score",
            "integer",
            {"value": "int"},
            {"unsigned": False, "size": "normal"},
            {"min": "", "max": 1000},
        ),
        TypedField(
            "field_balance", "decimal", {"value": "numeric(10,2)"}, {"precision": 10, "scale": 2}
        ),
        TypedField(
            "field_level",
            "list_string",
            {"value": "varchar(255)"},
            {"allowed_values": LEVELS10, "allowed_values_function": ""},
        ),
        TypedField(
            "field_birthdate", "datetime", {"value": "varchar(20)"}, {"datetime_type": "date"}
        ),
        TypedField(
            "field_last_seen", "datetime", {"value": "varchar(20)"}, {"datetime_type": "datetime"}
        ),
        TypedField("field_since", "timestamp", {"value": "int"}),
        TypedField("field_notes", "text_long", {"value": "text", "format": "varchar(255)"}),
        TypedField("field_work_mail", "email", {"value": "varchar(254)"}),
    ],
    7: [
        TypedField(
            "field_opt_out", "list_boolean", {"value": "int"}, {"allowed_values": {0: "", 1: ""}}
        ),
        TypedField(
            "field_score", "number_integer", {"value": "int"}, {}, {"min": "", "max": "1000"}
        ),
        TypedField(
            "field_balance",
            "number_decimal",
            {"value": "numeric(10,2)"},
            {"precision": 10, "scale": 2, "decimal_separator": "."},
        ),
        TypedField(
            "field_level",
            "list_text",
            {"value": "varchar(255)"},
            {"allowed_values": {"gold": "Gold", "silver": "Silver"}},
        ),
        TypedField(
            "field_notes",
            "text_long",
            {"value": "text", "format": "varchar(255)"},
            {},
            {"text_processing": 1},
        ),
    ],
}
SOURCES = {
    "field_opt_out": "HasOptedOutOfEmail",
    "field_score": "Score__c",
    "field_balance": "Balance__c",
    "field_level": "Level__c",
    "field_birthdate": "Birthdate",
    "field_last_seen": "LastActivity__c",
    "field_since": "Since__c",
    "field_notes": "Description",
    "field_work_mail": "WorkEmail__c",
}
# As an Outbound Message delivers them (app.soap: boolean, double, date and dateTime text).
VALUES: dict[str, Any] = {
    "HasOptedOutOfEmail": True,
    "Score__c": 42.0,
    "Balance__c": 1234.565,
    "Level__c": "gold",
    "Birthdate": "1990-05-17",
    "LastActivity__c": "2026-11-20T10:00:00.000Z",
    "Since__c": "2026-11-20T10:00:00.000Z",
    "Description": "<b>Hi</b>\nthere",
    "WorkEmail__c": "kim@work.example",
}
SINCE = int(datetime(2026, 11, 20, 10, tzinfo=UTC).timestamp())


def field_map(major: int) -> str:
    lines = [f'{f.name} = "{SOURCES[f.name]}"' for f in FIELDS[major]]
    return (
        '[Contact]\n[Contact.fields]\nmail = "Email"\nfield_first_name = "FirstName"\n'
        + "\n".join(lines)
        + '\n[Lead]\n[Lead.fields]\nmail = "Email"\n'
    )


def number(site: DrupalSite, text: str) -> Any:
    """A decimal column's value as the backend returns it (SQLite's NUMERIC: a float)."""
    return float(text) if site.backend == "sqlite" else Decimal(text)


async def typed_site(site: DrupalSite, tmp_path: Path) -> Any:
    for f in FIELDS[site.major]:
        await add_field(site, f)
    return await open_syncer(site, field_map(site.major), tmp_path)


async def test_typed_fields_are_stored_as_drupal_stores_them(
    drupal_site: DrupalSite, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = drupal_site
    syncer = await typed_site(site, tmp_path)
    (created,) = await syncer.apply([note(sf(1), "kim@example.com", "Kim", **VALUES)])
    uid = created.uid or 0
    assert (created.kind, created.detail) == ("created", None)
    expected: dict[str, Any] = {
        "field_opt_out": {"value": 1},
        "field_score": {"value": 42},
        "field_balance": {"value": number(site, "1234.57")},  # rounded half up, as Drupal
        "field_level": {"value": "gold"},
        "field_birthdate": {"value": "1990-05-17"},
        "field_last_seen": {"value": "2026-11-20T10:00:00"},  # UTC, 19 characters
        "field_since": {"value": SINCE},
        "field_notes": {"value": "<b>Hi</b>\nthere", "format": "plain_text"},
        "field_work_mail": {"value": "kim@work.example"},
    }
    for f in FIELDS[site.major]:
        assert await stored(site, f.name, uid) == expected[f.name], f.name
    assert await field_values(site, uid) == {"field_first_name": "Kim"}

    # Values the fields cannot take are left out (the fields keep theirs); the others apply.
    bad = {"Score__c": 12.5, "Level__c": "platinum", "Balance__c": 1e12}
    caplog.set_level(logging.WARNING, "sfrelay.worker")
    update = note(
        sf(1),
        "kim@example.com",
        "Kimmy",
        minutes=1,
        **{**VALUES, **bad, "HasOptedOutOfEmail": False},
    )
    (updated,) = await syncer.apply([update])
    detail = (
        "field_score not written (Score__c: 12.5 is not an integer); "
        "field_balance not written (Balance__c: 1000000000000.0 has more than 8 digits "
        "before the point); "
        "field_level not written (Level__c: 'platinum' is not one of the field's allowed values)"
    )
    assert (updated.kind, updated.uid, updated.detail) == ("updated", uid, detail)
    assert await stored(site, "field_opt_out", uid) == {"value": 0}
    for name in ("field_score", "field_balance", "field_level"):
        assert await stored(site, name, uid) == expected[name], name
    assert await field_values(site, uid) == {"field_first_name": "Kimmy"}
    _, history = await ledger_history(site, sf(1))
    assert [(e["o"], e.get("d")) for e in history] == [("created", None), ("updated", detail)]
    # The log says which field, never the value (it may be personal data).
    assert "field_level not written" in caplog.text and "platinum" not in caplog.text

    # A new user: a field whose value cannot be written stays empty.
    (other,) = await syncer.apply(
        [note(sf(2), "lou@example.com", "Lou", **{**VALUES, "Level__c": "Gold"})]
    )
    await syncer.close()
    assert other.kind == "created"
    assert other.detail == (
        "field_level not written (Level__c: 'Gold' is not one of the field's allowed values)"
    )
    assert await stored(site, "field_level", other.uid or 0) is None
    assert await stored(site, "field_score", other.uid or 0) == {"value": 42}


SUPPORTED10 = (
    "boolean, datetime, decimal, email, float, integer, list_float, list_integer, "
    "list_string, string, string_long, telephone, text, text_long, text_with_summary, timestamp"
)
SUPPORTED7 = (
    "list_boolean, list_float, list_integer, list_text, number_decimal, number_float, "
    "number_integer, text, text_long, text_with_summary"
)


@pytest.mark.parametrize(
    "drupal_site", ["sqlite-d10", "pg-d10", "mariadb-d10", "sqlite-d7"], indirect=True
)
@pytest.mark.parametrize("case", ["type", "multiple", "function"])
async def test_a_field_sfrelay_cannot_write_is_refused_at_start_up(
    drupal_site: DrupalSite, tmp_path: Path, case: str
) -> None:
    site = drupal_site
    d10 = site.major == 10
    if case == "type":
        kind = "entity_reference" if d10 else "taxonomy_term_reference"
        f = TypedField("field_company", kind, {"target_id" if d10 else "tid": "int"})
        message = (
            f"field map: the user field 'field_company' is of type '{kind}', which sfrelay "
            f"cannot write (it writes {SUPPORTED10 if d10 else SUPPORTED7}): leave "
            "field_company out of the field map"
        )
    elif case == "multiple":
        kind = "string" if d10 else "text"
        f = TypedField("field_company", kind, {"value": "varchar(255)"}, {}, {}, -1)
        message = (
            "field map: the user field 'field_company' takes any number of values; sfrelay "
            "writes several values only into list fields (a multi-select picklist's A;B;C): "
            "set its allowed number of values to 1, or leave it out of the field map"
        )
    else:
        kind = "list_string" if d10 else "list_text"
        settings = {"allowed_values": [], "allowed_values_function": "acme_companies"}
        f = TypedField("field_company", kind, {"value": "varchar(255)"}, settings)
        message = (
            "field map: the user field 'field_company' takes the allowed values of the PHP "
            "function acme_companies, which sfrelay cannot call: list them in the field's "
            "settings, or leave it out of the field map"
        )
    await add_field(site, f)
    mapping = '[Contact]\n[Contact.fields]\nmail = "Email"\nfield_company = "AccountId"\n'
    with pytest.raises(ConfigError) as refused:
        await open_syncer(site, mapping + '[Lead]\n[Lead.fields]\nmail = "Email"\n', tmp_path)
    assert str(refused.value) == message


@pytest.mark.parametrize("drupal_site", ["sqlite-d10", "sqlite-d7"], indirect=True)
async def test_a_default_a_field_cannot_take_is_refused_at_start_up(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    site = drupal_site
    for f in FIELDS[site.major]:
        await add_field(site, f)
    mapping = field_map(site.major).replace(
        "[Lead]", '[Contact.defaults]\nfield_score = "many"\n[Lead]'
    )
    with pytest.raises(ConfigError) as refused:
        await open_syncer(site, mapping, tmp_path)
    kind = "integer" if site.major == 10 else "number_integer"
    assert str(refused.value) == (
        f"field map [Contact.defaults]: field_score is a field of type '{kind}': 'many' is not a "
        "number: give it a value of that type, or leave field_score out of [Contact.defaults]"
    )


@pytest.mark.parametrize("drupal_site", ["sqlite-d10", "pg-d10", "mariadb-d10"], indirect=True)
async def test_a_decimal_field_of_scale_0_is_rounded_to_whole_numbers(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """Drupal's config holds scale 0 as the integer 0 (i:0;): rounded as DecimalItem's preSave
    rounds it, with all of `precision` digits before the point."""
    site = drupal_site
    units = TypedField(
        "field_units", "decimal", {"value": "numeric(10,0)"}, {"precision": 10, "scale": 0}
    )
    await add_field(site, units)
    mapping = '[Contact]\n[Contact.fields]\nmail = "Email"\nfield_units = "Units__c"\n'
    syncer = await open_syncer(site, mapping + '[Lead]\n[Lead.fields]\nmail = "Email"\n', tmp_path)
    (created,) = await syncer.apply([note(sf(1), "kim@example.com", "Kim", Units__c=123.5)])
    (big,) = await syncer.apply([note(sf(2), "lou@example.com", "Lou", Units__c=9876543210.0)])
    await syncer.close()
    assert (created.kind, created.detail, big.kind, big.detail) == (
        "created",
        None,
        "created",
        None,
    )
    assert await stored(site, "field_units", created.uid or 0) == {"value": number(site, "124")}
    assert await stored(site, "field_units", big.uid or 0) == {"value": number(site, "9876543210")}


@pytest.mark.parametrize("drupal_site", ["sqlite-d7", "pg-d7", "mariadb-d7"], indirect=True)
@pytest.mark.parametrize(("processing", "format_"), [("0", None), ("1", "plain_text")])
async def test_drupal7_text_processing_saved_by_the_field_ui_decides_the_format(
    drupal_site: DrupalSite, tmp_path: Path, processing: str, format_: str | None
) -> None:
    """Drupal 7's field UI saves the instance's text_processing as the form gave it, the text
    "0" or "1": "0" (plain text) stores no format, as Drupal 7 does."""
    site = drupal_site
    notes = TypedField(
        "field_notes",
        "text_long",
        {"value": "text", "format": "varchar(255)"},
        {},
        {"text_processing": processing, "user_register_form": 0},
    )
    await add_field(site, notes)
    mapping = '[Contact]\n[Contact.fields]\nmail = "Email"\nfield_notes = "Description"\n'
    syncer = await open_syncer(site, mapping + '[Lead]\n[Lead.fields]\nmail = "Email"\n', tmp_path)
    (created,) = await syncer.apply([note(sf(1), "kim@example.com", "Kim", Description="Hi")])
    await syncer.close()
    assert await stored(site, "field_notes", created.uid or 0) == {
        "value": "Hi",
        "format": format_,
    }


@pytest.mark.parametrize("drupal_site", ["sqlite-d10", "sqlite-d7"], indirect=True)
async def test_a_field_table_without_a_definition_is_refused_saying_what_to_do(
    drupal_site: DrupalSite, tmp_path: Path
) -> None:
    site = drupal_site
    names = ["user__field_ghost"] if site.major == 10 else ["field_data_field_ghost"]
    names += [] if site.major == 10 else ["field_revision_field_ghost"]
    for name in names:
        await site.execute(
            f"CREATE TABLE {name} (entity_id integer NOT NULL, field_ghost_value varchar(255))"
        )
    mapping = '[Contact]\n[Contact.fields]\nmail = "Email"\nfield_ghost = "Title"\n'
    with pytest.raises(ConfigError) as refused:
        await open_syncer(site, mapping + '[Lead]\n[Lead.fields]\nmail = "Email"\n', tmp_path)
    where = "config field.storage.user.field_ghost" if site.major == 10 else "field_config"
    assert str(refused.value) == (
        "field map: the user field 'field_ghost' has no definition on this Drupal site "
        f"(nothing in {where}; its table {names[0]} is left over): recreate the field in "
        "Drupal, or leave field_ghost out of the field map"
    )


TOPICS10 = [{"value": v, "label": v.title()} for v in ("news", "events", "offers", "jobs")]


async def topics(site: DrupalSite, uid: int) -> list[str]:
    """The user's rows of field_topics by delta (D7: field_data_*, the same in its revision)."""
    tables = (
        ["user__field_topics"]
        if site.major == 10
        else [f"field_{k}_field_topics" for k in ("data", "revision")]
    )
    found = []
    for table in tables:
        rows = await site.rows(
            f"SELECT delta, field_topics_value AS v FROM {table} WHERE entity_id = :u"
            " ORDER BY delta",
            u=uid,
        )
        assert [r["delta"] for r in rows] == list(range(len(rows))), rows
        found.append([r["v"] for r in rows])
    assert all(f == found[0] for f in found), found
    return found[0]


async def test_a_multi_select_picklist_fills_a_list_field_of_several_values(
    drupal_site: DrupalSite, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Interests__c = "news;events" (a multi-select picklist, as Salesforce sends it) into a
    list field of up to 3 values: a row per value, delta 0 first, in Salesforce's order; a
    change replaces them; a value the list does not allow, or a fourth, leaves the field as it
    was and says why; none selected empties it. Another user's rows are never touched."""
    site = drupal_site
    d10 = site.major == 10
    allowed = TOPICS10 if d10 else {t["value"]: t["label"] for t in TOPICS10}
    kind = "list_string" if d10 else "list_text"
    settings = {"allowed_values": allowed}
    await add_field(
        site, TypedField("field_topics", kind, {"value": "varchar(255)"}, settings, {}, 3)
    )
    mapping = (
        '[Contact]\n[Contact.fields]\nmail = "Email"\nfield_topics = "Interests__c"\n'
        '[Lead]\n[Lead.fields]\nmail = "Email"\n'
    )
    syncer = await open_syncer(site, mapping, tmp_path)
    try:
        kim, lee = await syncer.apply(
            [
                note(sf(1), "kim@example.org", Interests__c="events;news"),
                note(sf(2), "lee@example.org", Interests__c="jobs"),
            ]
        )
        assert (await topics(site, kim.uid or 0), await topics(site, lee.uid or 0)) == (
            ["events", "news"],
            ["jobs"],
        )
        steps = [
            ("news;offers;news", None, ["news", "offers"]),
            ("news;sports", "'sports' is not one of the field's allowed values", None),
            ("news;events;offers;jobs", "4 values selected; the field takes at most 3", None),
            ("offers;jobs;events", None, ["offers", "jobs", "events"]),
            (None, None, []),
        ]
        before = ["news", "offers"]
        for minutes, (value, refused, after) in enumerate(steps, 1):
            (out,) = await syncer.apply(
                [note(sf(1), "kim@example.org", minutes=minutes, Interests__c=value)]
            )
            assert out.kind == "updated", out
            if refused is None:
                assert out.detail is None
                before = after or []
            else:
                assert out.detail == f"field_topics not written (Interests__c: {refused})"
            assert await topics(site, kim.uid or 0) == before
        assert await topics(site, lee.uid or 0) == ["jobs"]
    finally:
        await syncer.close()
