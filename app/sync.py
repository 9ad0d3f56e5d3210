"""The business rules: filter, order guard, create-vs-update, applied to Drupal in batches.

Public API (the worker codes against this; it imports neither arq nor FastAPI)::

    syncer = await Syncer.open(settings)     # engine, Drupal version, sfrelay_ migrations,
                                             # field map validated against the real schema
                                             # (ConfigError here, never at the first job)
    outcomes = await syncer.apply(notifications)
    await syncer.close()

`apply` takes notifications as `app.queue.decode_notifications` returns them
(``{"id": ..., "object": "Contact"|"Lead", "fields": {"Id": ..., "Email": ..., ...}}``;
datetime fields may be `datetime` objects or ISO strings) and returns one `Outcome` per
notification, in order. The whole list is written in ONE transaction; if that transaction
fails on a per-record problem (constraint, bad value), every record is re-applied alone, so one
bad record never blocks or rolls back the others. Per-record problems become outcomes, never
exceptions:

==========================  ===================================================================
outcome                     meaning
==========================  ===================================================================
created                     a new Drupal user (uid) was written
updated                     the mapped Drupal user was updated
linked                      no mapping yet; the one Drupal user with that email was linked
                            and updated (SFRELAY_MATCH_BY_EMAIL)
converted                   a converted Lead: its user is now mapped to ConvertedContactId
skipped_no_email            no email: nothing written but the history (never retry)
skipped_invalid_email       an email Drupal would refuse (never retry)
skipped_converted           a converted Lead that was never synced: nothing to re-map
stale                       older than the version last applied for this record (by
                            SystemModstamp, else LastModifiedDate), or a Lead already converted
duplicate                   this version (or notification id) was already applied: no effect
conflict_duplicate_email    another Salesforce record (detail: its Id) or an unmapped Drupal
                            user (detail: ``uid <n>``) already has this email; nothing written
retry                       transient per-record error (detail: the error): try again later
failed                      permanent per-record error (detail: the error): dead-letter it
==========================  ===================================================================

`apply` raises `app.errors.RetryableError` only when the database as a whole cannot be used
(unreachable, locked, deadlock on the batch): the whole call can simply be repeated, because
applying the same notifications again has no second effect.

Dead letters live in the Drupal database too (table ``sfrelay_dead_letter``):
`dead_letter()` stores one, `list_dead_letters()` lists them, `take_dead_letters(ids)` removes
and returns them (``None`` = all) for a replay. `DeadLetter.notification` is the stored
notification (datetimes come back as ISO strings; `apply` accepts those).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.config import Settings

OUTCOMES = frozenset(
    {
        "created",
        "updated",
        "linked",
        "converted",
        "skipped_no_email",
        "skipped_invalid_email",
        "skipped_converted",
        "stale",
        "duplicate",
        "conflict_duplicate_email",
        "retry",
        "failed",
    }
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one notification."""

    notification_id: str
    record_id: str | None  # the Salesforce Id, as received
    outcome: str  # one of OUTCOMES
    uid: int | None = None
    detail: str | None = None  # the other Id for conflicts, the error for retry/failed


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A notification that kept failing, as stored in sfrelay_dead_letter."""

    id: int
    notification_id: str | None
    record_id: str | None
    notification: dict[str, Any]
    error: str
    attempts: int
    first_seen: float  # epoch seconds
    last_seen: float  # epoch seconds: when it was dead-lettered


class Syncer:
    """Applies notifications to one Drupal database; open once per process."""

    @classmethod
    async def open(cls, settings: Settings) -> Syncer:
        raise NotImplementedError

    async def apply(self, notifications: Sequence[dict[str, Any]]) -> list[Outcome]:
        raise NotImplementedError

    async def dead_letter(
        self, notification: dict[str, Any], error: str, attempts: int, first_seen: float
    ) -> int:
        """Store a notification that kept failing; returns the row id."""
        raise NotImplementedError

    async def list_dead_letters(self) -> list[DeadLetter]:
        raise NotImplementedError

    async def take_dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """Remove and return the given dead letters (None = all), e.g. to replay them."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
