"""`sfrelay backfill`: every matching record, queued like a reconcile (`Source.BACKFILL`), a
page at a time (never all in memory), resumable after a kill, leaving the reconcile watermark
at the time it started.

Per object: Salesforce's clock when the backfill started and the SystemModstamp of the last
queued page are checkpointed in sfrelay_cursor (`backfill:<Object>`) after each page; a second
run resumes from there (the versions read again are `current` or deduped in the queue). Once the
object is done, its reconcile watermark becomes the start time (unless it is later already)
and the checkpoint is dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from app.config import Settings
from app.drupal import cursors
from app.errors import ApiLimitReached, ConfigError, SalesforceLoginFailed
from app.jobs import Source
from app.outcomes import OutcomeKind
from app.queue import Enqueuer, count_outcomes
from app.reconcile import (
    SALESFORCE_ERRORS,
    PollContext,
    Poller,
    PollReport,
    Progress,
    handled,
    poll_object,
)
from app.salesforce.soql import parse_datetime

log = logging.getLogger("sfrelay.backfill")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class Checkpoint:
    started: datetime  # Salesforce's clock when this object's backfill began
    after: datetime  # records from here on are still to queue

    def dumps(self) -> str:
        return orjson.dumps(
            {"started": self.started.isoformat(), "after": self.after.isoformat()}
        ).decode()

    @classmethod
    def loads(cls, text: str) -> Checkpoint:
        data = orjson.loads(text)
        return cls(parse_datetime(data["started"]), parse_datetime(data["after"]))


async def backfill(
    ctx: PollContext,
    *,
    objects: list[str] | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    progress: Callable[[str], Progress] | None = None,
) -> PollReport:
    settings, engine = ctx.settings, ctx.engine
    enqueuer = None
    if not dry_run:
        enqueuer = Enqueuer(
            ctx.redis,
            queue_name=settings.queue_name,
            dedupe_ttl_s=settings.dedupe_ttl_seconds,
            job_ttl_s=settings.job_ttl_seconds,
        )
    poller = Poller(settings, engine, enqueuer, ctx.field_map, Source.BACKFILL)
    report = PollReport()
    for sobject in objects or handled(settings, ctx.field_map):
        if sobject not in ctx.field_map.objects:
            raise ConfigError(f"the field map has no [{sobject}] section: nothing to backfill")
        part = PollReport()
        shown = progress(sobject) if progress is not None else None
        try:
            await _one_object(ctx, poller, sobject, since, dry_run, part, shown)
        except SALESFORCE_ERRORS as exc:
            if part.stopped is None:  # before its first page
                part.errors += 1
                part.stopped = f"{sobject}: {exc}"
            if isinstance(exc, ApiLimitReached):
                if not dry_run:
                    await count_outcomes(ctx.redis, Counter({OutcomeKind.API_LIMIT: 1}))
                break
            if isinstance(exc, SalesforceLoginFailed):
                break  # the next object would be refused the same login
        finally:
            report.add(part)
            if shown is not None:
                shown.end()
    return report


async def _one_object(
    ctx: PollContext,
    poller: Poller,
    sobject: str,
    since: datetime | None,
    dry_run: bool,
    part: PollReport,
    shown: Progress | None,
) -> None:
    engine = ctx.engine
    name = cursors.checkpoint_name(sobject)
    saved = await cursors.get(engine, name)
    await ctx.api.require_api_headroom()
    if saved is not None and not dry_run:
        point = Checkpoint.loads(saved)
        if since is not None:
            log.warning(
                "backfill of %s resumes the run cut short at %s (started %s): --since %s does "
                "not apply to it",
                sobject,
                point.after.isoformat(),
                point.started.isoformat(),
                since.isoformat(),
            )
    else:
        point = Checkpoint(await ctx.api.server_time(), since or EPOCH)
        if not dry_run:
            await cursors.put(engine, name, point.dumps())

    async def checkpoint(mark: datetime | None) -> None:
        if shown is not None:
            if shown.total is None:
                shown.total = getattr(ctx.api, "last_total_size", None)
            shown.page(part.queried - shown.done)
        if not dry_run and mark is not None:
            point.after = mark
            await cursors.put(engine, name, point.dumps())

    await poll_object(ctx.api, poller, sobject, point.after, point.started, part, checkpoint)
    if part.stopped is not None or dry_run:
        return
    watermark = cursors.watermark_name(sobject)
    mark = await cursors.get(engine, watermark)
    if mark is None or parse_datetime(mark) < point.started:
        await cursors.put(engine, watermark, point.started.isoformat())
    await cursors.drop(engine, name)


async def run_backfill(
    settings: Settings,
    *,
    objects: list[str] | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    progress: Callable[[str], Progress] | None = None,
) -> PollReport:
    ctx = await PollContext.open(settings)
    try:
        return await backfill(ctx, objects=objects, since=since, dry_run=dry_run, progress=progress)
    finally:
        await ctx.close()
