"""create_app(settings): the receiver's FastAPI application; its lifespan owns the Redis pool."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app import __version__
from app.config import Settings
from app.durability import redis_location
from app.errors import ConfigError
from app.logs import RedactSecrets as RedactSecrets  # moved to app.logs
from app.logs import redact_logs
from app.logs import scrub as scrub
from app.mapping import EMAIL_LOCAL, load_field_map
from app.metrics import QueueGauges
from app.metrics import router as metrics_router
from app.queue import Enqueuer, redis_client
from app.receiver import ParseBudget, ReceiverState, router
from app.records import VERSION_FIELDS
from app.server import drain_on_sigterm
from app.wsdl import Contract, load_contract

log = logging.getLogger("sfrelay.receiver")


async def warn_if_not_durable(redis: Redis) -> None:
    """An ack promises Salesforce the notification is stored: say so when Redis cannot keep it."""
    try:
        config = await redis.config_get("appendonly")
        policy = await redis.config_get("maxmemory-policy")
    except (RedisError, OSError):
        return  # CONFIG may be disabled (managed Redis) or Redis down: /readyz reports the latter
    if config.get("appendonly") != "yes":
        log.warning(
            "Redis runs without AOF (appendonly no): acked notifications can be lost if Redis "
            "restarts; set appendonly yes"
        )
    if policy.get("maxmemory-policy", "noeviction") != "noeviction":
        log.warning(
            "Redis may evict keys (maxmemory-policy %s): queued jobs could vanish; "
            "set maxmemory-policy noeviction",
            policy.get("maxmemory-policy"),
        )


async def check_durability(enqueuer: Enqueuer, settings: Settings) -> None:
    """Refuse to start (ConfigError) when Redis cannot keep what SFRELAY_ACK_DURABILITY
    promises. Redis unreachable: checked again before the first ack (none is given until then)."""
    try:
        wait = await enqueuer.check_durability()
    except (RedisError, OSError) as exc:
        log.warning(
            "cannot check Redis at %s for SFRELAY_ACK_DURABILITY=%s yet (%s): no ack until it "
            "answers and passes the check",
            redis_location(settings.redis_url),
            settings.ack_durability,
            type(exc).__name__,
        )
        return
    log.info("ack durability %s: confirmed by %s", wait.mode, wait.how)


async def check_redis_at_start_up(settings: Settings) -> None:
    """`sfrelay serve`'s pre-flight: the durability check, before uvicorn starts any worker."""
    redis = redis_client(settings)
    try:
        enqueuer = Enqueuer(
            redis,
            queue_name=settings.queue_name,
            dedupe_ttl_s=settings.dedupe_ttl_seconds,
            job_ttl_s=settings.job_ttl_seconds,
            ack_durability=settings.ack_durability,
            redis_location=redis_location(settings.redis_url),
        )
        await check_durability(enqueuer, settings)
    finally:
        await redis.aclose()


def _warn_unsent_fields(settings: Settings, contract: Contract) -> None:
    """A field the field map reads that a handled object's WSDL does not declare: the Outbound
    Message does not select it, so push never sets (or clears) it in Drupal."""
    try:
        field_map = load_field_map(settings.field_map)
    except ConfigError:
        return  # the worker refuses it, saying why; the receiver keeps storing notifications
    for obj in settings.handled_objects:
        declared = {*(contract.field_types(obj) or ()), EMAIL_LOCAL}
        unsent = [f for f in field_map.sources.get(obj, ()) if f not in declared]
        if unsent:
            log.warning(
                "the %s WSDL in %s does not declare %s, which the field map reads: Outbound "
                "Messages without it leave it as it is in Drupal (only reconcile and backfill "
                "write it); add it to the Outbound Message's fields and its WSDL to %s",
                obj,
                settings.wsdl_dir,
                ", ".join(unsent),
                settings.wsdl_dir,
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The receiver. Loads the WSDLs (zeep, once) and checks the configuration before serving."""
    settings = settings or Settings()
    settings.require_receiver_ready()
    contract = load_contract(settings.wsdl_dir)
    missing = [obj for obj in settings.handled_objects if contract.field_types(obj) is None]
    if missing:
        raise ConfigError(
            f"no WSDL in {settings.wsdl_dir} declares {', '.join(missing)}: add the "
            "Outbound Message WSDL of each handled object"
        )
    for obj in settings.handled_objects:
        if not set(VERSION_FIELDS) & set(contract.field_types(obj) or ()):
            log.warning(
                "the %s WSDL in %s has neither SystemModstamp nor LastModifiedDate: Salesforce "
                "delivers out of order, and without a version an older notification can "
                "overwrite a newer one; add SystemModstamp to the Outbound Message's fields",
                obj,
                settings.wsdl_dir,
            )
    _warn_unsent_fields(settings, contract)
    redact_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_client(settings)
        executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sfrelay-parse")
        enqueuer = Enqueuer(
            redis,
            queue_name=settings.queue_name,
            dedupe_ttl_s=settings.dedupe_ttl_seconds,
            job_ttl_s=settings.job_ttl_seconds,
            ack_durability=settings.ack_durability,
            redis_location=redis_location(settings.redis_url),
        )
        try:
            await check_durability(enqueuer, settings)
            await warn_if_not_durable(redis)  # memory without AOF, and eviction in any mode
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            await redis.aclose()
            raise
        app.state.receiver = ReceiverState(
            settings=settings,
            contract=contract,
            redis=redis,
            enqueuer=enqueuer,
            org_ids=settings.canonical_org_ids,
            handled=frozenset(settings.handled_objects),
            # Two max-size messages parse at once (the cores this is sized for); more wait.
            parse_budget=ParseBudget(2 * settings.max_body_bytes),
            parse_executor=executor,
            queue_gauges=QueueGauges(redis, settings.queue_name),
        )
        # Everything loaded so far (zeep's WSDL model, FastAPI's routes) lives as long as the
        # process: keep the cyclic GC from scanning it again on every full collection.
        gc.freeze()
        receiver = app.state.receiver

        def draining() -> None:
            receiver.stopping = True

        # SIGTERM: not ready first, the listener closed SFRELAY_SHUTDOWN_DRAIN_SECONDS later.
        restore = drain_on_sigterm(
            settings.shutdown_drain_seconds, asyncio.get_running_loop(), draining
        )
        try:
            yield
        finally:
            if restore is not None:
                restore()
            executor.shutdown(wait=False, cancel_futures=True)
            await redis.aclose()

    app = FastAPI(
        title="sfrelay receiver",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(router)
    app.include_router(metrics_router)  # GET /metrics (app/metrics.py)
    return app
