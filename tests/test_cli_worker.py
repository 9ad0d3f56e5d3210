"""`sfrelay worker`, `sfrelay dead list|replay` and `queue stats` with a database.

Through `app.cli.main` in this process (the `cli` fixture); one real `sfrelay` subprocess per
command (`worker`, `dead`) shows the command line itself works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import redis

from app import dead
from app.config import Settings
from app.dead import DeadLetter
from app.jobs import JobNotification
from app.jobs import read as read_job
from app.queue import DEAD_KEY, JOB_KEY_PREFIX, SEEN_PREFIX
from app.sfid import canonical_id
from app.sync import Syncer
from tests.conftest import Cli
from tests.factories import ORG_ID, apply_job, contact_json, sf_id
from tests.fixtures_worker import PROJECT, settings_env
from tests.test_receiver_hostile_clients import own_redis
from tests.test_worker_process import emails, enqueue, expected


def sfrelay(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={**settings_env(settings), "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def add_dead_letter(settings: Settings, number: int) -> int:
    syncer = await Syncer.open(settings)  # a worker's start-up creates the table
    job = apply_job([], received_at=1_700_000_000.0, org_id=canonical_id(ORG_ID), action_id="04k")
    notification = JobNotification.from_json(
        contact_json(number, email=f"dead{number}@example.org")
    )
    try:
        async with syncer.engine.begin() as conn:
            return await dead.add(conn, DeadLetter.of(job, notification, "boom", 5))
    finally:
        await syncer.close()


async def test_dead_list_and_replay_by_id(
    worker_settings: Settings, redis_client: redis.Redis, tmp_path: Path, cli: Cli
) -> None:
    first = await add_dead_letter(worker_settings, 1)
    second = await add_dead_letter(worker_settings, 2)

    listed = sfrelay(worker_settings, tmp_path, "dead", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = orjson.loads(listed.stdout)
    assert [(d["id"], d["source"], d["error"], d["attempts"]) for d in letters] == [
        (str(first), "database", "boom", 5),
        (str(second), "database", "boom", 5),
    ]
    env = settings_env(worker_settings)
    table = cli(env, "dead", "list").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "NOTIFICATION", "RECORD", "TRIES"]
    assert table[1].split()[:4] == [str(first), sf_id("04l", 1), sf_id("003", 1), "5"]

    replayed = cli(env, "dead", "replay", str(second))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == "replayed 1 dead letters as 1 jobs\n"
    assert "replayed 1/1" in replayed.stderr
    [job_id] = list(redis_client.zrange(worker_settings.queue_name, 0, -1))
    job = read_job(redis_client.get(JOB_KEY_PREFIX.encode() + job_id) or b"")
    assert job.organization_id == canonical_id(ORG_ID)
    assert [n.fields["Email"] for n in job.notifications] == ["dead2@example.org"]
    assert job.notifications[0].first_seen == 1_700_000_000.0

    left = orjson.loads(cli(env, "dead", "list", "--json").stdout)
    assert [d["id"] for d in left] == [str(first)]


def test_dead_replay_says_what_to_give(worker_settings: Settings, cli: Cli) -> None:
    nothing = cli(settings_env(worker_settings), "dead", "replay")
    assert nothing.returncode == 2
    assert nothing.stderr == (
        "sfrelay: name the dead letters to replay (IDs from `sfrelay dead list`) or --all\n"
    )
    unknown = cli(settings_env(worker_settings), "dead", "replay", "999")
    assert unknown.returncode == 1
    assert unknown.stderr == "not replayed 999: no such dead letter (see `sfrelay dead list`)\n"


def test_dead_list_with_nothing_dead(worker_settings: Settings, drupal_db: Path, cli: Cli) -> None:
    before = drupal_db.read_bytes()
    listed = cli(settings_env(worker_settings), "dead", "list")
    assert (listed.returncode, listed.stdout) == (0, "no dead letters\n")
    # Read-only: no worker has created sfrelay's tables yet, and listing does not either.
    assert drupal_db.read_bytes() == before


def test_worker_burst_on_an_empty_queue_exits_zero(
    worker_settings: Settings, tmp_path: Path
) -> None:
    done = sfrelay(worker_settings, tmp_path, "worker", "--burst")
    assert done.returncode == 0, done.stderr
    assert "Starting worker for 1 functions: apply_notifications" in done.stderr


def test_worker_says_what_to_do_when_the_database_is_wrong(
    worker_settings: Settings, tmp_path: Path
) -> None:
    # A subprocess: arq installs its signal handlers before the database is opened, which
    # only the main thread of a process may do.
    wrong = worker_settings.model_copy(update={"database_url": "oracle://db/drupal"})
    failed = sfrelay(wrong, tmp_path, "worker", "--burst")
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1] == (
        "sfrelay: SFRELAY_DATABASE_URL: unsupported database 'oracle' "
        "(use mysql://, pgsql:// or postgresql://, or sqlite:///path)"
    )


def test_worker_says_what_to_do_when_redis_is_out_of_memory_and_loses_nothing(
    worker_settings: Settings, drupal_db: Path, tmp_path: Path
) -> None:
    """At maxmemory (noeviction) a worker cannot take a job (its in-progress key is a write):
    it says so and how to fix it, not to check the URL; the job waits, and runs once fixed."""
    with own_redis(tmp_path) as server:
        settings = worker_settings.model_copy(update={"redis_url": server.url})
        enqueue(settings, 0, 10)
        direct = server.client()
        direct.config_set("maxmemory", 1)
        failed = sfrelay(settings, tmp_path, "worker", "--burst")
        assert failed.returncode == 2
        assert failed.stderr.splitlines()[-1] == (
            "sfrelay: Redis refuses the worker's writes: Redis is out of memory (maxmemory "
            "reached) and refuses writes, the workers' too (they cannot take jobs): raise "
            "maxmemory; nothing queued is lost (noeviction)"
        )
        assert direct.zcard(settings.queue_name) == 1
        assert emails(drupal_db) == []
        direct.config_set("maxmemory", 0)
        done = sfrelay(settings, tmp_path, "worker", "--burst")
        assert done.returncode == 0, done.stderr
        assert emails(drupal_db) == expected(0, 10)


async def test_queue_stats_counts_the_database_dead_letters_too(
    worker_settings: Settings, redis_client: redis.Redis, tmp_path: Path, cli: Cli
) -> None:
    redis_client.hset(DEAD_KEY, f"{SEEN_PREFIX}x:04l000000000001AAA", b'{"reason": "no Id"}')
    await add_dead_letter(worker_settings, 1)
    await add_dead_letter(worker_settings, 2)
    stats = cli(settings_env(worker_settings), "queue", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert orjson.loads(stats.stdout)["dead"] == 3
    assert stats.stderr == ""
    # Without a usable database, it says so and counts what Redis holds.
    elsewhere = worker_settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/x.db"})
    stats = cli(settings_env(elsewhere), "queue", "stats", "--json")
    assert orjson.loads(stats.stdout)["dead"] == 1
    assert "dead counts only Redis's dead letters: no Drupal SQLite database at" in stats.stderr
