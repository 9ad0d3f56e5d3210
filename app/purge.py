"""`sfrelay queue purge --no-email`: take queued notifications whose record has no usable email
out of the queue, each recorded as `skipped_no_email` (its history and `queue stats`).

Safe while workers run: each job is rewritten by one Lua script that first checks the job is
not being run (arq's in-progress key) and is still byte for byte what was read; otherwise the
job is read again (a job a worker holds is left alone: the worker skips those records itself).
Safe to kill: each round of jobs has its removals in the records' histories before any of
them is rewritten.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from redis.asyncio import Redis
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.drupal import ledger
from app.drupal.engine import create_engine, writer
from app.drupal.errors import driver_text
from app.drupal.ledger import RecordState
from app.errors import RecordError, RetryableError
from app.jobs import JobNotification, without
from app.mapping import FieldMap, load_field_map
from app.outcomes import Outcome, OutcomeKind
from app.plan import add_history
from app.queue import (
    IN_PROGRESS_KEY_PREFIX,
    JOB_KEY_PREFIX,
    JobRewrite,
    count_outcomes,
    redis_client,
    rewrite_queued_job,
)
from app.reconcile import usable_email
from app.records import to_record
from app.salesforce import SalesforceApi

DETAIL = "taken out of the queue by `sfrelay queue purge --no-email`"
ATTEMPTS = 5  # reads of a job that keeps changing under us before it is left alone
JOBS_PER_ROUND = 100  # jobs whose removals are noted in one transaction, then rewritten


@dataclass(slots=True)
class PurgeReport:
    removed: int = 0
    kept: int = 0  # without email in the queue, but Salesforce has one now (--check-salesforce)
    busy: int = 0  # jobs a worker was running: left to it
    jobs_removed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def _email_in_salesforce(
    api: SalesforceApi, notifications: Iterable[JobNotification], field_map: FieldMap
) -> set[str]:
    """Ids (18) of the records that Salesforce has a usable email for now."""
    by_object: dict[str, set[str]] = {}
    for n in notifications:
        if n.record_id:
            by_object.setdefault(n.object, set()).add(n.record_id)
    have: set[str] = set()
    for sobject, ids in by_object.items():
        async for page in api.records_by_id(sobject, sorted(ids)):
            have.update(str(n.fields["Id"]) for n in page if usable_email(n, field_map))
    return have


async def purge_no_email(
    settings: Settings,
    redis: Redis,
    engine: AsyncEngine | None,
    field_map: FieldMap,
    *,
    api: SalesforceApi | None = None,
    dry_run: bool = False,
) -> PurgeReport:
    from app.sfid import sf_key

    report = PurgeReport()

    def no_email(n: JobNotification) -> bool:
        return n.object in field_map.objects and not usable_email(n, field_map)

    def plain(n: JobNotification) -> bool:
        return no_email(n) and (n.record_id is None or sf_key(n.record_id) not in has_email)

    has_email: set[str] = set()
    job_ids = [j.decode() for j in await redis.zrange(settings.queue_name, 0, -1)]
    if api is not None:  # one look-up for every candidate, before any rewrite
        candidates: list[JobNotification] = []
        for job_id in job_ids:
            raw = await redis.get(JOB_KEY_PREFIX + job_id)
            if raw is not None:
                candidates.extend(without(raw, no_email)[1])
        has_email = await _email_in_salesforce(api, candidates, field_map)
        report.kept = sum(1 for n in candidates if not plain(n))
    for start in range(0, len(job_ids), JOBS_PER_ROUND):
        removed = await _purge_jobs(
            settings,
            redis,
            engine,
            field_map,
            job_ids[start : start + JOBS_PER_ROUND],
            plain,
            report,
            dry_run=dry_run,
        )
        report.removed += len(removed)
        if removed and not dry_run:
            await count_outcomes(redis, Counter({OutcomeKind.SKIPPED_NO_EMAIL: len(removed)}))
    return report


async def _purge_jobs(
    settings: Settings,
    redis: Redis,
    engine: AsyncEngine | None,
    field_map: FieldMap,
    job_ids: list[str],
    plain: Callable[[JobNotification], bool],
    report: PurgeReport,
    *,
    dry_run: bool,
) -> list[JobNotification]:
    """Take `plain`'s notifications out of these jobs; what was taken out.

    Their `skipped_no_email` is in their histories before any job is rewritten: killed
    in between, a notification is still queued (its worker skips it again: one more entry),
    never gone without a trace."""
    wanted: dict[str, tuple[bytes, bytes | None, list[JobNotification]]] = {}
    for job_id in job_ids:
        raw = await redis.get(JOB_KEY_PREFIX + job_id)
        if raw is None:
            continue
        new, dropped = without(raw, plain)
        if not dropped:
            continue
        if not dry_run and await redis.exists(IN_PROGRESS_KEY_PREFIX + job_id):
            report.busy += 1  # a worker holds it: it skips those records itself
            continue
        wanted[job_id] = (raw, new, dropped)
    if dry_run:
        return [n for _, _, dropped in wanted.values() for n in dropped]
    noted = [n for _, _, dropped in wanted.values() for n in dropped]
    if engine is not None:
        await _note(engine, noted, field_map)
    removed: list[JobNotification] = []
    for job_id, (raw, new, dropped) in wanted.items():
        for _ in range(ATTEMPTS):
            done = await rewrite_queued_job(redis, settings.queue_name, job_id, raw, new)
            if done is JobRewrite.DONE:
                removed.extend(dropped)
                report.jobs_removed += new is None
                break
            if done is JobRewrite.BUSY:
                report.busy += 1
                break
            read = await redis.get(JOB_KEY_PREFIX + job_id)  # changed meanwhile: again
            if read is None:
                break
            raw, (new, dropped) = read, without(read, plain)
            if not dropped:
                break
            seen = {n.id for n in noted}
            fresh = [n for n in dropped if n.id not in seen]
            if fresh and engine is not None:
                await _note(engine, fresh, field_map)
                noted += fresh
    return removed


async def _note(engine: AsyncEngine, removed: list[JobNotification], field_map: FieldMap) -> None:
    """Each removed notification's `skipped_no_email` in its record's history."""
    records = []
    for index, n in enumerate(removed):
        try:
            records.append(to_record(index, n, field_map))
        except RecordError:
            continue  # no record Id: nothing to note it on
    now = time.time()
    async with writer(engine) as conn:
        states = await ledger.load(conn, {r.sf_id for r in records})
        for r in records:
            st = states.setdefault(r.sf_id, RecordState(r.sf_id, r.obj.sobject))
            outcome = Outcome(
                r.notification_id, r.raw_id, OutcomeKind.SKIPPED_NO_EMAIL, None, DETAIL
            )
            add_history(st, r, outcome, now)
        await ledger.save(conn, states.values())


async def run_purge(settings: Settings, *, check_salesforce: bool, dry_run: bool) -> PurgeReport:
    field_map = load_field_map(settings.field_map)
    redis = redis_client(settings)
    engine = create_engine(settings.database_url)
    api = None
    try:
        try:
            await ledger.migrate(engine)
        except (DBAPIError, OSError) as exc:  # a wrong SFRELAY_DATABASE_URL, a database down
            raise RetryableError(f"cannot use the Drupal database: {driver_text(exc)}") from exc
        if check_salesforce:
            from app.salesforce import SalesforceClient

            api = SalesforceClient(settings, field_map)
        return await purge_no_email(settings, redis, engine, field_map, api=api, dry_run=dry_run)
    finally:
        if api is not None:
            await api.close()
        await engine.dispose()
        await redis.aclose()
