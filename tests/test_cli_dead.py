"""`sfrelay dead discard`, and dead letters named by their notification Id (`dead replay` too).

Real Redis, a real Drupal 10 SQLite copy, a receiver dead letter written by the real receiver;
the commands run through `app.cli.main` (the `cli` fixture), one as a real subprocess.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from app.config import Settings
from app.dead import DeadLetter
from app.jobs import JobNotification
from app.queue import (
    DEAD_BODY_PREFIX,
    DEAD_KEY,
    DEFAULT_QUEUE,
    SEEN_PREFIX,
    worker_dead_letter_field,
)
from app.sfid import canonical_id
from tests.conftest import Cli
from tests.factories import ORG_ID, apply_job, contact_json, sf_id
from tests.fixtures_worker import settings_env
from tests.messages import Record, contact, outbound_message
from tests.test_cli_worker import add_dead_letter, sfrelay
from tests.test_status_why import _post

FUTURE = "2030-01-01T00:00:00.000Z"  # more than a day ahead: refused on receipt
REFUSED = (
    "refused on receipt: SystemModstamp '2030-01-01T00:00:00.000Z' is more than a day in the future"
)


def stores(drupal_db: Path, client: redis.Redis) -> dict[str, Any]:
    """Everything a discard or replay could change: both stores, the bodies, the queue."""
    with sqlite3.connect(drupal_db) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        rows = (
            db.execute("SELECT * FROM sfrelay_dead_letter ORDER BY id").fetchall()
            if "sfrelay_dead_letter" in tables
            else []
        )
    db.close()
    return {
        "database": rows,
        "redis": client.hgetall(DEAD_KEY),
        "bodies": sorted(client.scan_iter(f"{DEAD_BODY_PREFIX}*")),
        "queue": client.zcard(DEFAULT_QUEUE),
    }


def dead_counts(cli: Cli, settings: Settings) -> dict[str, int]:
    status = cli(settings_env(settings), "status", "--json")
    assert status.returncode == 0, status.stderr
    counts: dict[str, int] = orjson.loads(status.stdout)["dead"]
    return counts


def refuse(settings: Settings, *records: Any) -> list[str]:
    """Post one message whose notifications the receiver refuses; their notification Ids."""
    asyncio.run(_post(settings, outbound_message(list(records))))
    return [record.notification_id for record in records]


def receiver_field(notification_id: str) -> str:
    return f"{SEEN_PREFIX}{ORG_ID[:15]}:{notification_id}"


@dataclass
class Dead:
    settings: Settings
    drupal_db: Path
    refused: str  # the receiver's dead letter's notification Id
    rows: list[int]  # two workers' dead letters in the database
    twin: str  # the notification Id of rows[0], also kept in Redis


@pytest.fixture
def dead(worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path) -> Dead:
    """One receiver dead letter, two in the database, and the first of those in Redis too."""
    # Its notification Id is none of the workers' (tests.messages numbers them across tests).
    record = Record(
        "Contact", {"Email": "a@example.org", "SystemModstamp": FUTURE}, sf_id("04l", 90)
    )
    [refused] = refuse(worker_settings, record)
    rows = [asyncio.run(add_dead_letter(worker_settings, n)) for n in (1, 2)]
    twin = sf_id("04l", 1)
    job = apply_job([], received_at=1_700_000_000.0, org_id=canonical_id(ORG_ID), action_id="04k")
    notification = JobNotification.from_json(contact_json(1, email="dead1@example.org"))
    letter = DeadLetter.of(job, notification, "boom", 5)
    redis_client.hset(DEAD_KEY, worker_dead_letter_field(ORG_ID[:15], twin), letter.dumps())
    return Dead(worker_settings, drupal_db, refused, rows, twin)


def test_a_notification_refused_on_receipt_is_discarded_by_its_notification_id(
    worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path, cli: Cli
) -> None:
    env = settings_env(worker_settings)
    [refused] = refuse(worker_settings, contact(Email="a@example.org", SystemModstamp=FUTURE))
    assert dead_counts(cli, worker_settings) == {"redis": 1, "database": 0}

    listed = cli(env, "dead", "list")
    assert listed.returncode == 0
    table = listed.stdout.splitlines()
    assert table[1].split()[:2] == [receiver_field(refused), refused]
    assert (
        table[0].index("NOTIFICATION") == table[1].index(f" {refused} ") + 1
    )  # the long ID fits its column
    assert table[1].endswith(REFUSED)
    assert table[2:] == [
        "",
        "1 dead letter refused on receipt cannot be replayed: fix the record in Salesforce, "
        "which sends a new notification, then `sfrelay dead discard ID`",
    ]

    # Replay, by the NOTIFICATION column, finds it now, and says why not and what to do.
    before = stores(drupal_db, redis_client)
    replayed = cli(env, "dead", "replay", refused)
    assert (replayed.returncode, replayed.stdout) == (1, "replayed 0 dead letters as 0 jobs\n")
    assert replayed.stderr == (
        f"not replayed {receiver_field(refused)}: {REFUSED}; it cannot be applied as it is: fix "
        "it in Salesforce and let Salesforce send it again; `sfrelay dead discard "
        f"{receiver_field(refused)}` removes this one\n"
    )
    assert stores(drupal_db, redis_client) == before
    assert len(before["bodies"]) == 1  # the raw body kept beside it

    discarded = sfrelay(worker_settings, drupal_db.parent, "dead", "discard", refused)
    assert discarded.returncode == 0, discarded.stderr
    assert discarded.stdout.splitlines()[1:] == [table[1], "discarded 1 dead letters"]
    assert redis_client.hlen(DEAD_KEY) == 0
    assert stores(drupal_db, redis_client)["bodies"] == []  # its body went with it
    assert dead_counts(cli, worker_settings) == {"redis": 0, "database": 0}
    assert cli(env, "dead", "list").stdout == "no dead letters\n"


def test_discard_by_ids_removes_from_both_stores(
    dead: Dead, redis_client: redis.Redis, cli: Cli
) -> None:
    env = settings_env(dead.settings)
    assert dead_counts(cli, dead.settings) == {"redis": 2, "database": 2}
    twin_field = worker_dead_letter_field(ORG_ID[:15], dead.twin)
    # The database row by its ID, the second by its notification Id, the twin in Redis by ID.
    discarded = cli(env, "dead", "discard", str(dead.rows[0]), sf_id("04l", 2), twin_field)
    assert discarded.returncode == 0, discarded.stderr
    lines = discarded.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "NOTIFICATION", "RECORD", "TRIES"]
    assert sorted(line.split()[0] for line in lines[1:-1]) == sorted(
        [str(dead.rows[0]), str(dead.rows[1]), twin_field]
    )
    assert lines[-1] == "discarded 3 dead letters"
    assert stores(dead.drupal_db, redis_client)["database"] == []
    assert list(redis_client.hkeys(DEAD_KEY)) == [receiver_field(dead.refused).encode()]
    assert dead_counts(cli, dead.settings) == {"redis": 1, "database": 0}
    # Nothing was queued: discarding is not replaying.
    assert stores(dead.drupal_db, redis_client)["queue"] == 0


def test_discard_all_asks_nothing_and_empties_both_stores(
    dead: Dead, redis_client: redis.Redis, cli: Cli
) -> None:
    env = settings_env(dead.settings)
    discarded = cli(env, "dead", "discard", "--all", stdin=b"")
    assert discarded.returncode == 0, discarded.stderr
    assert len(discarded.stdout.splitlines()) == 1 + 4 + 1  # header, a line each, the count
    assert discarded.stdout.endswith("\ndiscarded 4 dead letters\n")
    assert stores(dead.drupal_db, redis_client) == {
        "database": [],
        "redis": {},
        "bodies": [],
        "queue": 0,
    }
    assert dead_counts(cli, dead.settings) == {"redis": 0, "database": 0}
    again = cli(env, "dead", "discard", "--all")
    assert (again.returncode, again.stdout, again.stderr) == (0, "discarded 0 dead letters\n", "")


def test_the_body_stays_while_a_dead_letter_of_its_message_is_left(
    worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path, cli: Cli
) -> None:
    env = settings_env(worker_settings)
    first, second = refuse(
        worker_settings,
        contact(Email="a@example.org", SystemModstamp=FUTURE),
        contact(Email="b@example.org", SystemModstamp=FUTURE),
    )
    [body] = stores(drupal_db, redis_client)["bodies"]
    assert cli(env, "dead", "discard", first).returncode == 0
    assert stores(drupal_db, redis_client)["bodies"] == [body]
    assert cli(env, "dead", "discard", receiver_field(second)).returncode == 0
    assert stores(drupal_db, redis_client)["bodies"] == []


# --- refusals: each says why, and nothing is removed or changed ------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["discard"],
            "sfrelay: name the dead letters to discard (IDs from `sfrelay dead list`) or --all\n",
        ),
        (["discard", "1", "--all"], "sfrelay: give IDs or --all, not both\n"),
        (["replay", "1", "--all"], "sfrelay: give IDs or --all, not both\n"),
    ],
)
def test_discard_and_replay_say_what_to_give(
    dead: Dead, redis_client: redis.Redis, cli: Cli, argv: list[str], message: str
) -> None:
    before = stores(dead.drupal_db, redis_client)
    refused = cli(settings_env(dead.settings), "dead", *argv)
    assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", message)
    assert stores(dead.drupal_db, redis_client) == before


def test_discard_of_an_unknown_id_removes_nothing(
    dead: Dead, redis_client: redis.Redis, cli: Cli
) -> None:
    before = stores(dead.drupal_db, redis_client)
    # The known ones named beside it are not removed either: all or nothing.
    refused = cli(
        settings_env(dead.settings), "dead", "discard", str(dead.rows[1]), "999", dead.refused
    )
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == (
        "not discarded 999: no such dead letter (see `sfrelay dead list`)\n"
        "sfrelay: nothing discarded: name each dead letter by an ID `sfrelay dead list` shows\n"
    )
    assert stores(dead.drupal_db, redis_client) == before
    assert dead_counts(cli, dead.settings) == {"redis": 2, "database": 2}


def test_discard_of_a_notification_id_in_two_dead_letters_asks_for_the_id(
    dead: Dead, redis_client: redis.Redis, cli: Cli
) -> None:
    before = stores(dead.drupal_db, redis_client)
    refused = cli(settings_env(dead.settings), "dead", "discard", dead.twin, dead.refused)
    assert (refused.returncode, refused.stdout) == (2, "")
    twin_field = worker_dead_letter_field(ORG_ID[:15], dead.twin)
    assert refused.stderr == (
        f"not discarded {dead.twin}: 2 dead letters have this notification Id: give the ID of "
        f"one ({dead.rows[0]}, {twin_field})\n"
        "sfrelay: nothing discarded: name each dead letter by an ID `sfrelay dead list` shows\n"
    )
    assert stores(dead.drupal_db, redis_client) == before


def test_replay_of_a_notification_id_in_two_dead_letters_asks_for_the_id(
    dead: Dead, redis_client: redis.Redis, cli: Cli
) -> None:
    before = stores(dead.drupal_db, redis_client)
    refused = cli(settings_env(dead.settings), "dead", "replay", dead.twin)
    assert (refused.returncode, refused.stdout) == (1, "replayed 0 dead letters as 0 jobs\n")
    twin_field = worker_dead_letter_field(ORG_ID[:15], dead.twin)
    assert refused.stderr == (
        f"not replayed {dead.twin}: 2 dead letters have this notification Id: give the ID of "
        f"one ({dead.rows[0]}, {twin_field})\n"
    )
    assert stores(dead.drupal_db, redis_client) == before


def test_replay_by_notification_id(dead: Dead, redis_client: redis.Redis, cli: Cli) -> None:
    replayed = cli(settings_env(dead.settings), "dead", "replay", sf_id("04l", 2))
    assert (replayed.returncode, replayed.stdout) == (0, "replayed 1 dead letters as 1 jobs\n")
    after = stores(dead.drupal_db, redis_client)
    assert [row[0] for row in after["database"]] == [dead.rows[0]]
    assert after["queue"] == 1
    assert dead_counts(cli, dead.settings) == {"redis": 2, "database": 1}
