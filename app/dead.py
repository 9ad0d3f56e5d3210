"""Dead letters wherever they are (the Drupal database, or Redis as a fallback): list, replay."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.drupal import ledger
from app.drupal.engine import create_engine
from app.errors import QueueUnavailable, RetryableError
from app.jobs import ApplyJob, JobNotification, Source
from app.queue import DEAD_KEY, enqueue_apply
from app.sfid import canonical_id
from app.soap import MAX_NOTIFICATIONS
from app.sync import DeadLetter, Syncer

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class DeadEntry:
    """One dead letter; `id` is the database row id, or the Redis hash field."""

    id: str
    source: str  # "database" or "redis"
    notification_id: str | None
    record_id: str | None
    error: str
    attempts: int
    first_seen: float
    last_seen: float
    notification: dict[str, Any] | None  # None: refused on receipt, nothing to apply

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplayResult:
    replayed: int = 0
    jobs: int = 0
    refused: dict[str, str] = field(default_factory=dict)


def _from_database(letter: DeadLetter) -> DeadEntry:
    return DeadEntry(
        id=str(letter.id),
        source="database",
        notification_id=letter.notification_id,
        record_id=letter.record_id,
        error=letter.error,
        attempts=letter.attempts,
        first_seen=letter.first_seen,
        last_seen=letter.last_seen,
        notification=letter.notification,
    )


def _from_redis(key: str, raw: bytes) -> DeadEntry:
    value = orjson.loads(raw)
    if "notification" in value:  # written by a worker whose database was down
        return DeadEntry(
            id=key,
            source="redis",
            notification_id=value.get("notification_id"),
            record_id=value.get("record_id"),
            error=value.get("error", ""),
            attempts=int(value.get("attempts", 1)),
            first_seen=float(value.get("first_seen", 0)),
            last_seen=float(value.get("last_seen", 0)),
            notification=value["notification"],
        )
    # Written by the receiver: the notification itself was unusable.
    received = float(value.get("received_at", 0))
    return DeadEntry(
        id=key,
        source="redis",
        notification_id=value.get("notification_id"),
        record_id=value.get("record_id"),
        error=f"refused on receipt: {value.get('reason', '')}",
        attempts=0,
        first_seen=received,
        last_seen=received,
        notification=None,
    )


async def _redis_entries(redis: Redis) -> list[DeadEntry]:
    try:
        raw: dict[bytes, bytes] = await redis.hgetall(DEAD_KEY)  # type: ignore[misc]
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot read the dead letters in Redis: {exc}") from exc
    return [_from_redis(key.decode(), value) for key, value in raw.items()]


async def count_database_dead_letters(settings: Settings) -> int:
    """Dead letters in the Drupal database's sfrelay_dead_letter table (0 before it exists).

    A plain count: no migrations, nothing written, so `sfrelay queue stats` stays read-only.
    Raises ConfigError or RetryableError when the database cannot be used.
    """
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            if not await conn.run_sync(
                lambda sync: inspect(sync).has_table(ledger.dead_letters.name)
            ):
                return 0
            count = await conn.scalar(select(func.count()).select_from(ledger.dead_letters))
            return int(count or 0)
    except DBAPIError as exc:
        raise RetryableError(f"cannot read the Drupal database: {exc.orig}") from exc
    finally:
        await engine.dispose()


async def list_dead_letters(settings: Settings) -> list[DeadEntry]:
    """Every dead letter, oldest last seen first."""
    syncer = await Syncer.open(settings)
    redis: Redis = Redis.from_url(settings.redis_url)
    try:
        entries = [_from_database(letter) for letter in await syncer.list_dead_letters()]
        entries += await _redis_entries(redis)
    finally:
        await redis.aclose()
        await syncer.close()
    return sorted(entries, key=lambda entry: (entry.last_seen, entry.id))


async def replay_dead_letters(
    settings: Settings, ids: Sequence[str] | None, progress: Progress | None = None
) -> ReplayResult:
    """Queue the given dead letters (None: all) again, then remove them.

    Each chunk is queued before it is removed: a replay cut short leaves a dead letter both
    queued and listed, which is harmless (applying twice has no second effect), never lost.
    """
    syncer = await Syncer.open(settings)
    redis: Redis = Redis.from_url(settings.redis_url)
    result = ReplayResult()
    try:
        entries = [_from_database(letter) for letter in await syncer.list_dead_letters()]
        entries += await _redis_entries(redis)
        by_id = {entry.id: entry for entry in entries}
        chosen = entries if ids is None else [by_id[i] for i in ids if i in by_id]
        if ids is not None:
            for missing in (i for i in ids if i not in by_id):
                result.refused[missing] = "no such dead letter (see `sfrelay dead list`)"
        replayable = []
        for entry in chosen:
            why = _why_not_replayable(entry)
            if why:
                result.refused[entry.id] = why
            else:
                replayable.append(entry)
        for chunk in _jobs(replayable):
            notification = chunk[0].notification or {}
            job = ApplyJob(
                organization_id=canonical_id(notification["organization_id"]),
                source=Source.OUTBOUND_MESSAGE,
                received_at=min(entry.first_seen for entry in chunk),
                notifications=tuple(
                    replace(
                        JobNotification.from_json(entry.notification or {}),
                        first_seen=entry.first_seen,
                    )
                    for entry in chunk
                ),
                action_id=notification["action_id"],
            )
            await enqueue_apply(redis, settings.queue_name, job, job_ttl_s=settings.job_ttl_seconds)
            in_database = [int(e.id) for e in chunk if e.source == "database"]
            if in_database:
                await syncer.take_dead_letters(in_database)
            in_redis = [e.id for e in chunk if e.source == "redis"]
            if in_redis:
                await redis.hdel(DEAD_KEY, *in_redis)  # type: ignore[misc]
            result.replayed += len(chunk)
            result.jobs += 1
            if progress is not None:
                progress(result.replayed, len(replayable))
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"the queue (Redis) failed during the replay: {exc}") from exc
    finally:
        await redis.aclose()
        await syncer.close()
    return result


def _why_not_replayable(entry: DeadEntry) -> str | None:
    if entry.notification is None:
        return (
            f"{entry.error}; it cannot be applied as it is: fix it in Salesforce and let "
            "Salesforce send it again"
        )
    missing = [
        key
        for key in ("organization_id", "action_id", "object", "fields")
        if key not in entry.notification
    ]
    if missing:
        return f"the stored notification lacks {', '.join(missing)}"
    return None


def _jobs(entries: list[DeadEntry]) -> list[list[DeadEntry]]:
    """Chunks of at most one message's worth, each from one organization and action."""

    def key(entry: DeadEntry) -> tuple[str, str]:
        notification = entry.notification or {}
        return (notification["organization_id"], notification["action_id"])

    chunks: list[list[DeadEntry]] = []
    for _, group in itertools.groupby(sorted(entries, key=key), key=key):
        members = list(group)
        for start in range(0, len(members), MAX_NOTIFICATIONS):
            chunks.append(members[start : start + MAX_NOTIFICATIONS])
    return chunks
