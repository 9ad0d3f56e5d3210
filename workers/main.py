"""WorkerSettings for arq: the task, JSON jobs, and the Syncer opened into ctx at start-up."""

from __future__ import annotations

import gc
import math
from signal import Signals
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker as ArqWorker

from app.config import Settings
from app.jobs import deserialize_for_worker, serialize
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
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
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
        "max_tries": settings.max_tries + tasks.INTERRUPTED_TRIES,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "log_results": False,
    }
    options.update(overrides)
    return options


class Worker(ArqWorker):
    """arq's Worker, taking jobs only while it is the active worker of its database and queue
    (workers.lease.Election); a standby keeps its heart beat (health check, cron) and waits."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        super().__init__(**worker_options(settings, **overrides))
        self.election = Election(settings.database_url, settings.queue_name)
        self.ctx[ELECTION] = self.election  # the task steps down when the database fails
        self._stopping = False

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

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self._stopping = True
        super().handle_sig_wait_for_completion(signum)

    async def close(self) -> None:
        if self._pool is not None and self.election.active:
            await self.election.resign(self.pool)
        await super().close()


def __getattr__(name: str) -> Any:
    # Built on first use, not at import: `arq workers.main.WorkerSettings` reads the
    # SFRELAY_* environment then, while tests import this module with their own settings.
    if name == "WorkerSettings":
        return worker_options(Settings())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
