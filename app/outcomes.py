"""What happened to one notification: `OutcomeKind` (a fixed set) and the `Outcome` result."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OutcomeKind(StrEnum):
    """The outcome of applying one notification (see app/sync.py for each one's meaning)."""

    CREATED = "created"
    UPDATED = "updated"
    LINKED = "linked"
    CONVERTED = "converted"
    SKIPPED_NO_EMAIL = "skipped_no_email"
    SKIPPED_INVALID_EMAIL = "skipped_invalid_email"
    SKIPPED_CONVERTED = "skipped_converted"
    STALE = "stale"
    DUPLICATE = "duplicate"
    CONFLICT_DUPLICATE_EMAIL = "conflict_duplicate_email"
    CONFLICT_PROTECTED_USER = "conflict_protected_user"
    # Deletes, undeletes and merges (app/lifecycle.py).
    BLOCKED = "blocked"
    UNBLOCKED = "unblocked"
    UNLINKED = "unlinked"
    MERGED = "merged"
    DELETED = "deleted"  # a delete noted, with nothing to change (detail: why)
    RETRY = "retry"
    FAILED = "failed"
    # What the worker then did with a `retry` or `failed` one (counted, never planned).
    REQUEUED = "requeued"
    DEAD = "dead"
    # A poll (reconcile, backfill) stopped because the org's API requests ran low.
    API_LIMIT = "api_limit"


# After these, sfrelay_record holds the version or a later one: the ledger, not the queue's
# dedupe key, then says it was applied (app.reconcile's `current`).
IN_LEDGER = frozenset(
    {
        OutcomeKind.CREATED,
        OutcomeKind.UPDATED,
        OutcomeKind.LINKED,
        OutcomeKind.CONVERTED,
        OutcomeKind.STALE,
        OutcomeKind.DUPLICATE,
        OutcomeKind.BLOCKED,
        OutcomeKind.UNBLOCKED,
        OutcomeKind.UNLINKED,
        OutcomeKind.MERGED,
        OutcomeKind.DELETED,
    }
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one notification (what the planner decided, then the sync's result)."""

    notification_id: str
    record_id: str | None  # the Salesforce Id, as received
    kind: OutcomeKind
    uid: int | None = None  # while planning, a pending new user's negative key
    detail: str | None = None  # the other Id for conflicts, the error for retry/failed
