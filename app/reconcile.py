"""Reconciliation, push's safety net: records changed in Salesforce since the watermark, queued
through the same queue and rules as pushed ones (`Enqueuer.submit`, `Source.RECONCILE`).

Per handled object: SOQL (queryAll, so deletions and merge losers come too) over
``SystemModstamp`` from the stored watermark minus `OVERLAP` to Salesforce's clock now, page by
page, oldest first. Each record is

- `current` when sfrelay already applied that version (sfrelay_record's modstamp, and at that
  very stamp its digest: a second change within the second is not current) or a later one:
  not queued;
- `no_email` when it is live and has no usable email: counted, never written;
- `deleted` / `merged` (a deletion, with MasterRecordId for a merge loser): queued when the
  record has a Drupal user, for app/lifecycle.py to apply;
- otherwise queued.

Then the same object's delete log (`sobjects/<Object>/deleted`, one request): a record deleted
and purged before a poll saw it (a hard delete, the Recycle Bin emptied) is missing from
queryAll but listed there. A listed record that queryAll did not return as a deletion and that
has a Drupal user not yet past that deletion is read again by Id (queryAll): still there (live
again after an undelete, or in the Recycle Bin after all), its row is taken as above; gone, it
is queued as a deletion stamped with its deletedDate (`purged`), the same notification a
queryAll row of that deletion would have been.

The watermark (Salesforce's time: the last queued page's SystemModstamp, then the `Date` of the
response the run started from) lives in sfrelay_cursor and advances only after the records up to
it were queued: a crash repeats work, never skips it. The delete log has its own (its
latestDateCovered), stored only after its purged deletions were queued. A record seen by push
and by reconcile is applied once (the planner's order guard makes the second `duplicate` or
`stale`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.drupal import cursors, ledger
from app.drupal.ledger import RecordState
from app.errors import (
    ApiLimitReached,
    ConfigError,
    SalesforceLoginFailed,
    SalesforceQueryRefused,
    SalesforceRequestRefused,
    SalesforceUnavailable,
)
from app.jobs import ApplyJob, JobNotification, Source
from app.lifecycle import is_deletion, merged_into
from app.mapping import FieldMap
from app.outcomes import OutcomeKind
from app.queue import Enqueuer, count_outcomes
from app.records import modstamp, valid_email
from app.salesforce import DeletedRecord, SalesforceApi
from app.salesforce.soql import parse_datetime, synthetic_id
from app.sfid import canonical_id, sf_key

log = logging.getLogger("sfrelay.reconcile")

# Start this far before the watermark: a transaction that committed late can carry a
# SystemModstamp older than records already read. Versions read twice are `current`.
OVERLAP = timedelta(minutes=10)
# How long Salesforce keeps a deleted record in the Recycle Bin, where queryAll sees it, and
# its deletion in the delete log, which alone lists one purged sooner (the bin emptied, a hard
# delete): an older deletion is not found at all.
RECYCLE_BIN = timedelta(days=15)
# sobjects/<Object>/deleted ignores seconds and refuses a start less than a minute before the
# end: a shorter window waits for the next run (its cursor stays).
MIN_DELETED_WINDOW = timedelta(minutes=2)
JOB_SIZE = 200  # notifications per queued job (a page of 2,000 becomes ten jobs)
# The organization of polled jobs when SFRELAY_ORG_IDS names none (development).
UNKNOWN_ORG = "00D000000000000"
# What Salesforce can answer that ends a poll (counted in `errors`); Redis and database errors
# are not among them: they propagate (the CLI names the setting, the cron job logs them).
SALESFORCE_ERRORS = (
    ApiLimitReached,
    SalesforceLoginFailed,
    SalesforceQueryRefused,
    SalesforceRequestRefused,
    SalesforceUnavailable,
)


@dataclass(slots=True)
class Progress:
    """Records, rate and ETA: one rewritten line on a terminal, a plain line every
    `every_s` seconds otherwise."""

    out: IO[str]
    tty: bool
    every_s: float = 5.0
    done: int = 0
    total: int | None = None
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0
    label: str = ""

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,} records, {rate:,.0f}/s"
        if self.total:
            left = max(self.total - self.done, 0)
            eta = left / rate if rate else 0.0
            text += f", {self.done * 100 // max(self.total, 1)}% of {self.total:,}"
            text += f", ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        return text

    def page(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.tty:
            print("\r" + self.line(), end="", file=self.out, flush=True)
        elif now - self.last >= self.every_s:
            self.last = now
            print(self.line(), file=self.out, flush=True)

    def end(self) -> None:
        if self.tty and self.done:
            print(file=self.out, flush=True)


@dataclass(slots=True)
class PollReport:
    queried: int = 0
    queued: int = 0
    current: int = 0
    no_email: int = 0
    deleted: int = 0
    merged: int = 0
    purged: int = 0  # deletions only the delete log still knew of (see take_purged)
    errors: int = 0
    stopped: str | None = None  # why the run stopped early

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, other: PollReport) -> None:
        for count in fields(self):
            if count.name != "stopped":
                setattr(self, count.name, getattr(self, count.name) + getattr(other, count.name))
        self.stopped = self.stopped or other.stopped


def organization(settings: Settings) -> str:
    orgs = sorted(settings.canonical_org_ids)
    return orgs[0] if orgs else canonical_id(UNKNOWN_ORG)


def handled(settings: Settings, field_map: FieldMap) -> list[str]:
    return [o for o in settings.handled_objects if o in field_map.objects]


def usable_email(notification: JobNotification, field_map: FieldMap) -> bool:
    obj = field_map.objects.get(notification.object)
    email = notification.fields.get(obj.email_field) if obj is not None else None
    # Drupal 8+'s rule, the wider: a Drupal 7 worker judges again
    return isinstance(email, str) and valid_email(email.strip(), international=True)


class Poller:
    """Sorts polled pages into the report's counts and queues what must be applied."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        enqueuer: Enqueuer | None,  # None: --dry-run
        field_map: FieldMap,
        source: Source,
    ) -> None:
        self.engine, self.enqueuer, self.field_map = engine, enqueuer, field_map
        self.source, self.org = source, organization(settings)
        # Ids of users' records queued as deletions this run: the delete log's pass leaves
        # them be (a merge stays a merge).
        self.deletions: set[str] = set()

    async def take(self, page: list[JobNotification], report: PollReport) -> None:
        async with self.engine.connect() as conn:
            states = await ledger.load(conn, {sf_key(n.fields["Id"]) for n in page})
        wanted: list[JobNotification] = []
        for n in page:
            report.queried += 1
            st = states.get(sf_key(n.fields["Id"]))
            if self.applied(st, n):
                report.current += 1
                continue
            if is_deletion(n.fields):
                if merged_into(n.fields):
                    report.merged += 1
                else:
                    report.deleted += 1
                if st is not None and st.uid is not None:
                    wanted.append(n)
                    self.deletions.add(st.sf_id)
                continue
            if not usable_email(n, self.field_map):
                report.no_email += 1
                continue
            wanted.append(n)
        await self.queue(wanted, report)

    def applied(self, st: RecordState | None, n: JobNotification) -> bool:
        """This version of the record, or a later one, is applied already (the planner's
        order guard would make it `duplicate` or `stale`)."""
        stamp = modstamp(n.fields)
        if st is None or st.modstamp is None or stamp is None or stamp > st.modstamp:
            return False
        return stamp < st.modstamp or st.same_version(n.fields, self.field_map.sources[n.object])

    async def queue(self, wanted: list[JobNotification], report: PollReport) -> None:
        if self.enqueuer is None:
            report.queued += len(wanted)
            return
        for start in range(0, len(wanted), JOB_SIZE):
            chunk = tuple(wanted[start : start + JOB_SIZE])
            job = ApplyJob(self.org, self.source, time.time(), chunk)
            result = await self.enqueuer.submit(job)
            report.queued += result.queued
            report.current += result.duplicates  # this very version is queued already

    async def poll_purged(
        self, api: SalesforceApi, sobject: str, start: datetime, end: datetime, report: PollReport
    ) -> datetime | None:
        """The delete log's [start, end] of `sobject` through `take_purged`, after the queryAll
        pass over the same time; returns where the next run starts (latestDateCovered:
        Salesforce lists to the minute, and maybe not up to `end`), None to keep the cursor.
        Errors end the object's run as in `poll_object`."""
        # Salesforce keeps 15 days; an older start is refused (the run has warned about it).
        start = max(start, end - RECYCLE_BIN + OVERLAP)
        if end - start < MIN_DELETED_WINDOW:
            return None
        try:
            await api.require_api_headroom()
            try:
                listed, covered = await deleted_in(api, sobject, start, end)
            except SalesforceRequestRefused as exc:
                if exc.error_code != "INVALID_REPLICATION_DATE":
                    raise
                # Salesforce purged its delete log (or an administrator the Recycle Bin) after
                # `start`: what was purged cannot be listed, now or later; what was deleted
                # since the log's new beginning still is, and is listed now.
                resume = await log_begins(api, sobject, end)
                log.warning(
                    "Salesforce no longer lists the %s deleted between %s and %s (%s): Drupal "
                    "users of records deleted and purged then are not blocked; listing resumes "
                    "at %s",
                    sobject,
                    start.isoformat(),
                    (resume or end).isoformat(),
                    exc,
                    (resume or end).isoformat(),
                )
                if resume is None:
                    return end
                listed, covered = await deleted_in(api, sobject, resume, end)
            await self.take_purged(api, sobject, listed, report)
        except SALESFORCE_ERRORS as exc:
            stop(report, sobject, exc)
            return None
        return covered

    async def take_purged(
        self, api: SalesforceApi, sobject: str, listed: list[DeletedRecord], report: PollReport
    ) -> None:
        """The delete log's records that queryAll did not return as deletions (see the module
        docstring): only those with a Drupal user cost a request."""
        newest: dict[str, datetime] = {}
        for r in listed:  # deleted, undeleted, deleted again: listed twice
            if r.id not in self.deletions:
                newest[r.id] = max(r.deleted_at, newest.get(r.id, r.deleted_at))
        if not newest:
            return
        async with self.engine.connect() as conn:
            states = await ledger.load(conn, newest)
        suspects: dict[str, JobNotification] = {}
        for record_id, at in newest.items():
            st, n = states.get(record_id), purged(sobject, record_id, at)
            if st is None or st.uid is None:
                continue  # no Drupal user: nothing to block
            if self.applied(st, n):
                continue
            suspects[record_id] = n
        if not suspects:
            return
        # Still in Salesforce after all: live again (an undelete), or in the Recycle Bin with
        # its MasterRecordId; its own row then, as queryAll would have returned it.
        found: list[JobNotification] = []
        async for page in api.records_by_id(sobject, sorted(suspects), include_deleted=True):
            found.extend(page)
        await self.take(found, report)
        gone = sorted(suspects.keys() - {sf_key(n.fields["Id"]) for n in found})
        report.purged += len(gone)
        await self.queue([suspects[record_id] for record_id in gone], report)


async def deleted_in(
    api: SalesforceApi, sobject: str, start: datetime, end: datetime
) -> tuple[list[DeletedRecord], datetime]:
    """The delete log's records in [start, end] and its latestDateCovered. Salesforce lists
    at most 600,000 Ids a request (more: EXCEEDED_ID_LIMIT, "choose start and end dates that
    are closer together"): such a window is asked for in halves, each as long as Salesforce
    takes one (a mass deletion must not stop the listing run after run)."""
    try:
        window = await api.deleted_records(sobject, start, end)
        return window.records, window.latest_covered
    except SalesforceRequestRefused as exc:
        middle = (start + (end - start) / 2).replace(second=0, microsecond=0)
        if exc.error_code != "EXCEEDED_ID_LIMIT" or min(middle - start, end - middle) < (
            MIN_DELETED_WINDOW
        ):
            raise
    first, _ = await deleted_in(api, sobject, start, middle)
    second, covered = await deleted_in(api, sobject, middle, end)
    return first + second, covered


async def log_begins(api: SalesforceApi, sobject: str, end: datetime) -> datetime | None:
    """Where the delete log begins now (its earliestDateAvailable, up to the next minute:
    Salesforce ignores a start's seconds), asked with the shortest window it takes; None when
    no window before `end` can be listed."""
    try:
        window = await api.deleted_records(sobject, end - MIN_DELETED_WINDOW, end)
    except SalesforceRequestRefused as exc:
        if exc.error_code != "INVALID_REPLICATION_DATE":
            raise
        return None
    earliest = window.earliest_available
    if earliest is None:
        return None
    minute = earliest.replace(second=0, microsecond=0)
    begins = minute if minute == earliest else minute + timedelta(minutes=1)
    return begins if end - begins >= MIN_DELETED_WINDOW else None


def purged(sobject: str, record_id: str, deleted_at: datetime) -> JobNotification:
    """A deletion only the delete log knows, as queryAll would have returned it: stamped with
    its deletedDate (Salesforce takes it from the record's SystemModstamp), so the order
    guard holds and a version of that deletion queued already is a duplicate."""
    stamp = deleted_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return JobNotification(
        synthetic_id(record_id, stamp),
        sobject,
        {"Id": record_id, "IsDeleted": True, "SystemModstamp": stamp},
    )


def resume_at(page: list[JobNotification], end: datetime) -> datetime | None:
    """Where a run may resume after `page` (a watermark, a checkpoint): the newest stamp of its
    records older than `end - OVERLAP`. Salesforce reads a page's values when it fetches the
    page, so a record edited since the query began comes back with a later stamp, out of
    order: the page's last stamp could lie past records not read yet, lost for good. Such a
    stamp is at least `end - OVERLAP` (`end` is read before the query; a transaction commits
    within OVERLAP of its stamp), so every older stamp is a record's own, in the query's
    order, and no record not read yet is older than the newest of them."""
    before = end - OVERLAP
    stamps = (n.fields.get("SystemModstamp") for n in page)
    settled = [when for s in stamps if isinstance(s, str) and (when := parse_datetime(s)) < before]
    return max(settled, default=None)


async def poll_object(
    api: SalesforceApi,
    poller: Poller,
    sobject: str,
    start: datetime,
    end: datetime,
    report: PollReport,
    on_page: Callable[[datetime | None], Any] | None = None,
) -> None:
    """Queue [start, end) of `sobject`; `on_page(resume_at(page, end))` after each page
    queued. Salesforce errors end the object's run: counted in `errors`, named in `stopped`."""
    pages: AsyncIterator[list[JobNotification]] = api.changed_records(
        sobject, start, end, include_deleted=True
    )
    try:
        async for page in pages:
            await poller.take(page, report)
            if page and on_page is not None:
                await on_page(resume_at(page, end))
    except SALESFORCE_ERRORS as exc:
        stop(report, sobject, exc)


def stop(report: PollReport, sobject: str, exc: Exception) -> None:
    """A Salesforce error ends the object's run; the API limit ends the whole run."""
    report.errors += 1
    report.stopped = f"{sobject}: {exc}"
    log.warning("poll of %s stopped: %s", sobject, exc)
    if isinstance(exc, ApiLimitReached):
        raise exc


async def reconcile(
    settings: Settings,
    api: SalesforceApi,
    engine: AsyncEngine,
    redis: Redis | None,
    field_map: FieldMap,
    *,
    since: datetime | None = None,
    dry_run: bool = False,
    progress: Callable[[str], Progress] | None = None,
) -> PollReport:
    """One reconciliation run over every handled object (see the module docstring);
    `progress` shows each object's pages as they are queued (the CLI's)."""
    report = PollReport()
    enqueuer = None
    if not dry_run:
        assert redis is not None
        enqueuer = Enqueuer(
            redis,
            queue_name=settings.queue_name,
            dedupe_ttl_s=settings.dedupe_ttl_seconds,
            job_ttl_s=settings.job_ttl_seconds,
        )
    poller = Poller(settings, engine, enqueuer, field_map, Source.RECONCILE)
    starts: dict[str, datetime] = {}
    marks: dict[str, datetime] = {}  # the watermarks as the run begins: it only moves them on
    deleted_starts: dict[str, datetime] = {}  # the delete log's, from its own cursor
    unmarked = []
    for sobject in handled(settings, field_map):
        mark = await cursors.get(engine, cursors.watermark_name(sobject))
        if mark is not None:
            marks[sobject] = parse_datetime(mark)
        if since is not None:
            starts[sobject] = since
            if mark is None and not dry_run:  # a run cut short resumes from here
                await cursors.put(engine, cursors.watermark_name(sobject), since.isoformat())
                marks[sobject] = since
        elif mark is not None:
            starts[sobject] = marks[sobject] - OVERLAP
        else:
            unmarked.append(sobject)
            continue
        listed = await cursors.get(engine, cursors.deleted_name(sobject))
        if listed is None and not dry_run:  # the first run (or a cut short one) lists from here
            await cursors.put(engine, cursors.deleted_name(sobject), starts[sobject].isoformat())
        if since is None and listed is not None:
            deleted_starts[sobject] = parse_datetime(listed)
        else:
            deleted_starts[sobject] = starts[sobject]
    if unmarked:
        backfill = f"sfrelay backfill --object {unmarked[0]}" if starts else "sfrelay backfill"
        fix = (
            f"run `{backfill}` first (it leaves one where it started), or give "
            "`sfrelay reconcile --since <ISO 8601>`"
        )
        if not starts:
            raise ConfigError(f"no reconcile watermark for {', '.join(unmarked)} yet: {fix}")
        # One object backfilled, not yet the other: the one with a watermark is reconciled.
        log.warning("reconcile skips %s, which has no watermark yet: %s", ", ".join(unmarked), fix)
    objects = list(starts)
    try:
        await api.require_api_headroom()
        end = await api.server_time()
        for sobject in objects:
            if starts[sobject] < end - RECYCLE_BIN:
                log.warning(
                    "reconcile of %s starts %d days back: records deleted more than %d days "
                    "ago have left Salesforce's Recycle Bin, so their Drupal users are not "
                    "blocked; run reconcile at least daily (SFRELAY_RECONCILE_EVERY_SECONDS)",
                    sobject,
                    (end - starts[sobject]).days,
                    RECYCLE_BIN.days,
                )
        for sobject in objects:
            name = cursors.watermark_name(sobject)

            floor = marks.get(sobject)
            part = PollReport()
            shown = progress(sobject) if progress is not None else None

            async def advance(
                mark: datetime | None,
                name: str = name,
                floor: datetime | None = floor,
                part: PollReport = part,
                shown: Progress | None = shown,
            ) -> None:
                if shown is not None:
                    if shown.total is None:
                        shown.total = getattr(api, "last_total_size", None)
                    shown.page(part.queried - shown.done)
                # Never back into the overlap the run began with (a run failing after its
                # first page each time would drift back): only past the stored watermark.
                if not dry_run and mark is not None and (floor is None or mark > floor):
                    await cursors.put(engine, name, mark.isoformat())

            try:
                await poll_object(api, poller, sobject, starts[sobject], end, part, advance)
                if part.stopped is None:
                    if not dry_run:
                        await cursors.put(engine, name, end.isoformat())
                    covered = await poller.poll_purged(
                        api, sobject, deleted_starts[sobject], end, part
                    )
                    if covered is not None and not dry_run:
                        await cursors.put(
                            engine, cursors.deleted_name(sobject), covered.isoformat()
                        )
            finally:
                report.add(part)
                if shown is not None:
                    shown.end()
    except SALESFORCE_ERRORS as exc:
        if report.stopped is None:  # before the first page
            report.errors += 1
            report.stopped = str(exc)
            log.warning("reconcile stopped: %s", exc)
        if isinstance(exc, ApiLimitReached) and redis is not None:
            await count_outcomes(redis, Counter({OutcomeKind.API_LIMIT: 1}))
    return report


@dataclass(slots=True)
class PollContext:
    """What a poll command opens: Salesforce, the Drupal database (migrated), Redis."""

    settings: Settings
    api: SalesforceApi
    engine: AsyncEngine
    redis: Redis
    field_map: FieldMap

    @classmethod
    async def open(cls, settings: Settings) -> PollContext:
        from app.drupal.engine import create_engine
        from app.mapping import load_field_map
        from app.queue import redis_client
        from app.salesforce import SalesforceClient, salesforce_configured

        if not salesforce_configured(settings):
            raise ConfigError(
                "Salesforce is not configured: set the SFRELAY_SF_* settings (README, "
                "'Salesforce API'), then check them with `sfrelay check`"
            )
        field_map = load_field_map(settings.field_map)
        api = SalesforceClient(settings, field_map)
        engine = create_engine(settings.database_url)
        try:
            await ledger.migrate(engine)
        except Exception:
            await engine.dispose()
            raise
        return cls(settings, api, engine, redis_client(settings), field_map)

    async def close(self) -> None:
        await self.api.close()
        await self.engine.dispose()
        await self.redis.aclose()


def parse_since(text: str) -> datetime:
    """--since: ISO 8601 with a time zone (Salesforce's times are UTC)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since {text!r} is not an ISO 8601 time: write it like 2026-01-31T08:00:00Z"
        ) from None
    if value.tzinfo is None:
        raise ConfigError(
            f"--since {text!r} has no time zone: add Z for UTC (2026-01-31T08:00:00Z)"
        )
    return value


async def run_reconcile(
    settings: Settings,
    *,
    since: datetime | None = None,
    dry_run: bool = False,
    progress: Callable[[str], Progress] | None = None,
) -> PollReport:
    """`sfrelay reconcile`: open everything, run once, close."""
    ctx = await PollContext.open(settings)
    try:
        return await reconcile(
            settings,
            ctx.api,
            ctx.engine,
            ctx.redis,
            ctx.field_map,
            since=since,
            dry_run=dry_run,
            progress=progress,
        )
    finally:
        await ctx.close()
