"""Jobs queued by another sfrelay release (a receiver upgraded before the workers, or after):
a shape the worker can read is applied; one it cannot is kept whole as a dead letter, saying
why, and `sfrelay dead replay` queues it again as it was. None is dropped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from arq.jobs import serialize_job
from redis import Redis

from app.config import Settings
from app.dead import list_dead_letters, replay_dead_letters
from app.jobs import serialize
from app.queue import DEAD_KEY, JOB_KEY_PREFIX, RETRY_KEY_PREFIX
from tests.conftest import Cli
from tests.factories import apply_job, new_contacts, sf_id
from tests.fixtures_worker import drupal_users, run_worker
from workers.tasks import INTERRUPTED_TRIES

FIX = "queued by another sfrelay release? Run workers of that release, then replay it"


def stored_job(change: Any = None) -> bytes:
    """A job of two new Contacts as this release stores it, its decoded form edited by
    `change` (in place)."""
    job = orjson.loads(apply_job(new_contacts(1, 2)).serialize(int(time.time() * 1000)))
    if change is not None:
        change(job)
    return orjson.dumps(job)


def put(redis: Redis, settings: Settings, raw: bytes, job_id: str = "skewed") -> None:
    redis.set(JOB_KEY_PREFIX + job_id, raw)
    redis.zadd(settings.queue_name, {job_id: int(time.time() * 1000)})


def newer_fields(job: dict[str, Any]) -> None:
    job["k"].update(v=3, priority=5)
    job["k"]["notifications"][0]["trace"] = "abc"


def older_fields(job: dict[str, Any]) -> None:
    del job["k"]["action_id"], job["k"]["received_at"], job["k"]["v"]


@pytest.mark.parametrize("change", [newer_fields, older_fields])
async def test_a_job_with_fields_added_or_left_out_is_applied(
    worker_settings: Settings, redis_client: Redis, drupal_db: Path, change: Any
) -> None:
    put(redis_client, worker_settings, stored_job(change))
    await run_worker(worker_settings)
    assert [user[2] for user in drupal_users(drupal_db)] == [
        "user1@example.org",
        "user2@example.org",
    ]
    assert redis_client.hlen(DEAD_KEY) == 0


def source(job: dict[str, Any]) -> None:
    job["k"]["source"] = "webhook"


def organization(job: dict[str, Any]) -> None:
    del job["k"]["organization_id"]


def function(job: dict[str, Any]) -> None:
    job["f"] = "apply_deletions"


UNREADABLE = {
    "source": (
        stored_job(source),
        "an apply_notifications job this worker cannot read (ValueError: 'webhook' is not a "
        f"valid Source): {FIX}",
    ),
    "organization": (
        stored_job(organization),
        f"an apply_notifications job this worker cannot read (KeyError: 'organization_id'): {FIX}",
    ),
    "function": (
        stored_job(function),
        f"a job for 'apply_deletions', a function this sfrelay worker does not run: {FIX}",
    ),
    "pickled": (b"\x80\x05garbage", f"not a job in arq's JSON layout (9 bytes): {FIX}"),
    "arq-keys-missing": (
        b'{"f": "apply_notifications"}',
        f"not a job in arq's JSON layout (28 bytes): {FIX}",
    ),
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
async def test_a_job_the_worker_cannot_read_is_kept_whole_saying_why_and_replayed_as_it_was(
    worker_settings: Settings, redis_client: Redis, drupal_db: Path, kind: str, cli: Cli
) -> None:
    raw, why = UNREADABLE[kind]
    put(redis_client, worker_settings, raw)
    worker = await run_worker(worker_settings)
    assert worker.jobs_complete == 1 and worker.jobs_failed == 0
    assert drupal_users(drupal_db) == []
    [letter] = await list_dead_letters(worker_settings)
    assert (letter.id, letter.error, letter.raw_job) == ("job:skewed", why, raw)
    listed = letter.as_dict()
    assert (listed["error"], listed["notification"], listed["job"]) == (
        why,
        None,
        raw.decode(errors="replace"),
    )
    assert redis_client.zcard(worker_settings.queue_name) == 0  # kept once: as a dead letter
    env = {"SFRELAY_REDIS_URL": worker_settings.redis_url}
    listed_text = cli({**env, "SFRELAY_DATABASE_URL": worker_settings.database_url}, "dead", "list")
    assert listed_text.stdout.splitlines()[1].endswith(f"  {why}")
    assert "refused on receipt" not in listed_text.stdout

    replayed = await replay_dead_letters(worker_settings, ["job:skewed"])
    assert (replayed.replayed, replayed.jobs, replayed.refused) == (1, 1, {})
    assert await list_dead_letters(worker_settings) == []
    [job_id] = list(redis_client.zrange(worker_settings.queue_name, 0, -1))
    assert redis_client.get(JOB_KEY_PREFIX + job_id.decode()) == raw


async def test_a_cron_job_of_a_worker_with_other_settings_is_dropped_as_arq_would(
    worker_settings: Settings, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker with Salesforce settings queues the reconcile cron job; one without them
    (or of another release) has no such function. The job holds no data, and its own
    workers queue it again on schedule: dropped with a warning, not a dead letter a minute."""
    raw = serialize_job(
        "sfrelay:reconcile", (), {}, None, int(time.time() * 1000), serializer=serialize
    )
    put(redis_client, worker_settings, raw, job_id="sfrelay:reconcile:1700000000000")
    await run_worker(worker_settings)
    assert redis_client.hlen(DEAD_KEY) == 0
    assert redis_client.zcard(worker_settings.queue_name) == 0
    assert (
        "job sfrelay:reconcile:1700000000000: 'sfrelay:reconcile' is not a function this worker "
        "runs; the job holds no data (a cron job of a worker with other settings or of another "
        "release): dropped"
    ) in caplog.messages


async def test_a_job_tried_more_often_than_this_workers_max_tries_allows_is_dead_lettered(
    worker_settings: Settings, redis_client: Redis, drupal_db: Path
) -> None:
    """SFRELAY_MAX_TRIES lowered in a deploy: a job earlier workers started more often than
    the new setting allows (arq's tries counter) was dropped by arq, unread. It is kept."""
    put(redis_client, worker_settings, stored_job())
    tries = worker_settings.max_tries + INTERRUPTED_TRIES + 5
    redis_client.set(RETRY_KEY_PREFIX + "skewed", tries)
    await run_worker(worker_settings)
    assert drupal_users(drupal_db) == []
    letters = await list_dead_letters(worker_settings)
    assert [(letter.notification_id, letter.error) for letter in letters] == [
        (
            sf_id("04l", n),
            f"started {tries} times without finishing: workers were stopped or killed while "
            "applying it, or retried it under a higher SFRELAY_MAX_TRIES",
        )
        for n in (1, 2)
    ]
