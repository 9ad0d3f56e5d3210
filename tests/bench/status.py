"""`sfrelay status` with a deep queue: wall time of the command's whole read (Redis + Drupal).

100,000 queued notifications laid out two ways (100,000 one-notification jobs; 1,000 jobs of
100), each as the receiver's script writes them, in a private redis-server; the Drupal
database is a copy of the shared Drupal 10 site. `queue stats` (reads every job) is timed
beside it for comparison.

    python -m tests.bench.status [--notifications 100000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from app.config import Settings
from app.jobs import ApplyJob, JobNotification, Source
from app.queue import JOB_KEY_PREFIX, queue_stats
from app.status import collect
from tests.messages import ORG_ID, sf_id
from tests.servers import SHARED, RedisServer, free_port

DRUPAL10 = SHARED / "drupal" / "sites" / "drupal10-standard.sqlite"


async def fill(redis: Redis, queue: str, jobs: int, per_job: int) -> None:
    now_ms = int(time.time() * 1000)
    for start in range(0, jobs, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for j in range(start, min(jobs, start + 1000)):
                notifications = tuple(
                    JobNotification(
                        sf_id("04l", j * per_job + n),
                        "Contact",
                        {
                            "Id": sf_id("003", j * per_job + n),
                            "Email": f"user{j * per_job + n}@example.org",
                            "LastName": "Byron",
                            "SystemModstamp": "2026-11-20T10:00:00.000Z",
                        },
                    )
                    for n in range(per_job)
                )
                job = ApplyJob(
                    ORG_ID, Source.OUTBOUND_MESSAGE, now_ms / 1000, notifications, sf_id("04k", 1)
                )
                pipe.set(f"{JOB_KEY_PREFIX}j{j}", job.serialize(now_ms))
                pipe.zadd(queue, {f"j{j}": now_ms - jobs + j})
            await pipe.execute()


def command_s(settings: Settings) -> tuple[float, float]:
    """The whole `sfrelay status` command as an operator runs it, process start included:
    (wall s, CPU s). The CPU time is what the wall time comes to on an idle machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    env.update(SFRELAY_REDIS_URL=settings.redis_url, SFRELAY_DATABASE_URL=settings.database_url)
    # Installed code has its bytecode compiled once; with PYTHONDONTWRITEBYTECODE set (as in
    # CI) every run would compile sqlalchemy again (~1 s): cache it outside the checkout.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "sfrelay-bench-pycache")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "app.cli", "status"], env=env, check=True, capture_output=True
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


async def timed(runs: int, settings: Settings) -> tuple[float, float, int]:
    status_s, stats_s = [], []
    counted = 0
    for _ in range(runs):
        started = time.perf_counter()
        status = await collect(settings)
        status_s.append(time.perf_counter() - started)
        counted = status.queue["notifications"]
        redis: Redis = Redis.from_url(settings.redis_url)
        started = time.perf_counter()
        await queue_stats(redis, settings.queue_name)
        stats_s.append(time.perf_counter() - started)
        await redis.aclose()
    return statistics.median(status_s), statistics.median(stats_s), counted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.status", description=__doc__)
    parser.add_argument("--notifications", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sfrelay-bench-status-"))
    server = RedisServer(port=free_port(), directory=tmp)
    server.start()
    try:
        drupal = tmp / "drupal.sqlite"
        shutil.copyfile(DRUPAL10, drupal)
        settings = Settings(
            _env_file=None, redis_url=server.url, database_url=f"sqlite:///{drupal}"
        )
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(
            "| layout | notifications counted | status's reads | `sfrelay status` command "
            "| `queue stats`'s reads |"
        )
        print("| --- | --- | --- | --- | --- |")
        for per_job in (1, 100):
            jobs = args.notifications // per_job

            async def run(jobs: int = jobs, per_job: int = per_job) -> tuple[float, float, int]:
                redis: Redis = Redis.from_url(settings.redis_url)
                await redis.flushall()
                await fill(redis, settings.queue_name, jobs, per_job)
                await redis.aclose()
                return await timed(args.runs, settings)

            status_s, stats_s, counted = asyncio.run(run())
            command_s(settings)  # warm: bytecode cached, files in the page cache
            commands = [command_s(settings) for _ in range(args.runs)]
            wall = statistics.median(w for w, _ in commands)
            cpu = statistics.median(c for _, c in commands)
            print(
                f"| {jobs:,} jobs x {per_job} | {counted:,} | {status_s * 1000:.0f} ms "
                f"| {wall * 1000:.0f} ms ({cpu * 1000:.0f} ms CPU) | {stats_s * 1000:.0f} ms |"
            )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
