"""The receiver benchmark's three apps, as uvicorn factories: ceiling, sfrelay, naive baseline."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI, Request
from fastapi.responses import Response

from app.config import Settings
from app.jobs import JobNotification
from app.main import create_app
from app.receiver import ENDPOINT, SOAP_CONTENT_TYPE
from app.sfid import canonical_id
from app.soap import ACK, OutboundMessage, parse_message
from app.wsdl import load_contract

# The benchmark passes its redis-server's URL to the uvicorn process in this variable,
# and sfrelay's SFRELAY_ACK_DURABILITY in the other.
REDIS_URL_ENV = "BENCH_REDIS_URL"
DURABILITY_ENV = "BENCH_ACK_DURABILITY"
ORG_ID = "00D5g000004Xk2PEAS"

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def bench_settings() -> Settings:
    return Settings(
        _env_file=None,
        env="production",
        org_ids=[ORG_ID],
        endpoint_token=None,
        allowed_networks=["127.0.0.0/8"],  # production needs a token or an address check
        redis_url=os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0"),
        ack_durability=os.environ.get(DURABILITY_ENV, "fsync"),
    )


def sfrelay_app() -> FastAPI:
    """sfrelay's real receiver."""
    return create_app(bench_settings())


async def _parse(request: Request) -> OutboundMessage:
    """What every variant does before it answers: read the body, parse it, check the org."""
    settings: Settings = request.app.state.settings
    message = parse_message(
        await request.body(), request.app.state.contract, settings.handled_objects
    )
    if canonical_id(message.organization_id) not in settings.canonical_org_ids:
        raise ValueError(f"unknown organization {message.organization_id}")
    return message


def _app(handle: Callable[[Request], Awaitable[None]], lifespan: Lifespan | None = None) -> FastAPI:
    """The shape of sfrelay's app (same FastAPI options, route and answer), another handler."""
    settings = bench_settings()
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.contract = load_contract(settings.wsdl_dir)

    @app.post(ENDPOINT)
    async def outbound_message(request: Request) -> Response:
        await handle(request)
        return Response(content=ACK, media_type=SOAP_CONTENT_TYPE)

    gc.freeze()  # as sfrelay's own app does once started: the same GC treatment for all
    return app


def ceiling_app() -> FastAPI:
    """Parse and ack, store nothing: what no storing receiver can beat."""

    async def handle(request: Request) -> None:
        await _parse(request)

    return _app(handle)


def naive_app() -> FastAPI:
    """The baseline: parse the same way, then one arq `enqueue_job` per notification."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.arq = await create_pool(RedisSettings.from_dsn(bench_settings().redis_url))
        try:
            yield
        finally:
            await app.state.arq.aclose()

    async def handle(request: Request) -> None:
        message = await _parse(request)
        for notification in message.notifications:
            # The notification id as arq's job id: arq's own way to refuse a redelivery.
            await request.app.state.arq.enqueue_job(
                "apply_notification",
                JobNotification(
                    notification.id, notification.sobject, notification.fields
                ).as_json(),
                organization_id=message.organization_id,
                _job_id=notification.id,
            )

    return _app(handle, lifespan)
