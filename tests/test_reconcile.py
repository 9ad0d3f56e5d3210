"""Reconciliation against the local Salesforce, real Redis and a Drupal 10 SQLite copy."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import redis

from app.backfill import run_backfill
from app.cli import main
from app.config import Settings
from app.drupal import cursors
from app.drupal.engine import create_engine
from app.jobs import ApplyJob, JobNotification, Source
from app.queue import RECONCILE_RUNNING_KEY as RUNNING
from app.queue import Enqueuer, queue_stats, redis_client
from app.reconcile import run_reconcile
from app.salesforce.soql import to_notification
from tests.fixtures_salesforce import holding, sf_env, sf_settings, sigkill_once
from tests.fixtures_worker import drupal_users, run_worker, settings_env
from tests.messages import sf_id
from tests.sfserver import FakeOrg, SalesforceServer, sf_datetime

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@pytest.fixture
def rc_settings(
    worker_settings: Settings, sf_server: SalesforceServer, sf_org: FakeOrg
) -> Settings:
    return sf_settings(
        "jwt-bearer",
        sf_server,
        redis_url=worker_settings.redis_url,
        database_url=worker_settings.database_url,
        org_ids=worker_settings.org_ids,
        job_timeout_seconds=5,
        retry_backoff_seconds=0,
        max_tries=3,
        worker_max_rss_mb=100_000,
    )


def add(org: FakeOrg, n: int, at: datetime, email: str | None = "default", last: str = "") -> str:
    record_id = sf_id("003", n)
    org.add(
        "Contact",
        record_id,
        Email=f"c{n}@example.org" if email == "default" else email,
        FirstName="Ada",
        LastName=last or f"L{n}",
        SystemModstamp=at,
    )
    return record_id


def users(path: Path) -> dict[str, tuple[str, str, int]]:
    """Salesforce Id -> (mail, last name, status) of every user sfrelay wrote."""
    return {row[6]: (row[2], row[5], row[3]) for row in drupal_users(path)}


async def pushed(settings: Settings, org: FakeOrg, record_id: str) -> None:
    """The record's current version as an Outbound Message would have queued it."""
    rendered = org.render(
        "Contact",
        org.records["Contact"][record_id],
        ["Id", "Email", "FirstName", "LastName", "SystemModstamp"],
    )
    notification = to_notification("Contact", rendered)
    push = JobNotification(f"04l{record_id[3:15]}XYZ", "Contact", notification.fields)
    client = redis_client(settings)
    try:
        enqueuer = Enqueuer(
            client,
            queue_name=settings.queue_name,
            dedupe_ttl_s=settings.dedupe_ttl_seconds,
            job_ttl_s=settings.job_ttl_seconds,
        )
        job = ApplyJob(
            sorted(settings.canonical_org_ids)[0], Source.OUTBOUND_MESSAGE, time.time(), (push,)
        )
        assert (await enqueuer.submit(job)).queued == 1
    finally:
        await client.aclose()


async def queued(settings: Settings) -> int:
    client = redis_client(settings)
    try:
        return (await queue_stats(client, settings.queue_name)).queued
    finally:
        await client.aclose()


async def test_a_30_hour_outage_is_found_once_each_and_no_email_left_out(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    settings = rc_settings
    # Before the outage: 10 records, pushed and applied; the first run starts at --since.
    sf_org.fixed_time = T0 + timedelta(hours=1)
    before = [add(sf_org, n, T0 + timedelta(minutes=n)) for n in range(1, 11)]
    first = await run_reconcile(settings, since=T0)
    assert (first.queried, first.queued, first.no_email, first.errors) == (10, 10, 0, 0)
    await run_worker(settings)
    assert set(users(drupal_db)) == set(before)
    # The outage: 30 hours in which Salesforce's deliveries failed and were dropped.
    start = T0 + timedelta(hours=2)
    changed = [add(sf_org, n, start + timedelta(hours=n), last=f"New{n}") for n in range(1, 5)]
    created = [add(sf_org, n, start + timedelta(hours=n)) for n in range(11, 17)]
    no_email = [add(sf_org, 17, start, email=None), add(sf_org, 18, start, email="  ")]
    # One change did get through by push and was applied before reconcile ran.
    late = add(sf_org, 19, start + timedelta(hours=29))
    await pushed(settings, sf_org, late)
    await run_worker(settings)
    sf_org.fixed_time = start + timedelta(hours=30)
    report = await run_reconcile(settings)
    assert report.as_dict() == {
        "queried": 4 + 6 + 2 + 1,
        "queued": 4 + 6,
        "current": 1,
        "no_email": 2,
        "deleted": 0,
        "merged": 0,
        "purged": 0,
        "errors": 0,
        "stopped": None,
    }
    await run_worker(settings)
    found = users(drupal_db)
    assert set(found) == {*before, *created, late}
    assert not set(no_email) & set(found)
    for n, record_id in enumerate(changed, start=1):
        assert found[record_id] == (f"c{n}@example.org", f"New{n}", 1)
    # Each applied once: one created/updated entry per version in the history.
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            from app.drupal import ledger

            states = await ledger.load(conn, changed)
        for state in states.values():
            assert [h["o"] for h in state.history] == ["created", "updated"]
        mark = await cursors.get(engine, cursors.watermark_name("Contact"))
        assert mark == sf_org.fixed_time.isoformat()
    finally:
        await engine.dispose()
    # A second run straight after queues nothing.
    again = await run_reconcile(settings)
    assert (again.queried, again.queued) == (0, 0)
    # Over the outage again: Drupal has every version already.
    over = await run_reconcile(settings, since=start)
    assert (over.queried, over.queued, over.current, over.no_email) == (13, 0, 11, 2)
    assert await queued(settings) == 0


async def test_a_second_change_within_the_pushed_versions_second_is_reconciled(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    """Push applied a version; a second change within the same second (one SystemModstamp:
    Salesforce stamps to the second) never came. Reconcile reads other values under the
    applied stamp: queued and applied, then current."""
    settings = rc_settings
    sf_org.fixed_time = T0 + timedelta(hours=1)
    record_id = add(sf_org, 1, T0, last="Pushed")
    await pushed(settings, sf_org, record_id)
    await run_worker(settings)
    assert users(drupal_db)[record_id][1] == "Pushed"
    add(sf_org, 1, T0, last="Second")
    report = await run_reconcile(settings, since=T0 - timedelta(minutes=1))
    assert (report.queried, report.queued, report.current) == (1, 1, 0)
    await run_worker(settings)
    assert users(drupal_db)[record_id] == ("c1@example.org", "Second", 1)
    again = await run_reconcile(settings, since=T0 - timedelta(minutes=1))
    assert (again.queried, again.queued, again.current) == (1, 0, 1)


async def test_deletes_and_merges_found_by_reconcile_act_on_the_right_users(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    settings = rc_settings
    sf_org.fixed_time = T0 + timedelta(hours=1)
    ids = [add(sf_org, n, T0 + timedelta(minutes=n)) for n in range(1, 6)]
    await run_reconcile(settings, since=T0)
    await run_worker(settings)
    by_id = {row[6]: row[0] for row in drupal_users(drupal_db)}
    sf_org.delete("Contact", ids[0], T0 + timedelta(hours=2))
    sf_org.delete("Contact", ids[1], T0 + timedelta(hours=2), master=ids[2])  # both have users
    new_survivor = add(sf_org, 50, T0 + timedelta(minutes=1), email=None)  # never synced
    sf_org.delete("Contact", ids[3], T0 + timedelta(hours=2), master=new_survivor)
    sf_org.fixed_time = T0 + timedelta(hours=3)
    report = await run_reconcile(settings)
    assert (report.deleted, report.merged, report.queued) == (1, 2, 3)
    await run_worker(settings)
    found = {row[0]: row[3] for row in drupal_users(drupal_db)}
    assert found[by_id[ids[0]]] == 0  # blocked
    assert found[by_id[ids[1]]] == 0  # merge loser whose survivor has a user
    assert found[by_id[ids[2]]] == 1
    assert found[by_id[ids[3]]] == 1  # handed over to the survivor
    assert found[by_id[ids[4]]] == 1
    assert users(drupal_db)[new_survivor][2] == 1


async def test_a_watermark_older_than_the_recycle_bin_is_warned_about(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """queryAll sees a deleted record while it is in the Recycle Bin (15 days): after a longer
    gap a deletion can be gone for good, so the run says so (it still queues what it finds)."""
    sf_org.fixed_time = T0 + timedelta(hours=1)
    add(sf_org, 1, T0 + timedelta(minutes=1))
    with caplog.at_level(logging.WARNING, logger="sfrelay.reconcile"):
        await run_reconcile(rc_settings, since=T0)
        assert [r for r in caplog.records if r.name == "sfrelay.reconcile"] == []
        sf_org.fixed_time = T0 + timedelta(days=21)
        later = add(sf_org, 2, T0 + timedelta(days=20))
        report = await run_reconcile(rc_settings)
    assert report.queued == 1 and report.stopped is None
    assert [r.getMessage() for r in caplog.records if r.name == "sfrelay.reconcile"] == [
        f"reconcile of {sobject} starts 20 days back: records deleted more than 15 days ago "
        "have left Salesforce's Recycle Bin, so their Drupal users are not blocked; run "
        "reconcile at least daily (SFRELAY_RECONCILE_EVERY_SECONDS)"
        for sobject in ("Contact", "Lead")
    ]
    await run_worker(rc_settings)
    assert later in users(drupal_db)


async def test_an_object_not_backfilled_yet_is_skipped_and_the_other_reconciled(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`sfrelay backfill --object Contact` leaves a watermark for Contact only: reconcile goes
    on with Contact (it refused both, and its cron said "did not run" every time)."""
    sf_org.fixed_time = T0 + timedelta(hours=1)
    add(sf_org, 1, T0 + timedelta(minutes=1))
    assert (await run_backfill(rc_settings, objects=["Contact"])).stopped is None
    sf_org.fixed_time = T0 + timedelta(hours=2)
    later = add(sf_org, 2, T0 + timedelta(minutes=90))
    with caplog.at_level(logging.WARNING, logger="sfrelay.reconcile"):
        report = await run_reconcile(rc_settings)
    assert (report.queued, report.stopped) == (1, None)
    assert [r.getMessage() for r in caplog.records if r.name == "sfrelay.reconcile"] == [
        "reconcile skips Lead, which has no watermark yet: run `sfrelay backfill --object "
        "Lead` first (it leaves one where it started), or give `sfrelay reconcile --since "
        "<ISO 8601>`"
    ]
    assert sf_org.last_query.count("FROM Contact") == 1
    await run_worker(rc_settings)
    assert later in users(drupal_db)


def test_a_first_run_without_watermark_refuses_and_changes_nothing(
    rc_settings: Settings,
    sf_org: FakeOrg,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in settings_env(rc_settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SFRELAY_SF_USERNAME", rc_settings.sf_username or "")
    monkeypatch.setenv("SFRELAY_SF_CONSUMER_KEY", rc_settings.sf_consumer_key or "")
    monkeypatch.setenv("SFRELAY_SF_PRIVATE_KEY_FILE", str(rc_settings.sf_private_key_file))
    monkeypatch.setenv("SFRELAY_ORG_IDS", ",".join(rc_settings.org_ids))
    add(sf_org, 1, T0)
    assert main(["reconcile", "--json"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "sfrelay: no reconcile watermark for Contact, Lead yet: run `sfrelay backfill` first (it "
        "leaves one where it started), or give `sfrelay reconcile --since <ISO 8601>`\n"
    )
    assert redis_client.keys("*") == []
    assert sf_org.counts["query"] + sf_org.counts["queryAll"] == 0
    assert main(["reconcile", "--since", "2026-11-20T07:00:00"]) == 2
    assert "has no time zone" in capsys.readouterr().err
    # --dry-run counts and queues nothing, stores no watermark.
    sf_org.fixed_time = T0 + timedelta(hours=1)
    assert main(["reconcile", "--since", "2026-11-20T07:00:00Z", "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    # Progress on stderr, a line per page (every 5 s at most) when it is not a terminal.
    [shown] = captured.err.splitlines()
    assert re.fullmatch(r"Contact: 1 records, [0-9,]+/s, 100% of 1, ETA 0m00s", shown), shown
    last = captured.out.strip().splitlines()[-1]
    assert orjson.loads(last) == {
        "queried": 1,
        "queued": 1,
        "current": 0,
        "no_email": 0,
        "deleted": 0,
        "merged": 0,
        "purged": 0,
        "errors": 0,
        "stopped": None,
        "dry_run": True,
    }
    assert [k for k in redis_client.keys("*") if not k.startswith(b"sfrelay:stats")] == []
    assert main(["reconcile", "--json"]) == 2  # still no watermark


async def test_the_api_limit_reached_mid_run_stops_and_resumes_next_run(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, redis_client: redis.Redis
) -> None:
    settings = rc_settings.model_copy(update={"sf_min_api_remaining": 100})
    sf_org.page_size = 10
    sf_org.fixed_time = T0 + timedelta(hours=1)
    ids = [add(sf_org, n, T0 + timedelta(seconds=n)) for n in range(1, 41)]
    sf_org.api_max = 1000
    sf_org.api_used = 880  # a few requests before the limit

    original = sf_org.page

    def page(locator: str, offset: int, version: str) -> dict[str, object]:
        if offset >= 20:
            sf_org.api_used = 950  # someone else used the org's requests meanwhile
        return original(locator, offset, version)

    sf_org.page = page  # type: ignore[method-assign]
    report = await run_reconcile(settings, since=T0)
    assert report.errors == 1 and report.stopped is not None
    assert "daily API requests are left" in report.stopped
    assert report.queued == 30
    assert redis_client.hget("sfrelay:stats", "outcome:api_limit") == b"1"
    engine = create_engine(settings.database_url)
    try:
        mark = await cursors.get(engine, cursors.watermark_name("Contact"))
    finally:
        await engine.dispose()
    assert mark == (T0 + timedelta(seconds=30)).isoformat()  # the last page queued
    await run_worker(settings)
    sf_org.api_used = 0
    sf_org.page = original  # type: ignore[method-assign]
    resumed = await run_reconcile(settings)
    assert resumed.errors == 0 and resumed.queued == 10
    await run_worker(settings)
    assert set(users(drupal_db)) == set(ids)
    assert sf_datetime(T0)  # the server's rendering is what the client parsed


async def test_the_cron_job_runs_once_at_a_time_and_never_crashes_the_worker(
    rc_settings: Settings, sf_org: FakeOrg, redis_client: redis.Redis
) -> None:
    from arq.connections import RedisSettings, create_pool

    from workers import polls, tasks
    from workers.main import worker_options

    settings = rc_settings.model_copy(update={"reconcile_every_seconds": 600})
    assert [job.name for job in worker_options(settings)["cron_jobs"]] == ["sfrelay:reconcile"]
    off = rc_settings.model_copy(update={"reconcile_every_seconds": 0})
    assert worker_options(off)["cron_jobs"] == []
    sf_org.fixed_time = T0 + timedelta(hours=1)
    ids = [add(sf_org, n, T0 + timedelta(minutes=n)) for n in range(1, 4)]
    await run_reconcile(settings, since=T0 - timedelta(hours=1), dry_run=False)
    before = await queued(settings)
    assert before == 3
    ids.append(add(sf_org, 9, T0 + timedelta(minutes=50)))
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    ctx: dict[str, object] = {"redis": pool}
    other: dict[str, object] = {"redis": pool}
    await tasks.startup(ctx, settings)
    other[tasks.STATE] = ctx[tasks.STATE]
    try:
        runs = sf_org.counts["queryAll"]
        await asyncio.gather(polls.reconcile_job(ctx), polls.reconcile_job(other))
        assert sf_org.counts["queryAll"] - runs == 2  # one run: one query per object
        assert await queued(settings) == 4  # it queued the new record
        assert redis_client.ttl("sfrelay:reconcile:recent") > 500
        assert not redis_client.exists("sfrelay:reconcile:running")
        # Not due again yet: nothing asked of Salesforce.
        asked = sf_org.counts["queryAll"]
        await polls.reconcile_job(ctx)
        assert sf_org.counts["queryAll"] == asked
        # Salesforce failing: logged, the worker carries on, the claim is released.
        redis_client.delete("sfrelay:reconcile:recent")
        sf_org.fail_next = [(503, "SERVER_UNAVAILABLE", "down")] * 10
        await polls.reconcile_job(ctx)
        assert not redis_client.exists("sfrelay:reconcile:running")
    finally:
        await polls.close(ctx)
        await tasks.shutdown(ctx)
        await pool.aclose()


def test_a_worker_killed_mid_reconcile_leaves_no_claim_that_stops_the_next_run(
    rc_settings: Settings,
    sf_org: FakeOrg,
    sf_server: SalesforceServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """A worker killed (SIGKILL) while its reconcile run waits on Salesforce: the next worker
    reconciles as soon as the run is due, not an hour later (the claim of a dead run expired
    with the hour-long run timeout)."""
    settings = rc_settings.model_copy(update={"job_timeout_seconds": 60})
    sf_org.fixed_time = T0 + timedelta(hours=1)
    add(sf_org, 1, T0 + timedelta(minutes=1))
    asyncio.run(run_reconcile(settings, since=T0, dry_run=False))  # the watermark
    env = sf_env(settings, sf_server, reconcile_every_seconds=1)

    def start(name: str) -> subprocess.Popen[bytes]:
        with (tmp_path / name).open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def renewed() -> None:
        # A live run keeps its claim: renewed while it waits on Salesforce.
        left = redis_client.pttl(RUNNING)
        deadline = time.monotonic() + 30
        while redis_client.pttl(RUNNING) <= left:
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)

    with holding(sf_org, "query") as arrived:  # the first worker's run at its start
        sigkill_once(arrived, start("first.log"), tmp_path / "first.log", renewed)
    asked = sf_org.counts["queryAll"]
    # The dead run's claim goes within seconds (not with the run's hour-long timeout)...
    deadline = time.monotonic() + 60
    while redis_client.exists(RUNNING):
        assert time.monotonic() < deadline, redis_client.ttl(RUNNING)
        time.sleep(0.1)
    second = start("second.log")
    try:
        # ...and, due again (SFRELAY_RECONCILE_EVERY_SECONDS=1), the next worker runs it at
        # its start.
        deadline = time.monotonic() + 60
        while sf_org.counts["queryAll"] == asked:
            assert second.poll() is None, (tmp_path / "second.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()
            time.sleep(0.1)
    finally:
        second.kill()
        second.wait(10)


# --- the delete log: records deleted and purged before a poll saw them --------------------


async def synced(settings: Settings, org: FakeOrg, count: int) -> dict[str, int]:
    """`count` Contacts, each with a Drupal user: Salesforce Id -> uid."""
    org.fixed_time = T0 + timedelta(hours=1)
    ids = [add(org, n, T0 + timedelta(minutes=n)) for n in range(1, count + 1)]
    await run_reconcile(settings, since=T0)
    await run_worker(settings)
    uids = {row[6]: row[0] for row in drupal_users(Path(settings.database_url.split("///")[1]))}
    assert set(uids) == set(ids)
    return uids


def statuses(path: Path) -> dict[int, int]:
    return {row[0]: row[3] for row in drupal_users(path)}


async def outcomes(settings: Settings, ids: list[str]) -> list[str | None]:
    """The last outcome sfrelay recorded for each record (None: never seen)."""
    from app.drupal import ledger

    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            states = await ledger.load(conn, ids)
    finally:
        await engine.dispose()
    return [states[i].history[-1]["o"] if i in states else None for i in ids]


async def cursor(settings: Settings, name: str) -> str | None:
    engine = create_engine(settings.database_url)
    try:
        return await cursors.get(engine, name)
    finally:
        await engine.dispose()


async def test_records_purged_before_a_poll_have_their_users_blocked(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    """A hard delete (Bulk API hardDelete) and a record emptied from the Recycle Bin are gone
    from queryAll before reconcile runs: the delete log still lists them, so their users get
    the deletion a queryAll row would have given them (SFRELAY_ON_DELETE=block)."""
    settings = rc_settings
    uids = await synced(settings, sf_org, 3)
    hard, emptied, kept = list(uids)
    sf_org.hard_delete("Contact", hard, T0 + timedelta(hours=2))
    sf_org.delete("Contact", emptied, T0 + timedelta(hours=2, minutes=5))
    sf_org.empty_recycle_bin("Contact", emptied)
    sf_org.fixed_time = T0 + timedelta(hours=3)
    before = sf_org.counts["queryAll"]
    report = await run_reconcile(settings)
    assert (report.queried, report.deleted, report.purged, report.queued) == (0, 0, 2, 2)
    assert (report.errors, report.stopped) == (0, None)
    # One delete log request per object, one query re-reading the two Ids by Id.
    assert (sf_org.counts["Contact:deleted"], sf_org.counts["Lead:deleted"]) == (2, 2)
    assert sf_org.counts["queryAll"] - before == 2 + 1
    await run_worker(settings)
    found = statuses(drupal_db)
    assert (found[uids[hard]], found[uids[emptied]], found[uids[kept]]) == (0, 0, 1)
    assert await outcomes(settings, [hard, emptied, kept]) == ["blocked", "blocked", "created"]
    # The next run lists them again (its window overlaps): applied, they cost nothing.
    sf_org.fixed_time = T0 + timedelta(hours=3, minutes=15)
    before = sf_org.counts["queryAll"]
    again = await run_reconcile(settings)
    assert (again.purged, again.queued, again.errors) == (0, 0, 0)
    assert sf_org.counts["queryAll"] - before == 2


async def test_a_purged_record_without_a_drupal_user_queues_nothing(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    settings = rc_settings
    uids = await synced(settings, sf_org, 1)
    never = add(sf_org, 2, T0 + timedelta(minutes=70), email=None)  # no email: never a user
    unseen = add(sf_org, 3, T0 + timedelta(minutes=80))  # created and purged between polls
    sf_org.hard_delete("Contact", never, T0 + timedelta(hours=2))
    sf_org.hard_delete("Contact", unseen, T0 + timedelta(hours=2))
    sf_org.fixed_time = T0 + timedelta(hours=3)
    before = sf_org.counts["queryAll"]
    report = await run_reconcile(settings)
    assert (report.purged, report.queued, report.errors) == (0, 0, 0)
    assert sf_org.counts["Contact:deleted"] == 2  # asked (once per run), nothing to re-read
    assert sf_org.counts["queryAll"] - before == 2
    assert await queued(settings) == 0
    assert await outcomes(settings, [never, unseen]) == [None, None]
    assert list(statuses(drupal_db).values()) == [1] and len(uids) == 1


async def test_an_undeleted_record_listed_by_the_delete_log_keeps_its_user(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    """The delete log still lists a record restored from the Recycle Bin: it is not deleted,
    whether sfrelay applied its restored version already or not yet."""
    settings = rc_settings
    uids = await synced(settings, sf_org, 3)
    applied, racing, hard = list(uids)
    for record_id in (applied, racing):
        sf_org.delete("Contact", record_id, T0 + timedelta(hours=2))
    sf_org.undelete("Contact", applied, T0 + timedelta(hours=2, minutes=30))
    await pushed(settings, sf_org, applied)  # its restored version came by push
    await run_worker(settings)
    sf_org.hard_delete("Contact", hard, T0 + timedelta(hours=2))
    sf_org.fixed_time = T0 + timedelta(hours=3)
    # Restored just after the run read Salesforce's clock: its stamp is past the run's end,
    # so queryAll leaves it to the next run; only the delete log shows it, deleted.
    sf_org.undelete("Contact", racing, T0 + timedelta(hours=3, seconds=20))
    report = await run_reconcile(settings)
    assert (report.purged, report.current, report.errors) == (1, 1, 0)
    assert report.queued == 2  # the hard delete, and the restored version read by Id
    await run_worker(settings)
    found = statuses(drupal_db)
    assert (found[uids[applied]], found[uids[racing]], found[uids[hard]]) == (1, 1, 0)
    assert await outcomes(settings, [applied, racing, hard]) == [
        "updated",
        "updated",
        "blocked",
    ]


async def test_a_merge_loser_listed_by_the_delete_log_keeps_its_merge(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    """A merge loser is in the delete log too. Returned by queryAll (with MasterRecordId) it
    stays a merge; emptied from the Recycle Bin after that merge was queued but before it was
    applied, the delete log's deletion is that same version (a duplicate), not a plain delete
    in its place."""
    settings = rc_settings
    uids = await synced(settings, sf_org, 3)
    loser, late_loser, hard = list(uids)
    survivor = add(sf_org, 50, T0 + timedelta(minutes=1), email=None)  # no Drupal user
    late_survivor = add(sf_org, 51, T0 + timedelta(minutes=1), email=None)
    sf_org.delete("Contact", loser, T0 + timedelta(hours=2), master=survivor)
    end = T0 + timedelta(hours=3, seconds=40)
    # Merged in the run's last minute: after what the delete log covers this run (to the
    # minute), so the next run lists it.
    sf_org.delete("Contact", late_loser, end - timedelta(seconds=30), master=late_survivor)
    sf_org.fixed_time = end
    first = await run_reconcile(settings)
    assert (first.merged, first.purged, first.queued) == (2, 0, 2)
    sf_org.empty_recycle_bin("Contact", late_loser)
    sf_org.hard_delete("Contact", hard, end + timedelta(minutes=5))
    sf_org.fixed_time = end + timedelta(minutes=15)
    second = await run_reconcile(settings)
    assert (second.merged, second.purged, second.queued, second.current) == (0, 2, 1, 1)
    await run_worker(settings)
    found = statuses(drupal_db)
    assert (found[uids[loser]], found[uids[late_loser]], found[uids[hard]]) == (1, 1, 0)
    assert await outcomes(settings, [loser, late_loser, hard]) == ["merged", "merged", "blocked"]
    owners = {row[0]: row[6] for row in drupal_users(drupal_db)}
    assert owners[uids[loser]] == survivor and owners[uids[late_loser]] == late_survivor


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sfrelay.reconcile"]


def log_purged(start: datetime, begins: datetime) -> list[str]:
    """The warnings of a run whose delete log window [start, ...] Salesforce purged up to
    `begins`, for each object."""
    return [
        f"Salesforce no longer lists the {sobject} deleted between {start.isoformat()} and "
        f"{begins.isoformat()} (Salesforce refused the deleted {sobject} records (HTTP 400, "
        "INVALID_REPLICATION_DATE): startDate before org replication enabled date): Drupal "
        f"users of records deleted and purged then are not blocked; listing resumes at "
        f"{begins.isoformat()}"
        for sobject in ("Contact", "Lead")
    ]


async def test_a_delete_log_window_older_than_salesforce_keeps_does_not_fail_the_poll(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Salesforce lists deletions for 15 days (earliestDateAvailable), less when it purged its
    delete log: an older start is refused with INVALID_REPLICATION_DATE. A run 20 days after
    the last lists the 15 days it can; one whose start the log no longer reaches warns, and
    the next run lists from where this one ended."""
    settings = rc_settings
    uids = await synced(settings, sf_org, 3)
    old, recent, later = list(uids)
    sf_org.hard_delete("Contact", old, T0 + timedelta(days=20))
    sf_org.fixed_time = T0 + timedelta(days=21)
    report = await run_reconcile(settings)
    assert (report.purged, report.queued, report.errors, report.stopped) == (1, 1, 0, None)
    # The delete log, purged by Salesforce after this run's start (two hours ago).
    sf_org.hard_delete("Contact", recent, T0 + timedelta(days=21, minutes=10))
    sf_org.purge_delete_log(T0 + timedelta(days=21, hours=1))
    end = T0 + timedelta(days=21, hours=2)
    sf_org.fixed_time = end
    changed = add(sf_org, 9, end - timedelta(minutes=30))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sfrelay.reconcile"):
        refused = await run_reconcile(settings)
    assert (refused.queued, refused.purged, refused.errors, refused.stopped) == (1, 0, 0, None)
    # Listed again from where the log now begins: nothing deleted there.
    assert warnings(caplog) == log_purged(T0 + timedelta(days=21), T0 + timedelta(days=21, hours=1))
    assert await cursor(settings, cursors.deleted_name("Contact")) == end.isoformat()
    sf_org.hard_delete("Contact", later, end + timedelta(minutes=5))
    sf_org.fixed_time = end + timedelta(minutes=15)
    resumed = await run_reconcile(settings)
    assert (resumed.purged, resumed.errors) == (1, 0)
    await run_worker(settings)
    found = statuses(drupal_db)
    assert (found[uids[old]], found[uids[recent]], found[uids[later]]) == (0, 1, 0)
    assert changed in users(drupal_db)


async def test_a_delete_log_purged_after_the_start_is_still_listed_from_where_it_begins(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Salesforce purged its delete log after this run's start: what it purged is lost, but
    a record hard-deleted after the purge is still listed (from earliestDateAvailable, to the
    minute) and its user blocked; the cursor never passes it unlisted."""
    settings = rc_settings
    uids = await synced(settings, sf_org, 2)
    lost, kept = list(uids)
    purge = T0 + timedelta(hours=2, minutes=10, seconds=30)
    sf_org.hard_delete("Contact", lost, T0 + timedelta(hours=2))
    sf_org.purge_delete_log(purge)
    sf_org.hard_delete("Contact", kept, T0 + timedelta(hours=2, minutes=40))
    end = T0 + timedelta(hours=3)
    sf_org.fixed_time = end
    with caplog.at_level(logging.WARNING, logger="sfrelay.reconcile"):
        report = await run_reconcile(settings)
    assert (report.purged, report.queued, report.errors, report.stopped) == (1, 1, 0, None)
    resumes = (purge + timedelta(minutes=1)).replace(second=0)
    assert warnings(caplog) == log_purged(T0 + timedelta(hours=1), resumes)
    assert await cursor(settings, cursors.deleted_name("Contact")) == end.isoformat()
    await run_worker(settings)
    found = statuses(drupal_db)
    assert (found[uids[lost]], found[uids[kept]]) == (1, 0)


async def test_a_mass_deletion_over_salesforces_id_limit_is_listed_in_halves(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    """Salesforce lists at most 600,000 deleted Ids a request (here 2): more is
    EXCEEDED_ID_LIMIT, and the window is asked for in halves until each fits; a window that
    cannot be halved any more stops the object's run, its cursor kept, and the next run
    (the deletions purged by then) goes on."""
    settings = rc_settings
    uids = await synced(settings, sf_org, 6)
    ids = list(uids)
    for i, record in enumerate(ids[:5]):
        sf_org.hard_delete("Contact", record, T0 + timedelta(hours=1, minutes=20 * i + 10))
    sf_org.max_deleted_ids = 2
    sf_org.fixed_time = T0 + timedelta(hours=3)
    before = sf_org.counts["Contact:deleted"]
    report = await run_reconcile(settings)
    assert (report.purged, report.queued, report.errors, report.stopped) == (5, 5, 0, None)
    # Deleted at 1:10, 1:30, 1:50, 2:10, 2:30. [1:00, 3:00] lists 5: refused; [1:00, 2:00] 3:
    # refused; then [1:00, 1:30], [1:30, 2:00] (1:30 in both: their ends are inclusive) and
    # [2:00, 3:00] 2 each.
    assert sf_org.counts["Contact:deleted"] - before == 5
    await run_worker(settings)
    found = statuses(drupal_db)
    assert [found[uids[r]] for r in ids] == [0, 0, 0, 0, 0, 1]
    # Refused however short the window: it is not halved below what Salesforce takes.
    start = await cursor(settings, cursors.deleted_name("Contact"))
    sf_org.max_deleted_ids = 0
    sf_org.hard_delete("Contact", ids[5], T0 + timedelta(hours=3, minutes=5))
    sf_org.fixed_time = T0 + timedelta(hours=3, minutes=8)
    stuck = await run_reconcile(settings)
    assert (stuck.purged, stuck.errors) == (0, 1)
    assert stuck.stopped is not None and "EXCEEDED_ID_LIMIT" in stuck.stopped
    assert await cursor(settings, cursors.deleted_name("Contact")) == start


async def test_the_delete_log_cursor_moves_only_after_its_deletions_were_queued(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    """The delete log's own watermark: latestDateCovered (to the minute), stored after the
    purged deletions were queued; Salesforce failing in between leaves it, and the next run
    lists the same window again. The queryAll watermark is the run's end, as before."""
    settings = rc_settings
    uids = await synced(settings, sf_org, 2)
    hard, kept = list(uids)
    start = T0 + timedelta(hours=1)
    assert await cursor(settings, cursors.deleted_name("Contact")) == start.isoformat()
    sf_org.hard_delete("Contact", hard, T0 + timedelta(hours=2))
    end = T0 + timedelta(hours=3, seconds=42)
    sf_org.fixed_time = end
    original = sf_org.replication

    def replication(sobject: str, kind: str, params: dict[str, list[str]]) -> dict[str, object]:
        answer = original(sobject, kind, params)
        if sobject == "Contact":  # the next request, reading the listed Ids again, fails
            sf_org.fail_next = [(503, "SERVER_UNAVAILABLE", "down")]
        return answer

    sf_org.replication = replication  # type: ignore[method-assign]
    failed = await run_reconcile(settings)
    assert (failed.purged, failed.queued, failed.errors) == (0, 0, 1)
    assert failed.stopped is not None and failed.stopped.startswith("Contact: ")
    assert await queued(settings) == 0
    assert await cursor(settings, cursors.deleted_name("Contact")) == start.isoformat()
    assert await cursor(settings, cursors.watermark_name("Contact")) == end.isoformat()
    covered = end.replace(second=0)
    assert await cursor(settings, cursors.deleted_name("Lead")) == covered.isoformat()
    sf_org.replication = original  # type: ignore[method-assign]
    later = end + timedelta(minutes=15)
    sf_org.fixed_time = later
    report = await run_reconcile(settings)
    assert (report.purged, report.queued, report.errors) == (1, 1, 0)
    assert (
        await cursor(settings, cursors.deleted_name("Contact"))
        == later.replace(second=0).isoformat()
    )
    # Straight after, the window is too short for Salesforce (a minute at least): not asked.
    asked = sf_org.counts["Contact:deleted"]
    assert (await run_reconcile(settings)).errors == 0
    assert sf_org.counts["Contact:deleted"] == asked
    await run_worker(settings)
    found = statuses(drupal_db)
    assert (found[uids[hard]], found[uids[kept]]) == (0, 1)


async def test_what_reconcile_queued_is_queued_again_after_drupal_is_restored_from_a_backup(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, tmp_path: Path
) -> None:
    """Drupal's database (sfrelay's ledger and watermark with it) restored from a backup taken
    before reconcile queued two versions: the next run reads them again, the ledger says
    Drupal lacks them, and they are queued and applied again (not taken for versions queued
    already: the queue remembers a polled version only until it is applied)."""
    settings = rc_settings
    sf_org.fixed_time = T0 + timedelta(hours=1)
    first = add(sf_org, 1, T0 + timedelta(minutes=1))
    await run_reconcile(settings, since=T0)
    await run_worker(settings)
    backup = tmp_path / "backup.sqlite"
    shutil.copyfile(drupal_db, backup)
    add(sf_org, 1, T0 + timedelta(hours=2), last="New1")
    later = add(sf_org, 2, T0 + timedelta(hours=2))
    sf_org.fixed_time = T0 + timedelta(hours=3)
    assert (await run_reconcile(settings)).queued == 2
    await run_worker(settings)
    restored = {first: ("c1@example.org", "L1", 1)}
    applied = {first: ("c1@example.org", "New1", 1), later: ("c2@example.org", "L2", 1)}
    assert users(drupal_db) == applied
    shutil.copyfile(backup, drupal_db)  # the restore, the worker stopped
    assert users(drupal_db) == restored
    report = await run_reconcile(settings)
    assert (report.queried, report.queued, report.current) == (2, 2, 0)
    await run_worker(settings)
    assert users(drupal_db) == applied
