"""The HTTP routes Salesforce and the load balancer talk to: verify, parse, enqueue, then ack."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, BusyLoadingError, RedisError, ResponseError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from app import logs, metrics
from app.config import Network, Settings
from app.dead import DeadLetter
from app.errors import (
    LOG_DETAIL_MAX,
    NAME_MAX,
    BadToken,
    BodyTooLarge,
    ConfigError,
    MalformedMessage,
    NotAllowed,
    QueueUnavailable,
    RejectedMessage,
    RequestTimeout,
    UnknownOrganization,
    UnsupportedMediaType,
    clip,
)
from app.jobs import ApplyJob, JobNotification, Source
from app.queue import READY_PROBE_KEY, Enqueuer, NotQueued, refusal
from app.sfid import SF_ID_FORM, canonical_id
from app.soap import ACK, Notification, OutboundMessage, fault, parse_message
from app.wsdl import Contract

log = logging.getLogger("sfrelay.receiver")

ENDPOINT = "/salesforce/outbound-message"
XML_MEDIA_TYPES = ("text/xml", "application/xml")
SOAP_CONTENT_TYPE = "text/xml; charset=utf-8"

# Smaller messages (a typical 100-notification message is well under this) parse on the event
# loop in a few milliseconds; larger ones in a thread, and are parsed and queued within the
# budget of bytes in flight.
PARSE_INLINE_BYTES = 64 * 1024

# /readyz answers within this: a load balancer's probe times out after a few seconds, and must
# get the reason rather than no answer (the client's socket timeout is 5 s).
READY_TIMEOUT_S = 2.0

# A key that never exists: `SET key 1 XX` is refused exactly when Redis refuses the ack's writes
# (OOM, MISCONF, READONLY, NOREPLICAS) and otherwise changes nothing, not even the AOF.

router = APIRouter()


@dataclass(slots=True)
class ReceiverState:
    """What the routes use, opened once by the app's lifespan (`app.state.receiver`)."""

    settings: Settings
    contract: Contract
    redis: Redis
    enqueuer: Enqueuer
    org_ids: frozenset[str]  # SFRELAY_ORG_IDS, canonical 15-character form
    handled: frozenset[str]  # SFRELAY_HANDLED_OBJECTS
    parse_budget: ParseBudget  # bytes of large messages parsed at once
    parse_executor: Executor  # the threads large messages parse in
    queue_gauges: metrics.QueueGauges  # what GET /metrics reads from Redis (app/metrics.py)
    undeclared_seen: set[tuple[str, str]] = field(default_factory=set)
    unready_reason: str | None = None  # what /readyz last logged
    stopping: bool = False  # SIGTERM received: /readyz says so while requests are still served


def _state(request: Request) -> ReceiverState:
    state: ReceiverState = request.app.state.receiver
    return state


def _soap(body: bytes, status_code: int) -> Response:
    response = Response(content=body, status_code=status_code, media_type=SOAP_CONTENT_TYPE)
    if status_code >= 400:
        # A refused client may still be sending its body: do not keep reading it.
        response.headers["connection"] = "close"
    return response


class ParseBudget:
    """At most `capacity` bytes of messages parsed and queued at once, first come first served.

    A parse tree, and the parsed message on its way to Redis, take several times the message's
    size: 16 concurrent 7 MB messages took the receiver from 84 MB to 600 MB. A message larger
    than the capacity waits for all of it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> int:
        size = min(size, self.capacity)
        if not self._waiters and size <= self.free:
            self.free -= size
            return size
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(size)  # granted as it was cancelled: give it back
            else:
                self._waiters.remove((size, waiter))
                self.release(0)  # the next waiter may fit now
            raise
        return size

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        held = await self.acquire(size)
        try:
            yield
        finally:
            self.release(held)

    def release(self, size: int) -> None:
        self.free += size
        while self._waiters and self._waiters[0][0] <= self.free:
            wanted, waiter = self._waiters.popleft()
            if not waiter.done():
                self.free -= wanted
                waiter.set_result(None)


def _in_networks(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(request: Request, trusted_proxies: Sequence[Network]) -> str:
    """The sender's address: X-Forwarded-For is believed only as far as trusted proxies reach."""
    peer = request.client.host if request.client else ""
    if not trusted_proxies or not _in_networks(peer, trusted_proxies):
        return peer
    # Every header line counts, in order: a proxy may add its own line after the client's.
    lines = request.headers.getlist("x-forwarded-for")
    hops = [h.strip() for line in lines for h in line.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in_networks(hop, trusted_proxies):
            return hop[:64]  # not always an address: it is echoed in the fault
    return hops[0][:64] if hops else peer


def _check_sender(request: Request, settings: Settings) -> None:
    if settings.allowed_networks:
        address = client_address(request, settings.trusted_proxies)
        if not _in_networks(address, settings.allowed_networks):
            raise NotAllowed(f"address {address} is not allowed to send Outbound Messages")
    expected = settings.endpoint_token
    if expected is not None:
        # Parsed and decoded as the application sees it (`?%74oken=` is `token`); exactly one.
        tokens = request.query_params.getlist("token")
        if len(tokens) > 1:
            raise BadToken(
                f"{len(tokens)} token parameters: give ?token=<SFRELAY_ENDPOINT_TOKEN> once"
            )
        given = tokens[0] if tokens else ""
        if not given:
            raise BadToken("missing token: add ?token=<SFRELAY_ENDPOINT_TOKEN> to the endpoint URL")
        if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise BadToken("wrong token: check the ?token= of the endpoint URL in Salesforce")


def _check_media_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in XML_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"content type {media_type or 'missing'!r} is not accepted: send text/xml (SOAP 1.1)"
        )
    # A compressed body would only be refused later as "not UTF-8": say what it is (RFC 9110
    # answers an unsupported content coding with 415 too).
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"content encoding {clip(coding, 40)!r} is not accepted: send the body uncompressed, "
            "as Salesforce does"
        )


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes, and with 408
    if it has not arrived whole within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise MalformedMessage("Content-Length is not a number")
        if int(declared) > limit:
            raise BodyTooLarge(f"the body exceeds {limit} bytes (SFRELAY_MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the body exceeds {limit} bytes (SFRELAY_MAX_BODY_BYTES)")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {timeout_s:g} s (SFRELAY_READ_TIMEOUT_SECONDS)"
        ) from None
    return b"".join(chunks)


# Distinct undeclared fields reported per process: a hostile message cannot grow it for ever.
_UNDECLARED_REPORTED_MAX = 1000


def _large_message_slot(state: ReceiverState, size: int) -> AbstractAsyncContextManager[None]:
    """Small messages go straight through; large ones wait for room in the parse budget."""
    if size <= PARSE_INLINE_BYTES:
        return nullcontext()
    return state.parse_budget.hold(size)


async def _parse(state: ReceiverState, body: bytes) -> OutboundMessage:
    """Parse on the event loop when small, else in the parse threads: the loop keeps answering
    (health checks, other messages) while a large message parses."""
    handled = state.settings.handled_objects
    if len(body) <= PARSE_INLINE_BYTES:
        return parse_message(body, state.contract, handled)
    return await asyncio.get_running_loop().run_in_executor(
        state.parse_executor, parse_message, body, state.contract, handled
    )


def _report_undeclared(seen: set[tuple[str, str]], message: OutboundMessage) -> None:
    """Say once per process which fields arrive that no WSDL in SFRELAY_WSDL_DIR declares."""
    for notification in message.notifications:
        for name in notification.undeclared:
            key = (notification.sobject, clip(name, NAME_MAX))
            if key not in seen and len(seen) < _UNDECLARED_REPORTED_MAX:
                seen.add(key)
                log.warning(
                    "%s.%s is not declared by any WSDL in SFRELAY_WSDL_DIR: passed on as text; "
                    "add this Outbound Message's WSDL to type it",
                    *key,
                )


def _queueable(notification: Notification, handled: frozenset[str]) -> bool:
    return notification.problem is None and notification.sobject in handled


def body_digest(message: OutboundMessage, handled: frozenset[str], body: bytes) -> str | None:
    """The body's SHA-256 (hex), which only a notification that is not queued needs (to be
    deduped without a usable id, or kept as a dead letter beside the body); None when every
    one is queued, the usual message: no digest of its ~50 KB on the ack path."""
    if all(_queueable(n, handled) for n in message.notifications):
        return None
    return hashlib.sha256(body).hexdigest()


def to_job(
    message: OutboundMessage, org15: str, body_sha: str | None, handled: frozenset[str]
) -> tuple[ApplyJob, list[NotQueued]]:
    """The message's usable notifications as one job; the skipped and unusable beside it.
    `body_sha`: body_digest()'s, required when a notification is not queued."""
    now = time.time()
    queued: list[JobNotification] = []
    others: list[NotQueued] = []
    for index, notification in enumerate(message.notifications):
        if _queueable(notification, handled):  # the usual case
            queued.append(
                JobNotification(notification.id, notification.sobject, notification.fields)
            )
            continue
        if body_sha is None:
            raise ValueError("to_job: a notification that is not queued needs the body's digest")
        # No notification id to dedupe on (or not an id at all: a 5,000-character one makes
        # no key): the same body and position is the same notification.
        if SF_ID_FORM.fullmatch(notification.id):
            dedupe_id = notification.id
        else:
            dedupe_id = f"body:{body_sha}:{index}"
        if notification.sobject and notification.sobject not in handled:
            others.append(NotQueued(dedupe_id))
        else:
            record_id = notification.record_id
            dead = DeadLetter(
                job=ApplyJob(org15, Source.OUTBOUND_MESSAGE, now, (), message.action_id),
                reason=notification.problem or "",
                notification_id=clip(notification.id, 40) or None,
                record_id=record_id and clip(record_id, 40),
                attempts=0,
                first_seen=now,
                last_seen=now,
                body_sha256=body_sha,
            )
            others.append(NotQueued(dedupe_id, dead.dumps()))
    job = ApplyJob(org15, Source.OUTBOUND_MESSAGE, now, tuple(queued), message.action_id)
    return job, others


@router.post(ENDPOINT)
async def outbound_message(request: Request) -> Response:
    started = time.perf_counter()
    state = _state(request)
    settings = state.settings
    try:
        _check_sender(request, settings)
        _check_media_type(request)
        body = await _read_body(request, settings.max_body_bytes, settings.read_timeout_seconds)
        async with _large_message_slot(state, len(body)):
            message = await _parse(state, body)
            org15 = canonical_id(message.organization_id)
            if state.org_ids and org15 not in state.org_ids:
                raise UnknownOrganization(
                    f"organization {message.organization_id} is not in SFRELAY_ORG_IDS"
                )
            body_sha = body_digest(message, state.handled, body)
            job, others = to_job(message, org15, body_sha, state.handled)
            with metrics.ENQUEUE_SECONDS.time():
                result = await state.enqueuer.submit(job, others, body=body, body_sha=body_sha)
    except RejectedMessage as exc:
        metrics.refused(exc)
        log.warning("refused (%s): %s", exc.status_code, exc.detail)
        return _soap(fault(exc.faultstring, exc.faultcode), exc.status_code)
    except QueueUnavailable as exc:
        metrics.refused(exc)
        # The detail (addresses, the script's hash) is for the log; the sender gets the gist.
        log.error("not acked, Salesforce will retry: %s", clip(str(exc), LOG_DETAIL_MAX))
        return _soap(fault(exc.faultstring, "soapenv:Server"), 503)
    except ClientDisconnect as exc:
        metrics.refused(exc)
        log.warning("the client disconnected before the end of its body: nothing stored")
        return _soap(fault("the client disconnected before the end of its body"), 400)
    except HTTPException:
        raise  # an HTTP answer chosen on purpose (FastAPI renders it)
    except Exception as exc:  # a bug: still a SOAP Fault (Salesforce retries), never an ack
        metrics.refused(exc)
        log.error("internal error, not acked: %s", clip(repr(exc), LOG_DETAIL_MAX), exc_info=exc)
        return _soap(
            fault("internal error in the receiver: not acked, retry later", "soapenv:Server"),
            500,
        )
    _report_undeclared(state.undeclared_seen, message)
    seconds = time.perf_counter() - started
    by_object = metrics.acked(message, job, result, state.handled, seconds)
    objects = ",".join(sorted({obj for obj, _ in by_object})) or "-"
    log.info(
        "acked org=%s action=%s object=%s notifications=%d queued=%d skipped=%d dead=%d "
        "duplicates=%d job=%s in %.1f ms",
        message.organization_id,
        clip(message.action_id, NAME_MAX),
        objects,
        len(message.notifications),
        result.queued,
        result.skipped,
        result.dead,
        result.duplicates,
        result.job_id,
        seconds * 1000,
        extra=logs.fields(
            event="received",
            organization_id=message.organization_id,
            action_id=clip(message.action_id, NAME_MAX),
            object=objects,
            count=len(message.notifications),
            queued=result.queued,
            skipped=result.skipped,
            dead=result.dead,
            duplicates=result.duplicates,
            job_id=result.job_id,
            duration_ms=round(seconds * 1000, 3),
        ),
    )
    return _soap(ACK, 200)


@router.api_route(ENDPOINT, methods=["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def other_methods(request: Request) -> Response:
    """Any other method: a SOAP Fault saying what the endpoint takes, not FastAPI's JSON."""
    response = _soap(
        fault(f"method {request.method} is not allowed: POST Outbound Messages, GET ?wsdl"), 405
    )
    response.headers["allow"] = "GET, POST"
    return response


@router.get(ENDPOINT)
async def wsdl(request: Request) -> Response:
    """`?wsdl` returns the Contact WSDL; `?wsdl=Lead` the WSDL of another object."""
    contract = _state(request).contract
    wanted = request.query_params.get("wsdl")
    if wanted is None:
        return _soap(fault("POST Outbound Messages here; GET ?wsdl for the WSDL"), 405)
    documents = contract.documents
    name = wanted or ("Contact" if "Contact" in documents else next(iter(documents), ""))
    document = documents.get(name)
    if document is None:
        known = ", ".join(sorted(documents))
        return _soap(fault(f"no WSDL for {wanted!r}; known objects: {known}"), 404)
    return Response(content=document, media_type="text/xml; charset=utf-8")


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def _unready(state: ReceiverState) -> tuple[str, str] | None:
    """Why an ack would fault now (what /readyz answers, what it logs), or None. One round trip,
    within READY_TIMEOUT_S."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            # Planned once Redis first answers (app.durability); ConfigError until it can honour
            # SFRELAY_ACK_DURABILITY, as every ack's submit() then refuses.
            wait = await state.enqueuer.check_durability()
            async with state.redis.pipeline(transaction=False) as pipe:
                pipe.set(READY_PROBE_KEY, b"1", xx=True, px=1000)
                if wait.replica:
                    pipe.info("replication")
                # Unannotated errors: refusal() reads the code that starts Redis's words.
                replies = await pipe.execute(raise_on_error=False)
            refused = next((r for r in replies if isinstance(r, Exception)), None)
            if refused is not None:
                raise refused
    except ConfigError as exc:
        # Its words name Redis's address: for the log only.
        reason = (
            f"Redis cannot keep what SFRELAY_ACK_DURABILITY={state.settings.ack_durability} "
            "promises: see the receiver's log"
        )
        return reason, f"{reason}: {exc}"
    except ResponseError as exc:
        reason = refusal(exc)
    except BusyLoadingError:
        reason = "Redis is loading its data set: ready when it has"
    except TimeoutError:
        reason = (
            f"Redis did not answer within {READY_TIMEOUT_S:g} s: acks wait for it, and fault "
            "after 5 s"
        )
    except AuthenticationError as exc:
        # A managed Redis answers a wrong ACL user or password at once: not "does not answer".
        reason = "Redis refuses sfrelay's login: check the user and password in SFRELAY_REDIS_URL"
        return reason, f"{reason}: {exc}"
    except (RedisError, OSError) as exc:
        reason = "Redis does not answer: check SFRELAY_REDIS_URL and that Redis runs"
        # redis-py's words (a refused connection, a TLS certificate it could not verify) name
        # the address, never the password: for the log only.
        return reason, f"{reason}: {exc}"
    else:
        if wait.replica and int(replies[1].get("connected_slaves", 0)) < 1:
            reason = (
                "no replica is connected to Redis, and every ack waits for one "
                "(SFRELAY_ACK_DURABILITY=replica) and faults: reconnect the replica"
            )
            return reason, reason
        return None
    return reason, reason


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 only when an ack could be written now: Redis answers within READY_TIMEOUT_S, accepts
    writes and can keep what SFRELAY_ACK_DURABILITY promises."""
    state = _state(request)
    if state.stopping:
        return JSONResponse(
            {
                "status": "stopping",
                "reason": "the receiver is shutting down (SIGTERM): it still serves requests "
                f"for {state.settings.shutdown_drain_seconds:g} s after the signal "
                "(SFRELAY_SHUTDOWN_DRAIN_SECONDS), then closes",
            },
            status_code=503,
        )
    unready = await _unready(state)
    if unready is None:
        state.unready_reason = None
        return JSONResponse({"status": "ready", "redis": "ok"})
    reason, detail = unready
    if state.unready_reason != reason:  # say it once, not at every probe
        state.unready_reason = reason
        log.error("not ready: %s", detail)
    return JSONResponse({"status": "unavailable", "redis": reason}, status_code=503)
