"""Deploy day: workers started together on a fresh database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect

from app.config import Settings
from app.drupal import ledger
from tests.drupal_rows import open_syncer
from tests.fixtures_db import DrupalSite
from tests.fixtures_worker import WorkerProcess

Starter = type[WorkerProcess]
NEWEST = len(ledger.MIGRATIONS)
D10 = pytest.mark.parametrize("drupal_site", ["sqlite-d10", "pg-d10", "mariadb-d10"], indirect=True)


def wait_started(workers: list[WorkerProcess], timeout: float = 90) -> None:
    """Until each worker said it is ready, or exited."""
    deadline = time.monotonic() + timeout
    while not all("worker ready" in w.output() or w.process.poll() is not None for w in workers):
        assert time.monotonic() < deadline, [w.output() for w in workers]
        time.sleep(0.05)


@D10
async def test_workers_opening_a_site_without_cachetags_together_all_open(
    drupal_site: DrupalSite,
) -> None:
    """Drupal creates cachetags on first use: on a site that has not used it yet, workers
    starting at the same moment each create it, one at a time (not "already exists")."""
    site = drupal_site
    await site.execute("DROP TABLE cachetags")
    opened = await asyncio.gather(*(open_syncer(site) for _ in range(5)), return_exceptions=True)
    for syncer in opened:
        if not isinstance(syncer, BaseException):
            await syncer.close()
    assert [type(s).__name__ for s in opened] == ["Syncer"] * 5, opened
    assert await site.rows("SELECT count(*) AS n FROM cachetags") == [{"n": 0}]
    assert await site.rows("SELECT id, version FROM sfrelay_schema") == [
        {"id": 1, "version": NEWEST}
    ]


@D10
async def test_three_worker_processes_started_together_on_a_fresh_database(
    drupal_site: DrupalSite,
    worker_settings: Settings,
    worker_process: Starter,
    tmp_path: Path,
) -> None:
    """No sfrelay table yet (nor cachetags): three `sfrelay worker` started at once all start,
    and the ledger is created once, at the newest version."""
    site = drupal_site
    await site.execute("DROP TABLE cachetags")
    assert await ledger_tables(site) == []
    settings = worker_settings.model_copy(update={"database_url": site.url})
    workers = [worker_process(settings, tmp_path) for _ in range(3)]
    wait_started(workers)
    for worker in workers:
        assert worker.process.poll() is None, worker.output()
        assert "Traceback" not in worker.output(), worker.output()
    assert await ledger_tables(site) == [
        "sfrelay_block",
        "sfrelay_cursor",
        "sfrelay_dead_letter",
        "sfrelay_record",
        "sfrelay_schema",
    ]
    assert await site.rows("SELECT id, version FROM sfrelay_schema") == [
        {"id": 1, "version": NEWEST}
    ]


async def ledger_tables(site: DrupalSite) -> list[str]:
    async with site.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    return sorted(n for n in names if n.startswith("sfrelay_"))
