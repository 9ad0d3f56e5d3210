"""Real `sfrelay worker` processes: memory guard, SIGTERM, SIGKILL, `arq --check`; no job lost."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import orjson
import redis

from app.config import Settings
from app.drupal.engine import nocase_utf8
from app.queue import (
    DEAD_KEY,
    IN_PROGRESS_KEY_PREFIX,
    JOB_KEY_PREFIX,
    RETRY_KEY_PREFIX,
    WORKERS_ALIVE_SUFFIX,
    enqueue_apply,
    redis_client,
)
from tests.factories import apply_job, new_contacts, sf_id
from tests.fixtures_worker import PROJECT, WorkerProcess, drupal_users, settings_env
from workers.lease import ACTIVE_S, LEASE_S, active_key, database_key

Starter = type[WorkerProcess]


def enqueue(settings: Settings, first: int, count: int, defer_s: float = 0) -> str:
    """One job of `count` new Contacts, numbered from `first`, queued through the queue's entry."""
    job_id = f"job{first}"

    async def put() -> bool:
        client = redis_client(settings)
        try:
            return await enqueue_apply(
                client,
                settings.queue_name,
                apply_job(new_contacts(first, count)),
                job_ttl_s=settings.job_ttl_seconds,
                defer_s=defer_s,
                job_id=job_id,
            )
        finally:
            await client.aclose()

    with ThreadPoolExecutor(1) as thread:  # its own event loop, also from an async test
        assert thread.submit(asyncio.run, put()).result()
    return job_id


def emails(path: Path) -> list[str]:
    return sorted(user[2] for user in drupal_users(path))


def expected(first: int, count: int) -> list[str]:
    return sorted(f"user{n}@example.org" for n in range(first, first + count))


@contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock, as another writer would: the worker's batch waits on it."""
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        yield lock
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()


def ledger_outcomes(path: Path) -> dict[str, list[str]]:
    """Salesforce Id -> the outcomes in its ledger history, oldest first."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT sf_id, history FROM sfrelay_record ORDER BY sf_id").fetchall()
    db.close()
    return {sf_id: [entry["o"] for entry in orjson.loads(history)] for sf_id, history in rows}


def wait_for(condition: Callable[[], object], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_memory_guard_exits_zero_and_the_restarted_worker_finishes_the_queue(
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    # 32 MB: any Python worker is past it after its first job.
    settings = worker_settings.model_copy(update={"worker_max_rss_mb": 32})
    worker = worker_process(settings, tmp_path)
    worker.wait_ready(redis_client)
    for j in range(3):
        enqueue(settings, 10 * j, 10)
    runs = [(worker.wait(30), worker.output())]
    # Queued once the first worker has stopped (not by a delay, which a loaded machine can
    # outrun): what a restarted worker must find.
    for j in range(3, 6):
        enqueue(settings, 10 * j, 10)
    while redis_client.zcard(settings.queue_name) and len(runs) < 8:  # the supervisor
        worker = worker_process(settings, tmp_path)
        runs.append((worker.wait(30), worker.output()))
    assert [code for code, _ in runs] == [0] * len(runs)
    assert len(runs) >= 2
    assert redis_client.zcard(settings.queue_name) == 0
    assert all("over SFRELAY_WORKER_MAX_RSS_MB=32" in log for _, log in runs)
    assert emails(drupal_db) == expected(0, 60)


def test_sigterm_lets_the_running_job_finish_and_leaves_the_rest_queued(
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    settings = worker_settings.model_copy(update={"job_timeout_seconds": 20})
    worker = worker_process(settings, tmp_path)
    worker.wait_ready(redis_client)
    with write_locked(drupal_db):
        running = enqueue(settings, 1, 5)
        wait_for(lambda: redis_client.exists(IN_PROGRESS_KEY_PREFIX + running))
        worker.signal(signal.SIGTERM)
        time.sleep(0.3)
        enqueue(settings, 100, 5)  # arrives while the worker stops
        time.sleep(0.3)
        assert worker.process.poll() is None  # still finishing its job
    assert worker.wait(20) == 0
    assert emails(drupal_db) == expected(1, 5)
    assert redis_client.zrange(settings.queue_name, 0, -1) == [b"job100"]
    assert worker_process(settings, tmp_path, "--burst").wait(30) == 0
    assert emails(drupal_db) == sorted(expected(1, 5) + expected(100, 5))


def test_sigkill_mid_job_the_next_worker_runs_the_job_again_once(
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    # A job timeout the first try cannot reach while the test holds the lock (it is killed
    # as soon as the job starts): the job is on its first try when the worker dies.
    settings = worker_settings.model_copy(update={"job_timeout_seconds": 60})
    first = worker_process(settings, tmp_path)
    first.wait_ready(redis_client)
    with write_locked(drupal_db):
        job_id = enqueue(settings, 1, 5)
        in_progress = IN_PROGRESS_KEY_PREFIX + job_id
        lease = database_key(settings.database_url)
        # Killed mid-write: the job has started and holds the writer turn, its batch waiting
        # on the lock.
        wait_for(lambda: redis_client.exists(in_progress, lease) == 2)
        first.signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    assert redis_client.zscore(settings.queue_name, job_id) is not None
    assert redis_client.get(RETRY_KEY_PREFIX + job_id) == b"1"  # started once, never finished
    assert emails(drupal_db) == []
    # The killed worker's in-progress mark would expire after the job timeout + 10 s (arq),
    # its writer lease after LEASE_S, its claim to take jobs after ACTIVE_S: expire them now,
    # as Redis would then.
    active = active_key(settings.database_url, settings.queue_name)
    assert 0 < redis_client.pttl(in_progress) <= (60 + 10) * 1000
    assert 0 < redis_client.pttl(lease) <= LEASE_S * 1000
    assert 0 < redis_client.pttl(active) <= ACTIVE_S * 1000
    redis_client.delete(in_progress, lease, active)
    second = worker_process(settings, tmp_path, "--burst")
    assert second.wait(40) == 0
    # Run again, once: every Contact created once, with one attempt in its history, nothing
    # dead, nothing left queued, arq's try counter gone with the finished job.
    assert emails(drupal_db) == expected(1, 5)
    assert ledger_outcomes(drupal_db) == {sf_id("003", n): ["created"] for n in range(1, 6)}
    assert redis_client.zcard(settings.queue_name) == 0
    assert not redis_client.exists(RETRY_KEY_PREFIX + job_id, JOB_KEY_PREFIX + job_id)
    assert redis_client.hlen(DEAD_KEY) == 0
    with sqlite3.connect(drupal_db) as db:
        assert db.execute("SELECT count(*) FROM sfrelay_dead_letter").fetchone() == (0,)
    db.close()


def test_arq_health_check_follows_the_running_worker(
    worker_settings: Settings, worker_process: Starter, redis_client: redis.Redis, tmp_path: Path
) -> None:
    def check() -> int:
        return subprocess.run(
            [sys.executable, "-m", "arq", "workers.main.WorkerSettings", "--check"],
            cwd=PROJECT,
            env=settings_env(worker_settings),
            capture_output=True,
            timeout=30,
        ).returncode

    worker = worker_process(worker_settings, tmp_path)
    worker.wait_ready(redis_client)
    assert check() == 0
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert check() == 1


def test_a_stopping_worker_leaves_the_health_check_to_the_one_still_running(
    worker_settings: Settings, worker_process: Starter, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A planned handover (SIGTERM to the active worker, a standby takes over): the queue's
    health check, which status and the compose file's `arq --check` read, stays up."""
    key = worker_settings.queue_name + ":health-check"
    alive = key + WORKERS_ALIVE_SUFFIX
    first = worker_process(worker_settings, tmp_path)
    first.wait_ready(redis_client)
    second = worker_process(worker_settings, tmp_path)
    deadline = time.monotonic() + 60  # a second worker starting on a busy machine
    while redis_client.zcard(alive) < 2:
        assert time.monotonic() < deadline, second.output()
        time.sleep(0.05)
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    assert redis_client.exists(key), first.output()
    assert redis_client.zcard(alive) == 1
    second.signal(signal.SIGTERM)
    assert second.wait(20) == 0
    assert not redis_client.exists(key)  # the last one out: no worker is alive
    assert redis_client.zcard(alive) == 0


def rename_table(path: Path, old: str, new: str) -> None:
    with sqlite3.connect(path) as db:
        db.create_collation("NOCASE_UTF8", nocase_utf8)
        db.execute(f"ALTER TABLE {old} RENAME TO {new}")
    db.close()


def test_a_field_deleted_in_drupal_stops_the_worker_and_its_jobs_wait_for_the_fix(
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    drupal_db: Path,
) -> None:
    """A mapped user field deleted while the worker runs (its table set aside, as Drupal's
    field deletion does): the worker stops (exit 0, for its supervisor), the job stays queued,
    nothing becomes a dead letter; a restarted worker refuses the field map, saying what to do,
    and once the field is back the job applies."""
    tmp_path = drupal_db.parent
    worker = worker_process(worker_settings, tmp_path)
    worker.wait_ready(redis_client)
    enqueue(worker_settings, 1, 5)
    wait_for(lambda: emails(drupal_db) == expected(1, 5))
    rename_table(drupal_db, "user__field_last_name", "field_deleted_data_5e1f0a3b9c")
    enqueue(worker_settings, 100, 5)
    assert worker.wait(30) == 0
    gone = "the user field 'field_last_name' does not exist on this Drupal site"
    assert f"the Drupal site changed while the worker ran: field map: {gone}" in worker.output()
    assert redis_client.zcard(worker_settings.queue_name) == 1
    assert redis_client.hlen(DEAD_KEY) == 0
    with sqlite3.connect(drupal_db) as db:
        assert db.execute("SELECT count(*) FROM sfrelay_dead_letter").fetchone() == (0,)
    db.close()
    restarted = worker_process(worker_settings, tmp_path)
    assert restarted.wait(30) != 0
    assert f"field map: {gone}" in restarted.output()
    rename_table(drupal_db, "field_deleted_data_5e1f0a3b9c", "user__field_last_name")
    assert worker_process(worker_settings, tmp_path, "--burst").wait(30) == 0
    assert emails(drupal_db) == sorted(expected(1, 5) + expected(100, 5))
