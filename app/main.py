"""create_app(settings): the receiver's FastAPI application; its lifespan owns the Redis pool."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from urllib.parse import unquote

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app import __version__
from app.config import Settings
from app.durability import redis_location
from app.errors import ConfigError
from app.queue import Enqueuer, redis_client
from app.receiver import ParseBudget, ReceiverState, router
from app.wsdl import load_contract

log = logging.getLogger("sfrelay.receiver")

_SECRET_PARAM = re.compile(
    r"((?:^|[?&;\s])(?:token|access_token|sessionid|session_id|sid|password)=)[^&;\s]+", re.I
)
# A Salesforce session id: the organization id, "!", then the session's secret.
_SESSION_ID = re.compile(r"\b00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?![A-Za-z0-9._\-]+")
_PERCENT_WORD = re.compile(r"\S*%[0-9A-Fa-f]{2}\S*")


def _decoded(word: str) -> str:
    for _ in range(3):  # %2574oken is %74oken is token
        decoded = unquote(word)
        if decoded == word:
            break
        word = decoded
    return word


def scrub(text: str) -> str:
    """`text` without secrets: query parameters judged as the application decodes them
    (`?%74oken=` is `?token=`), and anything shaped like a Salesforce session id."""
    if "%" in text:
        text = _PERCENT_WORD.sub(lambda m: _decoded(m.group()), text)
    return _SESSION_ID.sub("***", _SECRET_PARAM.sub(r"\1***", text))


class RedactSecrets(logging.Filter):
    """Scrub tokens and session ids from every log line (uvicorn's access log and ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.args and isinstance(record.msg, str):
            record.msg = scrub(record.msg)  # already the whole line (else a format string)
        elif isinstance(record.args, tuple):
            record.args = tuple(scrub(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: scrub(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


_REDACT = RedactSecrets()


def redact_logs() -> None:
    """Put the filter on every handler that can print a request line: the root logger's (ours
    propagate there) and uvicorn's, and on uvicorn's access logger should its handlers change."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    loggers = [logging.getLogger(name) for name in names]
    targets: list[logging.Filterer] = [loggers[-1], *(h for lg in loggers for h in lg.handlers)]
    for target in targets:
        if _REDACT not in target.filters:
            target.addFilter(_REDACT)


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
        )
        # Everything loaded so far (zeep's WSDL model, FastAPI's routes) lives as long as the
        # process: keep the cyclic GC from scanning it again on every full collection.
        gc.freeze()
        try:
            yield
        finally:
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
    return app
