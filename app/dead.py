"""Dead letters: notifications sfrelay could not apply, wherever they are kept; list, count,
replay, discard.

A dead letter is one `DeadLetter`, whoever writes it:

- the receiver, for an authentic notification it cannot use (kept in Redis beside the raw
  body; listed, never replayed: Salesforce must send it again once fixed);
- a worker, for a notification that kept failing: in the Drupal database's
  ``sfrelay_dead_letter`` table, or in Redis when the database cannot take it in time;
- a worker, for a whole job it cannot read (another release queued it: an unknown function,
  arguments of another shape): in Redis, the job kept as it was stored (`raw_job`), and
  replayed as such once workers that read it run.

This module alone writes, reads, counts, replays and discards (removes) them. Readers never
migrate: before a worker has created the table, the database simply holds no dead letters.
Redis key names are `app.queue`'s.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis
from sqlalchemy import (
    Column,
    Double,
    Integer,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import queue
from app.config import Settings
from app.drupal.engine import create_engine
from app.drupal.errors import driver_text
from app.drupal.ledger import metadata
from app.errors import RetryableError
from app.jobs import ApplyJob, JobNotification, Source
from app.records import json_within_bmp

logger = logging.getLogger("sfrelay.dead")

Progress = Callable[[int, int], None]
Run = Callable[[Coroutine[Any, Any, int]], Awaitable[int]]

_LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
table = Table(
    "sfrelay_dead_letter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("notification_id", String(40), nullable=True),
    Column("record_id", String(18), nullable=True, index=True),
    Column("payload", _LongText, nullable=False),  # DeadLetter.dumps()
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("first_seen", Double, nullable=False),
    Column("last_seen", Double, nullable=False),
)

REFUSED_ON_RECEIPT = "refused on receipt: "


class Kept(StrEnum):
    """Where a dead letter is kept."""

    DATABASE = "database"
    REDIS = "redis"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One notification sfrelay could not apply, and why."""

    job: ApplyJob  # source, organization, action, and the notification (none: refused)
    reason: str
    notification_id: str | None
    record_id: str | None
    attempts: int
    first_seen: float  # epoch seconds
    last_seen: float  # epoch seconds: when it was dead-lettered
    body_sha256: str | None = None  # the receiver keeps the raw body under this digest
    id: str = ""  # the database row id or the Redis hash field, once kept
    kept: Kept | None = None
    raw_job: bytes | None = None  # a job the worker could not read, as it was stored

    @classmethod
    def unreadable(cls, raw_job: bytes, reason: str) -> DeadLetter:
        """A worker's dead letter for a whole job it could not read."""
        now = time.time()
        nothing = ApplyJob("", Source.OUTBOUND_MESSAGE, now, ())
        return cls(nothing, reason, None, None, 1, now, now, raw_job=raw_job)

    @classmethod
    def of(
        cls, job: ApplyJob, notification: JobNotification, reason: str, attempts: int
    ) -> DeadLetter:
        """A worker's dead letter for one of `job`'s notifications."""
        return cls(
            job=job.with_notifications([replace(notification, attempt=1, first_seen=None)]),
            reason=reason,
            notification_id=notification.id or None,
            record_id=notification.record_id,
            attempts=attempts,
            first_seen=job.first_seen(notification),
            last_seen=time.time(),
        )

    @property
    def source(self) -> Source:
        return self.job.source

    @property
    def notification(self) -> JobNotification | None:
        """What to apply again; None: refused on receipt, nothing to apply."""
        return self.job.notifications[0] if self.job.notifications else None

    @property
    def refused_on_receipt(self) -> bool:
        """The receiver's: nothing to apply, nothing to replay."""
        return self.notification is None and self.raw_job is None

    @property
    def error(self) -> str:
        """The reason as `sfrelay dead list` shows it."""
        return REFUSED_ON_RECEIPT + self.reason if self.refused_on_receipt else self.reason

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "v": 2,
                "job": self.job.kwargs(),
                "reason": self.reason,
                "notification_id": self.notification_id,
                "record_id": self.record_id,
                "attempts": self.attempts,
                "first_seen": self.first_seen,
                "last_seen": self.last_seen,
                "body_sha256": self.body_sha256,
                **({"raw_job": base64.b64encode(self.raw_job).decode()} if self.raw_job else {}),
            }
        )

    @classmethod
    def loads(cls, raw: bytes | str, id: str, kept: Kept) -> DeadLetter:
        """Read any shape sfrelay ever stored (the untagged ones before version 2 too)."""
        value: dict[str, Any] = orjson.loads(raw)
        if value.get("v") != 2:
            return _untagged(value, id, kept)
        return cls(
            job=ApplyJob.from_kwargs(value["job"]),
            reason=str(value["reason"]),
            notification_id=value.get("notification_id"),
            record_id=value.get("record_id"),
            attempts=int(value["attempts"]),
            first_seen=float(value["first_seen"]),
            last_seen=float(value["last_seen"]),
            body_sha256=value.get("body_sha256"),
            id=id,
            kept=kept,
            raw_job=base64.b64decode(value["raw_job"]) if "raw_job" in value else None,
        )

    def as_dict(self) -> dict[str, Any]:
        """The `sfrelay dead list --json` form (unchanged: `source` says where it is kept)."""
        notification = self.notification
        return {
            "id": self.id,
            "source": self.kept.value if self.kept else None,
            "notification_id": self.notification_id,
            "record_id": self.record_id,
            "error": self.error,
            "attempts": self.attempts,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "notification": None if notification is None else self.job.flat(notification),
            **({"job": self.raw_job.decode(errors="replace")} if self.raw_job else {}),
        }


def _untagged(value: dict[str, Any], id: str, kept: Kept) -> DeadLetter:
    """The three shapes stored before version 2."""
    if "notification" in value:  # a worker's, in Redis because the database was down
        return DeadLetter(
            job=ApplyJob.from_flat(value["notification"]),
            reason=str(value.get("error", "")),
            notification_id=value.get("notification_id"),
            record_id=value.get("record_id"),
            attempts=int(value.get("attempts", 1)),
            first_seen=float(value.get("first_seen", 0)),
            last_seen=float(value.get("last_seen", 0)),
            id=id,
            kept=kept,
        )
    if "reason" in value:  # the receiver's: the notification itself was unusable
        job = ApplyJob.from_kwargs(value)  # its organization, action and time of receipt
        return DeadLetter(
            job=job,
            reason=str(value["reason"]),
            notification_id=value.get("notification_id"),
            record_id=value.get("record_id"),
            attempts=0,
            first_seen=job.received_at,
            last_seen=job.received_at,
            body_sha256=value.get("body_sha256"),
            id=id,
            kept=kept,
        )
    # A database row's payload: the flat notification (its error, attempts and times are the
    # row's columns).
    job = ApplyJob.from_flat(value)
    return DeadLetter(
        job=job,
        reason="",
        notification_id=job.notifications[0].id,
        record_id=job.notifications[0].record_id,
        attempts=1,
        first_seen=0.0,
        last_seen=0.0,
        id=id,
        kept=kept,
    )


@dataclass
class ReplayResult:
    replayed: int = 0
    jobs: int = 0
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class DiscardResult:
    """Either the letters removed, or why some IDs name no one letter (then none is removed)."""

    discarded: list[DeadLetter] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


# --- writing -------------------------------------------------------------------------------


async def add(conn: AsyncConnection, letter: DeadLetter) -> int:
    """Store one dead letter in the database; returns its row id."""
    result = await conn.execute(
        insert(table).values(
            notification_id=letter.notification_id,
            record_id=letter.record_id,
            payload=json_within_bmp(letter.dumps()),
            error=letter.reason,
            attempts=letter.attempts,
            first_seen=letter.first_seen,
            last_seen=letter.last_seen,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


async def keep(
    letters: Sequence[DeadLetter],
    engine: AsyncEngine,
    redis: Redis,
    deadline: float,
    run: Run | None = None,
) -> Kept:
    """Store dead letters in the database, or in Redis when it cannot take them by `deadline`.

    `run` wraps each database write (a worker detaches it, so that a stuck write cannot
    hold the job past its deadline; if it lands later, the letter is in both places, and
    replaying both is harmless). Raises QueueUnavailable when Redis cannot take them either.
    """
    left = list(letters)
    try:
        async with asyncio.timeout_at(deadline):
            while left:
                write = _add_one(engine, left[0])
                await (run(write) if run is not None else write)
                left.pop(0)
        return Kept.DATABASE
    except Exception as exc:  # whatever broke, the notifications must be kept somewhere
        logger.warning(
            "the database did not take %d dead letters (%s): keeping them in Redis",
            len(left),
            driver_text(exc),
        )
    await queue.dead_letters_to_redis(
        redis,
        {
            queue.worker_dead_letter_field(
                letter.job.organization_id, letter.notification_id or os.urandom(8).hex()
            ): letter.dumps()
            for letter in left
        },
    )
    return Kept.REDIS


async def keep_unreadable(redis: Redis, job_id: str, raw_job: bytes, reason: str) -> None:
    """Keep a job the worker could not read (as stored under `arq:job:<job_id>`) in Redis,
    where it was queued. Raises QueueUnavailable when Redis cannot take it."""
    letter = DeadLetter.unreadable(raw_job, reason)
    field = queue.unreadable_job_field(job_id)
    await queue.dead_letters_to_redis(redis, {field: letter.dumps()}, fallback=False)


async def _add_one(engine: AsyncEngine, letter: DeadLetter) -> int:
    async with engine.begin() as conn:
        return await add(conn, letter)


# --- reading (never migrates) --------------------------------------------------------------


async def _has_table(conn: AsyncConnection) -> bool:
    return bool(await conn.run_sync(lambda sync: inspect(sync).has_table(table.name)))


async def in_database(
    conn: AsyncConnection, *, record_id: str | None = None, with_email: bool = False
) -> list[DeadLetter]:
    """The dead letters in the database, oldest first (none before the table exists).

    Narrowed, for `sfrelay why`, to those of one record (`record_id`, any of its forms: they
    are kept as received) or to those whose notification holds an `@` (`with_email`).
    """
    if not await _has_table(conn):
        return []  # no worker has run yet: no dead letters
    query = select(table).order_by(table.c.id)
    if record_id is not None:
        forms = {record_id.lower(), record_id[:15].lower()}
        query = query.where(func.lower(table.c.record_id).in_(sorted(forms)))
    if with_email:
        query = query.where(table.c.payload.like("%@%"))
    found = []
    for row in await conn.execute(query):
        letter = DeadLetter.loads(row.payload, str(row.id), Kept.DATABASE)
        # The columns are the truth for what the untagged payload did not hold.
        found.append(
            replace(
                letter,
                reason=row.error,
                attempts=row.attempts,
                first_seen=row.first_seen,
                last_seen=row.last_seen,
            )
        )
    return found


async def _database(settings: Settings) -> AsyncEngine:
    return create_engine(settings.database_url, pool_size=1)


async def count_in_database(settings: Settings) -> int:
    """Dead letters in the Drupal database (0 before the table exists); reads only.

    Raises ConfigError or RetryableError when the database cannot be used.
    """
    engine = await _database(settings)
    try:
        async with engine.connect() as conn:
            return await count(conn)
    except (DBAPIError, OSError) as exc:  # asyncpg: a refused connection is a bare OSError
        raise RetryableError(f"cannot read the Drupal database: {driver_text(exc)}") from exc
    finally:
        await engine.dispose()


async def count(conn: AsyncConnection) -> int:
    """Dead letters in the database (0 before the table exists); reads only."""
    if not await _has_table(conn):
        return 0
    found = await conn.scalar(select(func.count()).select_from(table))
    return int(found or 0)


async def in_redis(redis: Redis) -> list[DeadLetter]:
    """The dead letters kept in Redis (the receiver's, and workers' the database refused)."""
    stored = await queue.dead_letters_in_redis(redis)
    letters = []
    for key, raw in sorted(stored.items()):
        try:
            letters.append(DeadLetter.loads(raw, key, Kept.REDIS))
        except (ValueError, KeyError, TypeError):
            logger.warning("dead letter %s in Redis is not one sfrelay can read: left alone", key)
    return letters


async def _everywhere(engine: AsyncEngine, redis: Redis) -> list[DeadLetter]:
    try:
        async with engine.connect() as conn:
            letters = await in_database(conn)
    except (DBAPIError, OSError) as exc:  # asyncpg: a refused connection is a bare OSError
        raise RetryableError(f"cannot read the Drupal database: {driver_text(exc)}") from exc
    return letters + await in_redis(redis)


async def list_dead_letters(settings: Settings) -> list[DeadLetter]:
    """Every dead letter, oldest last seen first; reads only."""
    engine = await _database(settings)
    redis = queue.redis_client(settings)
    try:
        letters = await _everywhere(engine, redis)
    finally:
        await redis.aclose()
        await engine.dispose()
    return sorted(letters, key=lambda letter: (letter.last_seen, letter.id))


# --- replay --------------------------------------------------------------------------------


async def replay_dead_letters(
    settings: Settings, ids: Sequence[str] | None, progress: Progress | None = None
) -> ReplayResult:
    """Queue the given dead letters (None: all) again, then remove them.

    Each chunk is queued before it is removed: a replay cut short leaves a dead letter both
    queued and listed, which is harmless (applying twice has no second effect), never lost.
    """
    engine = await _database(settings)
    redis = queue.redis_client(settings)
    result = ReplayResult()
    try:
        letters = await _everywhere(engine, redis)
        chosen = letters
        if ids is not None:
            chosen, result.refused = _named(letters, ids)
        replayable = []
        for letter in chosen:
            why = _why_not_replayable(letter)
            if why:
                result.refused[letter.id] = why
            else:
                replayable.append(letter)
        total = len(replayable)
        for letter in replayable:
            if letter.raw_job is not None:  # a whole job, queued again as it was
                await queue.enqueue_stored(
                    redis, settings.queue_name, letter.raw_job, job_ttl_s=settings.job_ttl_seconds
                )
                await _remove(engine, redis, [letter])
                result.replayed += 1
                result.jobs += 1
        for chunk in _jobs([letter for letter in replayable if letter.raw_job is None]):
            job = replace(
                chunk[0].job,
                received_at=min(letter.first_seen for letter in chunk),
                notifications=tuple(
                    replace(letter.notification, first_seen=letter.first_seen)
                    for letter in chunk
                    if letter.notification is not None
                ),
            )
            await queue.enqueue_apply(
                redis, settings.queue_name, job, job_ttl_s=settings.job_ttl_seconds
            )
            await _remove(engine, redis, chunk)
            result.replayed += len(chunk)
            result.jobs += 1
            if progress is not None:
                progress(result.replayed, total)
    finally:
        await redis.aclose()
        await engine.dispose()
    return result


def _why_not_replayable(letter: DeadLetter) -> str | None:
    if letter.raw_job is not None:
        return None
    if letter.notification is None:
        return (
            f"{letter.error}; it cannot be applied as it is: fix it in Salesforce and let "
            f"Salesforce send it again; `sfrelay dead discard {letter.id}` removes this one"
        )
    if not letter.job.organization_id or not letter.notification.object:
        return "the stored notification lacks its organization or object"
    return None


def _jobs(letters: list[DeadLetter]) -> list[list[DeadLetter]]:
    """Chunks of at most one message's worth, each from one organization, action and source."""
    # Imported here: app.soap loads lxml, which `sfrelay status` and `why` need not.
    from app.soap import MAX_NOTIFICATIONS

    def key(letter: DeadLetter) -> tuple[str, str, str]:
        return (letter.job.organization_id, letter.job.action_id, letter.source.value)

    chunks: list[list[DeadLetter]] = []
    for _, group in itertools.groupby(sorted(letters, key=key), key=key):
        members = list(group)
        for start in range(0, len(members), MAX_NOTIFICATIONS):
            chunks.append(members[start : start + MAX_NOTIFICATIONS])
    return chunks


# --- naming, removing, discarding ------------------------------------------------------------

NO_SUCH = "no such dead letter (see `sfrelay dead list`)"


def _named(
    letters: Sequence[DeadLetter], ids: Sequence[str]
) -> tuple[list[DeadLetter], dict[str, str]]:
    """The letters `ids` name (each once, in the order named), and why an ID names none.

    An ID is a letter's own (`sfrelay dead list`'s ID column) or its notification Id (the
    NOTIFICATION column) when no other letter has that notification Id: one a worker kept in
    the database late, after keeping it in Redis, is in both places.
    """
    by_id = {letter.id: letter for letter in letters}
    by_notification: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        if letter.notification_id:
            by_notification.setdefault(letter.notification_id, []).append(letter)
    chosen: dict[str, DeadLetter] = {}
    refused: dict[str, str] = {}
    for given in ids:
        same = [by_id[given]] if given in by_id else by_notification.get(given, [])
        if len(same) == 1:
            chosen.setdefault(same[0].id, same[0])
        elif same:
            refused[given] = (
                f"{len(same)} dead letters have this notification Id: give the ID of one "
                f"({', '.join(letter.id for letter in same)})"
            )
        else:
            refused[given] = NO_SUCH
    return list(chosen.values()), refused


async def _remove(
    engine: AsyncEngine, redis: Redis, letters: Sequence[DeadLetter], bodies: Sequence[str] = ()
) -> None:
    """Remove `letters` from where they are kept (the database first), and the raw `bodies`."""
    in_database = [int(letter.id) for letter in letters if letter.kept is Kept.DATABASE]
    if in_database:
        try:
            async with engine.begin() as conn:
                await conn.execute(delete(table).where(table.c.id.in_(in_database)))
        except (DBAPIError, OSError) as exc:
            raise RetryableError(f"cannot write the Drupal database: {driver_text(exc)}") from exc
    in_redis = [letter.id for letter in letters if letter.kept is Kept.REDIS]
    if in_redis or bodies:
        await queue.remove_dead_letters_in_redis(redis, in_redis, bodies)


async def discard_dead_letters(settings: Settings, ids: Sequence[str] | None) -> DiscardResult:
    """Remove the given dead letters (None: all) for good, without applying them.

    All or nothing: when an ID names no one letter, nothing is removed. The raw body the
    receiver kept beside its dead letters goes with the last of them.
    """
    engine = await _database(settings)
    redis = queue.redis_client(settings)
    try:
        letters = await _everywhere(engine, redis)
        if ids is None:
            chosen = letters
        else:
            chosen, refused = _named(letters, ids)
            if refused:
                return DiscardResult(refused=refused)
        gone = {letter.id for letter in chosen}
        kept_bodies = {letter.body_sha256 for letter in letters if letter.id not in gone}
        bodies = {letter.body_sha256 for letter in chosen if letter.body_sha256} - kept_bodies
        await _remove(engine, redis, chosen, sorted(str(body) for body in bodies))
    finally:
        await redis.aclose()
        await engine.dispose()
    return DiscardResult(discarded=sorted(chosen, key=lambda letter: (letter.last_seen, letter.id)))
