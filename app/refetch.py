"""Refetch mode (SFRELAY_PAYLOAD_MODE=refetch): a notification is only a signal. The worker reads
each record's current values by SOQL (``WHERE Id IN (...)``, 300 Ids per query, queryAll so
records in the recycle bin come back with IsDeleted) instead of trusting the message body: Id-only
Outbound Messages work and a stale payload can never win. A record Salesforce does not return at
all is not taken for a deletion: the integration user may only lack access to it (sharing), and
every such user would be blocked. It fails with a reason (a dead letter, to replay once shared);
a record deleted and purged is found by reconcile in Salesforce's delete log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from app.jobs import JobNotification
from app.mapping import FieldMap
from app.salesforce import SalesforceApi
from app.sfid import sf_key


async def current(
    api: SalesforceApi, notifications: Sequence[JobNotification], field_map: FieldMap
) -> tuple[list[JobNotification], dict[int, str]]:
    """The notifications with the records' current fields (same ids, attempts, first seen),
    and for each one whose record Salesforce did not return, by its place, why it failed."""
    wanted: dict[str, set[str]] = {}
    for n in notifications:
        record_id = n.record_id
        if n.object in field_map.objects and record_id and _looks_like_id(record_id):
            wanted.setdefault(n.object, set()).add(sf_key(record_id))
    found: dict[str, dict[str, object]] = {}
    for sobject, ids in wanted.items():
        # Pushed work: never held back by the polls' reserve of API requests.
        pages = api.records_by_id(sobject, sorted(ids), include_deleted=True, reserve=False)
        async for page in pages:
            for record in page:
                found[str(record.fields["Id"])] = record.fields
    result, unread = [], {}
    for index, n in enumerate(notifications):
        record_id = n.record_id
        if n.object not in wanted or not record_id or not _looks_like_id(record_id):
            result.append(n)  # not ours to read: the rules judge it as sent
            continue
        fields = found.get(sf_key(record_id))
        if fields is None:
            unread[index] = (
                f"refetch: Salesforce returns no {n.object} {record_id} to the integration "
                "user: it is not shared with that user (give it access, then `sfrelay dead "
                "replay`), or it was deleted and purged (reconcile finds that in the delete "
                "log: `sfrelay dead discard`)"
            )
            result.append(n)
        else:
            result.append(replace(n, fields=dict(fields)))
    return result, unread


def _looks_like_id(value: str) -> bool:
    return len(value) in (15, 18) and value.isalnum() and value.isascii()
