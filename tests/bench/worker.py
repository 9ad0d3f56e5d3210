"""Worker benchmark: one `sfrelay worker` drains 100,000 notifications into Drupal 10.

Per database (SQLite copy of a real site; PostgreSQL and MariaDB when the storage fixtures can
start them, each with its own durability defaults):
users/s of the worker beside `Syncer.apply` called alone (no queue) and the ceiling of raw
`executemany` of the same rows into the same tables on the same driver, all in the same run,
and the worker's RSS growth. Prints a markdown table; never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import redis
from redis.asyncio import Redis
from sqlalchemy import text

from app.config import PROJECT_ROOT, Settings
from app.drupal.engine import create_engine
from app.jobs import ApplyJob, JobNotification, Source
from app.queue import DEFAULT_QUEUE, HEALTH_CHECK_SUFFIX, OUTCOME_PREFIX, STATS_KEY, enqueue_apply
from app.sfid import to18
from app.sync import Syncer
from tests.servers import SHARED, RedisServer, free_port
from workers.main import GC_THRESHOLD

if TYPE_CHECKING:
    from tests.fixtures_db import Server

DRUPAL10 = SHARED / "drupal" / "sites" / "drupal10-standard.sqlite"
ORG_ID = "00D5g000004Xk2PEAS"
ACTION_ID = "04k5g000000Gm7REAS"
JOB_SIZE = 100
# SFRELAY_WORKER_BATCH_SIZE's default; the same for the worker and the ceiling
BATCH: int = Settings.model_fields["worker_batch_size"].default
TARGETS = {"sqlite": 10_000.0, "postgresql": 6_000.0}  # issue 10: twice the worker of before
RSS_TARGET_MB = 20.0
FIELDS = ("first_name", "last_name", "salesforce_id")
DEFAULT_GC = gc.get_threshold()


@dataclass(frozen=True, slots=True)
class Workload:
    """Preloaded records (untimed), then the timed notifications: new, updates, no email."""

    preload: list[JobNotification]
    timed: list[JobNotification]

    @property
    def writes(self) -> int:
        return sum(1 for n in self.timed if "Email" in n.fields)


def _contact(number: int, *, email: bool, stamp: str, version: int = 0) -> JobNotification:
    fields: dict[str, Any] = {
        "Id": to18(f"0035g{number:010d}"),
        "FirstName": f"First{number}",
        "LastName": f"Last{number}v{version}",
        "SystemModstamp": stamp,
        "LastModifiedDate": stamp,
    }
    if email:
        fields["Email"] = f"user{number}.v{version}@example.org"
    return JobNotification(to18(f"04l5{version}{number:010d}"), "Contact", fields)


def workload(total: int) -> Workload:
    """60% new Contacts, 30% updates of preloaded ones, 10% without email, shuffled."""
    updates, no_email = total * 3 // 10, total // 10
    new = total - updates - no_email
    old, later = "2026-11-01T00:00:00.000Z", "2026-11-02T00:00:00.000Z"
    preload = [_contact(n, email=True, stamp=old) for n in range(updates)]
    timed = [_contact(n, email=True, stamp=later, version=1) for n in range(updates)]
    timed += [_contact(updates + n, email=True, stamp=later) for n in range(new)]
    timed += [_contact(updates + new + n, email=False, stamp=later) for n in range(no_email)]
    random.Random(7).shuffle(timed)  # a fixed order
    return Workload(preload, timed)


async def _enqueue(redis_url: str, notifications: list[JobNotification]) -> None:
    client: Redis = Redis.from_url(redis_url)
    try:
        for start in range(0, len(notifications), JOB_SIZE):
            job = ApplyJob(
                ORG_ID,
                Source.OUTBOUND_MESSAGE,
                time.time(),
                tuple(notifications[start : start + JOB_SIZE]),
                ACTION_ID,
            )
            await enqueue_apply(client, DEFAULT_QUEUE, job, job_ttl_s=86400)
    finally:
        await client.aclose()


@dataclass(frozen=True, slots=True)
class Drain:
    seconds: float
    rss_ready_mb: float
    rss_peak_mb: float
    rss_end_mb: float
    outcomes: dict[str, int]
    cpu_seconds: float = 0.0  # the worker's CPU (user + system) from ready to exit


def drain(env: dict[str, str], client: redis.Redis, workdir: Path) -> Drain:
    """Run `sfrelay worker --burst` until the queue is empty; time it from ready to exit."""
    client.delete(STATS_KEY)
    log = (workdir / "worker.log").open("wb")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--burst"],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    watched = psutil.Process(process.pid)
    while not client.exists(DEFAULT_QUEUE + HEALTH_CHECK_SUFFIX):
        if process.poll() is not None:
            raise RuntimeError((workdir / "worker.log").read_text())
        time.sleep(0.005)
    started = time.perf_counter()
    cpu_ready = sum(watched.cpu_times()[:2])
    ready = peak = last = watched.memory_info().rss
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss
        except psutil.NoSuchProcess:
            break
        if rss:  # 0 once the process has exited
            last = rss
            peak = max(peak, last)
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    process.wait()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker, now reaped
    cpu = reaped.ru_utime + reaped.ru_stime - children.ru_utime - children.ru_stime
    log.close()
    if process.returncode != 0:
        raise RuntimeError((workdir / "worker.log").read_text())
    raw = client.hgetall(STATS_KEY)
    outcomes = {
        k.decode().removeprefix(OUTCOME_PREFIX): int(v)
        for k, v in raw.items()
        if k.startswith(OUTCOME_PREFIX.encode())
    }
    mb = 2**20
    return Drain(seconds, ready / mb, peak / mb, last / mb, outcomes, cpu - cpu_ready)


def _rows(workload: Workload, max_uid: int) -> tuple[list[dict[str, Any]], ...]:
    """The rows a sync writes for the workload: users, users_field_data, field rows, updates.

    The preloaded records are users max_uid + 1 ...; new users are numbered after them.
    """
    now = int(time.time())
    users, data, fields, updates = [], [], [], []
    preloaded = {n.fields["Id"]: max_uid + 1 + i for i, n in enumerate(workload.preload)}
    uid = max_uid + len(preloaded)
    for item in workload.timed:
        f = item.fields
        if "Email" not in f:
            continue
        if f["Id"] in preloaded:
            updates.append(
                {
                    "uid": preloaded[f["Id"]],
                    "mail": f["Email"],
                    "changed": now,
                    "last": f["LastName"],
                }
            )
            continue
        uid += 1
        users.append({"uid": uid, "uuid": str(uuid.uuid4()), "langcode": "en"})
        data.append(
            {
                "uid": uid,
                "name": f"{f['FirstName']} {f['LastName']}",
                "mail": f["Email"],
                "now": now,
                **_DATA_CONSTANTS,
            }
        )
        for value in (f["FirstName"], f["LastName"], f["Id"]):
            fields.append({"uid": uid, "value": value, **_FIELD_CONSTANTS})
    return users, data, fields, updates


# Every value is bound, constants too: the MySQL driver (aiomysql, as PyMySQL) makes an
# executemany INSERT one multi-row INSERT only when its VALUES holds placeholders alone, else
# it sends one statement per row. One name per column: PostgreSQL types each from its column.
_INSERT_USER = "INSERT INTO users (uid, uuid, langcode) VALUES (:uid, :uuid, :langcode)"
_DATA_CONSTANTS = {
    "langcode": "en",
    "preferred_langcode": "en",
    "timezone": "UTC",
    "status": 1,
    "access": 0,
    "login": 0,
    "default_langcode": 1,
}
_INSERT_DATA = (
    "INSERT INTO users_field_data (uid, langcode, preferred_langcode, name, mail, timezone, "
    "status, created, changed, access, login, init, default_langcode) VALUES (:uid, "
    ":langcode, :preferred_langcode, :name, :mail, :timezone, :status, :now, :now, :access, "
    ":login, :mail, :default_langcode)"
)
_FIELD_CONSTANTS = {"bundle": "user", "deleted": 0, "langcode": "en", "delta": 0}
_INSERT_FIELD = (
    "INSERT INTO user__field_{0} (bundle, deleted, entity_id, revision_id, langcode, delta, "
    "field_{0}_value) VALUES (:bundle, :deleted, :uid, :uid, :langcode, :delta, :value)"
)
_UPDATE_DATA = (
    "UPDATE users_field_data SET mail = :mail, init = :mail, changed = :changed WHERE uid = :uid"
)
_UPDATE_LAST = (
    "UPDATE user__field_last_name SET field_last_name_value = :last WHERE entity_id = :uid"
)


async def ceiling(database_url: str, workload: Workload, batch: int) -> float:
    """Users/s of plain executemany of the same rows, `batch` notifications per transaction."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            first_uid = int(await conn.scalar(text("SELECT MAX(uid) FROM users")) or 0)
        # The preloaded users exist before the clock starts, as they do for the worker.
        users, data, fields, _ = _rows(Workload([], workload.preload), first_uid)
        async with engine.begin() as conn:
            await _insert(conn, users, data, fields)
        users, data, fields, updates = _rows(workload, first_uid)
        started = time.perf_counter()
        for start in range(0, len(users), batch):
            stop = start + batch
            async with engine.begin() as conn:
                await _insert(
                    conn, users[start:stop], data[start:stop], fields[3 * start : 3 * stop]
                )
        for start in range(0, len(updates), batch):
            async with engine.begin() as conn:
                chunk = updates[start : start + batch]
                await conn.execute(text(_UPDATE_DATA), chunk)
                await conn.execute(text(_UPDATE_LAST), chunk)
        return (len(users) + len(updates)) / (time.perf_counter() - started)
    finally:
        await engine.dispose()


async def syncer_alone(database_url: str, workload: Workload, batch: int) -> float:
    """Users/s of `Syncer.apply` called directly with `batch` notifications: no queue, no arq."""
    settings = Settings(_env_file=None, database_url=database_url, worker_batch_size=batch)
    syncer = await Syncer.open(settings)
    try:
        for start in range(0, len(workload.preload), batch):
            await syncer.apply(workload.preload[start : start + batch])
        # The worker's collector settings (workers/main.py): what exists now (here the whole
        # workload) is out of the collector's sight, as start-up is in the worker.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 10, 10)
        started = time.perf_counter()
        for start in range(0, len(workload.timed), batch):
            await syncer.apply(workload.timed[start : start + batch])
        return workload.writes / (time.perf_counter() - started)
    finally:
        gc.unfreeze()
        gc.set_threshold(*DEFAULT_GC)
        await syncer.close()


async def _insert(conn: Any, users: list[Any], data: list[Any], fields: list[Any]) -> None:
    if not users:
        return
    await conn.execute(text(_INSERT_USER), users)
    await conn.execute(text(_INSERT_DATA), data)
    for i, name in enumerate(FIELDS):
        await conn.execute(text(_INSERT_FIELD.format(name)), fields[i::3])


@dataclass(frozen=True, slots=True)
class Row:
    database: str
    batch: int
    notifications: int
    seconds: float
    users_per_s: float
    ceiling_per_s: float
    syncer_per_s: float
    rss: Drain


def run_one(
    name: str,
    database: Callable[[], AbstractContextManager[str]],
    total: int,
    batch: int,
    tmp: Path,
) -> Row:
    work = workload(total)
    server = RedisServer(port=free_port(), directory=tmp / f"redis-{name}-{batch}")
    server.start()
    client = server.client()
    try:
        with database() as url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
            env.update(
                SFRELAY_REDIS_URL=server.url,
                SFRELAY_DATABASE_URL=url,
                SFRELAY_WORKER_BATCH_SIZE=str(batch),
                PYTHONPATH=str(PROJECT_ROOT),
            )
            asyncio.run(_enqueue(server.url, work.preload))
            drain(env, client, tmp)  # untimed: the users that the updates update
            asyncio.run(_enqueue(server.url, work.timed))
            result = drain(env, client, tmp)
        with database() as url:
            top = asyncio.run(ceiling(url, work, batch))
        with database() as url:
            alone = asyncio.run(syncer_alone(url, work, batch))
    finally:
        client.close()
        server.stop()
    return Row(name, batch, total, result.seconds, work.writes / result.seconds, top, alone, result)


@contextmanager
def sqlite_copy(tmp: Path) -> Iterator[Callable[[], AbstractContextManager[str]]]:
    @contextmanager
    def fresh() -> Iterator[str]:
        path = tmp / f"drupal-{uuid.uuid4().hex}.sqlite"
        shutil.copyfile(DRUPAL10, path)
        yield f"sqlite:///{path}"

    yield fresh


@contextmanager
def postgres(tmp: Path) -> Iterator[Callable[[], AbstractContextManager[str]]]:
    """A PostgreSQL server (the storage tests' own start-up), a fresh Drupal 10 database each."""
    from tests.fixtures_db import start_postgres

    with _server_sites(start_postgres(durable=True)) as fresh:
        yield fresh


@contextmanager
def mariadb(tmp: Path) -> Iterator[Callable[[], AbstractContextManager[str]]]:
    """A MariaDB server (the storage tests' own start-up, with MariaDB's durability and buffer
    pool defaults), a fresh Drupal 10 database (the tests' MySQL schema) each."""
    from tests.fixtures_db import start_mariadb

    with _server_sites(start_mariadb(durable=True)) as fresh:
        yield fresh


@contextmanager
def _server_sites(server: Server) -> Iterator[Callable[[], AbstractContextManager[str]]]:
    @contextmanager
    def fresh() -> Iterator[str]:
        yield server.url(asyncio.run(server.fresh(10)))

    try:
        yield fresh
    finally:
        server.stop()


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(rows: list[Row]) -> str:
    lines = [
        "| database | batch | notifications | worker s | worker users/s "
        "| Syncer.apply alone users/s | raw executemany users/s | worker / raw | target users/s "
        "| RSS ready → peak → end MB | RSS growth |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for row in rows:
        target = TARGETS.get(row.database)
        goal = "—" if target is None else f"≥ {target:,.0f}: {_met(row.users_per_s >= target)}"
        growth = row.rss.rss_peak_mb - row.rss.rss_ready_mb
        lines.append(
            f"| {row.database} | {row.batch} | {row.notifications:,} | {row.seconds:.1f} "
            f"| {row.users_per_s:,.0f} | {row.syncer_per_s:,.0f} | {row.ceiling_per_s:,.0f} "
            f"| {row.users_per_s / row.ceiling_per_s:.0%} "
            f"| {goal} "
            f"| {row.rss.rss_ready_mb:.0f} → {row.rss.rss_peak_mb:.0f} → {row.rss.rss_end_mb:.0f} "
            f"| {growth:+.1f} MB (< {RSS_TARGET_MB:.0f}: {_met(growth < RSS_TARGET_MB)}) |"
        )
    outcomes = ", ".join(
        f"{row.database} (batch {row.batch}): "
        + " ".join(f"{k}={v}" for k, v in sorted(row.rss.outcomes.items()))
        for row in rows
    )
    return "\n".join(lines) + f"\n\nOutcomes of the timed run: {outcomes}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.worker", description=__doc__)
    parser.add_argument("--notifications", type=int, default=100_000)
    parser.add_argument(
        "--batch-sizes", default=str(BATCH), help="comma-separated SFRELAY_WORKER_BATCH_SIZE values"
    )
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql,mariadb",
        help="comma-separated: sqlite,postgresql,mariadb",
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfrelay-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.databases.split(","):
            with databases()[name](tmp) as database:
                for batch in (int(b) for b in args.batch_sizes.split(",")):
                    rows.append(run_one(name, database, args.notifications, batch, tmp))
                print(f"{name}: done in {rows[-1].seconds:.1f} s", file=sys.stderr)
    print(table(rows))


def databases() -> dict[str, Callable[[Path], AbstractContextManager[Callable[[], Any]]]]:
    return {"sqlite": sqlite_copy, "postgresql": postgres, "mariadb": mariadb}


if __name__ == "__main__":
    main()
