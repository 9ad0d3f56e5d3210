"""The tests' one source of ids, notifications and jobs (the benchmarks may keep their own).

- `sf_id(prefix, n)` / `sf(n)`: valid 18-character Salesforce Ids;
- `note(...)`: one job notification by record, its values as Salesforce sends them;
- `contact_json(n, ...)`: one notification in the job's JSON form (for jobs of older shapes);
- `new_contacts(first, count)`: Contacts `user{n}@example.org`, each a new Drupal user;
- `apply_job(...)`: an `ApplyJob` of the SOAP receiver's source holding them.

Outbound Message XML is built by `tests.messages`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from app.jobs import ApplyJob, JobNotification, Source
from app.sfid import to18

ORG_ID = "00D1I000003qqqEUAQ"
ACTION_ID = "04k1I000000bmsHQAQ"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MODIFIED = "2026-11-20T10:00:00.000Z"

# Notification ids of `note()`: far from the small numbers tests pass to `sf_id("04l", n)`.
_note_numbers = itertools.count(10**9)


def sf_id(prefix: str, number: int) -> str:
    """A valid 18-character Salesforce Id with a 3-character key prefix (003 Contact, 00Q Lead,
    04l notification, 04k action)."""
    return to18(f"{prefix}{number:012d}")


def sf(n: int, prefix: str = "003") -> str:
    """The Id of record number `n` (a Contact unless `prefix` says otherwise)."""
    return sf_id(prefix, n)


def note(
    record_id: str,
    email: str | None = "",
    first: str | None = None,
    last: str | None = None,
    *,
    minutes: int = 0,
    obj: str | None = None,
    nid: str | None = None,
    **extra: Any,
) -> JobNotification:
    """A job's notification, its values as Salesforce sends them: SystemModstamp is T0 +
    `minutes`; email "" leaves Email out, None sends it empty (nil)."""
    sobject = obj or ("Lead" if record_id.startswith("00Q") else "Contact")
    stamp = (T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
    fields: dict[str, Any] = {"Id": record_id, "SystemModstamp": stamp.replace("+00:00", "Z")}
    if email != "":
        fields["Email"] = email
    if first is not None:
        fields["FirstName"] = first
    if last is not None:
        fields["LastName"] = last
    fields.update(extra)
    return JobNotification(nid or sf_id("04l", next(_note_numbers)), sobject, fields)


def contact_json(
    number: int,
    record: str | None = None,
    *,
    email: str | None = None,
    first: str = "Ada",
    last: str = "Byron",
    modified: str = MODIFIED,
) -> dict[str, Any]:
    """Contact notification `number` (record `sf_id("003", number)` unless given) in the job's
    JSON form."""
    fields: dict[str, Any] = {
        "Id": record or sf_id("003", number),
        "FirstName": first,
        "LastName": last,
        "LastModifiedDate": modified,
        "SystemModstamp": modified,
    }
    if email is not None:
        fields["Email"] = email
    return {"id": sf_id("04l", number), "object": "Contact", "fields": fields}


def new_contacts(first: int, count: int) -> list[JobNotification]:
    """`count` Contacts numbered from `first`, each `user{n}@example.org`, last name `U{n}`."""
    return [
        JobNotification(
            sf_id("04l", n),
            "Contact",
            {"Id": sf_id("003", n), "Email": f"user{n}@example.org", "LastName": f"U{n}"},
        )
        for n in range(first, first + count)
    ]


def apply_job(
    notifications: Iterable[JobNotification | dict[str, Any]],
    *,
    received_at: float | None = None,
    org_id: str = ORG_ID,
    action_id: str = sf_id("04k", 1),
) -> ApplyJob:
    """A job of Outbound Message notifications (JobNotification or their JSON form)."""
    return ApplyJob(
        org_id,
        Source.OUTBOUND_MESSAGE,
        time.time() if received_at is None else received_at,
        tuple(
            n if isinstance(n, JobNotification) else JobNotification.from_json(n)
            for n in notifications
        ),
        action_id,
    )
