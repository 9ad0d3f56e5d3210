"""The worker's reconcile cron job: every SFRELAY_RECONCILE_EVERY_SECONDS, one run at a time
across all workers (a Redis claim), only when Salesforce credentials are set."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from arq.cron import CronJob, cron

from app.config import Settings
from app.errors import SfrelayError
from app.queue import claim_reconcile, release_reconcile
from app.reconcile import reconcile
from app.salesforce import SalesforceClient, salesforce_configured
from workers.tasks import STATE, WorkerState

logger = logging.getLogger("sfrelay.reconcile")

CLIENT = "sfrelay_salesforce"
# The longest a run may take (arq's timeout for the job and the claim's expiry).
RUN_TIMEOUT_S = 3600


def cron_jobs(settings: Settings) -> list[CronJob]:
    """The reconcile job when it is on (checked every minute; it runs when due)."""
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


async def reconcile_job(ctx: dict[str, Any]) -> None:
    state: WorkerState = ctx[STATE]
    settings = state.settings
    redis = ctx["redis"]
    token = uuid.uuid4().hex
    if not await claim_reconcile(redis, token, settings.reconcile_every_seconds, RUN_TIMEOUT_S):
        return
    try:
        client = ctx.get(CLIENT)
        if client is None:
            client = ctx[CLIENT] = SalesforceClient(settings, state.syncer.field_map)
        report = await reconcile(
            settings, client, state.syncer.engine, redis, state.syncer.field_map
        )
        logger.info(
            "reconcile: %s",
            " ".join(f"{k}={v}" for k, v in report.as_dict().items() if k != "stopped"),
        )
        if report.stopped:
            logger.warning("reconcile stopped early: %s", report.stopped)
    except SfrelayError as exc:  # never crash the worker: the next run tries again
        logger.warning("reconcile did not run: %s", exc)
    finally:
        await release_reconcile(redis, token)


async def close(ctx: dict[str, Any]) -> None:
    client: SalesforceClient | None = ctx.pop(CLIENT, None)
    if client is not None:
        await client.close()
