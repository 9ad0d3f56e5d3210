"""Backfill benchmark: `sfrelay backfill` from the local Salesforce (tests/sfserver.py) into
Drupal 10 (SQLite copy of a real site; PostgreSQL when it can start one), end to end: the
backfill queues every record, then `sfrelay worker --burst` applies them. Reports records/s of
each phase and end to end, beside the local server's own speed (the same pages pulled with
nothing done to them). Prints a markdown table; never asserts."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from app.backfill import run_backfill
from app.config import Settings
from app.salesforce import SalesforceClient
from tests import sfserver
from tests.bench.worker import databases, drain
from tests.servers import RedisServer, free_port
from tests.sfserver import SalesforceServer

TARGET = 3000.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Row:
    database: str
    records: int
    server_per_s: float
    backfill_s: float
    drain_s: float
    created: int

    @property
    def end_to_end(self) -> float:
        return self.records / (self.backfill_s + self.drain_s)


def settings_for(redis_url: str, database_url: str, server: SalesforceServer) -> Settings:
    return Settings(
        _env_file=None,
        env="development",
        redis_url=redis_url,
        database_url=database_url,
        sf_username=sfserver.USERNAME,
        sf_consumer_key=sfserver.CONSUMER_KEY,
        sf_private_key_file=server.private_key_file,
        reconcile_every_seconds=0,
    )


async def server_speed(settings: Settings) -> float:
    client = SalesforceClient(settings)
    try:
        started = time.perf_counter()
        count = 0
        async for page in client.changed_records("Contact", T0, T0 + timedelta(days=30)):
            count += len(page)
        return count / (time.perf_counter() - started)
    finally:
        await client.close()


def run_one(
    name: str,
    database: Callable[[], AbstractContextManager[str]],
    server: SalesforceServer,
    redis_url: str,
    records: int,
    tmp: Path,
) -> Row:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    with database() as url:
        settings = settings_for(redis_url, url, server)
        speed = asyncio.run(server_speed(settings))
        started = time.perf_counter()
        report = asyncio.run(run_backfill(settings, objects=["Contact"]))
        backfill_s = time.perf_counter() - started
        env = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
        env.update(
            SFRELAY_ENV="development",
            SFRELAY_REDIS_URL=redis_url,
            SFRELAY_DATABASE_URL=url,
            PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        )
        result = drain(env, client, tmp)
    client.close()
    assert report.queued == records, report
    return Row(name, records, speed, backfill_s, result.seconds, result.outcomes.get("created", 0))


def table(rows: list[Row]) -> str:
    lines = [
        "| database | records | local server alone rec/s | backfill (queue) s | worker s "
        "| end to end rec/s | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        met = "met" if r.end_to_end >= TARGET else "NOT met"
        lines.append(
            f"| {r.database} | {r.records:,} | {r.server_per_s:,.0f} | {r.backfill_s:.1f} "
            f"| {r.drain_s:.1f} | {r.end_to_end:,.0f} | ≥ {TARGET:,.0f}: {met} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.backfill", description=__doc__)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfrelay-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = SalesforceServer(tmp)
        redis_server = RedisServer(port=free_port(), directory=tmp / "redis")
        (tmp / "redis").mkdir()
        redis_server.start()
        os.environ.update(server.env())
        try:
            org = server.org
            for n in range(1, args.records + 1):
                org.add(
                    "Contact",
                    sfserver_id(n),
                    Email=f"b{n}@example.org",
                    FirstName="Bench",
                    LastName=f"L{n}",
                    SystemModstamp=T0 + timedelta(milliseconds=n),
                )
            org.fixed_time = T0 + timedelta(days=30)
            for name in args.databases.split(","):
                with databases()[name](tmp) as database:
                    rows.append(
                        run_one(name, database, server, redis_server.url, args.records, tmp)
                    )
                print(f"{name}: done", file=sys.stderr)
        finally:
            redis_server.stop()
            server.stop()
    print(table(rows))


def sfserver_id(n: int) -> str:
    from app.sfid import to18

    return to18(f"0035g{n:010d}")


if __name__ == "__main__":
    main()
