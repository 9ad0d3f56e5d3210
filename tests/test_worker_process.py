"""Real `sfrelay worker` processes: memory guard, SIGTERM, SIGKILL, `arq --check`; no job lost."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from app.config import Settings
from app.jobs import ApplyJob, JobNotification, Source
from app.queue import IN_PROGRESS_KEY_PREFIX, JOB_KEY_PREFIX
from tests.fixtures_worker import PROJECT, WorkerProcess, drupal_users, settings_env
from tests.messages import ORG_ID, sf_id

Starter = type[WorkerProcess]


def enqueue(
    client: redis.Redis, settings: Settings, first: int, count: int, defer_s: float = 0
) -> str:
    """One job of `count` new Contacts, numbered from `first`, queued as the receiver does."""
    notifications = [
        JobNotification(
            sf_id("04l", n),
            "Contact",
            {"Id": sf_id("003", n), "Email": f"user{n}@example.org", "LastName": f"U{n}"},
        )
        for n in range(first, first + count)
    ]
    job = ApplyJob(ORG_ID, Source.OUTBOUND_MESSAGE, time.time(), tuple(notifications))
    job_id = f"job{first}"
    now_ms = int(time.time() * 1000)
    client.set(JOB_KEY_PREFIX + job_id, job.serialize(now_ms))
    client.zadd(settings.queue_name, {job_id: now_ms + int(defer_s * 1000)})
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
        enqueue(redis_client, settings, 10 * j, 10)
    # Due only once the first worker has stopped: what a restarted worker must find.
    for j in range(3, 6):
        enqueue(redis_client, settings, 10 * j, 10, defer_s=3)
    runs = [(worker.wait(30), worker.output())]
    while redis_client.zcard(settings.queue_name) and len(runs) < 5:  # the supervisor
        worker = worker_process(settings, tmp_path)
        runs.append((worker.wait(30), worker.output()))
    assert [code for code, _ in runs] == [0] * len(runs)
    assert len(runs) == 2
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
        running = enqueue(redis_client, settings, 1, 5)
        wait_for(lambda: redis_client.exists(IN_PROGRESS_KEY_PREFIX + running))
        worker.signal(signal.SIGTERM)
        time.sleep(0.3)
        enqueue(redis_client, settings, 100, 5)  # arrives while the worker stops
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
    # The job's in-progress mark outlives a killed worker by the job timeout + 10 s (arq).
    settings = worker_settings.model_copy(update={"job_timeout_seconds": 1})
    first = worker_process(settings, tmp_path)
    first.wait_ready(redis_client)
    with write_locked(drupal_db):
        job_id = enqueue(redis_client, settings, 1, 5)
        wait_for(lambda: redis_client.exists(IN_PROGRESS_KEY_PREFIX + job_id))
        first.signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    assert redis_client.zscore(settings.queue_name, job_id) is not None
    assert emails(drupal_db) == []
    second = worker_process(settings, tmp_path, "--burst")
    assert second.wait(40) == 0
    assert emails(drupal_db) == expected(1, 5)
    # Try 2, or later if the first worker's batch had already timed out once on the lock.
    assert re.search(rf"job {job_id} try [2-9]: 5 notifications .* created=5\n", second.output())
    assert redis_client.zcard(settings.queue_name) == 0


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
