"""The worker task in a real arq Worker: real Redis, a real Drupal 10 SQLite copy."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from arq.constants import in_progress_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from app.config import Settings
from app.dead import Kept, list_dead_letters, replay_dead_letters
from app.jobs import (
    APPLY_JOB,
    ApplyJob,
    JobNotification,
    Source,
    deserialize_for_worker,
    serialize,
)
from app.queue import (
    DEAD_KEY,
    JOB_KEY_PREFIX,
    OUTCOME_PREFIX,
    RETRY_KEY_PREFIX,
    SEEN_PREFIX,
    STATS_KEY,
    Enqueuer,
    enqueue_apply,
)
from tests.factories import ORG_ID, apply_job, contact_json, sf_id
from tests.fixtures_worker import drupal_users, run_worker
from workers.main import claim_jobs
from workers.tasks import INTERRUPTED_TRIES, backoff_s


@pytest.fixture
async def aredis(worker_settings: Settings) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(worker_settings.redis_url)
    yield client
    await client.aclose()


async def enqueue(aredis: Redis, settings: Settings, *jobs: ApplyJob) -> None:
    for one in jobs:
        assert await enqueue_apply(
            aredis, settings.queue_name, one, job_ttl_s=settings.job_ttl_seconds
        )


def stats(client: redis.Redis) -> dict[str, int]:
    raw = dict(client.hgetall(STATS_KEY))
    return {k.decode(): int(v) for k, v in raw.items() if k.startswith(OUTCOME_PREFIX.encode())}


async def test_jobs_are_claimed_once_and_only_when_due_and_free(
    worker_settings: Settings, aredis: Redis
) -> None:
    """workers.main.claim_jobs: arq's rule for starting a job, one round trip for all."""
    queue = worker_settings.queue_name
    now = int(time.time() * 1000)
    await aredis.zadd(queue, {"due": now - 10, "taken": now - 10, "later": now + 60_000})
    await aredis.set(in_progress_key_prefix + "taken", b"1")  # another worker runs it

    claimed = await claim_jobs(aredis, queue, ["due", "taken", "later", "gone"], 30_000)
    assert claimed == [("due", now - 10)]
    assert 29_000 < await aredis.pttl(in_progress_key_prefix + "due") <= 30_000
    for other in ("later", "gone"):
        assert await aredis.exists(in_progress_key_prefix + other) == 0
    assert await claim_jobs(aredis, queue, ["due"], 30_000) == []  # never twice
    assert await claim_jobs(aredis, queue, [], 30_000) == []


def test_the_worker_decodes_a_job_s_notifications_once_and_never_fails_decoding() -> None:
    """app.jobs.deserialize_for_worker: JobNotifications made once, shared with the ApplyJob
    (arq keeps the arguments until the job ends), printed as their count; what it cannot
    read stays as it came (a decoding error would have arq fail the job before the task)."""
    job = apply_job([contact_json(1, email="ada@example.org"), contact_json(2)])

    def stored(kwargs: dict[str, Any]) -> bytes:  # as arq stores a job
        return serialize_job(APPLY_JOB, (), kwargs, None, 0, serializer=serialize)

    kwargs = deserialize_for_worker(stored(job.kwargs()))["k"]
    items = kwargs["notifications"]
    assert repr(items) == "<2 notifications>"
    assert ApplyJob.from_kwargs(kwargs).notifications == job.notifications
    read = ApplyJob.from_kwargs(kwargs).notifications
    assert all(a is b for a, b in zip(read, items, strict=True))

    bad = [contact_json(1), {"id": "x", "fields": 5}]
    kept = deserialize_for_worker(stored({**job.kwargs(), "notifications": bad}))["k"]
    assert kept["notifications"] == bad and repr(kept["notifications"]) == "<2 notifications>"


async def test_a_job_becomes_drupal_users_and_outcome_counters(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    notifications = [
        contact_json(1, email="ada@example.org"),
        contact_json(2, email="grace@example.org", first="Grace", last="Hopper"),
        contact_json(3),  # no email: never a user
    ]
    await enqueue(aredis, worker_settings, apply_job(notifications))
    worker = await run_worker(worker_settings)
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (1, 0, 0)
    assert drupal_users(drupal_db) == [
        (2, "Ada Byron", "ada@example.org", 1, "Ada", "Byron", sf_id("003", 1)),
        (3, "Grace Hopper", "grace@example.org", 1, "Grace", "Hopper", sf_id("003", 2)),
    ]
    assert stats(redis_client) == {"outcome:created": 2, "outcome:skipped_no_email": 1}
    assert redis_client.zcard(worker_settings.queue_name) == 0
    assert redis_client.keys("arq:*") == []  # no result kept, nothing left behind


async def test_the_same_job_again_has_no_second_effect(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    # What a worker killed after its commit leaves: the job runs a second time.
    kwargs = apply_job([contact_json(n, email=f"user{n}@example.org") for n in range(1, 51)])
    await enqueue(aredis, worker_settings, kwargs)
    await run_worker(worker_settings)
    first = drupal_users(drupal_db)
    await enqueue(aredis, worker_settings, kwargs)
    await run_worker(worker_settings)
    assert drupal_users(drupal_db) == first
    assert len(first) == 50
    assert stats(redis_client) == {"outcome:created": 50, "outcome:duplicate": 50}


async def test_concurrent_jobs_are_applied_whole_and_all_of_them(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    jobs = [
        apply_job([contact_json(100 * j + n, email=f"j{j}n{n}@example.org") for n in range(100)])
        for j in range(8)
    ]
    await enqueue(aredis, worker_settings.model_copy(update={"worker_batch_size": 250}), *jobs)
    worker = await run_worker(worker_settings.model_copy(update={"worker_batch_size": 250}))
    assert worker.jobs_complete == 8
    users = drupal_users(drupal_db)
    assert len(users) == 800
    assert {u[2] for u in users} == {f"j{j}n{n}@example.org" for j in range(8) for n in range(100)}
    assert stats(redis_client) == {"outcome:created": 800}


async def test_a_locked_database_is_retried_then_dead_lettered_in_redis_then_replayed(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    settings = worker_settings.model_copy(update={"job_timeout_seconds": 1.5, "max_tries": 2})
    # Due in a moment: the worker opens the database first, then another writer locks it.
    kwargs = apply_job([contact_json(1, email="ada@example.org")])
    assert await enqueue_apply(aredis, settings.queue_name, kwargs, job_ttl_s=3600, defer_s=0.5)
    lock = sqlite3.connect(drupal_db, isolation_level=None, check_same_thread=False)

    async def lock_then_release_when_dead_lettered() -> None:
        while not await aredis.exists(settings.queue_name + ":health-check"):
            await asyncio.sleep(0.005)
        lock.execute("BEGIN IMMEDIATE")  # held for longer than a job may take
        while not await aredis.hlen(DEAD_KEY):  # type: ignore[misc]
            await asyncio.sleep(0.02)
        lock.execute("ROLLBACK")

    locker = asyncio.create_task(lock_then_release_when_dead_lettered())
    worker = await run_worker(settings)
    await locker
    lock.close()
    # Tried twice (SFRELAY_MAX_TRIES=2), then kept: the database could not take the letter.
    assert (worker.jobs_retried, worker.jobs_complete, worker.jobs_failed) == (1, 1, 0)
    assert redis_client.zcard(settings.queue_name) == 0
    letters = await list_dead_letters(settings)
    # The database write of the letter, cut short, may land once the lock is gone: then the
    # letter is in both places, and replaying both has no second effect.
    assert {(d.kept, d.notification_id) for d in letters} <= {
        (Kept.REDIS, sf_id("04l", 1)),
        (Kept.DATABASE, sf_id("04l", 1)),
    }
    [letter] = [d for d in letters if d.kept is Kept.REDIS]
    assert letter.source is Source.OUTBOUND_MESSAGE
    assert letter.error.startswith("gave up after 2 tries: ")
    assert letter.attempts == 2

    result = await replay_dead_letters(settings, None)
    assert (result.replayed, result.refused) == (len(letters), {})
    assert await list_dead_letters(settings) == []
    await run_worker(settings)
    [user] = drupal_users(drupal_db)
    assert user[1:] == ("Ada Byron", "ada@example.org", 1, "Ada", "Byron", sf_id("003", 1))


async def test_a_job_interrupted_too_often_is_dead_lettered_not_dropped(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    await enqueue(aredis, worker_settings, apply_job([contact_json(1, email="ada@example.org")]))
    [job_id] = list(redis_client.zrange(worker_settings.queue_name, 0, -1))
    # arq counts a try each time a run starts: as if workers died on this job again and again.
    tries = worker_settings.max_tries + INTERRUPTED_TRIES - 1
    redis_client.set(RETRY_KEY_PREFIX.encode() + job_id, tries)
    worker = await run_worker(worker_settings)
    assert worker.jobs_complete == 1
    assert drupal_users(drupal_db) == []
    [letter] = await list_dead_letters(worker_settings)
    assert (letter.kept, letter.attempts) == (Kept.DATABASE, tries + 1)
    assert letter.error == (
        f"started {tries} times without finishing: workers were stopped or killed while "
        "applying it, or retried it under a higher SFRELAY_MAX_TRIES"
    )
    assert letter.notification is not None
    assert letter.notification.fields["Email"] == "ada@example.org"
    assert stats(redis_client) == {"outcome:dead": 1}


def test_backoff_doubles_from_the_setting_up_to_an_hour(worker_settings: Settings) -> None:
    settings = worker_settings.model_copy(update={"retry_backoff_seconds": 30})
    assert [backoff_s(settings, n) for n in (1, 2, 3, 8)] == [30, 60, 120, 3600]


async def test_a_redis_dead_letter_from_the_receiver_is_listed_but_not_replayed(
    worker_settings: Settings, redis_client: redis.Redis
) -> None:
    entry = {
        "notification_id": sf_id("04l", 9),
        "object": "Contact",
        "record_id": None,
        "organization_id": ORG_ID,
        "action_id": sf_id("04k", 1),
        "reason": "sObject has no xsi:type in the sObject namespace",
        "received_at": 1_700_000_000.0,
        "body_sha256": "0" * 64,
    }
    redis_client.hset(DEAD_KEY, f"{SEEN_PREFIX}x:y", orjson.dumps(entry))
    [letter] = await list_dead_letters(worker_settings)
    assert letter.error == "refused on receipt: sObject has no xsi:type in the sObject namespace"
    result = await replay_dead_letters(worker_settings, [f"{SEEN_PREFIX}x:y", "12345"])
    assert result.replayed == 0
    assert result.refused == {
        "12345": "no such dead letter (see `sfrelay dead list`)",
        f"{SEEN_PREFIX}x:y": "refused on receipt: sObject has no xsi:type in the sObject "
        "namespace; it cannot be applied as it is: fix it in Salesforce and let Salesforce "
        f"send it again; `sfrelay dead discard {SEEN_PREFIX}x:y` removes this one",
    }
    assert redis_client.hlen(DEAD_KEY) == 1


async def test_a_failed_notification_is_dead_lettered_at_once_beside_applied_ones(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    broken = contact_json(2, email="broken@example.org")
    del broken["fields"]["Id"]
    await enqueue(
        aredis, worker_settings, apply_job([contact_json(1, email="ada@example.org"), broken])
    )
    worker = await run_worker(worker_settings)
    assert (worker.jobs_complete, worker.jobs_retried) == (1, 0)
    assert [u[2] for u in drupal_users(drupal_db)] == ["ada@example.org"]
    [letter] = await list_dead_letters(worker_settings)
    assert (letter.kept, letter.notification_id, letter.attempts) == (
        Kept.DATABASE,
        broken["id"],
        1,
    )
    assert letter.error == "the notification has no record Id"
    assert letter.notification == JobNotification.from_json(broken)
    assert (letter.job.organization_id, letter.job.action_id) == (ORG_ID[:15], sf_id("04k", 1))
    assert stats(redis_client) == {"outcome:created": 1, "outcome:failed": 1, "outcome:dead": 1}
    assert redis_client.zcard(worker_settings.queue_name) == 0


async def test_a_retry_outcome_requeues_only_that_notification_until_max_tries(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    # A constraint the sync cannot foresee (as when another writer takes the same row): the
    # database itself refuses this one user, every time.
    with sqlite3.connect(drupal_db) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON users_field_data "
            "WHEN NEW.mail = 'taken@example.org' "
            "BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: users_field_data.mail'); END"
        )
    db.close()
    queued = apply_job(
        [contact_json(1, email="ada@example.org"), contact_json(2, email="taken@example.org")]
    )
    await enqueue(aredis, worker_settings, queued)
    worker = await run_worker(worker_settings)
    # The message's job, then two follow-up jobs holding only the refused notification.
    assert (worker.jobs_complete, worker.jobs_retried, worker.jobs_failed) == (3, 0, 0)
    assert [u[2] for u in drupal_users(drupal_db)] == ["ada@example.org"]
    [letter] = await list_dead_letters(worker_settings)
    assert (letter.notification_id, letter.attempts) == (sf_id("04l", 2), 3)
    assert letter.error.startswith("gave up after 3 attempts: ")
    assert "UNIQUE constraint failed: users_field_data.mail" in letter.error
    assert letter.first_seen == queued.received_at
    assert stats(redis_client) == {
        "outcome:created": 1,
        "outcome:retry": 3,
        "outcome:requeued": 2,
        "outcome:dead": 1,
    }


async def test_a_job_queued_in_the_untagged_shape_before_version_2_still_applies(
    worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path
) -> None:
    # Exactly as the receiver of the previous release wrote it: no "v", a `types` side channel.
    now_ms = int(time.time() * 1000)
    old: dict[str, Any] = {
        "t": None,
        "f": "apply_notifications",
        "a": [],
        "et": now_ms,
        "k": {
            "organization_id": ORG_ID,
            "action_id": sf_id("04k", 1),
            "received_at": now_ms / 1000,
            "types": {"Contact": {"LastModifiedDate": "dateTime", "SystemModstamp": "dateTime"}},
            "notifications": [
                contact_json(1, email="ada@example.org"),
                {**contact_json(2, email="bob@example.org"), "attempt": 2, "first_seen": 1000.0},
            ],
        },
    }
    redis_client.set(JOB_KEY_PREFIX + "old", orjson.dumps(old))
    redis_client.zadd(worker_settings.queue_name, {"old": now_ms})
    worker = await run_worker(worker_settings)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert sorted(u[2] for u in drupal_users(drupal_db)) == ["ada@example.org", "bob@example.org"]
    assert stats(redis_client) == {"outcome:created": 2}


async def test_dead_letters_stored_before_version_2_are_listed_and_replayed(
    worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path
) -> None:
    await run_worker(worker_settings)  # start-up creates the table
    stored = {
        **contact_json(1, email="ada@example.org"),
        "organization_id": ORG_ID,
        "action_id": "a",
    }
    with sqlite3.connect(drupal_db) as db:  # a worker's row, as the previous release wrote it
        db.execute(
            "INSERT INTO sfrelay_dead_letter (notification_id, record_id, payload, error, "
            "attempts, first_seen, last_seen) VALUES (?, ?, ?, 'boom', 5, 1000.0, 2000.0)",
            (sf_id("04l", 1), sf_id("003", 1), orjson.dumps({**stored, "types": {}}).decode()),
        )
    db.close()
    # A worker's letter kept in Redis while the database was down, as it was written then.
    fallback = {
        "notification_id": sf_id("04l", 2),
        "record_id": sf_id("003", 2),
        "notification": {**contact_json(2, email="bob@example.org"), "organization_id": ORG_ID},
        "error": "bang",
        "attempts": 3,
        "first_seen": 1500.0,
        "last_seen": 2500.0,
    }
    redis_client.hset(DEAD_KEY, "worker:x:2", orjson.dumps(fallback))
    letters = await list_dead_letters(worker_settings)
    assert [(d.kept, d.notification_id, d.error, d.attempts, d.first_seen) for d in letters] == [
        (Kept.DATABASE, sf_id("04l", 1), "boom", 5, 1000.0),
        (Kept.REDIS, sf_id("04l", 2), "bang", 3, 1500.0),
    ]
    result = await replay_dead_letters(worker_settings, None)
    assert (result.replayed, result.refused) == (2, {})
    await run_worker(worker_settings)
    assert sorted(u[2] for u in drupal_users(drupal_db)) == ["ada@example.org", "bob@example.org"]


async def test_a_protected_user_is_counted_never_retried_nor_dead_lettered(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis, drupal_db: Path
) -> None:
    def admin_row() -> list[tuple[Any, ...]]:
        with sqlite3.connect(drupal_db) as db:
            return db.execute("SELECT * FROM users_field_data WHERE uid = 1").fetchall()

    before = admin_row()
    takeover = contact_json(1, email="admin@example.com", first="Eve")
    await enqueue(
        aredis, worker_settings, apply_job([takeover, contact_json(2, email="ada@example.org")])
    )
    worker = await run_worker(worker_settings)
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (1, 0, 0)
    assert stats(redis_client) == {"outcome:conflict_protected_user": 1, "outcome:created": 1}
    assert await list_dead_letters(worker_settings) == []
    assert redis_client.zcard(worker_settings.queue_name) == 0
    assert admin_row() == before
    assert [u[2] for u in drupal_users(drupal_db)] == ["ada@example.org"]


async def test_a_polled_version_leaves_the_queues_dedupe_once_the_ledger_holds_it(
    worker_settings: Settings, aredis: Redis, redis_client: redis.Redis
) -> None:
    """A pushed notification's id stays seen (Salesforce redelivers it for 24 hours); a polled
    version's goes once applied (the poll asks the ledger first: app.queue.count_outcomes),
    and one the ledger does not hold (no email) stays seen."""
    enqueuer = Enqueuer(
        aredis,
        queue_name=worker_settings.queue_name,
        dedupe_ttl_s=worker_settings.dedupe_ttl_seconds,
        job_ttl_s=worker_settings.job_ttl_seconds,
    )
    org = ORG_ID[:15]  # as the receiver and the polls queue it (app.sfid.canonical_id)
    pushed = apply_job([contact_json(1, email="ada@example.org")], org_id=org)
    polled = replace(
        apply_job([contact_json(2, email="grace@example.org"), contact_json(3)], org_id=org),
        source=Source.RECONCILE,
    )
    for job in (pushed, polled):
        assert (await enqueuer.submit(job)).queued == len(job.notifications)
    await run_worker(worker_settings)
    assert stats(redis_client) == {"outcome:created": 2, "outcome:skipped_no_email": 1}
    seen = sorted(key.decode() for key in redis_client.scan_iter(SEEN_PREFIX + "*"))
    assert seen == [f"{SEEN_PREFIX}{org}:{sf_id('04l', n)}" for n in (1, 3)]
