"""Typed user fields: a field sfrelay cannot write is refused at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import ConfigError
from tests.drupal_fields import TypedField, add_field
from tests.drupal_rows import open_syncer
from tests.fixtures_db import DrupalSite

LEVELS10 = [{"value": "gold", "label": "Gold"}, {"value": "silver", "label": "Silver"}]
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
        kind = "list_string" if d10 else "list_text"
        allowed = LEVELS10 if d10 else {"a": "A"}
        f = TypedField(
            "field_company", kind, {"value": "varchar(255)"}, {"allowed_values": allowed}, {}, -1
        )
        message = (
            "field map: the user field 'field_company' takes any number of values; sfrelay "
            "writes single-value fields only: set its allowed number of values to 1, or leave "
            "it out of the field map"
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
