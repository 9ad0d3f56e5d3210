"""Each Drupal field type's conversion rule (app.drupal.fieldtypes), value by value."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from app.drupal.fields import FieldColumn
from app.drupal.fieldtypes import converter


def convert(
    kind: str, value: Any, *, major: int = 10, dialect: str = "postgresql", **settings: Any
) -> Any:
    column = FieldColumn("field_x", settings.pop("length", None), kind, settings)
    return converter(column, major=major, dialect=dialect)(value)


@pytest.mark.parametrize(
    ("kind", "settings", "value", "stored"),
    [
        ("string", {"max_length": 5}, "Kimberly", "Kimbe"),
        ("string", {"length": 4}, True, "1"),
        ("string_long", {}, "x" * 300, "x" * 300),
        ("boolean", {}, True, 1),
        ("boolean", {}, False, 0),
        ("boolean", {}, "false", 0),
        ("boolean", {}, " TRUE ", 1),
        ("boolean", {}, "", None),
        ("boolean", {}, None, None),
        ("integer", {}, 42.0, 42),
        ("integer", {}, "  7 ", 7),
        ("integer", {}, "1e3", 1000),
        ("integer", {"unsigned": True}, 0, 0),
        ("integer", {"size": "big"}, 2**40, 2**40),
        ("decimal", {"precision": 10, "scale": 2}, 1234.565, Decimal("1234.57")),
        ("decimal", {"precision": 10, "scale": 2}, -0.005, Decimal("-0.01")),
        ("decimal", {"precision": 4, "scale": 2}, "99.994", Decimal("99.99")),
        ("float", {}, "2.5", 2.5),
        ("email", {}, " kim@example.com ", "kim@example.com"),
        ("telephone", {}, " +1 555 0100 ", "+1 555 0100"),
        ("datetime", {"datetime_type": "date"}, "1990-05-17", "1990-05-17"),
        ("datetime", {"datetime_type": "date"}, "2026-11-20T23:30:00.000Z", "2026-11-20"),
        (
            "datetime",
            {"datetime_type": "datetime"},
            "2026-11-20T10:00:00.000Z",
            "2026-11-20T10:00:00",
        ),
        (
            "datetime",
            {"datetime_type": "datetime"},
            "2026-11-20T10:00:00.000+0100",
            "2026-11-20T09:00:00",
        ),
        ("datetime", {"datetime_type": "datetime"}, "1990-05-17", "1990-05-17T12:00:00"),
        ("timestamp", {}, "1970-01-02T00:00:00.000Z", 86400),
        ("timestamp", {}, "1970-01-02", 86400 + 43200),
        ("timestamp", {}, 1700000000.0, 1700000000),
        ("list_string", {"allowed_values": [{"value": "a", "label": "A"}]}, "a", "a"),
        ("list_integer", {"allowed_values": [{"value": 3, "label": "Three"}]}, 3.0, 3),
        ("list_float", {"allowed_values": [{"value": 0.5, "label": "Half"}]}, "0.5", 0.5),
    ],
)
def test_a_value_is_stored_as_its_type_stores_it(
    kind: str, settings: dict[str, Any], value: Any, stored: Any
) -> None:
    result = convert(kind, value, **settings)
    assert (result, type(result)) == (stored, type(stored))


def test_sqlite_gets_a_decimal_as_text_and_drupal_7_its_own_type_names() -> None:
    assert convert("decimal", 1.5, dialect="sqlite", precision=10, scale=2) == "1.50"
    assert convert("number_integer", "12", major=7) == 12
    assert convert("list_text", "gold", major=7, allowed_values={"gold": "Gold"}) == "gold"
    assert convert("list_boolean", True, major=7, allowed_values={0: "", 1: ""}) == 1


@pytest.mark.parametrize(
    ("kind", "settings", "value", "why"),
    [
        ("boolean", {}, "yes", "'yes' is not a boolean"),
        ("boolean", {}, 2, "2 is not a boolean"),
        ("integer", {}, 12.5, "12.5 is not an integer"),
        ("integer", {}, True, "a checkbox is not an integer"),
        ("integer", {}, "12abc", "'12abc' is not a number"),
        ("integer", {}, 2**31, "2147483648 is above the field's maximum 2147483647"),
        ("integer", {"unsigned": True}, -1, "-1 is below the field's minimum 0"),
        ("integer", {"min": 1, "max": ""}, 0, "0 is below the field's minimum 1"),
        (
            "decimal",
            {"precision": 4, "scale": 2},
            99.995,
            "99.995 has more than 2 digits before the point",
        ),
        ("float", {}, "nan", "'nan' is not a finite number"),
        ("email", {}, "kim@", "'kim@' is not an email address Drupal accepts"),
        ("telephone", {}, "1" * 257, "a telephone number of 257 characters (at most 256)"),
        (
            "datetime",
            {"datetime_type": "date"},
            "17/05/1990",
            "'17/05/1990' is not a date or dateTime",
        ),
        ("timestamp", {}, "2100-01-01", "'2100-01-01' is outside the timestamp column's range"),
        (
            "list_string",
            {"allowed_values": [{"value": "a", "label": "A"}]},
            "A",
            "'A' is not one of the field's allowed values",
        ),
    ],
)
def test_a_value_a_field_cannot_take_is_refused(
    kind: str, settings: dict[str, Any], value: Any, why: str
) -> None:
    with pytest.raises(ValueError) as refused:
        convert(kind, value, **settings)
    assert str(refused.value) == why


@pytest.mark.parametrize(
    ("kind", "cardinality", "value", "stored"),
    [
        ("list_string", -1, "b;a", ("b", "a")),
        ("list_string", -1, "a;;b;a;", ("a", "b")),  # empty items skipped, each once
        ("list_string", -1, ["a", "b"], ("a", "b")),  # already a list
        ("list_string", -1, "", None),
        ("list_string", -1, ";", None),
        ("list_string", 2, "a;b", ("a", "b")),
        ("list_integer", -1, "3;1", (3, 1)),
        ("list_float", 2, "1.5;1.50", (1.5,)),  # the same key twice
    ],
)
def test_a_list_field_of_several_values_takes_a_multi_select_picklist(
    kind: str, cardinality: int, value: Any, stored: Any
) -> None:
    choices: dict[str, list[Any]] = {"list_string": list("abc"), "list_integer": [1, 2, 3]}
    keys = choices.get(kind) or [1.5]
    allowed = [{"value": k, "label": str(k)} for k in keys]
    column = FieldColumn(
        "field_x", None, kind, {"allowed_values": allowed}, cardinality=cardinality
    )
    assert converter(column, major=10, dialect="sqlite")(value) == stored


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("a;b;c", "3 values selected; the field takes at most 2"),
        ("a;A", "'A' is not one of the field's allowed values"),
        ("a ;b", "'a ' is not one of the field's allowed values"),  # keys are exact
    ],
)
def test_a_multi_select_value_a_list_field_cannot_take_is_refused(value: str, error: str) -> None:
    allowed = [{"value": k, "label": k} for k in "abc"]
    column = FieldColumn("field_x", None, "list_string", {"allowed_values": allowed}, cardinality=2)
    with pytest.raises(ValueError) as refused:
        converter(column, major=10, dialect="sqlite")(value)
    assert str(refused.value) == error
