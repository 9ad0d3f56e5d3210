"""Thin arq tasks: decode a job, apply it through the Syncer, turn outcomes into retries."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import psutil
from arq import Retry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app import dead
from app.config import Settings
from app.dead import DeadLetter
from app.drupal.errors import driver_text
from app.errors import (
    QueueUnavailable,
    RetryableError,
    SalesforceLoginFailed,
    SalesforceQueryRefused,
    SiteChanged,
)
from app.jobs import ApplyJob, JobNotification, dataless_function, why_unreadable
from app.logs import fields
from app.outcomes import IN_LEDGER, Outcome, OutcomeKind
from app.queue import JOB_KEY_PREFIX, count_outcomes, enqueue_apply
from app.sync import Syncer
from workers import metrics as worker_metrics
from workers.group_commit import GroupCommit, WriterBusy
from workers.lease import Election, WriterLease

logger = logging.getLogger("sfrelay.worker")

STATE = "sfrelay"
ELECTION = "sfrelay_election"  # workers.main.Worker's Election (absent under arq's own CLI)
# Tries on top of SFRELAY_MAX_TRIES for a job whose runs were interrupted (worker killed or
# stopped mid-job): the task dead-letters the job on the last.
INTERRUPTED_TRIES = 10
# arq's own max_tries: never reached. arq drops a job past it unread; the task decides instead,
# also for a tries counter that workers with a higher SFRELAY_MAX_TRIES left (a deploy lowering
# it), which arq's limit of SFRELAY_MAX_TRIES + INTERRUPTED_TRIES used to drop.
ARQ_MAX_TRIES = 2**31 - 1
MAX_BACKOFF_S = 3600.0
# Shares of SFRELAY_JOB_TIMEOUT_SECONDS: applying must end by the first, storing dead letters
# in the database by the second; the rest is for Redis, before arq's own timeout drops the job.
APPLY_SHARE = 0.7
DEAD_LETTER_SHARE = 0.85

T = TypeVar("T")


@dataclass
class WorkerState:
    """What a worker process opens once: the settings, the Syncer and its group commit."""

    settings: Settings
    syncer: Syncer
    batch: GroupCommit
    process: psutil.Process = field(default_factory=psutil.Process)
    stopping: bool = False
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    async def detached(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` in its own task: cancelling the wait leaves the work running."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(_forget(self.background))
        return await asyncio.shield(task)


async def startup(ctx: dict[str, Any], settings: Settings) -> None:
    syncer = await Syncer.open(settings)
    # Workers of one database take turns to write it (workers/lease.py).
    lease = WriterLease(ctx["redis"], settings.database_url)
    batch = GroupCommit(syncer.apply_prepared, settings.worker_batch_size, lease.turn)
    state = WorkerState(settings, syncer, batch)
    ctx[STATE] = state
    worker_metrics.serve(settings.worker_metrics_port)  # metrics: SFRELAY_WORKER_METRICS_PORT
    if ELECTION not in ctx:
        # arq's own Worker (`arq workers.main.WorkerSettings`) takes every job, never standing
        # by: active from the start (workers.main.Worker's Election says so otherwise).
        worker_metrics.ACTIVE.set(1)
    logger.info("worker ready: rss %.0f MB", _rss_mb(state))


async def shutdown(ctx: dict[str, Any]) -> None:
    state: WorkerState | None = ctx.get(STATE)
    if state is not None:
        await state.batch.wait_idle()
        await asyncio.gather(*state.background, return_exceptions=True)
        await state.syncer.close()


async def after_job_end(ctx: dict[str, Any]) -> None:
    """The memory guard: past SFRELAY_WORKER_MAX_RSS_MB, stop the way SIGTERM does.

    Running jobs finish, nothing new is taken, the process exits 0 and its supervisor starts
    a fresh one. Signalling ourselves reuses arq's own graceful stop under any launcher.
    """
    state: WorkerState = ctx[STATE]
    rss = _rss_mb(state)
    if rss > state.settings.worker_max_rss_mb and not state.stopping:
        logger.warning(
            "rss %.0f MB is over SFRELAY_WORKER_MAX_RSS_MB=%d: finishing running jobs and "
            "exiting for the supervisor to restart the worker",
            rss,
            state.settings.worker_max_rss_mb,
        )
        _stop(state)


def _stop(state: WorkerState) -> None:
    """Stop the way SIGTERM does: running jobs finish, nothing new is taken, exit 0."""
    if not state.stopping:
        state.stopping = True
        os.kill(os.getpid(), signal.SIGTERM)


def backoff_s(settings: Settings, attempt: int) -> float:
    """Delay before attempt `attempt + 1`: doubling from SFRELAY_RETRY_BACKOFF_SECONDS."""
    return float(min(settings.retry_backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_S))


async def apply_notifications(ctx: dict[str, Any], **kwargs: Any) -> None:
    """Apply one `ApplyJob`'s notifications to Drupal (its arguments: see app.jobs)."""
    state: WorkerState = ctx[STATE]
    settings = state.settings
    redis: Redis = ctx["redis"]
    job_try: int = ctx["job_try"]
    try:
        job = ApplyJob.from_kwargs(kwargs)
    except Exception as exc:  # another release's shape: arq would drop the job
        await keep_unreadable(ctx, exc)
        return
    notifications = job.notifications
    started = time.monotonic()
    # Every wait below ends before arq's job timeout: a job that arq times out is dropped.
    now = asyncio.get_running_loop().time()
    apply_by = now + settings.job_timeout_seconds * APPLY_SHARE
    dead_by = now + settings.job_timeout_seconds * DEAD_LETTER_SHARE
    counts: Counter[OutcomeKind] = Counter()
    dead: list[_Letter] = []
    retry: list[JobNotification] = []
    settled: list[str] = []  # polled versions the ledger holds now (app.queue.count_outcomes)

    if job_try >= settings.max_tries + INTERRUPTED_TRIES:
        # Every earlier run was cut short (this job may be what kills the worker), or retried
        # under a higher setting.
        reason = (
            f"started {job_try - 1} times without finishing: workers were stopped or killed "
            "while applying it, or retried it under a higher SFRELAY_MAX_TRIES"
        )
        dead = [(item, reason, job_try) for item in notifications]
    else:
        try:
            unread: dict[int, str] = {}
            if settings.payload_mode == "refetch":
                from workers.polls import refetched  # (workers.polls imports this module)

                async with asyncio.timeout_at(apply_by):
                    fetched, unread = await refetched(ctx, state, notifications)
                    notifications = tuple(fetched)
            # Records are made now, while another batch (or worker) writes the database.
            prepared = state.syncer.prepare(notifications)
            for index, why in unread.items():
                item = notifications[index]
                prepared[index] = Outcome(item.id, item.record_id, OutcomeKind.FAILED, None, why)
            outcomes = await state.batch.apply(prepared, deadline=apply_by)
        except WriterBusy:
            # Other workers' batches took the database until this job's deadline: nothing of
            # it ran and nothing failed. Back on the queue, due now, its tries unchanged.
            await _requeue(
                redis, ctx, settings, job, "other workers held the database until its deadline"
            )
            return
        except SiteChanged as exc:
            # Every record would fail alike, into the dead letters: the job waits instead,
            # tries unchanged, and the worker stops; started again, it refuses the field map
            # (saying what to do) until the site and the map fit again.
            logger.error("job %s: %s", ctx["job_id"], exc)
            _stop(state)
            await _requeue(redis, ctx, settings, job, "the Drupal site changed")
            return
        except (SalesforceLoginFailed, SalesforceQueryRefused) as exc:
            # Refetch mode: Salesforce refuses sfrelay itself (the login, a mapped field or
            # object): the same, every record would fail alike. Started again, the worker
            # refuses (polls.startup) until it is fixed in Salesforce or the settings.
            logger.error(
                "job %s: %s: refetch mode reads every record from Salesforce; the worker stops "
                "and leaves its jobs queued",
                ctx["job_id"],
                exc,
            )
            _stop(state)
            await _requeue(redis, ctx, settings, job, "Salesforce refused sfrelay")
            return
        except (RetryableError, TimeoutError) as exc:
            reason = str(exc) or "the database gave no answer in time"
            election: Election | None = ctx.get(ELECTION)
            if election is not None:
                await election.step_down(redis)
            if job_try < settings.max_tries:
                delay = backoff_s(settings, job_try)
                logger.warning(
                    "job %s try %d: %s; retrying in %.0f s", ctx["job_id"], job_try, reason, delay
                )
                raise Retry(defer=delay) from exc
            reason = f"gave up after {job_try} tries: {reason}"
            dead = [(item, reason, job_try) for item in notifications]
        except Exception as exc:  # a bug or a PermanentError: never drop the job's work
            logger.exception("job %s: applying failed", ctx["job_id"])
            reason = f"{type(exc).__name__}: {exc}"
            dead = [(item, reason, job_try) for item in notifications]
        else:
            retry = _sort_outcomes(settings, job, outcomes, counts, dead)
            worker_metrics.outcomes_decided(ctx["job_id"], notifications, outcomes)
            if job.source.polled:
                settled = [o.notification_id for o in outcomes if o.kind in IN_LEDGER]
    try:
        if retry:
            delay = backoff_s(settings, min(item.attempt for item in retry) - 1)
            await enqueue_apply(
                redis,
                settings.queue_name,
                job.with_notifications(retry),
                job_ttl_s=settings.job_ttl_seconds,
                defer_s=delay,
                job_id=f"{ctx['job_id']}.retry",
            )
            counts[OutcomeKind.REQUEUED] += len(retry)
        if dead:
            await _dead_letter(state, redis, job, dead, dead_by)
            counts[OutcomeKind.DEAD] += len(dead)
    except QueueUnavailable as exc:
        # Failing here would let arq delete the job with its retries and dead letters unsaved;
        # running the whole job again is harmless (applying twice has no second effect).
        delay = backoff_s(settings, job_try)
        logger.warning("job %s: %s; running it again in %.0f s", ctx["job_id"], exc, delay)
        raise Retry(defer=delay) from exc
    await _finish(redis, ctx, job, counts, started, settled)


async def unknown_function(ctx: dict[str, Any], *_: Any, **__: Any) -> None:
    """What workers.main.Worker runs for a job of a function it does not have (or one it
    cannot decode), which arq would drop: `keep_unreadable`."""
    await keep_unreadable(ctx)


async def keep_unreadable(ctx: dict[str, Any], error: Exception | None = None) -> None:
    """A job this worker cannot read (`error`: what reading an apply job's arguments raised)
    goes, as stored, to the dead letters with why, instead of being dropped."""
    redis: Redis = ctx["redis"]
    job_id = str(ctx["job_id"])
    raw = await redis.get(JOB_KEY_PREFIX + job_id)
    if raw is None:  # its TTL ran out meanwhile: arq had it expire anyway
        return
    if error is None and (name := dataless_function(raw)) is not None:
        logger.warning(
            "job %s: %r is not a function this worker runs; the job holds no data (a cron job "
            "of a worker with other settings or of another release): dropped",
            job_id,
            name,
        )
        return
    reason = why_unreadable(raw, error)
    try:
        await dead.keep_unreadable(redis, job_id, raw, reason)
    except QueueUnavailable as exc:
        state: WorkerState = ctx[STATE]
        delay = backoff_s(state.settings, ctx["job_try"])
        logger.warning("job %s: %s; trying again in %.0f s", job_id, exc, delay)
        raise Retry(defer=delay) from exc
    logger.error(
        "job %s: %s (kept in the dead letters: `sfrelay dead list`, `sfrelay dead replay`)",
        job_id,
        reason,
    )


_Letter = tuple[JobNotification, str, int]  # notification, reason, attempts


async def _requeue(
    redis: Redis, ctx: dict[str, Any], settings: Settings, job: ApplyJob, why: str
) -> None:
    # A fixed follow-up id (.w<n>, counting up): a re-run of this job queues the same one.
    base, _, count = str(ctx["job_id"]).rpartition(".w")
    if not (base and count.isdigit()):
        base, count = str(ctx["job_id"]), "0"
    job_id = f"{base}.w{int(count) + 1}"
    try:
        await enqueue_apply(
            redis,
            settings.queue_name,
            job,
            job_ttl_s=settings.job_ttl_seconds,
            job_id=job_id,
        )
    except QueueUnavailable as exc:
        delay = backoff_s(settings, ctx["job_try"])
        logger.warning("job %s: %s; running it again in %.0f s", ctx["job_id"], exc, delay)
        raise Retry(defer=delay) from exc
    logger.info("job %s: %s; queued again as %s (tries unchanged)", ctx["job_id"], why, job_id)


def _sort_outcomes(
    settings: Settings,
    job: ApplyJob,
    outcomes: list[Outcome],
    counts: Counter[OutcomeKind],
    dead: list[_Letter],
) -> list[JobNotification]:
    """Count the outcomes, collect the dead letters; return the notifications to retry."""
    retry: list[JobNotification] = []
    for item, outcome in zip(job.notifications, outcomes, strict=True):
        counts[outcome.kind] += 1
        attempt = item.attempt
        detail = outcome.detail or outcome.kind
        if outcome.kind is OutcomeKind.RETRY and attempt < settings.max_tries:
            retry.append(replace(item, attempt=attempt + 1, first_seen=job.first_seen(item)))
        elif outcome.kind is OutcomeKind.RETRY:
            dead.append((item, f"gave up after {attempt} attempts: {detail}", attempt))
        elif outcome.kind is OutcomeKind.FAILED:
            dead.append((item, detail, attempt))
    return retry


async def _dead_letter(
    state: WorkerState, redis: Redis, job: ApplyJob, letters: list[_Letter], deadline: float
) -> None:
    """Store dead letters in the database, or in Redis when it cannot take them in time."""
    await dead.keep(
        [DeadLetter.of(job, item, reason, attempts) for item, reason, attempts in letters],
        state.syncer.engine,
        redis,
        deadline,
        state.detached,
    )


async def _finish(
    redis: Redis,
    ctx: dict[str, Any],
    job: ApplyJob,
    counts: Counter[OutcomeKind],
    started: float,
    settled: list[str],
) -> None:
    try:
        await count_outcomes(redis, counts, org15=job.organization_id, settled=settled)
    except (RedisError, OSError) as exc:  # counters (and settled keys): not worth a failed job
        logger.warning("job %s: outcome counters not recorded: %s", ctx["job_id"], exc)
    worker_metrics.job_finished(counts)  # metrics: outcomes by kind, dead letters
    summary = " ".join(f"{name}={count}" for name, count in sorted(counts.items()))
    logger.info(
        "job %s try %d: %d notifications in %.0f ms: %s",
        ctx["job_id"],
        ctx["job_try"],
        len(job.notifications),
        (time.monotonic() - started) * 1000,
        summary or "nothing",
        extra=fields(
            event="job",
            job_id=ctx["job_id"],
            job_try=ctx["job_try"],
            notifications=len(job.notifications),
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            outcomes={kind.value: n for kind, n in sorted(counts.items())},  # JSON keys: str
        ),
    )


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.warning("detached database write failed: %s", driver_text(exc))

    return done


def _rss_mb(state: WorkerState) -> float:
    return float(state.process.memory_info().rss) / 2**20
