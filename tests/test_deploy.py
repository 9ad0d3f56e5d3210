"""Deploy day: workers started together on a fresh database, a release rolled back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import Connection, inspect, text

from app.config import Settings
from app.drupal import ledger
from app.errors import ConfigError
from app.queue import DEFAULT_QUEUE as QUEUE
from tests.conftest import Cli
from tests.drupal_rows import open_syncer
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite
from tests.fixtures_worker import PROJECT, WorkerProcess
from tests.messages import contact, outbound_message
from tests.servers import RedisServer, free_port, wait_for_port

Starter = type[WorkerProcess]
NEWEST = len(ledger.MIGRATIONS)
D10 = pytest.mark.parametrize("drupal_site", ["sqlite-d10", "pg-d10", "mariadb-d10"], indirect=True)
ROLLED_BACK = (
    f"the sfrelay_* tables in this database are at schema version {NEWEST + 1}, newer than "
    f"this sfrelay knows (up to {NEWEST}): a newer sfrelay release upgraded them; run that "
    "release (or a later one) again, or restore the database backup taken before the upgrade "
    "to run this one"
)


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


async def newer_ledger(site: DrupalSite) -> list[dict[str, object]]:
    """The ledger as a newer release left it (one record, version NEWEST + 1); its rows."""
    syncer = await open_syncer(site)
    try:
        await syncer.apply([note(sf(1), "p1@example.org", "P", "One")])
    finally:
        await syncer.close()
    await site.execute("UPDATE sfrelay_schema SET version = :v", v=NEWEST + 1)
    return await ledger_rows(site)


async def ledger_rows(site: DrupalSite) -> list[dict[str, object]]:
    return [
        *await site.rows("SELECT id, version FROM sfrelay_schema"),
        *await site.rows("SELECT sf_id, uid, modstamp, digest, user_key FROM sfrelay_record"),
    ]


@D10
async def test_a_ledger_newer_than_this_release_is_refused_and_left_as_it_is(
    drupal_site: DrupalSite,
) -> None:
    """A rollback: the recorded version is past the last migration this release knows."""
    site = drupal_site
    before = await newer_ledger(site)
    with pytest.raises(ConfigError) as refused:
        await ledger.migrate(site.engine)
    assert str(refused.value) == ROLLED_BACK
    with pytest.raises(ConfigError) as refused:
        await open_syncer(site)
    assert str(refused.value) == ROLLED_BACK
    assert await ledger_rows(site) == before


@pytest.mark.parametrize("drupal_site", ["sqlite-d10"], indirect=True)
async def test_a_rolled_back_worker_exits_saying_why_and_check_fails_alike(
    worker_settings: Settings,
    worker_process: Starter,
    drupal_site: DrupalSite,
    redis_client: Redis,
    tmp_path: Path,
    cli: Cli,
) -> None:
    site = drupal_site
    before = await newer_ledger(site)
    worker = worker_process(worker_settings.model_copy(update={"database_url": site.url}), tmp_path)
    assert worker.wait(60) == 2
    assert worker.output().strip().splitlines()[-1] == f"sfrelay: {ROLLED_BACK}"
    assert "Traceback" not in worker.output()
    checked = cli(
        {"SFRELAY_REDIS_URL": worker_settings.redis_url, "SFRELAY_DATABASE_URL": site.url}, "check"
    )
    assert checked.returncode == 1, checked.stdout
    assert f"{ROLLED_BACK}" in checked.stdout
    assert await ledger_rows(site) == before


LEDGER_INDEXES = {
    "sfrelay_dead_letter": ["ix_sfrelay_dead_letter_record_id"],
    "sfrelay_record": ["ix_sfrelay_record_uid"],
}


async def ledger_indexes(site: DrupalSite) -> dict[str, list[str]]:
    def read(sync: Connection) -> dict[str, list[str]]:
        found = inspect(sync)
        return {t: sorted(str(i["name"]) for i in found.get_indexes(t)) for t in LEDGER_INDEXES}

    async with site.engine.connect() as conn:
        return await conn.run_sync(read)


@D10
@pytest.mark.parametrize("recorded", [False, True], ids=["no-version", "version-recorded"])
async def test_a_first_migration_killed_between_its_statements_is_finished_by_the_next_start(
    drupal_site: DrupalSite, recorded: bool
) -> None:
    """MySQL commits each CREATE TABLE and CREATE INDEX on its own: a worker killed between
    them left the tables without their indexes and no version. The next start creates what
    is missing, indexes too (PostgreSQL and SQLite roll the whole step back); and so does
    it when an earlier release, which did not make them, had recorded the newest version."""
    site = drupal_site
    await ledger.migrate(site.engine)
    for table, names in LEDGER_INDEXES.items():
        for name in names:
            on = f" ON {table}" if site.backend == "mariadb" else ""
            await site.execute(f"DROP INDEX {name}{on}")
    if not recorded:
        await site.execute("DELETE FROM sfrelay_schema")
    assert await ledger_indexes(site) == {table: [] for table in LEDGER_INDEXES}
    assert await ledger.migrate(site.engine) == NEWEST
    assert await ledger_indexes(site) == LEDGER_INDEXES
    assert await site.rows("SELECT id, version FROM sfrelay_schema") == [
        {"id": 1, "version": NEWEST}
    ]


@pytest.mark.parametrize("drain", ["0", "1"])
def test_a_post_in_flight_at_sigterm_is_stored_then_acked_and_new_connections_are_refused(
    redis_server: RedisServer, redis_client: Redis, tmp_path: Path, drain: str
) -> None:
    """A rolling restart: `sfrelay serve` gets SIGTERM while a message's body is still
    arriving. uvicorn closes the listener (after the drain) and lets the request finish (no
    graceful-shutdown timeout: the container's stop grace period bounds it): the message is
    stored, then acked; a connection opened after the listener closed is refused."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")},
        "SFRELAY_ORG_IDS": "00D1I000003qqqEUAQ",
        "SFRELAY_ALLOWED_NETWORKS": "127.0.0.0/8",
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_PORT": str(port),
        "SFRELAY_SHUTDOWN_DRAIN_SECONDS": drain,
        "PYTHONPATH": str(PROJECT),
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        wait_for_port(port, timeout=30)  # uvicorn binds after "Application startup complete"
        body = outbound_message([contact(Email="inflight@example.org")])
        head = (
            "POST /salesforce/outbound-message HTTP/1.1\r\nHost: sfrelay\r\n"
            f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(head + body[:100])
            time.sleep(0.5)  # the request is being read
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while "Waiting for connections to close" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            assert redis_client.zcard(QUEUE) == 0  # nothing stored yet
            client.sendall(body[100:])
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert b"<Ack>true</Ack>" in answer
        assert redis_client.zcard(QUEUE) == 1  # stored before the ack
        assert process.wait(30) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@D10
async def test_two_workers_started_together_upgrade_a_version_1_ledger_with_rows_once(
    drupal_site: DrupalSite,
    worker_settings: Settings,
    worker_process: Starter,
    tmp_path: Path,
) -> None:
    """An upgrade: the ledger as version 1 made it (records without digest and user_key,
    no cursors, no blocks), with a row; two new workers started at once both start, the
    steps run once, and the row is kept."""
    site = drupal_site
    syncer = await open_syncer(site)
    try:
        await syncer.apply([note(sf(1), "p1@example.org", "P", "One")])
    finally:
        await syncer.close()
    async with site.engine.begin() as conn:
        for table in ("sfrelay_cursor", "sfrelay_block"):
            await conn.execute(text(f"DROP TABLE {table}"))
        for column in ("digest", "user_key"):
            await conn.execute(text(f"ALTER TABLE sfrelay_record DROP COLUMN {column}"))
        await conn.execute(text("UPDATE sfrelay_schema SET version = 1"))
    (row,) = await site.rows("SELECT sf_id, uid, modstamp FROM sfrelay_record")
    settings = worker_settings.model_copy(update={"database_url": site.url})
    workers = [worker_process(settings, tmp_path) for _ in range(2)]
    wait_started(workers)
    for worker in workers:
        assert worker.process.poll() is None, worker.output()
        assert "Traceback" not in worker.output(), worker.output()
    assert await site.rows("SELECT id, version FROM sfrelay_schema") == [
        {"id": 1, "version": NEWEST}
    ]
    assert await site.rows("SELECT sf_id, uid, modstamp, digest, user_key FROM sfrelay_record") == [
        {**row, "digest": None, "user_key": None}
    ]
    assert await ledger_tables(site) == [
        "sfrelay_block",
        "sfrelay_cursor",
        "sfrelay_dead_letter",
        "sfrelay_record",
        "sfrelay_schema",
    ]
