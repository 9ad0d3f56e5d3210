"""`sfrelay status` and `sfrelay why` against real Redis and a real Drupal 10 SQLite copy.

The history they show comes from a real sync (an arq worker in burst mode); the commands are
called in-process through `app.cli.main`, plus one subprocess run of each.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from redis.asyncio import Redis

from app import dead
from app.cli import main
from app.config import Settings
from app.dead import DeadLetter
from app.main import create_app
from app.queue import (
    DEAD_KEY,
    HEALTH_CHECK_SUFFIX,
    JOB_KEY_PREFIX,
    RATE_PREFIX,
    SEEN_PREFIX,
    WORKERS_ALIVE_SUFFIX,
    enqueue_apply,
)
from app.sfid import to18
from app.sync import Syncer
from tests.factories import ORG_ID, apply_job, contact_json, sf_id
from tests.fixtures_worker import WorkerProcess, run_worker
from tests.messages import contact, outbound_message
from tests.servers import free_port
from tests.test_cli_worker import sfrelay
from tests.test_worker_process import wait_for

RECEIVED_AT = 1_764_000_000.0  # 2025-11-24 16:00:00 UTC
ADA = to18("0031I00000AbCdE")  # letters in it: its 15-character form is case-sensitive
NO_MAIL = sf_id("003", 2)
TWIN = sf_id("003", 3)  # Ada's email in another Contact
DEAD_DB = sf_id("003", 4)
DEAD_REDIS = sf_id("003", 5)
UNKNOWN = sf_id("003", 99)


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


@dataclass
class Scenario:
    settings: Settings
    drupal_db: Path
    uid: int  # Ada's Drupal user
    at: dict[str, list[float]]  # Salesforce Id -> the times of its history entries
    queued_job: str
    queued_score: float
    dead_row: int


def history_times(drupal_db: Path) -> dict[str, list[float]]:
    with sqlite3.connect(drupal_db) as db:
        rows = db.execute("SELECT sf_id, history FROM sfrelay_record").fetchall()
    db.close()
    return {sf: [entry["at"] for entry in orjson.loads(h)] for sf, h in rows}


async def _sync(settings: Settings) -> tuple[str, float, int]:
    client: Redis = Redis.from_url(settings.redis_url)
    try:
        # 1: Ada is created, a Contact without an email skipped, one with Ada's email refused.
        await enqueue_apply(
            client,
            settings.queue_name,
            apply_job(
                [
                    contact_json(1, ADA, email="Ada@Example.org"),
                    contact_json(2, NO_MAIL),
                    contact_json(3, TWIN, email="ada@example.org"),
                ],
                received_at=RECEIVED_AT,
            ),
            job_ttl_s=settings.job_ttl_seconds,
        )
        await run_worker(settings)
        # 2: a newer version of Ada updates her user.
        newer = contact_json(11, ADA, email="Ada@Example.org", modified="2026-11-21T10:00:00Z")
        await enqueue_apply(
            client,
            settings.queue_name,
            apply_job([newer], received_at=RECEIVED_AT),
            job_ttl_s=settings.job_ttl_seconds,
        )
        await run_worker(settings)
        # 3: queued, not applied: a new version of the Contact without an email.
        again = contact_json(12, NO_MAIL, modified="2026-11-22T10:00:00Z")
        await enqueue_apply(
            client,
            settings.queue_name,
            apply_job([again], received_at=RECEIVED_AT),
            job_ttl_s=settings.job_ttl_seconds,
        )
        [(queued_job, score)] = await client.zrange(settings.queue_name, 0, -1, withscores=True)
        # Dead: one kept by a worker in the database, one refused by the receiver (Redis).
        dead_row = await add_database_dead_letter(
            settings,
            contact_json(4, DEAD_DB, email="dead4@example.org"),
            "boom for dead4@example.org",
        )
        refused = DeadLetter(
            job=apply_job([], received_at=RECEIVED_AT),
            reason="LastModifiedDate is not a dateTime",
            notification_id=sf_id("04l", 5),
            record_id=DEAD_REDIS,
            attempts=0,
            first_seen=RECEIVED_AT,
            last_seen=RECEIVED_AT,
            body_sha256="0" * 64,
        )
        await client.hset(  # type: ignore[misc]
            DEAD_KEY, f"{SEEN_PREFIX}{ORG_ID[:15]}:{sf_id('04l', 5)}", refused.dumps()
        )
    finally:
        await client.aclose()
    return queued_job.decode(), score, dead_row


@pytest.fixture
def scenario(worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path) -> Scenario:
    queued_job, score, dead_row = asyncio.run(_sync(worker_settings))
    with sqlite3.connect(drupal_db) as db:
        [(uid,)] = db.execute("SELECT uid FROM users_field_data WHERE mail = 'Ada@Example.org'")
    db.close()
    at = history_times(drupal_db)
    return Scenario(worker_settings, drupal_db, uid, at, queued_job, score, dead_row)


def run(
    capsys: pytest.CaptureFixture[str], settings: Settings, *argv: str
) -> tuple[int, list[str], str]:
    """`sfrelay ARGV` in this process with exactly these settings (from the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in settings.model_dump(mode="json"):
            mp.delenv(f"SFRELAY_{key.upper()}", raising=False)
        mp.setenv("SFRELAY_REDIS_URL", settings.redis_url)
        mp.setenv("SFRELAY_DATABASE_URL", settings.database_url)
        mp.setenv("SFRELAY_QUEUE_NAME", settings.queue_name)
        mp.chdir(Path(settings.database_url.removeprefix("sqlite:///")).parent)  # no .env
        code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def fingerprint(drupal_db: Path, client: redis.Redis) -> tuple[str, dict[bytes, Any]]:
    """The database file's bytes and every Redis key's value: what a read-only command keeps."""
    digest = hashlib.sha256(drupal_db.read_bytes()).hexdigest()
    keys = {key: client.dump(key) for key in client.keys("*")}
    return digest, keys


# --- why: a record --------------------------------------------------------------------------


def test_why_a_record_shows_its_user_version_and_history(
    scenario: Scenario, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(scenario.drupal_db, redis_client)
    created, updated = scenario.at[ADA]
    expected = [
        f"Contact {ADA} -> Drupal user {scenario.uid}",
        f"  last applied version: 2026-11-21 10:00:00.000 UTC (notification {sf_id('04l', 11)})",
        "  history (last 2 outcomes, oldest first):",
        f"    {utc(created)}  created                   created Drupal user {scenario.uid}",
        f"    {utc(updated)}  updated                   updated Drupal user {scenario.uid}",
        "queued now: nothing",
        "dead letters: none",
    ]
    # The 18-character Id in any case, and the case-sensitive 15-character Id, are one record.
    for asked in (ADA, ADA.upper(), ADA.lower(), ADA[:15]):
        code, lines, err = run(capsys, scenario.settings, "why", asked)
        assert (code, lines, err) == (0, expected, ""), asked
    assert fingerprint(scenario.drupal_db, redis_client) == before

    code, lines, _ = run(capsys, scenario.settings, "why", ADA[:15].lower(), "--json")
    assert code == 1  # a different record: the 15-character form is case-sensitive
    code, lines, _ = run(capsys, scenario.settings, "why", ADA.lower(), "--json")
    assert code == 0
    assert orjson.loads(lines[0]) == {
        "query": ADA.lower(),
        "kind": "record",
        "id": ADA,
        "email": None,
        "users": [],
        "records": [
            {
                "id": ADA,
                "object": "Contact",
                "uid": scenario.uid,
                "drupal_user_exists": True,
                "drupal_uid_given_again": False,
                "last_version": "2026-11-21T10:00:00.000Z",
                "last_notification_id": sf_id("04l", 11),
                "converted_to": None,
                "updated_at": orjson.loads(lines[0])["records"][0]["updated_at"],
                "history": [
                    {
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
                        "outcome": "created",
                        "uid": scenario.uid,
                        "detail": None,
                        "notification_id": sf_id("04l", 1),
                    },
                    {
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(updated)),
                        "outcome": "updated",
                        "uid": scenario.uid,
                        "detail": None,
                        "notification_id": sf_id("04l", 11),
                    },
                ],
            }
        ],
        "conflicts": [],
        "queued": [],
        "dead": [],
    }


def test_why_a_conflict_names_the_other_record_and_no_email(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    [at] = scenario.at[TWIN]
    code, lines, err = run(capsys, scenario.settings, "why", TWIN)
    assert (code, err) == (0, "")
    assert lines == [
        f"Contact {TWIN} -> no Drupal user",
        "  last applied version: none",
        "  history (last 1 outcomes, oldest first):",
        f"    {utc(at)}  conflict_duplicate_email  NOT synced: its email already belongs to "
        f"Contact {ADA} in Drupal; give one of them another email in Salesforce, or merge them",
        "queued now: nothing",
        "dead letters: none",
    ]
    assert "@" not in "".join(lines)


def test_why_a_record_queued_now(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    [at] = scenario.at[NO_MAIL]
    code, lines, err = run(capsys, scenario.settings, "why", NO_MAIL)
    assert (code, err) == (0, "")
    assert lines == [
        f"Contact {NO_MAIL} -> no Drupal user",
        "  last applied version: none",
        "  history (last 1 outcomes, oldest first):",
        f"    {utc(at)}  skipped_no_email          skipped: the record has no email, and a "
        "Drupal user needs one",
        "queued now:",
        f"  notification {sf_id('04l', 12)} for Contact {NO_MAIL} (received "
        "2025-11-24 16:00:00 UTC)",
        "dead letters: none",
    ]
    code, json_lines, _ = run(capsys, scenario.settings, "why", NO_MAIL, "--json")
    assert orjson.loads(json_lines[0])["queued"] == [
        {
            "job_id": scenario.queued_job,
            "notification_id": sf_id("04l", 12),
            "record_id": NO_MAIL,
            "object": "Contact",
            "received_at": "2025-11-24T16:00:00Z",
            "ready_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(scenario.queued_score / 1000)
            ),
            "attempt": 1,
        }
    ]


def test_why_dead_records_in_the_database_and_in_redis(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, err = run(capsys, scenario.settings, "why", DEAD_DB)
    assert (code, err) == (0, "")
    dead_line = lines[-1]
    assert lines == [
        f"Contact {DEAD_DB}: sfrelay has not applied any notification for it",
        "queued now: nothing",
        "dead letters (`sfrelay dead replay ID` after fixing the cause; those refused on receipt:"
        " `sfrelay dead discard ID`):",
        dead_line,
    ]
    # The error names an email: not the one asked about, so it is masked.
    assert dead_line.startswith(
        f"  {scenario.dead_row}: notification {sf_id('04l', 4)} for Contact {DEAD_DB}, 5 tries, "
        "last "
    )
    assert dead_line.endswith(": boom for <email>")

    code, lines, err = run(capsys, scenario.settings, "why", DEAD_REDIS, "--json")
    assert (code, err) == (0, "")
    assert orjson.loads(lines[0])["dead"] == [
        {
            "id": f"{SEEN_PREFIX}{ORG_ID[:15]}:{sf_id('04l', 5)}",
            "source": "redis",
            "notification_id": sf_id("04l", 5),
            "record_id": DEAD_REDIS,
            "error": "refused on receipt: LastModifiedDate is not a dateTime",
            "attempts": 0,
            "first_seen": "2025-11-24T16:00:00Z",
            "last_seen": "2025-11-24T16:00:00Z",
        }
    ]


def test_why_an_unknown_record(
    scenario: Scenario, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(scenario.drupal_db, redis_client)
    code, lines, err = run(capsys, scenario.settings, "why", UNKNOWN)
    assert (code, err) == (1, "")
    assert lines == [
        f"Contact {UNKNOWN}: sfrelay has not applied any notification for it",
        "queued now: nothing",
        "dead letters: none",
    ]
    assert fingerprint(scenario.drupal_db, redis_client) == before


# --- why: an email --------------------------------------------------------------------------


def test_why_an_email_finds_the_user_its_record_and_the_refused_twin(
    scenario: Scenario, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(scenario.drupal_db, redis_client)
    created, updated = scenario.at[ADA]
    [refused] = scenario.at[TWIN]
    code, lines, err = run(capsys, scenario.settings, "why", "ADA@example.ORG")
    assert (code, err) == (0, "")
    assert lines == [
        f"ada@example.org: Drupal user {scenario.uid}",
        f"  Drupal user {scenario.uid} <- Contact {ADA}",
        f"Contact {ADA} -> Drupal user {scenario.uid}",
        f"  last applied version: 2026-11-21 10:00:00.000 UTC (notification {sf_id('04l', 11)})",
        "  history (last 2 outcomes, oldest first):",
        f"    {utc(created)}  created                   created Drupal user {scenario.uid}",
        f"    {utc(updated)}  updated                   updated Drupal user {scenario.uid}",
        "records not synced because ada@example.org is taken:",
        f"  Contact {TWIN} -> no Drupal user",
        "    last applied version: none",
        "    history (last 1 outcomes, oldest first):",
        f"      {utc(refused)}  conflict_duplicate_email  NOT synced: its email already belongs "
        f"to Contact {ADA} in Drupal; give one of them another email in Salesforce, or merge "
        "them",
        "queued now: nothing",
        "dead letters: none",
    ]
    assert fingerprint(scenario.drupal_db, redis_client) == before
    code, lines, _ = run(capsys, scenario.settings, "why", "ada@example.org", "--json")
    answer = orjson.loads(lines[0])
    assert answer["users"] == [{"uid": scenario.uid, "records": [ADA]}]
    assert [r["id"] for r in answer["records"]] == [ADA]
    assert [r["id"] for r in answer["conflicts"]] == [TWIN]


def test_why_an_email_of_a_dead_notification_shows_it(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, err = run(capsys, scenario.settings, "why", "dead4@example.org")
    assert (code, err) == (0, "")
    assert lines[:3] == [
        "dead4@example.org: no Drupal user has this email",
        "queued now: nothing",
        "dead letters (`sfrelay dead replay ID` after fixing the cause; those refused on receipt:"
        " `sfrelay dead discard ID`):",
    ]
    assert lines[3].endswith(": boom for dead4@example.org")  # the email asked about
    assert len(lines) == 4


def test_why_an_email_drupal_refuses_finds_the_records_skipped_for_it(
    scenario: Scenario, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two Contacts with the same address Drupal refuses (two dots in a row), in another case
    # each; a third with another refused address is not shown.
    bad, also_bad, other = sf_id("003", 21), sf_id("003", 22), sf_id("003", 23)
    jobs = [
        contact_json(21, bad, email="Rosa..Odegaard@Gmail.com"),
        contact_json(22, also_bad, email=" rosa..odegaard@gmail.COM "),
        contact_json(23, other, email="rosa..other@gmail.com"),
    ]
    asyncio.run(_apply(scenario.settings, jobs))
    before = fingerprint(scenario.drupal_db, redis_client)
    code, lines, err = run(capsys, scenario.settings, "why", "ROSA..odegaard@gmail.com")
    assert (code, err) == (0, "")
    [first] = history_times(scenario.drupal_db)[bad]
    [second] = history_times(scenario.drupal_db)[also_bad]
    meaning = "skipped: its email is not one Drupal accepts"
    assert lines == [
        "rosa..odegaard@gmail.com: no Drupal user has this email",
        f"Contact {bad} -> no Drupal user",
        "  last applied version: none",
        "  history (last 1 outcomes, oldest first):",
        f"    {utc(first)}  skipped_invalid_email     {meaning} (Rosa..Odegaard@Gmail.com)",
        f"Contact {also_bad} -> no Drupal user",
        "  last applied version: none",
        "  history (last 1 outcomes, oldest first):",
        f"    {utc(second)}  skipped_invalid_email     {meaning} (rosa..odegaard@gmail.COM)",
        "queued now: nothing",
        "dead letters: none",
    ]
    assert fingerprint(scenario.drupal_db, redis_client) == before


async def _apply(settings: Settings, notifications: list[dict[str, Any]]) -> None:
    client: Redis = Redis.from_url(settings.redis_url)
    try:
        await client.delete(settings.queue_name)  # the scenario's queued job stays unapplied
        await enqueue_apply(
            client,
            settings.queue_name,
            apply_job(notifications, received_at=RECEIVED_AT),
            job_ttl_s=settings.job_ttl_seconds,
        )
        await run_worker(settings)
    finally:
        await client.aclose()


def test_why_an_unknown_email(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys, scenario.settings, "why", "nobody@example.org")
    assert (code, lines, err) == (
        1,
        [
            "nobody@example.org: no Drupal user has this email",
            "queued now: nothing",
            "dead letters: none",
        ],
        "",
    )


@pytest.mark.parametrize("asked", ["hello", "003000000000001A", "0031I00000AbCdE!!!", ""])
def test_why_refuses_what_is_neither_an_id_nor_an_email(
    worker_settings: Settings,
    redis_client: redis.Redis,
    drupal_db: Path,
    capsys: pytest.CaptureFixture[str],
    asked: str,
) -> None:
    before = fingerprint(drupal_db, redis_client)
    code, lines, err = run(capsys, worker_settings, "why", asked)
    assert (code, lines) == (2, [])
    assert err == (
        f"sfrelay: {asked!r} is neither a Salesforce record Id (15 or 18 letters and digits, "
        "e.g. 0031I00000AbCdEQAZ) nor an email\n"
    )
    assert fingerprint(drupal_db, redis_client) == before


# --- status ---------------------------------------------------------------------------------


async def _post(settings: Settings, body: bytes) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
            response = await http.post(
                "/salesforce/outbound-message",
                content=body,
                headers={"content-type": "text/xml; charset=UTF-8", "soapaction": '""'},
            )
            assert response.status_code == 200, response.text


def test_status_one_screen(
    worker_settings: Settings,
    redis_client: redis.Redis,
    drupal_db: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Received through the receiver (3 notifications), applied by a real worker.
    minute = int(time.time()) // 60
    records = [contact(Email="ada@example.org"), contact(), contact(Email="ADA@example.org")]
    asyncio.run(_post(worker_settings, outbound_message(records)))
    asyncio.run(run_worker(worker_settings))
    # Then 2 more are received and wait in the queue, and one is refused as unusable.
    bad = contact(Email="x@example.org", LastModifiedDate="yesterday")
    asyncio.run(_post(worker_settings, outbound_message([contact(), contact(), bad])))
    redis_client.zadd(  # the job waits since 2 minutes 5 s (score: when it became ready)
        worker_settings.queue_name,
        {redis_client.zrange(worker_settings.queue_name, 0, 0)[0]: (time.time() - 125) * 1000},
    )
    asyncio.run(
        add_database_dead_letter(
            worker_settings, contact_json(40, DEAD_DB, email="d@example.org"), "boom"
        )
    )
    before = fingerprint(drupal_db, redis_client)

    code, lines, err = run(capsys, worker_settings, "status")
    assert (code, err) == (0, "")
    queue_line, waited = lines[0].split("; the oldest has waited ")
    assert queue_line == "queue        2 notifications in 1 job"
    minutes, _, seconds, _ = waited.split()
    assert 125 <= int(minutes) * 60 + int(seconds) < 300
    if int(time.time()) // 60 == minute:  # no minute boundary fell in between (the usual)
        assert lines[1] == (
            "received     0 notifications in the last minute, 0 in the last hour (whole "
            "minutes), 6 so far this minute"
        )
    assert lines[2:] == [
        "receiver     queued 5, skipped (object not synced) 0, redelivered duplicates 0, "
        "refused as unusable 1 (since the Redis data began)",
        "outcomes     conflict_duplicate_email 1, created 1, skipped_no_email 1 (since the "
        "Redis data began)",
        "dead         2 (1 in the Drupal database, 1 in Redis); `sfrelay dead list` shows them",
        "workers      none alive: no arq health check in the last 31 s (start `sfrelay worker`)",
        "database     reachable (Drupal 8+)",
    ]
    assert fingerprint(drupal_db, redis_client) == before

    code, lines, _ = run(capsys, worker_settings, "status", "--json")
    status = orjson.loads(lines[0])
    assert status["queue"]["jobs"] == 1
    assert status["queue"]["notifications"] == 2
    assert status["queue"]["notifications_exact"] is True
    assert status["received"]["this_minute"] + status["received"]["last_minute"] == 6
    assert status["outcomes"] == {
        "conflict_duplicate_email": 1,
        "created": 1,
        "skipped_no_email": 1,
    }
    assert status["dead"] == {"redis": 1, "database": 1}
    assert status["workers"] == {"alive": False, "count": 0, "health_check": None}
    assert status["database"] == {"reachable": True, "drupal": 10, "error": None}
    assert sorted(status) == [
        "database",
        "dead",
        "now",
        "outcomes",
        "queue",
        "received",
        "receiver",
        "reconcile",
        "workers",
    ]
    assert status["reconcile"] is None  # no worker reconciled yet


async def add_database_dead_letter(
    settings: Settings, one: dict[str, Any], reason: str, attempts: int = 5
) -> int:
    """A worker's dead letter in the database (its tables created as a worker does)."""
    syncer = await Syncer.open(settings)
    try:
        applied = apply_job([one], received_at=RECEIVED_AT)
        letter = DeadLetter.of(applied, applied.notifications[0], reason, attempts)
        async with syncer.engine.begin() as conn:
            return await dead.add(conn, letter)
    finally:
        await syncer.close()


def test_status_reads_a_sample_not_every_job(
    worker_settings: Settings, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> None:
        client: Redis = Redis.from_url(worker_settings.redis_url)
        async with client.pipeline(transaction=False) as pipe:
            for n in range(300):
                one = apply_job(
                    [
                        contact_json(2 * n, sf_id("003", 2 * n)),
                        contact_json(2 * n + 1, sf_id("003", 2 * n + 1)),
                    ],
                    received_at=RECEIVED_AT,
                )
                pipe.set(f"{JOB_KEY_PREFIX}j{n}", one.serialize(0))
                pipe.zadd(worker_settings.queue_name, {f"j{n}": 1_000 + n})
            await pipe.execute()
        await client.aclose()

    asyncio.run(fill())
    redis_client.config_resetstat()
    code, lines, err = run(capsys, worker_settings, "status", "--json")
    assert (code, err) == (0, "")
    stats = redis_client.info("commandstats")
    status = orjson.loads(lines[0])
    assert status["queue"] == {
        "jobs": 300,
        "notifications": 600,  # every job holds 2: the estimate is exact
        "notifications_exact": False,
        "sampled_jobs": 100,
        "deferred_jobs": 0,
        "oldest_ready_age_s": status["queue"]["oldest_ready_age_s"],
    }
    assert status["queue"]["oldest_ready_age_s"] > 1_700_000_000  # since the score 1 s
    # One MGET of the 100 sampled jobs, two GETs (the health check key, the last reconcile):
    # never one per job.
    assert stats["cmdstat_mget"]["calls"] == 1
    assert stats["cmdstat_get"]["calls"] == 2
    assert "cmdstat_zrange" not in stats
    assert sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info") < 80
    _, text_lines, _ = run(capsys, worker_settings, "status")
    assert text_lines[0].startswith(
        "queue        about 600 notifications in 300 jobs (estimated from 100 jobs); the "
        "oldest has waited "
    )


def test_status_without_sfrelay_tables_creates_none_and_sees_a_live_worker(
    worker_settings: Settings,
    redis_client: redis.Redis,
    drupal_db: Path,
    worker_process: type[WorkerProcess],
    tmp_path: Path,
) -> None:
    # A subprocess run, before any worker opened the database (and migrated it).
    done = sfrelay(worker_settings, tmp_path, "status")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3:] == [
        "dead         0 (0 in the Drupal database, 0 in Redis)",
        "workers      none alive: no arq health check in the last 31 s (start `sfrelay worker`)",
        "database     reachable (Drupal 8+)",
    ]
    with sqlite3.connect(drupal_db) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert not {t for t in tables if t.startswith("sfrelay_")}  # no migration ran

    # How many are alive, not one worker's counts (arq's key holds the last writer's: a
    # standby's said "0 jobs done" beside an active worker).
    alive = worker_settings.queue_name + HEALTH_CHECK_SUFFIX + WORKERS_ALIVE_SUFFIX
    workers = []
    for count in (1, 2):
        workers.append(worker_process(worker_settings, tmp_path))
        workers[-1].wait_ready(redis_client)
        wait_for(lambda n=count: redis_client.zcard(alive) == n)  # type: ignore[misc]
        done = sfrelay(worker_settings, tmp_path, "status")
        assert (done.returncode, done.stdout.splitlines()[-2]) == (
            0,
            f"workers      {count} alive (reported within the last 31 s; each reports every 30 s)",
        ), done.stderr
    workers[0].signal(signal.SIGTERM)
    assert workers[0].wait() == 0
    done = sfrelay(worker_settings, tmp_path, "status")
    assert done.stdout.splitlines()[-2] == (
        "workers      1 alive (reported within the last 31 s; each reports every 30 s)"
    )


def test_status_says_when_the_database_cannot_be_reached(
    worker_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = worker_settings.model_copy(
        update={"database_url": f"sqlite:///{tmp_path}/nowhere.sqlite"}
    )
    code, lines, err = run(capsys, missing, "status")
    assert (code, err) == (0, "")
    assert lines[-3:] == [
        "dead         0 in Redis; the Drupal database could not be read",
        "workers      none alive: no arq health check in the last 31 s (start `sfrelay worker`)",
        f"database     NOT reachable: no Drupal SQLite database at {tmp_path}/nowhere.sqlite: "
        "set SFRELAY_DATABASE_URL to your site's file "
        "(sqlite:////path/to/sites/default/files/.ht.sqlite) (check SFRELAY_DATABASE_URL)",
    ]
    assert not (tmp_path / "nowhere.sqlite").exists()


def test_why_as_a_subprocess(scenario: Scenario, tmp_path: Path) -> None:
    done = sfrelay(scenario.settings, tmp_path, "why", ADA, "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["records"][0]["uid"] == scenario.uid


def test_rate_counter_is_written_by_the_receiver_script(
    worker_settings: Settings, redis_client: redis.Redis
) -> None:
    before = int(time.time()) // 60
    asyncio.run(_post(worker_settings, outbound_message([contact(), contact()])))
    after = int(time.time()) // 60
    keys = [k.decode() for k in redis_client.keys(RATE_PREFIX + "*")]
    assert len(keys) == 1 and int(keys[0].removeprefix(RATE_PREFIX)) in (before, after)
    assert redis_client.hgetall(keys[0]) == {b"received": b"2"}
    assert 7200 < redis_client.ttl(keys[0]) <= 7260


@pytest.mark.parametrize("command", [["status"], ["why", ADA]])
def test_status_and_why_say_what_to_do_when_redis_is_down(
    worker_settings: Settings,
    drupal_db: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    down = worker_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    before = hashlib.sha256(drupal_db.read_bytes()).hexdigest()
    code, lines, err = run(capsys, down, *command)
    assert (code, lines) == (2, [])
    assert err.startswith("sfrelay: cannot read the queue (Redis): ")
    assert err.endswith("; check SFRELAY_REDIS_URL and that Redis runs\n")
    assert hashlib.sha256(drupal_db.read_bytes()).hexdigest() == before


def test_why_every_outcome_a_history_holds_is_said_in_words() -> None:
    from app.outcomes import OutcomeKind
    from app.why import _MEANING

    counted_only = {OutcomeKind.REQUEUED, OutcomeKind.DEAD}  # never in a record's history
    assert [k.value for k in OutcomeKind if k not in _MEANING and k not in counted_only] == []


@pytest.mark.parametrize(
    ("outcome", "uid", "detail", "text"),
    [
        (
            "conflict_protected_user",
            None,
            "uid 7 has role administrator",
            "NOT synced: a protected Drupal account (uid 7 has role administrator); sfrelay "
            "never changes uid 0, uid 1 or a user holding a protected role "
            "(SFRELAY_PROTECTED_ROLES), so nothing was written",
        ),
        (
            "blocked",
            7,
            None,
            "deleted in Salesforce: Drupal user 7 was blocked (SFRELAY_ON_DELETE=block); "
            "undeleting the record unblocks it",
        ),
        (
            "blocked",
            7,
            f"{ADA} merged into {TWIN}, which has uid 9",
            f"merged in Salesforce: {ADA} merged into {TWIN}, which has uid 9; Drupal user 7 "
            "(the merged record's) was blocked, the survivor's user kept",
        ),
        (
            "unblocked",
            7,
            f"{ADA} is live again",
            "undeleted in Salesforce: Drupal user 7, which sfrelay had blocked, was unblocked",
        ),
        (
            "unlinked",
            7,
            None,
            "deleted in Salesforce: no longer linked to Drupal user 7, which was left as it was "
            "(SFRELAY_ON_DELETE=unlink)",
        ),
        (
            "merged",
            7,
            f"{ADA} merged into {TWIN}: its user now belongs to {TWIN}",
            f"merged in Salesforce: {ADA} merged into {TWIN}: its user now belongs to {TWIN} "
            "(Drupal user 7)",
        ),
        (
            "deleted",
            None,
            "the record has no Drupal user",
            "deleted in Salesforce; nothing changed in Drupal: the record has no Drupal user",
        ),
        (
            "updated",
            7,
            "field_level not written (Level__c: 'platinum' is not one of the field's allowed "
            "values)",
            "updated Drupal user 7; field_level not written (Level__c: 'platinum' is not one of "
            "the field's allowed values)",
        ),
        ("created", 8, None, "created Drupal user 8"),
        (
            "api_limit",
            None,
            None,
            "not read from Salesforce: the org's daily API requests ran low "
            "(SFRELAY_SF_MIN_API_REMAINING); the next reconcile resumes",
        ),
    ],
)
def test_why_says_the_lifecycle_outcomes_in_words(
    outcome: str, uid: int | None, detail: str | None, text: str
) -> None:
    from app.why import meaning

    assert meaning({"outcome": outcome, "uid": uid, "detail": detail}, None) == text
