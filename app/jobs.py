"""The one job sfrelay queues, `ApplyJob`: the only code that builds and reads its arguments.

An arq job `apply_notifications` carries one `ApplyJob` as keyword arguments in a tagged,
versioned form (``{"v": 2, "source": ..., "organization_id": ..., "notifications": [...]}``);
arq's own `serialize_job` lays the job out and `serialize` / `deserialize` (arq's serializer
hooks) turn it into JSON bytes. `ApplyJob.from_kwargs` also reads the untagged form queued
before version 2 (with its `types` map, which is ignored: values are typed where written).

Field values travel exactly as the source sent them (a dateTime stays Salesforce's
``2024-05-01T10:00:00.000Z`` text); `app.records` interprets them where they are written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import orjson
from arq.jobs import deserialize_job, serialize_job

from app.sfid import canonical_id

APPLY_JOB = "apply_notifications"  # the arq function that runs an ApplyJob
# What the worker's deserializer names a job it cannot decode: no function has this name, so
# the worker keeps the job as a dead letter (workers.main.Worker) instead of arq dropping it.
UNDECODABLE = "\x00undecodable"
_ARQ_KEYS = frozenset({"f", "a", "k", "t", "et"})  # a job as arq's serialize_job lays it out
VERSION = 2
_SPLICE = "\x00notifications\x00"  # stands in for the list the receiver's script splices in


class Source(StrEnum):
    """Where a job's notifications came from."""

    OUTBOUND_MESSAGE = "outbound_message"
    RECONCILE = "reconcile"
    BACKFILL = "backfill"
    REFETCH = "refetch"

    @property
    def polled(self) -> bool:
        """Read from Salesforce's API: its notification ids are stand-ins for a version
        (app.salesforce.soql.synthetic_id), which a later poll reads again."""
        return self in (Source.RECONCILE, Source.BACKFILL)


# Not frozen: a frozen dataclass costs ten times as much to build, and the receiver builds
# one per notification on its hot path. Treat it as immutable (dataclasses.replace).
@dataclass(slots=True)
class JobNotification:
    """One record change to apply: the notification id, object, fields as sent."""

    id: str
    object: str
    fields: dict[str, Any]
    attempt: int = 1  # 2, 3, ... once retried
    first_seen: float | None = None  # when first received, if before the job's received_at

    @property
    def record_id(self) -> str | None:
        value = self.fields.get("Id")
        return value if isinstance(value, str) else None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "object": self.object, "fields": self.fields}
        if self.attempt != 1:
            data["attempt"] = self.attempt
        if self.first_seen is not None:
            data["first_seen"] = self.first_seen
        return data

    def dumps(self) -> bytes:
        if self.attempt == 1 and self.first_seen is None:  # the receiver's, on its hot path
            return orjson.dumps({"id": self.id, "object": self.object, "fields": self.fields})
        return orjson.dumps(self.as_json())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobNotification:
        first_seen = data.get("first_seen")
        fields = data.get("fields")
        return cls(
            id=str(data.get("id") or ""),
            object=str(data.get("object") or ""),
            # The decoded dict itself (nothing changes a notification's fields): a worker
            # holds two batches of jobs, their decoded arguments alive until each job ends.
            fields=fields if type(fields) is dict else dict(fields or {}),
            attempt=int(data.get("attempt", 1)),
            first_seen=None if first_seen is None else float(first_seen),
        )


@dataclass(frozen=True, slots=True)
class ApplyJob:
    """Notifications of one organization to apply to Drupal, and where they came from."""

    organization_id: str  # the case-correct 15-character form (app.sfid.canonical_id)
    source: Source
    received_at: float  # epoch seconds
    notifications: tuple[JobNotification, ...]
    action_id: str = ""  # the Outbound Message's ActionId, when it came from one

    def first_seen(self, notification: JobNotification) -> float:
        if notification.first_seen is not None:
            return notification.first_seen
        return self.received_at

    def with_notifications(self, notifications: Iterable[JobNotification]) -> ApplyJob:
        return replace(self, notifications=tuple(notifications))

    def kwargs(self) -> dict[str, Any]:
        """The job's keyword arguments (what `from_kwargs` reads)."""
        return {**self._head(), "notifications": [n.as_json() for n in self.notifications]}

    def _head(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "source": self.source.value,
            "organization_id": self.organization_id,
            "action_id": self.action_id,
            "received_at": self.received_at,
        }

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ApplyJob:
        """Read a job's keyword arguments, as this version or the untagged one writes them."""
        # Version 1 (untagged) also had `types`, and the organization id as received.
        return cls(
            organization_id=canonical_id(str(kwargs["organization_id"])),
            source=Source(kwargs.get("source", Source.OUTBOUND_MESSAGE)),
            received_at=float(kwargs.get("received_at") or 0.0),
            notifications=tuple(
                n if isinstance(n, JobNotification) else JobNotification.from_json(n)
                for n in kwargs.get("notifications") or ()
            ),
            action_id=str(kwargs.get("action_id") or ""),
        )

    def flat(self, notification: JobNotification) -> dict[str, Any]:
        """One notification beside its organization and action, in one object.

        The form `sfrelay dead list --json` shows, and dead letters stored before version 2.
        """
        return {
            **notification.as_json(),
            "organization_id": self.organization_id,
            "action_id": self.action_id,
        }

    @classmethod
    def from_flat(cls, value: dict[str, Any], received_at: float = 0.0) -> ApplyJob:
        """The one-notification job of a `flat()` object (or an older, untagged one)."""
        return cls.from_kwargs({"received_at": received_at, **value, "notifications": [value]})

    def serialize(self, enqueued_ms: int) -> bytes:
        """The job as arq stores it under `arq:job:<id>`."""
        return serialize_job(APPLY_JOB, (), self.kwargs(), None, enqueued_ms, serializer=serialize)

    def frame(self, enqueued_ms: int) -> tuple[bytes, bytes]:
        """The stored job's bytes before and after its notifications' comma-joined `dumps()`.

        The receiver's script splices the notifications Redis accepts in between, so the
        job is written in the same round trip as their dedupe keys.
        """
        kwargs = {**self._head(), "notifications": _SPLICE}
        raw = serialize_job(APPLY_JOB, (), kwargs, None, enqueued_ms, serializer=serialize)
        prefix, _, suffix = raw.partition(orjson.dumps(_SPLICE))
        return prefix + b"[", b"]" + suffix


def serialize(data: dict[str, Any]) -> bytes:
    """arq's job_serializer: JSON, so any client (and a person with redis-cli) can read it."""
    return orjson.dumps(data)


def deserialize(raw: bytes) -> dict[str, Any]:
    """arq's job_deserializer."""
    result: dict[str, Any] = orjson.loads(raw)
    return result


class Notifications(list[Any]):
    """A job's notifications as the worker receives them (JobNotifications), printed as their
    count. arq logs every job it starts with its arguments' repr: that of 100 notifications
    took ~0.15 ms a job, and cut at 80 characters it showed their first ids and nothing useful."""

    def __repr__(self) -> str:
        return f"<{len(self)} notifications>"


def deserialize_for_worker(raw: bytes) -> dict[str, Any]:
    """The worker's job_deserializer: `deserialize`, the notifications made JobNotifications
    once (arq keeps a job's arguments until it ends: decoded dicts beside the ApplyJob's
    objects were a second copy of two batches of notifications), in a `Notifications`.
    A job that is not arq's JSON layout is named UNDECODABLE (arq would drop it)."""
    try:
        result = deserialize(raw)
    except orjson.JSONDecodeError:
        result = None
    if not (isinstance(result, dict) and result.keys() >= _ARQ_KEYS):
        return {"f": UNDECODABLE, "a": (), "k": {}, "t": None, "et": 0}
    kwargs = result.get("k") if isinstance(result, dict) else None
    if isinstance(kwargs, dict) and isinstance(items := kwargs.get("notifications"), list):
        # Never raise here (arq would fail the job as undecodable, before the task runs):
        # what cannot be read stays as it came, for the task to read, and fail on, as before.
        with suppress(Exception):
            items = [JobNotification.from_json(n) if isinstance(n, dict) else n for n in items]
        kwargs["notifications"] = Notifications(items)
    return result


def read(raw: bytes) -> ApplyJob:
    """The ApplyJob of a job as stored under `arq:job:<id>`."""
    job = deserialize_job(raw, deserializer=deserialize)
    if job.function != APPLY_JOB:
        raise ValueError(f"not an {APPLY_JOB} job: {job.function}")
    return ApplyJob.from_kwargs(job.kwargs)


def why_unreadable(raw: bytes, error: Exception | None = None) -> str:
    """Why a worker cannot run this stored job (`error`: what reading its arguments raised),
    and what to do: another release or program queued it."""
    fix = "queued by another sfrelay release? Run workers of that release, then replay it"
    decoded = deserialize_for_worker(raw)
    if decoded["f"] == UNDECODABLE:
        return f"not a job in arq's JSON layout ({len(raw)} bytes): {fix}"
    if decoded["f"] != APPLY_JOB:
        return f"a job for {decoded['f']!r}, a function this sfrelay worker does not run: {fix}"
    return f"an {APPLY_JOB} job this worker cannot read ({type(error).__name__}: {error}): {fix}"


def dataless_function(raw: bytes) -> str | None:
    """The function of a stored job without arguments, which holds nothing to lose: a cron
    job (`sfrelay:reconcile`) that a worker with other settings, or of another release,
    queued, and that its own workers queue again on schedule. None for any other job."""
    decoded = deserialize_for_worker(raw)
    if decoded["f"] in (UNDECODABLE, APPLY_JOB) or decoded["a"] or decoded["k"]:
        return None
    return str(decoded["f"])


def notification_count(raw: bytes) -> int:
    """How many notifications a stored job holds (1 for a job that is not one of ours)."""
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 1  # e.g. a pickled job another producer wrote: one job
    kwargs = job.get("k") or {}
    notifications = kwargs.get("notifications")
    return len(notifications) if isinstance(notifications, list) else 1


def without(
    raw: bytes, drop: Callable[[JobNotification], bool]
) -> tuple[bytes | None, list[JobNotification]]:
    """A stored job rewritten without the notifications `drop` picks (arq's layout, tries and
    enqueue time kept): (the new bytes, or None when nothing is left; what was dropped)."""
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw, []  # e.g. a pickled job another producer wrote: not ours to edit
    kwargs = job.get("k") if isinstance(job, dict) else None
    if not isinstance(kwargs, dict) or job.get("f") != APPLY_JOB:
        return raw, []
    notifications = [JobNotification.from_json(n) for n in kwargs.get("notifications") or ()]
    dropped = [n for n in notifications if drop(n)]
    if not dropped:
        return raw, []
    kept = [n.as_json() for n in notifications if not drop(n)]
    if not kept:
        return None, dropped
    job["k"] = {**kwargs, "notifications": kept}
    return orjson.dumps(job), dropped
