"""The HTTP routes Salesforce and the load balancer talk to: verify, parse, enqueue, then ack."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from app.config import Network, Settings
from app.errors import (
    LOG_DETAIL_MAX,
    NAME_MAX,
    BadToken,
    BodyTooLarge,
    MalformedMessage,
    NotAllowed,
    QueueUnavailable,
    RejectedMessage,
    UnknownOrganization,
    UnsupportedMediaType,
    clip,
)
from app.queue import Enqueuer
from app.sfid import canonical_id
from app.soap import ACK, OutboundMessage, fault, parse_message
from app.wsdl import Contract

log = logging.getLogger("sfrelay.receiver")

ENDPOINT = "/salesforce/outbound-message"
XML_MEDIA_TYPES = ("text/xml", "application/xml")
SOAP_CONTENT_TYPE = "text/xml; charset=utf-8"

router = APIRouter()


def _soap(body: bytes, status_code: int) -> Response:
    return Response(content=body, status_code=status_code, media_type=SOAP_CONTENT_TYPE)


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
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in_networks(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def _check_sender(request: Request, settings: Settings) -> None:
    if settings.allowed_networks:
        address = client_address(request, settings.trusted_proxies)
        if not _in_networks(address, settings.allowed_networks):
            raise NotAllowed(f"address {address} is not allowed to send Outbound Messages")
    expected = settings.endpoint_token
    if expected is not None:
        given = request.query_params.get("token")
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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise MalformedMessage("Content-Length is not a number")
        if int(declared) > limit:
            raise BodyTooLarge(f"the body exceeds {limit} bytes (SFRELAY_MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body exceeds {limit} bytes (SFRELAY_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


# Distinct undeclared fields reported per process: a hostile message cannot grow it for ever.
_UNDECLARED_REPORTED_MAX = 1000


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


@router.post(ENDPOINT)
async def outbound_message(request: Request) -> Response:
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    enqueuer: Enqueuer = request.app.state.enqueuer
    try:
        _check_sender(request, settings)
        _check_media_type(request)
        body = await _read_body(request, settings.max_body_bytes)
        message = parse_message(body, request.app.state.contract, settings.handled_objects)
        allowed_orgs: frozenset[str] = request.app.state.org_ids
        if allowed_orgs and canonical_id(message.organization_id) not in allowed_orgs:
            raise UnknownOrganization(
                f"organization {message.organization_id} is not in SFRELAY_ORG_IDS"
            )
        result = await enqueuer.enqueue(message, body)
    except RejectedMessage as exc:
        log.warning("refused (%s): %s", exc.status_code, exc.detail)
        return _soap(fault(exc.faultstring, exc.faultcode), exc.status_code)
    except QueueUnavailable as exc:
        # The detail (addresses, the script's hash) is for the log; the sender gets the gist.
        log.error("not acked, Salesforce will retry: %s", clip(str(exc), LOG_DETAIL_MAX))
        return _soap(fault(exc.faultstring, "soapenv:Server"), 503)
    except ClientDisconnect:
        log.warning("the client disconnected before the end of its body: nothing stored")
        return _soap(fault("the client disconnected before the end of its body"), 400)
    except HTTPException:
        raise  # an HTTP answer chosen on purpose (FastAPI renders it)
    except Exception as exc:  # a bug: still a SOAP Fault (Salesforce retries), never an ack
        log.error("internal error, not acked: %s", clip(repr(exc), LOG_DETAIL_MAX), exc_info=exc)
        return _soap(
            fault("internal error in the receiver: not acked, retry later", "soapenv:Server"),
            500,
        )
    _report_undeclared(request.app.state.undeclared_seen, message)
    log.info(
        "acked org=%s action=%s notifications=%d queued=%d skipped=%d dead=%d duplicates=%d "
        "job=%s in %.1f ms",
        message.organization_id,
        clip(message.action_id, NAME_MAX),
        len(message.notifications),
        result.queued,
        result.skipped,
        result.dead,
        result.duplicates,
        result.job_id,
        (time.perf_counter() - started) * 1000,
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
    contract: Contract = request.app.state.contract
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


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    try:
        await request.app.state.redis.ping()
    except (RedisError, OSError) as exc:
        return JSONResponse({"status": "unavailable", "redis": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready", "redis": "ok"})
