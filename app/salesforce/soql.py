"""SOQL for the polls: the field set per object, UTC literals, Id batches, and the record shape."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from app.errors import ConfigError
from app.jobs import JobNotification
from app.mapping import EMAIL_LOCAL, FieldMap, ObjectMap, placeholders
from app.sfid import sf_key

# Every handled object has these; Salesforce's own version and deletion markers.
SYSTEM_FIELDS = ("Id", "SystemModstamp", "LastModifiedDate", "IsDeleted")
# Objects that can be merged carry the survivor's Id on the deleted loser.
MERGEABLE_OBJECTS = frozenset({"Account", "Contact", "Lead"})
OBJECT_EXTRA_FIELDS: dict[str, tuple[str, ...]] = {"Lead": ("IsConverted", "ConvertedContactId")}

# A GET query's URL must stay under Salesforce's 16,384-character request line; an Id costs
# 27 characters there once quoted and URL-encoded ('...'%2C), so 300 leave room for the fields.
IDS_PER_QUERY = 300

_SOBJECT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_RECORD_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
# The REST API renders a dateTime as 2026-01-02T03:04:05.000+0000; Outbound Messages (and so
# the queue) carry 2026-01-02T03:04:05.000Z.
_REST_DATETIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})\+0000")


def sobject_name(name: str) -> str:
    if not _SOBJECT.fullmatch(name):
        raise ValueError(f"{name!r} is not a Salesforce object name")
    return name


def field_set(obj: ObjectMap, field_map: FieldMap) -> list[str]:
    """The fields a poll selects for `obj`: what the mapping and the rules read, once each."""
    names = [
        "Id",
        obj.email_field,
        *obj.base.values(),
        *obj.fields.values(),
        *placeholders(field_map.username_template),
        *placeholders(field_map.username_fallback),
        *SYSTEM_FIELDS,
    ]
    if obj.sobject in MERGEABLE_OBJECTS:
        names.append("MasterRecordId")
    names.extend(OBJECT_EXTRA_FIELDS.get(obj.sobject, ()))
    seen: set[str] = set()
    chosen: list[str] = []
    for name in names:
        # SOQL refuses a field selected twice, in any letter case.
        if name == EMAIL_LOCAL or name.lower() in seen:
            continue
        if not _SOBJECT.fullmatch(name):
            raise ConfigError(f"field map [{obj.sobject}]: {name!r} is not a Salesforce field name")
        seen.add(name.lower())
        chosen.append(name)
    return chosen


def utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{value.isoformat()} has no time zone: Salesforce times are UTC, pass an aware "
            "datetime (datetime.now(UTC), or fromisoformat with +00:00 / Z)"
        )
    return value.astimezone(UTC)


def soql_datetime(value: datetime) -> str:
    """A SOQL dateTime literal, floored to the second (SOQL literals have no fractions), so
    consecutive half-open windows [start, end) still tile without a gap."""
    return utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def rest_datetime(value: datetime) -> str:
    """A dateTime for REST query parameters (sobjects/X/deleted ?start=&end=)."""
    return utc(value).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def parse_datetime(text: str) -> datetime:
    """Salesforce's dateTime text (…+0000, …Z) as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def changed_query(sobject: str, fields: list[str], start: datetime, end: datetime) -> str:
    """Records whose SystemModstamp is in [start, end), oldest first (pages come in order)."""
    # Safe: object and field names are checked identifiers, the times are formatted here.
    return (
        f"SELECT {', '.join(fields)} FROM {sobject_name(sobject)} "  # noqa: S608
        f"WHERE SystemModstamp >= {soql_datetime(start)} "
        f"AND SystemModstamp < {soql_datetime(end)} ORDER BY SystemModstamp, Id"
    )


def ids_query(sobject: str, fields: list[str], ids: list[str]) -> str:
    quoted = ", ".join(f"'{record_id}'" for record_id in ids)  # id_batches checked each Id
    return f"SELECT {', '.join(fields)} FROM {sobject_name(sobject)} WHERE Id IN ({quoted})"  # noqa: S608


def id_batches(ids: Iterable[str], size: int = IDS_PER_QUERY) -> Iterator[list[str]]:
    """Distinct Ids (by their 18-character form), `size` at a time; refuses anything that is
    not an Id, so nothing but Ids ever reaches the SOQL text."""
    seen: set[str] = set()
    batch: list[str] = []
    for record_id in ids:
        if not isinstance(record_id, str) or not _RECORD_ID.fullmatch(record_id):
            raise ValueError(f"{record_id!r} is not a Salesforce record Id")
        key = sf_key(record_id)
        if key in seen:
            continue
        seen.add(key)
        batch.append(key)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def synthetic_id(record_id: str, stamp: str | None) -> str:
    """A stable notification id for a polled record version: the same version polled twice
    gets the same id (so it is a duplicate, not a second write). At most 36 characters:
    sfrelay stores notification ids in 40."""
    digits = "".join(c for c in stamp or "" if c.isdigit())[:17]
    return f"{record_id}@{digits or '-'}"


def to_notification(sobject: str, record: dict[str, Any]) -> JobNotification:
    """A REST record as the notification an `app.jobs.ApplyJob` carries (as if pushed)."""
    fields: dict[str, Any] = {}
    for name, value in record.items():
        if name == "attributes":
            continue
        if type(value) is str:
            match = _REST_DATETIME.fullmatch(value)
            if match:
                value = match.group(1) + "Z"
        fields[name] = value
    record_id = fields.get("Id")
    if isinstance(record_id, str) and _RECORD_ID.fullmatch(record_id):
        fields["Id"] = record_id = sf_key(record_id)
    stamp = fields.get("SystemModstamp") or fields.get("LastModifiedDate")
    return JobNotification(
        synthetic_id(str(record_id), stamp if isinstance(stamp, str) else None), sobject, fields
    )
