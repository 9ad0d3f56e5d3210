"""End to end: a real uvicorn server, a real redis-server, and zeep as Salesforce's stand-in."""

from __future__ import annotations

import concurrent.futures
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import zeep
import zeep.exceptions
from lxml import etree

from app.config import DEFAULT_WSDL_DIR, Settings
from app.jobs import JobNotification
from app.jobs import read as read_job
from app.main import create_app
from app.queue import DEFAULT_QUEUE, JOB_KEY_PREFIX, STATS_KEY
from tests.conftest import SHARED_WSDLS
from tests.factories import MODIFIED, ORG_ID, sf_id
from tests.messages import (
    ESCAPED_NAME,
    SALESFORCE,
    Layout,
    Record,
    contact,
    outbound_message,
)
from tests.servers import RedisServer, UvicornThread, free_port

BINDING = "{http://soap.sforce.com/2005/09/outbound}NotificationBinding"
SOBJECT = "{urn:sobject.enterprise.soap.sforce.com}"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XML = {"content-type": "text/xml; charset=UTF-8"}
# What Salesforce's sender puts on each POST (amp-labs/connectors#3419; a curl replay of a real
# message in a README, search-index id 37127193827).
SALESFORCE_HEADERS = {
    "content-type": "text/xml; charset=utf-8",
    "soapaction": '""',
    "user-agent": "Jakarta Commons-HttpClient/3.1",
    "accept-encoding": "gzip",
}


@pytest.fixture
def server(settings: Settings) -> Iterator[UvicornThread]:
    with UvicornThread(create_app(settings)) as running:
        yield running


def endpoint(server: UvicornThread) -> str:
    return f"{server.url}/salesforce/outbound-message"


def queued(redis_client: redis.Redis) -> list[JobNotification]:
    out: list[JobNotification] = []
    for job_id in redis_client.zrange(DEFAULT_QUEUE, 0, -1):
        out += read_job(redis_client.get(JOB_KEY_PREFIX.encode() + job_id) or b"").notifications
    return out


class SalesforceTyping(zeep.Plugin):
    """Adds `xsi:type="sf:<Object>"` to each sObject, with `sf` declared on it, as Salesforce does.

    zeep itself leaves xsi:type out when the value has the element's declared type.
    """

    def __init__(self, sobject: str) -> None:
        self.sobject = sobject

    def egress(
        self, envelope: etree._Element, http_headers: dict[str, str], *_: Any
    ) -> tuple[etree._Element, dict[str, str]]:
        for old in list(envelope.iter("{http://soap.sforce.com/2005/09/outbound}sObject")):
            new = etree.Element(old.tag, nsmap={"sf": SOBJECT[1:-1], "xsi": XSI})
            new.set(f"{{{XSI}}}type", f"sf:{self.sobject}")
            new.extend(list(old))
            parent = old.getparent()
            assert parent is not None
            parent.replace(old, new)
        return envelope, http_headers


def notify(
    wsdl: Path, url: str, sobject: dict[str, Any], *, number: int, typed: str | None = None
) -> Any:
    client = zeep.Client(str(wsdl), plugins=[SalesforceTyping(typed)] if typed else [])
    service = client.create_service(BINDING, url)
    return service.notifications(
        OrganizationId=ORG_ID,
        ActionId=sf_id("04k", 1),
        SessionId=None,
        EnterpriseUrl="https://na73.salesforce.com/services/Soap/c/61.0/00D1I000003qqqE",
        PartnerUrl="https://na73.salesforce.com/services/Soap/u/61.0/00D1I000003qqqE",
        Notification=[{"Id": sf_id("04l", number), "sObject": sobject}],
    )


def test_zeep_with_our_contact_and_lead_wsdls(
    server: UvicornThread, redis_client: redis.Redis
) -> None:
    contact_fields = {"Id": sf_id("003", 7), "Email": "ada@example.org", "FirstName": "Ada"}
    # Plain zeep sends no xsi:type: the record id's key prefix (003) names the object.
    assert notify(DEFAULT_WSDL_DIR / "contact.wsdl", endpoint(server), contact_fields, number=1)
    lead_fields = {"Id": sf_id("00Q", 8), "Email": "lead@example.org", "IsConverted": True}
    ack = notify(
        DEFAULT_WSDL_DIR / "lead.wsdl", endpoint(server), lead_fields, number=2, typed="Lead"
    )
    assert ack is True
    by_object = {n.object: n.fields for n in queued(redis_client)}
    # Fields the WSDL declares and zeep left out are nulls (as Salesforce omits them).
    nulls = {"LastName": None, "LastModifiedDate": None, "SystemModstamp": None}
    assert by_object["Contact"] == {**contact_fields, **nulls}
    assert by_object["Lead"]["IsConverted"] is True
    assert by_object["Lead"]["Email"] == "lead@example.org"


@pytest.mark.parametrize("wsdl", sorted(SHARED_WSDLS.glob("*.wsdl")), ids=lambda p: p.name[:20])
def test_zeep_with_real_salesforce_wsdls(
    wsdl: Path, server: UvicornThread, redis_client: redis.Redis
) -> None:
    client = zeep.Client(str(wsdl))
    [sobject_type] = [
        t
        for t in client.wsdl.types.types
        if t.qname is not None
        and t.qname.namespace == SOBJECT[1:-1]
        and t.qname.localname not in ("sObject", "AggregateResult")
    ]
    name = sobject_type.qname.localname
    prefix = {"Contact": "003", "Account": "001"}.get(name, "a0R")
    assert notify(wsdl, endpoint(server), {"Id": sf_id(prefix, 3)}, number=3, typed=name) is True
    handled = sobject_type.qname.localname == "Contact"
    skipped = int(redis_client.hget(STATS_KEY, "skipped") or 0)
    assert (len(queued(redis_client)), skipped) == ((1, 0) if handled else (0, 1))


def test_a_fault_reaches_zeep_as_a_fault(server: UvicornThread, redis_client: redis.Redis) -> None:
    client = zeep.Client(str(DEFAULT_WSDL_DIR / "contact.wsdl"))
    service = client.create_service(BINDING, endpoint(server))
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.notifications(
            OrganizationId="00D000000000001AAA",
            ActionId=sf_id("04k", 1),
            SessionId=None,
            EnterpriseUrl="x",
            PartnerUrl="y",
            Notification=[{"Id": sf_id("04l", 1), "sObject": {"Id": sf_id("003", 1)}}],
        )
    assert caught.value.message == "organization 00D000000000001AAA is not in SFRELAY_ORG_IDS"
    assert redis_client.dbsize() == 0


def test_hostile_bodies_are_refused_and_the_server_stays_responsive(
    server: UvicornThread, redis_client: redis.Redis
) -> None:
    hostile = {
        "xxe": b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<r>&x;</r>",
        "billion laughs": b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "lol">'
        + b"".join(
            f'<!ENTITY a{i} "{("&a;" if i == 0 else f"&a{i - 1};") * 10}">'.encode()
            for i in range(9)
        )
        + b"]><l>&a8;</l>",
        "deep nesting": b"<a>" * 200_000 + b"</a>" * 200_000,
        "oversize": b"<a>" + b"x" * (9 * 1024 * 1024) + b"</a>",
    }
    # How fast they are refused is measured by the benchmarks (python -m tests.bench receiver);
    # here: each refused with its own status, nothing stored, /healthz answered after each.
    expected = {"xxe": 400, "billion laughs": 400, "deep nesting": 400, "oversize": 413}
    with httpx.Client(timeout=10) as http:
        for name, body in hostile.items():
            response = http.post(endpoint(server), content=body, headers=XML)
            assert response.status_code == expected[name], name
            assert redis_client.dbsize() == 0, name
            assert http.get(f"{server.url}/healthz").status_code == 200
    assert redis_client.dbsize() == 0


def test_redis_stopped_mid_run_nothing_acked_is_lost_nothing_half_written(
    settings: Settings, tmp_path: Path
) -> None:
    own_redis = RedisServer(port=free_port(), directory=tmp_path / "redis")
    own_redis.start()
    app_settings = Settings(_env_file=None, **{**settings.model_dump(), "redis_url": own_redis.url})
    messages = [outbound_message([contact(Email=f"m{i}@example.org")]) for i in range(40)]

    def post(body: bytes) -> int:
        with httpx.Client(timeout=15) as http:
            return http.post(url, content=body, headers=XML).status_code

    try:
        with UvicornThread(create_app(app_settings)) as running:
            url = endpoint(running)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                first = list(pool.map(post, messages[:20]))
                stopping = pool.submit(own_redis.stop)
                during = list(pool.map(post, messages[20:]))
                stopping.result()
            assert set(first) == {200}
            assert post(messages[-1]) == 503
            own_redis.start()  # AOF brings back everything that was acked
            statuses = first + during
            client = own_redis.client()
            stored = {n.id for n in queued(client)}
            for body, status in zip(messages, statuses, strict=True):
                notification_id = body.split(b"<Id>")[1].split(b"</Id>")[0].decode()
                if status == 200:
                    assert notification_id in stored
                else:
                    assert status == 503
            # Every message again, as Salesforce retries: each notification queued exactly once.
            assert {post(body) for body in messages} == {200}
            ids = [n.id for n in queued(client)]
            assert len(ids) == len(set(ids)) == len(messages)
            client.close()
    finally:
        own_redis.stop()


# The same content in each layout found in public captures and replays of real messages.
REAL_LAYOUTS = {
    "Salesforce's own": SALESFORCE,
    # A Node test posting a captured Opportunity message as one line (search-index id
    # 28294268481); Mule templates build theirs the same way.
    "one line": Layout(indent="", newline=""),
    # guardian/salesforce-message-handler simpleUpdate.json: the body relayed with CRLF.
    "CRLF, 4-space indent": Layout(newline="\r\n", indent="    "),
    # aspnet/AspNetWebHooks OutboundMessage1.xml (BOM, 2 spaces); aspnet/WebHooks Salesforce.xml
    # (no declaration).
    "BOM, no declaration": Layout(bom=True, declaration="", indent="  "),
    # "Send Session ID" on: a session id of the 00D...!AQ... form (the README capture above).
    "session id sent": Layout(session_id="00D1I000003qqqE!AQ0AQHwogrxFUHYyM3M65BM_mz.U63"),
    # Salesforce is removing session ids (help 005232763): an empty element, or none at all.
    "session id empty": Layout(session_id=""),
    "no SessionId element": Layout(session_element=False),
    # Hand-made replays: other prefixes, `sf` declared once on the Envelope.
    "other prefixes": Layout(envelope_prefix="S", sf_on_envelope=True),
}


@pytest.mark.parametrize("layout", REAL_LAYOUTS.values(), ids=list(REAL_LAYOUTS))
def test_real_message_layouts_are_acked_and_stored_typed(
    layout: Layout, server: UvicornThread, redis_client: redis.Redis
) -> None:
    record = contact(Email="zoe@example.org", SystemModstamp=MODIFIED, **ESCAPED_NAME)
    body = outbound_message([record], layout=layout, nil=("LastModifiedDate",))
    response = httpx.post(endpoint(server), content=body, headers=SALESFORCE_HEADERS)
    assert response.status_code == 200
    assert "<Ack>true</Ack>" in response.text
    assert queued(redis_client) == [
        JobNotification(
            record.notification_id,
            "Contact",
            {
                "Id": record.fields["Id"],
                "Email": "zoe@example.org",
                **ESCAPED_NAME,
                "SystemModstamp": MODIFIED,
                "LastModifiedDate": None,
            },
        )
    ]


def test_salesforce_transport_keep_alive_chunked_and_expect_continue(
    server: UvicornThread, redis_client: redis.Redis
) -> None:
    first, second, third = (contact(Email=f"t{n}@example.org") for n in range(3))

    def chunks(record: Record) -> Iterator[bytes]:
        body = outbound_message([record])
        yield from (body[i : i + 200] for i in range(0, len(body), 200))

    with httpx.Client(headers=SALESFORCE_HEADERS) as http:  # one kept-alive connection
        sized = http.post(endpoint(server), content=outbound_message([first]))
        chunked = http.post(endpoint(server), content=chunks(second))
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert [sized.status_code, chunked.status_code] == [200, 200]
    # An HTTP/1.1 client may wait for "100 Continue" before it sends the body.
    body = outbound_message([third])
    head = (
        "POST /salesforce/outbound-message HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in SALESFORCE_HEADERS.items())
        + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"<Ack>true</Ack>" in answer
    assert sorted(n.fields["Email"] for n in queued(redis_client)) == [
        "t0@example.org",
        "t1@example.org",
        "t2@example.org",
    ]
