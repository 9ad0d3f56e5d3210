"""Processes killed (SIGKILL) while a worker writes a large workload, on every backend: a
worker killed mid-batch, then restarted, leaves what one clean run leaves and no database lock
held; Redis killed and restarted from its AOF under a running worker loses no job."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from sqlalchemy.engine import make_url

from app.config import Settings
from app.drupal.engine import _MYSQL_LOCK, _PG_LOCK_KEY, create_engine
from app.jobs import JobNotification
from app.queue import IN_PROGRESS_KEY_PREFIX, enqueue_apply, redis_client
from tests.drupal_rows import uids_allocated, user_table
from tests.factories import apply_job, note, sf
from tests.fixtures_db import DrupalSite
from tests.fixtures_worker import WorkerProcess
from tests.servers import RedisServer, free_port
from workers.lease import active_key, database_key

Starter = type[WorkerProcess]
RECORDS = 3000
PER_JOB = 100
KILLS = 2


def workload() -> list[list[JobNotification]]:
    """New Contacts, then newer versions of a third of them (new last name and email), the
    jobs shuffled (Salesforce delivers out of order)."""
    rng = random.Random(7)
    created = [
        note(sf(n), f"user{n}@example.org", f"First{n}", f"Last{n}") for n in range(1, RECORDS + 1)
    ]
    updated = [
        note(sf(n), f"moved{n}@example.org", f"First{n}", f"Later{n}", minutes=5)
        for n in range(1, RECORDS + 1, 3)
    ]
    jobs = [created[i : i + PER_JOB] for i in range(0, len(created), PER_JOB)]
    jobs += [updated[i : i + PER_JOB] for i in range(0, len(updated), PER_JOB)]
    rng.shuffle(jobs)
    return jobs


async def enqueue_all(settings: Settings, jobs: list[list[JobNotification]]) -> None:
    client = redis_client(settings)
    try:
        for number, notifications in enumerate(jobs):
            await enqueue_apply(
                client,
                settings.queue_name,
                apply_job(notifications),
                job_ttl_s=settings.job_ttl_seconds,
                job_id=f"job{number}",
            )
    finally:
        await client.aclose()


async def snapshot(site: DrupalSite, existing: set[int]) -> dict[str, Any]:
    """What one clean run must leave: each record's user with its newest values, and the
    checks of Drupal's own consistency (one user per record, uid allocation ahead)."""
    table = user_table(site)
    users = {
        r["uid"]: (r["name"], r["mail"])
        for r in await site.rows(f"SELECT uid, name, mail FROM {table} WHERE uid > 1")
        if r["uid"] not in existing
    }
    ledger = await site.rows("SELECT sf_id, uid, modstamp FROM sfrelay_record")
    field = "user__field_last_name" if site.major == 10 else "field_data_field_last_name"
    last = await site.rows(f"SELECT entity_id, field_last_name_value AS v FROM {field}")
    assert len({r["entity_id"] for r in last}) == len(last), "two last names for one user"
    last_names = {r["entity_id"]: r["v"] for r in last}
    assert sorted(r["uid"] for r in ledger) == sorted(users), "a user without its record"
    top = max(users)
    if site.major == 7 or site.backend == "postgresql":
        allocated = await uids_allocated(site)
        assert allocated >= top, ("uid allocation behind the users", allocated, top)
    return {
        r["sf_id"]: (r["modstamp"], users[r["uid"]][1], last_names.get(r["uid"])) for r in ledger
    }


async def writer_lock_held(site: DrupalSite) -> bool:
    """Whether a worker holds sfrelay's writer lock of the database now."""
    if site.backend == "postgresql":
        rows = await site.rows(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objid = :key AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())",
            key=_PG_LOCK_KEY,
        )
        return bool(rows[0]["n"])
    if site.backend == "mariadb":
        rows = await site.rows("SELECT IS_USED_LOCK(:name) AS holder", name=_MYSQL_LOCK)
        return rows[0]["holder"] is not None
    path = make_url(site.url).database
    probe = sqlite3.connect(str(path), timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


async def count_records(site: DrupalSite) -> int:
    """Records in the ledger (0 before the worker made it), read without taking SQLite's
    write lock (the site's engine begins IMMEDIATE)."""
    try:
        if site.backend == "sqlite":
            db = sqlite3.connect(str(make_url(site.url).database), timeout=30)
            try:
                return int(db.execute("SELECT count(*) FROM sfrelay_record").fetchone()[0])
            finally:
                db.close()
        (row,) = await site.rows("SELECT count(*) AS n FROM sfrelay_record")
        return int(row["n"])
    except Exception:  # no sfrelay_record yet
        return 0


def newest(records: dict[str, Any]) -> None:
    """Every record has its newest version: mail (index 1) and last name (index 2)."""
    assert {k: v[1] for k, v in records.items()} == {
        sf(n): (f"moved{n}@example.org" if n % 3 == 1 else f"user{n}@example.org")
        for n in range(1, RECORDS + 1)
    }
    assert {k: v[2] for k, v in records.items()} == {
        sf(n): (f"Later{n}" if n % 3 == 1 else f"Last{n}") for n in range(1, RECORDS + 1)
    }


def site_settings(worker_settings: Settings, site: DrupalSite) -> Settings:
    return worker_settings.model_copy(update={"database_url": site.url, "job_timeout_seconds": 60})


async def test_sigkill_mid_batch_then_a_restarted_worker_leaves_what_a_clean_run_does(
    drupal_site: DrupalSite,
    worker_settings: Settings,
    worker_process: Starter,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """Workers killed while a batch holds the writer lock (some committed before it), then
    one more run: no duplicate user, every record with its newest values, the ledger and the
    uid allocation (sequences, users_uid_seq) consistent, no lock left, nothing dead."""
    site = drupal_site
    settings = site_settings(worker_settings, site)
    table = user_table(site)
    existing = {r["uid"] for r in await site.rows(f"SELECT uid FROM {table}")}
    await enqueue_all(settings, workload())
    for _ in range(KILLS):
        worker = worker_process(settings, tmp_path)
        before = await count_records(site)

        async def mid_batch(worker: WorkerProcess = worker, before: int = before) -> bool:
            """A batch holds the writer lock after others were committed (or all is done)."""
            assert worker.process.poll() is None, worker.output()
            if not redis_client.zcard(settings.queue_name):
                return True
            return await writer_lock_held(site) and await count_records(site) > before

        await until(mid_batch, 60, "no batch in progress")
        worker.signal(signal.SIGKILL)
        assert await asyncio.to_thread(worker.wait, 10) == -signal.SIGKILL
        await until(lambda: _not(writer_lock_held(site)), 30, "the writer lock stays held")
        # Its in-progress marks, writer turn and active claim expire later: expire them now.
        redis_client.delete(
            *redis_client.scan_iter(IN_PROGRESS_KEY_PREFIX + "*"),
            database_key(settings.database_url),
            active_key(settings.database_url, settings.queue_name),
        )
    assert await asyncio.to_thread(worker_process(settings, tmp_path, "--burst").wait, 120) == 0
    assert redis_client.zcard(settings.queue_name) == 0
    got = await snapshot(site, existing)
    newest(got)
    dead = await site.rows("SELECT count(*) AS n FROM sfrelay_dead_letter")
    assert dead[0]["n"] == 0


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


async def test_redis_killed_under_a_running_worker_loses_no_job(
    worker_settings: Settings, worker_process: Starter, tmp_path: Path
) -> None:
    """Redis SIGKILLed while the worker writes, and started again from its AOF: the worker
    (or, if it exits, the next one, as its supervisor starts it) applies every job."""
    server = RedisServer(port=free_port(), directory=tmp_path / "redis")
    server.start()
    engine = create_engine(worker_settings.database_url)
    try:
        settings = worker_settings.model_copy(
            update={"redis_url": server.url, "job_timeout_seconds": 20}
        )
        site = DrupalSite("sqlite-d10", "sqlite", 10, settings.database_url, engine)
        table = user_table(site)
        existing = {r["uid"] for r in await site.rows(f"SELECT uid FROM {table}")}
        await enqueue_all(settings, workload())
        worker = worker_process(settings, tmp_path)

        async def started() -> bool:
            assert worker.process.poll() is None, worker.output()
            return await count_records(site) > 0

        await until(started, 120, "no batch")
        server.kill()
        server.start()
        deadline = time.monotonic() + 300
        with server.client() as client:
            while client.zcard(settings.queue_name):
                if worker.process.poll() is not None:  # the supervisor
                    worker = worker_process(settings, tmp_path)
                assert time.monotonic() < deadline, worker.output()
                await asyncio.sleep(0.2)
        newest(await snapshot(site, existing))
    finally:
        await engine.dispose()
        server.stop()
