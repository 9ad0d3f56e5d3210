"""Real `sfrelay worker` processes against database faults: a read-only SQLite file, a dead
letter of a transient error replayed, two workers (one active, one standing by) and a poison
record in a 10,000 batch."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import redis

from app.config import Settings
from app.dead import Kept, list_dead_letters, replay_dead_letters
from app.queue import IN_PROGRESS_KEY_PREFIX, RETRY_KEY_PREFIX
from tests.factories import sf_id
from tests.fixtures_worker import WorkerProcess
from tests.test_sync_faults import make_read_only, make_writable
from tests.test_worker_process import emails, enqueue, expected, wait_for

Starter = type[WorkerProcess]


def retried(client: redis.Redis, settings: Settings) -> bool:
    """Some job has run more than once (arq counts its tries in arq:retry:<job id>)."""
    return any(int(client.get(key) or 0) >= 2 for key in client.keys(RETRY_KEY_PREFIX + "*"))


def drained(client: redis.Redis, settings: Settings) -> bool:
    return client.zcard(settings.queue_name) == 0 and not client.keys(IN_PROGRESS_KEY_PREFIX + "*")


async def test_a_read_only_database_is_retried_and_applied_once_writable_nothing_dead(
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    settings = worker_settings.model_copy(
        update={"max_tries": 10, "retry_backoff_seconds": 0.2, "job_timeout_seconds": 10}
    )
    worker = worker_process(settings, tmp_path)
    worker.wait_ready(redis_client)
    make_read_only(drupal_db)
    try:
        for j in range(5):
            enqueue(settings, 100 * j, 100)
        wait_for(lambda: retried(redis_client, settings), timeout=60)
        assert emails(drupal_db) == []
    finally:
        make_writable(drupal_db)
    wait_for(lambda: drained(redis_client, settings), timeout=120)
    assert emails(drupal_db) == expected(0, 500)
    assert await list_dead_letters(settings) == []
    assert "attempt to write a readonly database; retrying in" in worker.output()
    # Alone, it stood by after each failed batch, then took the jobs again.
    assert "the database failed this worker's batch: standing by for 5 s" in worker.output()


async def test_a_dead_letter_of_a_transient_error_is_replayed_to_success(
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    settings = worker_settings.model_copy(
        update={"max_tries": 2, "retry_backoff_seconds": 0.1, "job_timeout_seconds": 10}
    )
    worker = worker_process(settings, tmp_path)
    worker.wait_ready(redis_client)
    make_read_only(drupal_db)
    try:
        enqueue(settings, 1, 20)
        wait_for(lambda: drained(redis_client, settings), timeout=60)
        letters = await list_dead_letters(settings)
    finally:
        make_writable(drupal_db)
    # The database was read-only: the letters are kept in Redis, with the database's reason.
    assert sorted(d.notification_id or "" for d in letters) == [
        sf_id("04l", n) for n in range(1, 21)
    ]
    assert {d.kept for d in letters} == {Kept.REDIS}
    assert all(d.error.startswith("gave up after 2 tries: Drupal database: ") for d in letters)
    assert all("readonly" in d.error for d in letters)
    assert emails(drupal_db) == []
    # The log says why in the driver's words; never the statement with the letters' payloads
    # (SQLAlchemy's text of the error adds both, on lines of their own).
    log = worker.output()
    assert "did not take 20 dead letters (attempt to write a readonly database)" in log
    assert "sfrelay_dead_letter" not in log and "[parameters" not in log

    result = await replay_dead_letters(settings, None)
    assert (result.replayed, result.refused) == (20, {})
    wait_for(lambda: drained(redis_client, settings), timeout=60)
    assert emails(drupal_db) == expected(1, 20)
    assert await list_dead_letters(settings) == []
    worker.stop()


def test_two_workers_one_takes_jobs_the_other_takes_over_and_a_poison_record(
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    with sqlite3.connect(drupal_db) as db:
        db.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON users_field_data "
            "WHEN NEW.mail = 'user5000@example.org' "
            "BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: poison'); END"
        )
    db.close()
    # Long enough that a loaded test machine never turns slowness into retries.
    settings = worker_settings.model_copy(update={"job_timeout_seconds": 30})
    workers = [worker_process(settings, tmp_path) for _ in range(2)]
    for worker in workers:  # the health-check key is shared: each says when it is ready
        wait_for(lambda w=worker: "worker ready" in w.output(), timeout=60)  # type: ignore[misc]

    def said(worker: WorkerProcess, text: str) -> bool:
        return text in worker.output()

    # One is the active worker of this database and queue, the other stands by.
    wait_for(lambda: all(said(w, "taking jobs") or said(w, "standing by") for w in workers))
    [active] = [w for w in workers if said(w, "taking jobs")]
    [standby] = [w for w in workers if w is not active]
    assert said(standby, "standing by: another worker takes this database's jobs")
    for j in range(50):
        enqueue(settings, 100 * j, 100)
    wait_for(lambda: drained(redis_client, settings), timeout=300)
    assert emails(drupal_db) == expected(0, 5_000)
    assert not said(standby, "created=")  # it took no job
    # The active one stops (SIGTERM, as the memory guard or a deploy would): the standby
    # takes over at once, with the second half and its poison record.
    active.signal(signal.SIGTERM)
    assert active.wait(60) == 0
    for j in range(50, 100):
        enqueue(settings, 100 * j, 100)

    def done() -> bool:
        return drained(redis_client, settings) and bool(asyncio.run(list_dead_letters(settings)))

    wait_for(done, timeout=600)
    assert said(standby, "taking jobs") and said(standby, "created=")
    assert emails(drupal_db) == sorted(set(expected(0, 10_000)) - {"user5000@example.org"})
    [letter] = asyncio.run(list_dead_letters(settings))
    assert (letter.notification_id, letter.attempts) == (sf_id("04l", 5000), settings.max_tries)
    assert "poison" in letter.error
    logs = [worker.output() for worker in workers]
    # No job ever timed out or was retried as a whole.
    assert not any("retrying in" in log or "no answer in time" in log for log in logs)
