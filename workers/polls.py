"""The worker's reconcile cron job: every SFRELAY_RECONCILE_EVERY_SECONDS, one run at a time
across all workers (a Redis claim), only when Salesforce credentials are set."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import orjson
from arq.cron import CronJob, cron
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app import refetch
from app.config import Settings
from app.errors import ApiLimitReached, ConfigError, SalesforceUnavailable, SfrelayError
from app.jobs import JobNotification
from app.queue import RECONCILE_LAST_KEY, claim_reconcile, release_reconcile, renew_reconcile
from app.reconcile import reconcile
from app.salesforce import SalesforceClient, salesforce_configured
from workers.tasks import STATE, WorkerState

logger = logging.getLogger("sfrelay.reconcile")

CLIENT = "sfrelay_salesforce"
# The longest a run may take (arq's timeout for the job).
RUN_TIMEOUT_S = 3600
# The run's claim (one run at a time across workers) lasts this long, renewed every
# CLAIM_RENEW_S while the run goes on: a worker killed mid-run (SIGKILL, OOM, a lost machine)
# holds it this long at most, where the claim used to last the whole RUN_TIMEOUT_S and so
# kept every other worker from reconciling for an hour.
CLAIM_S = 10
CLAIM_RENEW_S = 2.0


def cron_jobs(settings: Settings) -> list[CronJob]:
    """The reconcile job when it is on (checked every minute; it runs when due)."""
    if settings.payload_mode == "refetch" and not salesforce_configured(settings):
        raise ConfigError(
            "SFRELAY_PAYLOAD_MODE=refetch reads records from Salesforce: set the SFRELAY_SF_* "
            "settings (README, 'Salesforce API'), or SFRELAY_PAYLOAD_MODE=message"
        )
    if settings.reconcile_every_seconds <= 0 or not salesforce_configured(settings):
        return []
    return [
        cron(
            reconcile_job,
            name="sfrelay:reconcile",
            second=0,
            unique=True,
            run_at_startup=True,
            timeout=RUN_TIMEOUT_S,
            max_tries=1,
            keep_result=0,
        )
    ]


async def startup(ctx: dict[str, Any]) -> None:
    """When this worker reads Salesforce: every mapped field must be readable (ConfigError
    naming them, before any job); Salesforce being unreachable only delays that check.
    Salesforce refusing sfrelay (the login, a field, an object: changed there months in)
    refuses the start only in refetch mode, which reads every record; otherwise it is
    logged and the worker applies what Salesforce pushes, which needs no API (reconcile
    logs the refusal on each run until it is fixed)."""
    state: WorkerState = ctx[STATE]
    settings = state.settings
    reads = settings.reconcile_every_seconds > 0 or settings.payload_mode == "refetch"
    if not reads or not salesforce_configured(settings):
        return
    client = salesforce(ctx, state)
    try:
        for sobject in settings.handled_objects:
            if sobject not in state.syncer.field_map.objects:
                continue
            missing = await client.missing_fields(sobject)
            if missing:
                raise ConfigError(
                    f"Salesforce: the integration user cannot read {sobject} "
                    f"{', '.join(missing)}: fix SFRELAY_FIELD_MAP or the user's field access "
                    "(`sfrelay check` shows every part)"
                )
    except (SalesforceUnavailable, ApiLimitReached) as exc:
        logger.warning("mapped fields not checked in Salesforce now: %s", exc)
    except SfrelayError as exc:
        if settings.payload_mode == "refetch":
            raise
        logger.error(
            "%s: reconcile cannot run until this is fixed; pushed notifications are still "
            "applied (`sfrelay check` shows every part)",
            str(exc).removesuffix(" (`sfrelay check` shows every part)"),
        )


def salesforce(ctx: dict[str, Any], state: WorkerState) -> SalesforceClient:
    """The worker's one Salesforce client (reconcile and refetch share it)."""
    client: SalesforceClient | None = ctx.get(CLIENT)
    if client is None:
        client = ctx[CLIENT] = SalesforceClient(state.settings, state.syncer.field_map)
    return client


async def refetched(
    ctx: dict[str, Any], state: WorkerState, notifications: Sequence[JobNotification]
) -> tuple[list[JobNotification], dict[int, str]]:
    return await refetch.current(salesforce(ctx, state), notifications, state.syncer.field_map)


async def reconcile_job(ctx: dict[str, Any]) -> None:
    state: WorkerState = ctx[STATE]
    settings = state.settings
    redis = ctx["redis"]
    token = uuid.uuid4().hex
    if not await claim_reconcile(redis, token, settings.reconcile_every_seconds, CLAIM_S):
        return
    keeper = asyncio.create_task(_keep_claim(redis, token))
    try:
        report = await reconcile(
            settings, salesforce(ctx, state), state.syncer.engine, redis, state.syncer.field_map
        )
        logger.info(
            "reconcile: %s",
            " ".join(f"{k}={v}" for k, v in report.as_dict().items() if k != "stopped"),
        )
        # (why it stopped early is logged where it stopped: app.reconcile)
        await _remember(redis, report.queued, report.errors, report.stopped)
    except SfrelayError as exc:  # never crash the worker: the next run tries again
        logger.warning("reconcile did not run: %s", exc)
        await _remember(redis, 0, 1, str(exc))
    finally:
        keeper.cancel()
        with suppress(asyncio.CancelledError):
            await keeper
        await release_reconcile(redis, token)


async def _remember(redis: Redis, queued: int, errors: int, stopped: str | None) -> None:
    """How this run ended, for `sfrelay status` (a failing run otherwise shows in the log
    alone: Salesforce refusing the login months in, a field made unreadable)."""
    last = {"at": round(time.time(), 3), "queued": queued, "errors": errors, "stopped": stopped}
    try:
        await redis.set(RECONCILE_LAST_KEY, orjson.dumps(last))
    except (RedisError, OSError) as exc:
        logger.warning("reconcile: its outcome not stored for sfrelay status: %s", exc)


async def _keep_claim(redis: Redis, token: str) -> None:
    """Renew the run's claim while it runs. Lost (the loop stalled past CLAIM_S and another
    worker started a run): this run goes on; two runs only queue what the dedupe and the
    order guard make harmless, and each watermark only moves forward."""
    while True:
        await asyncio.sleep(CLAIM_RENEW_S)
        try:
            if not await renew_reconcile(redis, token, CLAIM_S):
                logger.warning("reconcile: this run's claim expired; another run may overlap it")
                return
        except (RedisError, OSError) as exc:
            logger.warning("reconcile: claim not renewed: %s", exc)


async def close(ctx: dict[str, Any]) -> None:
    client: SalesforceClient | None = ctx.pop(CLIENT, None)
    if client is not None:
        await client.close()
