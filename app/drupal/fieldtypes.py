"""Drupal field types: which sfrelay writes, and how a Salesforce value becomes what Drupal stores.

A converter is chosen once per mapped field at start-up (`converter`); per value it returns
what goes into `<field>_value` (None: no value, the field is emptied) or raises ValueError
saying why the value cannot go there (the rules then leave the field as it is).

Rules (Drupal 8+ type / Drupal 7 type):
- string, text / text: text, cut to max_length; string_long, text_long, text_with_summary /
  text_long, text_with_summary: text as it is. Text types with a format column get the
  site's fallback format (plain_text unless changed; D7 only when the field has text
  processing on, else NULL, as Drupal 7 itself stores it).
- boolean / list_boolean: true/false, "true"/"false", "1"/"0", 1/0 -> 1 or 0.
- integer, list_integer / number_integer, list_integer: an int, or a float or text with an
  integral value (42.0), within the column's range (unsigned, size) and the field's min/max.
- decimal / number_decimal: rounded half away from zero to `scale` (as Drupal's preSave),
  at most precision - scale digits before the point, within min/max.
- float, list_float / number_float, list_float: a finite number, within min/max.
- email: an address Drupal accepts (app.records.valid_email), stripped.
- telephone: text, stripped, at most 256 characters.
- datetime: "YYYY-MM-DD" for datetime_type date; "YYYY-MM-DDTHH:MM:SS" in UTC for datetime.
  A Salesforce date in a datetime field is 12:00:00 UTC (Drupal's own time for a date
  alone: the same day in almost every time zone); a dateTime in a date field is its UTC day.
- timestamp: seconds since 1970 (UTC); a date is its 12:00:00 UTC.
- list_*: only a key of the field's allowed values (a picklist's API value), exactly.
  A list field of several values (cardinality other than 1; not list_boolean) takes a
  multi-select picklist: "A;B;C" (Salesforce's form in messages and the REST API) is a tuple
  of keys, a delta each, in Salesforce's order, each once, at most the field's cardinality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import partial
from typing import Any

from app.drupal.fields import FieldColumn
from app.records import as_text, valid_email

Convert = Callable[[Any], Any]

TEXT = frozenset({"string", "text"})  # cut to max_length
LONG_TEXT = frozenset({"string_long", "text_long", "text_with_summary"})
# Drupal 8+ IntegerItem sizes (bits); Drupal 7's number_integer is a plain int.
_INT_BITS = {"tiny": 8, "small": 16, "medium": 24, "normal": 32, "big": 64}
TELEPHONE_MAX = 256  # Drupal's TelephoneItem length constraint
_NOON = time(12, 0)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 42 else text[:40] + "…"


def _number(value: Any, what: str) -> Decimal | None:
    """A number or numeric text as a Decimal; None for no value. A checkbox (a bool) is none."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"a checkbox is not {what}")
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return None
    elif not isinstance(value, int | float | Decimal):
        raise ValueError(f"{_short(value)} is not a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{_short(value)} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{_short(value)} is not a finite number")
    return number


def _bounds(settings: dict[str, Any]) -> tuple[Decimal | None, Decimal | None]:
    """The field's own min and max (its instance settings; '' or absent: none)."""
    found = []
    for key in ("min", "max"):
        raw = settings.get(key)
        try:
            found.append(None if raw in (None, "") else Decimal(str(raw)))
        except InvalidOperation:
            found.append(None)
    return found[0], found[1]


def _within(number: Decimal, low: Decimal | None, high: Decimal | None, value: Any) -> None:
    if low is not None and number < low:
        raise ValueError(f"{_short(value)} is below the field's minimum {low}")
    if high is not None and number > high:
        raise ValueError(f"{_short(value)} is above the field's maximum {high}")


def to_boolean(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "":
            return None
        if text in ("true", "1"):
            return 1
        if text in ("false", "0"):
            return 0
    raise ValueError(f"{_short(value)} is not a boolean")


def _integer(value: Any, low: Decimal | None, high: Decimal | None) -> int | None:
    number = _number(value, "an integer")
    if number is None:
        return None
    if number != number.to_integral_value():
        raise ValueError(f"{_short(value)} is not an integer")
    _within(number, low, high, value)
    return int(number)


def _decimal(
    value: Any, scale: int, digits: int, low: Decimal | None, high: Decimal | None, as_str: bool
) -> Decimal | str | None:
    number = _number(value, "a number")
    if number is None:
        return None
    rounded = number.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    if abs(rounded) >= Decimal(10) ** digits:
        raise ValueError(f"{_short(value)} has more than {digits} digits before the point")
    _within(rounded, low, high, value)
    # SQLite is given text, as PHP's PDO gives it (its NUMERIC affinity stores the number).
    return str(rounded) if as_str else rounded


def _float(value: Any, low: Decimal | None, high: Decimal | None) -> float | None:
    number = _number(value, "a number")
    if number is None:
        return None
    _within(number, low, high, value)
    result = float(number)
    if not math.isfinite(result):
        raise ValueError(f"{_short(value)} is out of range")
    return result


def _moment(value: Any) -> date | datetime | None:
    """A Salesforce date ("YYYY-MM-DD") or dateTime (ISO, UTC unless it says otherwise)."""
    if value is None or isinstance(value, date):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{_short(value)} is not a date or dateTime")
    text = value.strip()
    if text == "":
        return None
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{_short(value)} is not a date or dateTime") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{_short(value)} is out of range") from None


def _utc(moment: date | datetime) -> datetime:
    if isinstance(moment, datetime):
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return datetime.combine(moment, _NOON, UTC)


def _datetime(value: Any, date_only: bool) -> str | None:
    moment = _moment(value)
    if moment is None:
        return None
    if date_only:
        day = _utc(moment).date() if isinstance(moment, datetime) else moment
        return day.isoformat()
    return _utc(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(value: Any) -> int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = _integer(value, None, None)
    else:
        moment = _moment(value)
        if moment is None:
            return None
        seconds = math.floor(_utc(moment).timestamp())
    if seconds is not None and not -(2**31) <= seconds < 2**31:
        raise ValueError(f"{_short(value)} is outside the timestamp column's range")
    return seconds


def _email(value: Any, international: bool) -> str | None:
    text = as_text(value)
    if text is None or not (text := text.strip()):
        return None
    if not valid_email(text, international=international):
        raise ValueError(f"{_short(value)} is not an email address Drupal accepts")
    return text


def _telephone(value: Any) -> str | None:
    text = as_text(value)
    if text is None or not (text := text.strip()):
        return None
    if len(text) > TELEPHONE_MAX:
        raise ValueError(f"a telephone number of {len(text)} characters (at most {TELEPHONE_MAX})")
    return text


def _listed(value: Any, convert: Convert, keys: Collection[Any]) -> Any:
    converted = convert(value)
    if converted is not None and converted not in keys:
        raise ValueError(f"{_short(value)} is not one of the field's allowed values")
    return converted


def _several(value: Any, one: Convert, limit: int) -> tuple[Any, ...] | None:
    """A multi-select picklist's value as the keys of a list field of several values (None:
    none selected, the field is emptied)."""
    if isinstance(value, list | tuple):
        items: list[Any] | tuple[Any, ...] = value
    else:
        text = as_text(value)
        if text is None:
            return None
        items = text.split(";")
    keys: list[Any] = []
    for item in items:
        if item == "":
            continue
        key = one(item)
        if key is not None and key not in keys:
            keys.append(key)
    if 0 < limit < len(keys):
        raise ValueError(f"{len(keys)} values selected; the field takes at most {limit}")
    return tuple(keys) or None


def allowed_keys(settings: dict[str, Any]) -> list[Any]:
    """The keys of a list field's allowed values: Drupal 8+ config holds a list of
    {value, label}; Drupal 7 a map of key -> label."""
    allowed = settings.get("allowed_values") or {}
    items = list(allowed.values()) if isinstance(allowed, dict) else list(allowed)
    if items and all(isinstance(item, dict) and "value" in item for item in items):
        return [item["value"] for item in items]
    return list(allowed) if isinstance(allowed, dict) else []


def _int_range(settings: dict[str, Any]) -> tuple[Decimal, Decimal]:
    bits = _INT_BITS.get(str(settings.get("size") or "normal"), 32)
    if settings.get("unsigned"):
        return Decimal(0), Decimal(2**bits - 1)
    return Decimal(-(2 ** (bits - 1))), Decimal(2 ** (bits - 1) - 1)


def _clamp(
    own: tuple[Decimal | None, Decimal | None], column: tuple[Decimal, Decimal]
) -> tuple[Decimal, Decimal]:
    low = column[0] if own[0] is None else max(own[0], column[0])
    high = column[1] if own[1] is None else min(own[1], column[1])
    return low, high


@dataclass(frozen=True, slots=True)
class Converter:
    """One field's conversion. Text (`typed` None) is as_text cut to `length`, called as such
    by the rules (the default field map's path: no call through a partial per value)."""

    length: int | None = None
    typed: Convert | None = None

    def __call__(self, value: Any) -> Any:
        return as_text(value, self.length) if self.typed is None else self.typed(value)


TEXT_CONVERTER = Converter()  # text without a length (a field sfrelay has no definition of)


def converter(column: FieldColumn, *, major: int, dialect: str) -> Converter:
    """The converter of one field (its type one of app.drupal.fields.SUPPORTED), decided once."""
    kind, settings = column.type, column.settings
    if kind in TEXT:
        max_length = settings.get("max_length")
        cut = int(max_length) if isinstance(max_length, int) and max_length > 0 else column.length
        return Converter(cut)
    if kind in LONG_TEXT:
        return TEXT_CONVERTER
    typed = _typed(kind, settings, major=major, dialect=dialect)
    if column.cardinality != 1:  # (a list field: app.drupal.fields.MULTIPLE)
        return Converter(None, partial(_several, one=typed, limit=column.cardinality))
    return Converter(None, typed)


def _setting(settings: dict[str, Any], key: str, default: int) -> Any:
    value = settings.get(key)
    return default if value in (None, "") else value


def _typed(kind: str, settings: dict[str, Any], *, major: int, dialect: str) -> Convert:
    if kind in ("boolean", "list_boolean"):
        return to_boolean
    own = _bounds(settings)
    if kind in ("integer", "number_integer", "list_integer"):
        low, high = _clamp(own, _int_range(settings if major == 10 else {}))
        convert: Convert = partial(_integer, low=low, high=high)
    elif kind in ("decimal", "number_decimal"):
        # Scale 0 is a scale (whole numbers); only an absent or empty setting is the default.
        precision = int(_setting(settings, "precision", 10))
        scale = int(_setting(settings, "scale", 2))
        return partial(
            _decimal,
            scale=scale,
            digits=precision - scale,
            low=own[0],
            high=own[1],
            as_str=dialect == "sqlite",
        )
    elif kind in ("float", "number_float", "list_float"):
        convert = partial(_float, low=own[0], high=own[1])
    elif kind == "email":
        return partial(_email, international=major != 7)
    elif kind == "telephone":
        return _telephone
    elif kind == "datetime":
        return partial(_datetime, date_only=settings.get("datetime_type") == "date")
    elif kind == "timestamp":
        return _timestamp
    elif kind in ("list_string", "list_text"):
        convert = as_text
    else:
        raise ValueError(f"no converter for field type {kind!r}")
    if kind.startswith("list_"):
        keys = allowed_keys(settings)
        if kind == "list_integer":
            keys = [int(k) for k in keys]
        elif kind == "list_float":
            keys = [float(k) for k in keys]
        else:
            keys = [str(k) for k in keys]
        return partial(_listed, convert=convert, keys=frozenset(keys))
    return convert


def field_converters(
    fields: dict[str, FieldColumn], major: int, dialect: str
) -> dict[str, Converter]:
    """Each mapped field's converter, decided once at start-up."""
    return {name: converter(f, major=major, dialect=dialect) for name, f in fields.items()}


def site_language(value: Any, languages: frozenset[str]) -> str | None:
    """A preferred language (`langcode`) as one of the site's langcodes (None: none): as
    sent, else in Drupal's form (lower case, `-`: Salesforce's `pt_BR` is `pt-br`), else its
    primary language (`en_US` is `en` on a site without `en-us`). Drupal takes no other
    (its AllowedValues constraint; the columns hold 12 ASCII characters: PostgreSQL and
    MySQL refused a longer one, and the whole record failed)."""
    text = as_text(value)
    if text is None or text in languages:
        return text
    tag = text.strip().lower().replace("_", "-")
    for code in (tag, tag.partition("-")[0]):
        if code in languages:
            return code
    shown = ", ".join(sorted(languages))
    raise ValueError(f"{_short(value)} is not one of the site's languages ({shown})")


# Salesforce field types (describe's `type`) whose values a Drupal type takes; a text type
# takes any (every value has a text form). For `sfrelay check`.
_NUMBERS = frozenset({"int", "double", "currency", "percent"})
_TAKES: dict[str, frozenset[str]] = {
    **dict.fromkeys(("boolean", "list_boolean"), frozenset({"boolean"})),
    **dict.fromkeys(
        ("integer", "number_integer", "list_integer", "decimal", "number_decimal"), _NUMBERS
    ),
    **dict.fromkeys(("float", "number_float", "list_float"), _NUMBERS),
    "email": frozenset({"email", "string"}),
    "telephone": frozenset({"phone", "string"}),
    "datetime": frozenset({"date", "datetime"}),
    "timestamp": frozenset({"date", "datetime"}),
    **dict.fromkeys(
        ("list_string", "list_text"),
        frozenset({"picklist", "multipicklist", "string", "combobox"}),
    ),
}


def takes_salesforce_type(drupal_type: str, salesforce_type: str) -> bool:
    """Whether values of a Salesforce field of this type can go into a Drupal field of
    `drupal_type` (a list field still takes only its allowed values)."""
    takes = _TAKES.get(drupal_type)
    return takes is None or salesforce_type.lower() in takes
