"""Backfill: 20,000 records from the local Salesforce, killed mid-run and resumed."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.backfill import Checkpoint, run_backfill
from app.config import Settings
from app.drupal import cursors
from app.reconcile import run_reconcile
from tests.fixtures_salesforce import holding, sf_env, sigkill_once
from tests.fixtures_worker import run_worker
from tests.sfserver import FakeOrg, Refusal, SalesforceServer
from tests.test_reconcile import T0, add, cursor, queued, rc_settings, users

__all__ = ["rc_settings"]

COUNT = 20_000


async def test_a_backfill_killed_mid_run_resumes_and_ends_with_exactly_the_users(
    rc_settings: Settings,
    sf_org: FakeOrg,
    sf_server: SalesforceServer,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    settings = rc_settings
    sf_org.page_size = 1000
    sf_org.fixed_time = T0 + timedelta(days=1)
    expected = set()
    for n in range(1, COUNT + 1):
        if n % 200 == 0:
            add(sf_org, n, T0 + timedelta(seconds=n), email=None)
        else:
            expected.add(add(sf_org, n, T0 + timedelta(seconds=n)))
    log = tmp_path / "backfill.log"
    with holding(sf_org, "page", lambda _, offset, __: offset >= 8000) as arrived:
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "backfill", "--object", "Contact"],
                cwd=tmp_path,
                env=sf_env(settings, sf_server),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        sigkill_once(arrived, process, log)
    output = log.read_text()
    assert "Contact: 1,000 records" in output  # progress lines (not a terminal)
    saved = await cursor(settings, cursors.checkpoint_name("Contact"))
    assert saved is not None
    point = Checkpoint.loads(saved)
    assert point.started == sf_org.fixed_time
    assert point.after == T0 + timedelta(seconds=8000)  # the last page queued
    assert await cursor(settings, cursors.watermark_name("Contact")) is None
    assert await queued(settings) == 8000 - 40  # 40 of the first 8,000 have no email

    served = sf_org.served_records
    report = await run_backfill(settings, objects=["Contact"])
    assert sf_org.served_records - served == COUNT - 8000 + 1  # resumed, not restarted
    assert (report.queried, report.queued, report.no_email, report.errors) == (
        12_001,
        12_000 - 60,
        61,  # record 8,000 (read again: the checkpoint's own) has no email
        0,
    )
    assert report.current == 0
    assert await cursor(settings, cursors.checkpoint_name("Contact")) is None
    assert await cursor(settings, cursors.watermark_name("Contact")) == point.started.isoformat()
    await run_worker(settings)
    assert set(users(drupal_db)) == expected
    assert len(users(drupal_db)) == COUNT - 100
    # Reconcile carries on from the backfill's start: nothing new.
    leads = await run_backfill(settings, objects=["Lead"])
    assert (leads.queried, leads.errors) == (0, 0)
    sf_org.fixed_time = point.started + timedelta(minutes=5)
    follow = await run_reconcile(settings)
    assert (follow.queued, follow.errors) == (0, 0)


async def test_a_dry_run_backfill_counts_and_stores_nothing(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    sf_org.fixed_time = T0 + timedelta(days=1)
    for n in range(1, 6):
        add(sf_org, n, T0 + timedelta(seconds=n), email=None if n == 5 else "default")
    report = await run_backfill(rc_settings, dry_run=True)
    assert (report.queried, report.queued, report.no_email) == (5, 4, 1)
    assert await queued(rc_settings) == 0
    assert await cursor(rc_settings, cursors.checkpoint_name("Contact")) is None
    assert await cursor(rc_settings, cursors.watermark_name("Contact")) is None
    assert users(drupal_db) == {}


def test_progress_on_a_terminal_rewrites_one_line_with_rate_and_eta() -> None:
    import io

    from app.reconcile import Progress

    out = io.StringIO()
    shown = Progress(out, tty=True, label="Contact", total=4000)
    shown.page(1000)
    shown.page(1000)
    shown.end()
    lines = out.getvalue().split("\r")
    assert lines[0] == ""
    assert lines[2].startswith("Contact: 2,000 records, ")
    assert ", 50% of 4,000, ETA " in lines[2]
    assert out.getvalue().endswith("\n")


# --- a record edited while a run pages: Salesforce reads a page's values when it fetches the
# page, so the record comes back with its new stamp, out of the query's order -------------


def edited_mid_run(org: FakeOrg, edited: str, later: timedelta, fail: Refusal) -> None:
    """Paging: record `edited` is edited as the second page is fetched, its stamp `later`
    than the run's start (negative: a transaction begun before it, committed now); the third
    page fails."""
    original = org.page

    def page(locator: str, offset: int, version: str) -> dict[str, Any]:
        if offset == org.page_size:
            assert org.fixed_time is not None
            edit_time = org.fixed_time + later
            org.fixed_time = max(org.fixed_time, edit_time)
            record = org.records["Contact"][edited]
            record["SystemModstamp"], record["LastName"] = edit_time, "Edited"
        if offset == 2 * org.page_size:
            org.page = original  # type: ignore[method-assign]  # the next run pages normally
            raise fail
        return original(locator, offset, version)

    org.page = page  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("edited", "later"),
    [(19, timedelta(minutes=5)), (19, timedelta(minutes=-5)), (14, timedelta(minutes=-9))],
    ids=["after the start", "committed late, the last", "committed late, the fifth"],
)
async def test_a_backfill_resumes_before_records_not_read_yet(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, edited: int, later: timedelta
) -> None:
    sf_org.page_size = 10
    sf_org.fixed_time = T0 + timedelta(days=1)
    ids = [add(sf_org, n, T0 + timedelta(seconds=n)) for n in range(1, 31)]
    edited_mid_run(sf_org, ids[edited], later, Refusal(503, "SERVER_UNAVAILABLE", "down"))
    cut = await run_backfill(rc_settings)
    assert cut.stopped is not None
    point = Checkpoint.loads(await cursor(rc_settings, cursors.checkpoint_name("Contact")) or "")
    # The second page's newest record not edited (the edited one came back with its new stamp,
    # within OVERLAP of the run's start or past it), not the edited one's stamp.
    assert point.after == T0 + timedelta(seconds=20 if edited == 14 else 19)
    resumed = await run_backfill(rc_settings)
    assert resumed.stopped is None and resumed.errors == 0
    await run_worker(rc_settings)
    assert sorted(set(ids) - set(users(drupal_db))) == []


async def test_a_reconcile_watermark_stays_before_records_not_read_yet(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path
) -> None:
    sf_org.page_size = 10
    sf_org.fixed_time = T0 + timedelta(hours=3)
    ids = [add(sf_org, n, T0 + timedelta(minutes=n)) for n in range(1, 31)]  # missed pushes
    fail = Refusal(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
    edited_mid_run(sf_org, ids[19], timedelta(minutes=30), fail)
    cut = await run_reconcile(rc_settings, since=T0)
    assert cut.stopped is not None
    mark = await cursor(rc_settings, cursors.watermark_name("Contact"))
    assert mark == (T0 + timedelta(minutes=19)).isoformat()  # not the edited 20th's stamp
    sf_org.fixed_time += timedelta(minutes=15)
    assert (await run_reconcile(rc_settings)).stopped is None
    await run_worker(rc_settings)
    assert sorted(set(ids) - set(users(drupal_db))) == []


async def test_a_reconcile_watermark_never_moves_back_into_its_overlap(
    rc_settings: Settings, sf_org: FakeOrg
) -> None:
    """A run starts 10 minutes before its watermark; failing after its first page, it must
    not leave the watermark back there (failing so each time, it would drift back)."""
    sf_org.fixed_time = T0 + timedelta(hours=3)
    assert (await run_reconcile(rc_settings, since=T0)).stopped is None
    mark = T0 + timedelta(hours=3)
    assert await cursor(rc_settings, cursors.watermark_name("Contact")) == mark.isoformat()
    sf_org.page_size = 10
    for n in range(1, 11):  # inside the overlap: the first page
        add(sf_org, n, mark - timedelta(minutes=5, seconds=-n))
    for n in range(11, 31):
        add(sf_org, n, mark + timedelta(minutes=n))
    sf_org.fixed_time = T0 + timedelta(hours=5)
    original = sf_org.page

    def page(locator: str, offset: int, version: str) -> dict[str, Any]:
        if offset:  # the second page fails
            raise Refusal(503, "SERVER_UNAVAILABLE", "down")
        return original(locator, offset, version)

    sf_org.page = page  # type: ignore[method-assign]
    cut = await run_reconcile(rc_settings)
    assert cut.stopped is not None and cut.queried == 10
    assert await cursor(rc_settings, cursors.watermark_name("Contact")) == mark.isoformat()


async def test_a_backfill_cut_short_resumes_and_says_since_does_not_apply(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sf_org.page_size = 10
    sf_org.fixed_time = T0 + timedelta(days=1)
    ids = [add(sf_org, n, T0 + timedelta(seconds=n)) for n in range(1, 31)]
    original = sf_org.page

    def page(locator: str, offset: int, version: str) -> dict[str, Any]:
        if offset:
            raise Refusal(503, "SERVER_UNAVAILABLE", "down")
        return original(locator, offset, version)

    sf_org.page = page  # type: ignore[method-assign]
    assert (await run_backfill(rc_settings, objects=["Contact"])).stopped is not None
    sf_org.page = original  # type: ignore[method-assign]
    since = T0 + timedelta(seconds=25)
    with caplog.at_level(logging.WARNING, logger="sfrelay.backfill"):
        resumed = await run_backfill(rc_settings, objects=["Contact"], since=since)
    assert resumed.stopped is None
    cut, started = T0 + timedelta(seconds=10), T0 + timedelta(days=1)
    assert [r.getMessage() for r in caplog.records if r.name == "sfrelay.backfill"] == [
        f"backfill of Contact resumes the run cut short at {cut.isoformat()} (started "
        f"{started.isoformat()}): --since {since.isoformat()} does not apply to it"
    ]
    await run_worker(rc_settings)
    assert sorted(set(ids) - set(users(drupal_db))) == []
