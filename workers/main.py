"""WorkerSettings for arq: the task, JSON jobs, and the Syncer opened into ctx at start-up."""

from __future__ import annotations

import gc
import math
import time
import uuid
from dataclasses import replace
from signal import Signals
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Function
from arq.worker import Worker as ArqWorker
from redis.asyncio import Redis

from app.config import REDIS_TLS_PARAMS, Settings
from app.jobs import deserialize_for_worker, serialize
from app.queue import WORKERS_ALIVE_SUFFIX
from app.soap import MAX_NOTIFICATIONS
from workers import polls, tasks
from workers.lease import Election
from workers.tasks import ELECTION

# Jobs run at once by one worker; their notifications are applied together (group commit):
# two batches' worth (SFRELAY_WORKER_BATCH_SIZE), so one gathers while the other is written,
# and never fewer than this. Order between records is kept by the sync rule's order guard,
# not by running one job at a time.
MIN_JOBS = 20
# How often the worker looks at the queue: a ZRANGEBYSCORE every 50 ms costs Redis nothing,
# and a worker draining a backlog picks up the next jobs while a batch is being written.
POLL_DELAY_S = 0.05
# `arq --check` fails when the health key is older than this (+1 s): keep it under a minute.
HEALTH_CHECK_INTERVAL_S = 30


GC_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


def max_jobs(settings: Settings) -> int:
    return max(MIN_JOBS, 2 * math.ceil(settings.worker_batch_size / MAX_NOTIFICATIONS))


def redis_settings(url: str) -> RedisSettings:
    """arq's connection to SFRELAY_REDIS_URL, read as the receiver's and the CLI's redis-py
    client reads it: arq's from_dsn kept a percent-encoded user name or password (%2F for /)
    encoded, so a worker failed to log in to the Redis the receiver used."""
    dsn = RedisSettings.from_dsn(url)
    return replace(
        dsn,
        username=unquote(dsn.username) if dsn.username else dsn.username,
        password=unquote(dsn.password) if dsn.password else dsn.password,
        **_tls_options(url),
    )


def _tls_options(url: str) -> dict[str, Any]:
    """The rediss:// URL's TLS parameters (app.config.REDIS_TLS_PARAMS), which from_dsn drops:
    without them a worker failed to verify a Redis certificate that the receiver accepted
    (?ssl_ca_certs=), or verified one it was told not to (?ssl_cert_reqs=none)."""
    query = {name: values[-1] for name, values in parse_qs(urlsplit(url).query).items()}
    options: dict[str, Any] = {name: query[name] for name in REDIS_TLS_PARAMS if name in query}
    if "ssl_cert_reqs" in options:
        options["ssl_cert_reqs"] = options["ssl_cert_reqs"].lower()
    if "ssl_check_hostname" in options:
        options["ssl_check_hostname"] = options["ssl_check_hostname"].lower() == "true"
    return options


def worker_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of arq's Worker for these settings."""

    async def startup(ctx: dict[str, Any]) -> None:
        await tasks.startup(ctx, settings)
        await polls.startup(ctx)
        # What start-up built lives as long as the process (modules, SQLAlchemy's and
        # pydantic's caches, ~100,000 objects): out of the cyclic collector's sight, a full
        # collection during a batch scans the batch only (it was 15-25% of a batch's time),
        # and young collections run less often (a batch allocates ~100 objects per record).
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 10, 10)

    async def shutdown(ctx: dict[str, Any]) -> None:
        await tasks.shutdown(ctx)
        await polls.close(ctx)

    options: dict[str, Any] = {
        "functions": [tasks.apply_notifications],
        "cron_jobs": polls.cron_jobs(settings),
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings.redis_url),
        "job_serializer": serialize,
        "job_deserializer": deserialize_for_worker,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "after_job_end": tasks.after_job_end,
        "max_jobs": max_jobs(settings),
        "poll_delay": POLL_DELAY_S,
        "job_timeout": settings.job_timeout_seconds,
        # SIGTERM (and the memory guard) lets running jobs finish; whatever is still running
        # after this is cancelled and stays queued for the next worker.
        "job_completion_wait": math.ceil(settings.job_timeout_seconds),
        # Results are never read: the queue dedupes, Drupal holds the outcome.
        "keep_result": 0,
        # The task dead-letters a job on its last try, so arq never drops one.
        "max_tries": tasks.ARQ_MAX_TRIES,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "log_results": False,
    }
    options.update(overrides)
    return options


# arq's start_jobs claims a job in 4 round trips (WATCH, EXISTS, ZSCORE, MULTI/EXEC): 4,000
# for 100,000 notifications. This claims every job of a poll in one, by the same rule,
# atomically: not in progress, still queued, due. KEYS: the queue, then each job's
# in-progress key; ARGV: now (ms), the in-progress TTL (ms), then the job ids.
_CLAIM = """
local claimed = {}
for i = 3, #ARGV do
  local key = KEYS[i - 1]
  if redis.call('EXISTS', key) == 0 then
    local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score and tonumber(score) > 0 and tonumber(score) <= tonumber(ARGV[1]) then
      redis.call('PSETEX', key, ARGV[2], '1')
      claimed[#claimed + 1] = ARGV[i]
      claimed[#claimed + 1] = score
    end
  end
end
return claimed
"""


async def claim_jobs(
    redis: Redis, queue: str, job_ids: list[str], in_progress_ms: int
) -> list[tuple[str, int]]:
    """The jobs among `job_ids` this worker now runs, with their scores (enqueue time, ms):
    those not in progress elsewhere, still in the queue and due, each marked in progress for
    `in_progress_ms`, as arq marks them."""
    if not job_ids:
        return []
    keys = [queue, *(in_progress_key_prefix + job_id for job_id in job_ids)]
    script = redis.register_script(_CLAIM)  # EVALSHA (the text itself once per server)
    raw = await script(keys=keys, args=[timestamp_ms(), in_progress_ms, *job_ids])
    return [(raw[i].decode(), int(float(raw[i + 1]))) for i in range(0, len(raw), 2)]


class Functions(dict[str, Any]):
    """arq's function table (name -> Function) where a name it lacks runs `fallback`: arq 0.28
    drops a job of an unknown function (or one it cannot decode, app.jobs.UNDECODABLE)."""

    def __init__(self, functions: dict[str, Any], fallback: Function) -> None:
        super().__init__(functions)
        self.fallback = fallback

    def __missing__(self, name: str) -> Function:
        return self.fallback


class Worker(ArqWorker):
    """arq's Worker, taking jobs only while it is the active worker of its database and queue
    (workers.lease.Election); a standby keeps its heart beat (health check, cron) and waits."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        super().__init__(**worker_options(settings, **overrides))
        # A job queued by another release, kept as a dead letter (tasks.keep_unreadable).
        unknown = Function("unknown_function", tasks.unknown_function, None, None, None, None)
        self.functions = Functions(self.functions, unknown)
        self.election = Election(settings.database_url, settings.queue_name)
        self.ctx[ELECTION] = self.election  # the task steps down when the database fails
        self._stopping = False
        # arq's health-check key is one per queue, and arq deletes it when any worker stops:
        # the workers alive are also kept in a sorted set (member: this worker, score: when
        # its beat expires), so that a stopping one leaves the shared key to the others
        # (status and `arq --check` would say none is alive).
        self._alive_key = self.health_check_key + WORKERS_ALIVE_SUFFIX
        self._me = uuid.uuid4().hex

    async def _poll_iteration(self) -> None:
        # arq 0.28 (pinned): jobs are picked in _poll_iteration while allow_pick_jobs, which
        # its SIGTERM handler clears for good; a standby clears it for this one look only.
        if self._stopping or not self.allow_pick_jobs:
            if self.election.active is not False:
                await self.election.resign(self.pool)
            await super()._poll_iteration()
            return
        standby = not await self.election.elect(self.pool)
        if standby:
            self.allow_pick_jobs = False
        try:
            await super()._poll_iteration()
        finally:
            if standby and not self._stopping:
                self.allow_pick_jobs = True

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs (0.28), the jobs claimed in one round trip (claim_jobs)."""
        free = self.max_jobs - self.job_counter
        wanted = [job_id.decode() for job_id in job_ids][: max(0, free)]
        in_progress_ms = int(self.in_progress_timeout_s * 1000)
        for job_id, score in await claim_jobs(self.pool, self.queue_name, wanted, in_progress_ms):
            await self.sem.acquire()  # free: job_counter counts its holders
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self._stopping = True
        super().handle_sig_wait_for_completion(signum)

    async def record_health(self) -> None:
        due = time.time() - self._last_health_check >= self.health_check_interval
        await super().record_health()
        if due:
            ttl_ms = int((self.health_check_interval + 1) * 1000)
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.zadd(self._alive_key, {self._me: timestamp_ms() + ttl_ms})
                pipe.pexpire(self._alive_key, ttl_ms)
                await pipe.execute()

    async def close(self) -> None:
        if self._pool is not None:
            if self.election.active:
                await self.election.resign(self.pool)
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.zrem(self._alive_key, self._me)
                pipe.zremrangebyscore(self._alive_key, "-inf", timestamp_ms())
                pipe.zcard(self._alive_key)
                *_, others = await pipe.execute()
            if others:
                # Another worker of this queue is alive: arq deletes a key of this worker's
                # name (there is none) instead of the one they share.
                self.health_check_key = f"{self._alive_key}:{self._me}"
        await super().close()


def __getattr__(name: str) -> Any:
    # Built on first use, not at import: `arq workers.main.WorkerSettings` reads the
    # SFRELAY_* environment then, while tests import this module with their own settings.
    if name == "WorkerSettings":
        return worker_options(Settings())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
