"""`sfrelay status`: one screen on the queue, the traffic, the outcomes and what is up.

Cheap whatever the backlog: a fixed number of Redis commands in two round trips, never one
per queued job. The queue's jobs are counted exactly (ZCARD); its notifications are counted
exactly when at most SAMPLE_JOBS jobs wait, and estimated from SAMPLE_JOBS random jobs
otherwise (a job holds one Outbound Message: 1 to 100 notifications).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError

from app import dead as dead_letters
from app.config import Settings
from app.drupal.errors import driver_text
from app.drupal.readonly import read_engine
from app.drupal.schema import detect_major
from app.errors import ConfigError, QueueUnavailable
from app.jobs import notification_count
from app.queue import (
    DEAD_KEY,
    HEALTH_CHECK_SUFFIX,
    JOB_KEY_PREFIX,
    OUTCOME_PREFIX,
    RATE_PREFIX,
    RECONCILE_LAST_KEY,
    STATS_KEY,
    WORKERS_ALIVE_SUFFIX,
    redis_client,
)

SAMPLE_JOBS = 100
DATABASE_TIMEOUT_S = 5.0
# Counters the receiver keeps in sfrelay:stats beside the workers' outcome:* ones.
RECEIVER_COUNTERS = ("queued_total", "skipped", "duplicates", "dead_received", "dead_fallback")


@dataclass(slots=True)
class Status:
    now: float
    queue: dict[str, Any]
    received: dict[str, int]
    outcomes: dict[str, int]
    receiver: dict[str, int]
    dead: dict[str, int | None]
    workers: dict[str, Any]
    database: dict[str, Any] = field(default_factory=dict)
    reconcile: dict[str, Any] | None = None  # the workers' last run (None: none yet)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def read_status(settings: Settings, redis: Redis) -> Status:
    """Everything `sfrelay status` shows; raises QueueUnavailable when Redis cannot answer."""
    now = time.time()
    minute = int(now) // 60
    queue_name = settings.queue_name
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zcard(queue_name)
            pipe.zrangebyscore(queue_name, "-inf", int(now * 1000), start=0, num=1, withscores=True)
            pipe.zcount(queue_name, f"({int(now * 1000)}", "+inf")
            pipe.zrandmember(queue_name, SAMPLE_JOBS)
            pipe.hgetall(STATS_KEY)
            pipe.hlen(DEAD_KEY)
            pipe.get(queue_name + HEALTH_CHECK_SUFFIX)
            pipe.zcount(
                queue_name + HEALTH_CHECK_SUFFIX + WORKERS_ALIVE_SUFFIX,
                f"({int(now * 1000)}",
                "+inf",
            )
            pipe.get(RECONCILE_LAST_KEY)
            for back in range(61):  # this minute, then the 60 whole minutes before it
                pipe.hget(f"{RATE_PREFIX}{minute - back}", "received")
            replies = await pipe.execute()
        jobs, oldest, deferred, sample, counters, dead_redis, health, alive = replies[:8]
        reconciled = replies[8]
        rates = [int(r or 0) for r in replies[9:]]
        sample = list(sample or [])
        raws: list[bytes | None] = []
        if sample:
            raws = await redis.mget([JOB_KEY_PREFIX + j.decode() for j in sample])
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot read the queue (Redis): {exc}") from exc

    sizes = [notification_count(raw) for raw in raws if raw is not None]
    exact = len(sample) >= jobs  # every job was read (those gone meanwhile were finished)
    if exact or not sizes:
        notifications = sum(sizes) if exact else jobs
    else:
        notifications = round(jobs * sum(sizes) / len(sizes))
    oldest_age = max(0.0, now - float(oldest[0][1]) / 1000) if oldest else None
    decoded = {k.decode(): int(v) for k, v in counters.items()}
    return Status(
        now=round(now, 3),
        queue={
            "jobs": int(jobs),
            "notifications": int(notifications),
            "notifications_exact": exact,
            "sampled_jobs": len(sample),
            "deferred_jobs": int(deferred),
            "oldest_ready_age_s": None if oldest_age is None else round(oldest_age, 1),
        },
        received={
            "this_minute": rates[0],
            "last_minute": rates[1],
            "last_hour": sum(rates[1:]),
        },
        outcomes={
            k.removeprefix(OUTCOME_PREFIX): v
            for k, v in sorted(decoded.items())
            if k.startswith(OUTCOME_PREFIX)
        },
        receiver={name: decoded.get(name, 0) for name in RECEIVER_COUNTERS},
        dead={"redis": int(dead_redis), "database": None},
        workers=_workers(health, int(alive)),
        reconcile=_reconcile(reconciled),
    )


def _reconcile(raw: bytes | None) -> dict[str, Any] | None:
    try:
        last = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    return last if isinstance(last, dict) else None


def _workers(health: bytes | None, alive: int) -> dict[str, Any]:
    """arq's health-check key: one per queue, rewritten by every worker every 30 s, gone
    31 s after the last one stopped writing it; its counts are those of whichever worker
    wrote it last (a standby's are 0). `alive`: sfrelay's workers that reported within 31 s
    (workers.main.Worker; `arq workers.main.WorkerSettings` runs arq's own, which count 0)."""
    if health is None:
        return {"alive": False, "count": alive, "health_check": None}
    text = health.decode(errors="replace")
    counts = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return {
        "alive": True,
        "count": alive,
        "health_check": {k: int(v) for k, v in counts.items() if v.isdigit()},
    }


async def read_database(settings: Settings) -> tuple[dict[str, Any], int | None]:
    """({"reachable": bool, "drupal": major, "error": str|None}, dead letters in the table)."""
    try:
        engine = read_engine(settings.database_url)
    except ConfigError as exc:
        return {"reachable": False, "drupal": None, "error": str(exc)}, None
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_S), engine.connect() as conn:
            major, _ = await detect_major(conn, settings.drupal_version)
            dead = await dead_letters.count(conn)
        return {"reachable": True, "drupal": major, "error": None}, dead
    except TimeoutError:
        error = f"no answer within {DATABASE_TIMEOUT_S:.0f} s"
    except DBAPIError as exc:
        error = driver_text(exc).splitlines()[0]
    except (ConfigError, OSError) as exc:
        error = str(exc)
    finally:
        await engine.dispose()
    return {"reachable": False, "drupal": None, "error": error}, None


async def collect(settings: Settings) -> Status:
    redis = redis_client(settings)
    try:
        database_task = asyncio.create_task(read_database(settings))
        try:
            status = await read_status(settings, redis)
        finally:
            database, dead_db = await database_task
    finally:
        await redis.aclose()
    status.database = database
    status.dead["database"] = dead_db
    return status


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def render(status: Status) -> list[str]:
    """The text screen, one line per topic."""
    q = status.queue
    about = "" if q["notifications_exact"] else "about "
    jobs = f"{q['jobs']:,} job{'' if q['jobs'] == 1 else 's'}"
    queue = f"{about}{q['notifications']:,} notifications in {jobs}"
    if not q["notifications_exact"]:
        queue += f" (estimated from {q['sampled_jobs']} jobs)"
    if q["oldest_ready_age_s"] is not None:
        queue += f"; the oldest has waited {_ago(q['oldest_ready_age_s'])}"
    if q["deferred_jobs"]:
        queue += f"; {q['deferred_jobs']:,} jobs wait for a retry"
    r = status.received
    received = (
        f"{r['last_minute']:,} notifications in the last minute, {r['last_hour']:,} in the "
        f"last hour (whole minutes), {r['this_minute']:,} so far this minute"
    )
    outcomes = ", ".join(f"{k} {v:,}" for k, v in status.outcomes.items()) or "none yet"
    rc = status.receiver
    receiver = (
        f"queued {rc['queued_total']:,}, skipped (object not synced) {rc['skipped']:,}, "
        f"redelivered duplicates {rc['duplicates']:,}, refused as unusable {rc['dead_received']:,}"
    )
    in_redis, in_database = status.dead["redis"] or 0, status.dead["database"]
    if in_database is None:
        dead = f"{in_redis:,} in Redis; the Drupal database could not be read"
    else:
        total = in_redis + in_database
        dead = f"{total:,} ({in_database:,} in the Drupal database, {in_redis:,} in Redis)"
    if total_dead := in_redis + (in_database or 0):
        dead += f"; `sfrelay dead list` shows {'it' if total_dead == 1 else 'them'}"
    w = status.workers
    if w["alive"]:
        count = f"{w['count']} " if w["count"] else ""
        workers = f"{count}alive (reported within the last 31 s; each reports every 30 s)"
    else:
        workers = "none alive: no arq health check in the last 31 s (start `sfrelay worker`)"
    db = status.database
    if db.get("reachable"):
        major = "7" if db["drupal"] == 7 else "8+"
        database = f"reachable (Drupal {major})"
    else:
        database = f"NOT reachable: {db.get('error')} (check SFRELAY_DATABASE_URL)"
    lines = [
        f"queue        {queue}",
        f"received     {received}",
        f"receiver     {receiver} (since the Redis data began)",
        f"outcomes     {outcomes} (since the Redis data began)",
        f"dead         {dead}",
        f"workers      {workers}",
        f"database     {database}",
    ]
    if (last := status.reconcile) is not None:
        run = f"a worker's last run {_ago(max(status.now - float(last.get('at') or 0), 0))} ago"
        if last.get("stopped"):
            lines.append(f"reconcile    {run}: STOPPED: {last['stopped']}")
        else:
            lines.append(
                f"reconcile    {run}: queued {last.get('queued', 0):,}, errors "
                f"{last.get('errors', 0):,}"
            )
    return lines
