"""`sfrelay queue purge --no-email`: alone, against Salesforce, and while a worker runs."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import text

from app.cli import main
from app.config import Settings
from app.drupal import ledger
from app.drupal.engine import writer
from app.jobs import ApplyJob, JobNotification, Source
from app.purge import DETAIL, run_purge
from app.queue import IN_PROGRESS_KEY_PREFIX, Enqueuer, queue_stats, redis_client
from tests.drupal_rows import note, sf
from tests.fixtures_db import DrupalSite
from tests.fixtures_worker import (
    PROJECT,
    WorkerProcess,
    drupal_users,
    reaped,
    settings_env,
    sigkill,
)
from tests.sfserver import FakeOrg
from tests.test_reconcile import T0, rc_settings
from workers.lease import WriterLease

__all__ = ["rc_settings"]


async def enqueue(settings: Settings, jobs: list[list[JobNotification]]) -> None:
    client = redis_client(settings)
    try:
        enqueuer = Enqueuer(
            client,
            queue_name=settings.queue_name,
            dedupe_ttl_s=settings.dedupe_ttl_seconds,
            job_ttl_s=settings.job_ttl_seconds,
        )
        org = sorted(settings.canonical_org_ids)[0]
        for notifications in jobs:
            job = ApplyJob(org, Source.OUTBOUND_MESSAGE, time.time(), tuple(notifications))
            assert (await enqueuer.submit(job)).queued == len(notifications)
    finally:
        await client.aclose()


async def waiting(settings: Settings) -> tuple[int, int]:
    client = redis_client(settings)
    try:
        stats = await queue_stats(client, settings.queue_name)
        return stats.queued, stats.in_progress
    finally:
        await client.aclose()


def history(path: Path, sf_id: str) -> list[dict[str, object]]:
    import sqlite3

    with sqlite3.connect(path) as db:
        row = db.execute("SELECT history FROM sfrelay_record WHERE sf_id = ?", (sf_id,)).fetchone()
    db.close()
    return [] if row is None else list(orjson.loads(row[0]))


async def test_purge_removes_exactly_the_no_email_notifications_and_records_them(
    worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path
) -> None:
    settings = worker_settings
    await enqueue(
        settings,
        [
            [note(sf(1), "a@example.org"), note(sf(2), None), note(sf(3), "  ")],
            [note(sf(4), None)],  # a job left empty goes
            [note(sf(5), "not an email")],  # unusable: Drupal would refuse it
        ],
    )
    dry = await run_purge(settings, check_salesforce=False, dry_run=True)
    assert (dry.removed, dry.jobs_removed) == (4, 0)
    assert await waiting(settings) == (5, 0)
    report = await run_purge(settings, check_salesforce=False, dry_run=False)
    assert (report.removed, report.jobs_removed, report.busy) == (4, 2, 0)
    assert await waiting(settings) == (1, 0)
    assert redis_client.hget("sfrelay:stats", "outcome:skipped_no_email") == b"4"
    entry = history(drupal_db, sf(2))
    assert [(h["o"], h["d"]) for h in entry] == [("skipped_no_email", DETAIL)]
    assert history(drupal_db, sf(1)) == []
    again = await run_purge(settings, check_salesforce=False, dry_run=False)
    assert again.removed == 0


def test_purge_without_a_criterion_refuses_and_changes_nothing(
    worker_settings: Settings,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(enqueue(worker_settings, [[note(sf(1), None)]]))
    before = {k: redis_client.dump(k) for k in redis_client.keys("*")}
    for name, value in settings_env(worker_settings).items():
        monkeypatch.setenv(name, value)
    assert main(["queue", "purge"]) == 2
    assert capsys.readouterr().err == (
        "sfrelay: say what to purge: --no-email (queued records without a usable email)\n"
    )
    assert {k: redis_client.dump(k) for k in redis_client.keys("*")} == before
    assert main(["queue", "purge", "--no-email", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "removed": 1,
        "kept": 0,
        "busy": 0,
        "jobs_removed": 1,
        "dry_run": False,
    }


async def test_check_salesforce_keeps_records_that_have_an_email_there_now(
    rc_settings: Settings, sf_org: FakeOrg, redis_client: redis.Redis
) -> None:
    sf_org.add("Contact", sf(1), Email="now@example.org", LastName="A", SystemModstamp=T0)
    sf_org.add("Contact", sf(2), Email=None, LastName="B", SystemModstamp=T0)
    await enqueue(rc_settings, [[note(sf(1), None), note(sf(2), None), note(sf(3), None)]])
    report = await run_purge(rc_settings, check_salesforce=True, dry_run=False)
    assert (report.removed, report.kept) == (2, 1)
    raw = redis_client.get(
        "arq:job:" + redis_client.zrange(rc_settings.queue_name, 0, -1)[0].decode()
    )
    assert raw is not None
    left = orjson.loads(raw)["k"]["notifications"]
    assert [n["fields"]["Id"] for n in left] == [sf(1)]


async def test_purge_while_a_worker_runs_loses_and_repeats_nothing(
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    settings = worker_settings
    jobs, with_email, without = [], set(), 0
    for j in range(400):
        notifications = []
        for k in range(10):
            n = j * 10 + k + 1
            if n % 3 == 0:
                notifications.append(note(sf(n), None))
                without += 1
            else:
                notifications.append(note(sf(n), f"u{n}@example.org"))
                with_email.add(sf(n))
        jobs.append(notifications)
    await enqueue(settings, jobs)
    aredis = AsyncRedis.from_url(settings.redis_url)
    try:
        # The test holds the writer turn (workers/lease.py) before the worker starts: the
        # worker takes jobs and waits for its turn, so the purge meets jobs in progress and
        # jobs still queued however fast the machine (a quick worker once drained all 400
        # before the purge began).
        async with WriterLease(aredis, settings.database_url).turn():
            worker = worker_process(settings, tmp_path)
            worker.wait_ready(redis_client)
            deadline = time.monotonic() + 30
            while not redis_client.keys(IN_PROGRESS_KEY_PREFIX + "*"):
                assert time.monotonic() < deadline, worker.output()
                await asyncio.sleep(0.02)
            report = await run_purge(settings, check_salesforce=False, dry_run=False)
    finally:
        await aredis.aclose()
    assert report.removed > 0 and report.busy > 0
    deadline = time.monotonic() + 120
    while await waiting(settings) != (0, 0):
        assert time.monotonic() < deadline, worker.output()
        await asyncio.sleep(0.1)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    stats = redis_client.hgetall("sfrelay:stats")
    # Each notification without email was either purged or skipped by the worker, once.
    assert int(stats[b"outcome:skipped_no_email"]) == without
    assert int(stats[b"outcome:created"]) == len(with_email)
    assert {row[6] for row in drupal_users(drupal_db)} == with_email


async def test_purge_leaves_jobs_that_are_not_sfrelays_alone(
    worker_settings: Settings, redis_client: redis.Redis
) -> None:
    redis_client.set("arq:job:other", b"\x80\x04pickled")
    redis_client.set(
        "arq:job:json", orjson.dumps({"f": "other_task", "k": {"notifications": [{}]}})
    )
    redis_client.zadd(worker_settings.queue_name, {"other": 1, "json": 2})
    before = {k: redis_client.dump(k) for k in redis_client.keys("*")}
    report = await run_purge(worker_settings, check_salesforce=False, dry_run=False)
    assert report.removed == 0
    assert {k: redis_client.dump(k) for k in redis_client.keys("*")} == before


@pytest.mark.parametrize("drupal_site", ["pg-d10"], indirect=True)
async def test_a_purge_killed_mid_run_leaves_each_notification_queued_or_recorded(
    worker_settings: Settings, redis_client: redis.Redis, drupal_site: DrupalSite, tmp_path: Path
) -> None:
    """SIGKILL while the purge waits for the database (a worker's batch holds the writer
    lock): each notification without email it meant to take is still queued, or its history
    says skipped_no_email; none is gone without a trace."""
    site = drupal_site
    settings = worker_settings.model_copy(update={"database_url": site.url})
    await enqueue(settings, [[note(sf(n), None)] for n in range(1, 11)])
    await enqueue(settings, [[note(sf(20), "a@example.org")]])
    await ledger.migrate(site.engine)
    log = tmp_path / "purge.log"
    async with writer(site.engine), site.engine.connect() as watch:
        with log.open("wb") as out:
            purge = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "queue", "purge", "--no-email"],
                cwd=tmp_path,
                env={**settings_env(settings), "PYTHONPATH": str(PROJECT)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        with reaped(purge):
            deadline = time.monotonic() + 60
            while not await watch.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'")
            ):
                assert purge.poll() is None and time.monotonic() < deadline, log.read_text()
                await watch.rollback()
                await asyncio.sleep(0.05)
            sigkill(purge)
    queued = {
        n["fields"]["Id"]
        for key in redis_client.keys("arq:job:*")
        for n in orjson.loads(redis_client.get(key) or b"{}")["k"]["notifications"]
    }
    for n in range(1, 11):
        rows = await site.rows("SELECT history FROM sfrelay_record WHERE sf_id = :s", s=sf(n))
        noted = [h["o"] for r in rows for h in orjson.loads(r["history"])]
        assert sf(n) in queued or noted == ["skipped_no_email"], (n, noted)
    assert sf(20) in queued
