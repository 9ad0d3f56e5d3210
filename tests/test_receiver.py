"""The receiver against a real Redis: what it acks, what it stores, and one test per refusal."""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from app.config import DEFAULT_WSDL_DIR, PROJECT_ROOT, Settings
from app.jobs import ApplyJob, JobNotification, Source
from app.jobs import read as read_job
from app.main import create_app
from app.queue import (
    DEAD_BODY_PREFIX,
    DEAD_KEY,
    DEFAULT_QUEUE,
    JOB_KEY_PREFIX,
    SEEN_PREFIX,
    STATS_KEY,
)
from app.receiver import body_digest
from app.sfid import canonical_id
from app.soap import parse_message
from app.wsdl import load_contract
from tests.conftest import shared_message
from tests.factories import ORG_ID
from tests.messages import Record, contact, outbound_message
from tests.servers import RedisServer, free_port

URL = "/salesforce/outbound-message"
XML = {"content-type": "text/xml; charset=UTF-8", "soapaction": '""'}
ACK_TEXT = "<Ack>true</Ack>"

ClientFactory = Callable[..., Any]


@pytest.fixture
async def make_client(settings: Settings) -> AsyncIterator[ClientFactory]:
    """Builds a client for an app whose settings are `settings` with the given overrides."""
    stack: list[Any] = []

    async def build(**overrides: Any) -> httpx.AsyncClient:
        app = create_app(Settings(_env_file=None, **{**settings.model_dump(), **overrides}))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 40000)),
            base_url="http://receiver",
        )
        stack.append((lifespan, client))
        return client

    yield build
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


def queued_jobs(redis_client: redis.Redis) -> list[ApplyJob]:
    jobs = []
    for job_id in redis_client.zrange(DEFAULT_QUEUE, 0, -1):
        raw = redis_client.get(JOB_KEY_PREFIX.encode() + job_id)
        assert raw is not None
        jobs.append(read_job(raw))
    return jobs


def queued_jobs_notifications(redis_client: redis.Redis) -> list[JobNotification]:
    return [n for job in queued_jobs(redis_client) for n in job.notifications]


def queued_notification_ids(redis_client: redis.Redis) -> list[str]:
    return [n.id for n in queued_jobs_notifications(redis_client)]


def fault_of(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "text/xml; charset=utf-8"
    assert ACK_TEXT not in response.text
    start = response.text.index("<faultstring>") + len("<faultstring>")
    return response.text[start : response.text.index("</faultstring>")]


async def test_a_message_is_stored_as_one_arq_job_then_acked(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    records = [
        # A raw newline in a value: the script's payload list is newline-separated.
        contact(Email="ada@example.org", FirstName="Ada", LastName="Love\nlace"),
        contact(Email="alan@example.org", LastModifiedDate="2024-05-01T10:00:00.000Z"),
    ]
    response = await client.post(URL, content=outbound_message(records), headers=XML)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/xml; charset=utf-8"
    assert ACK_TEXT in response.text
    [job] = queued_jobs(redis_client)
    assert (job.organization_id, job.source) == (canonical_id(ORG_ID), Source.OUTBOUND_MESSAGE)
    first, second = job.notifications
    assert first == JobNotification(
        records[0].notification_id,
        "Contact",
        {
            "Id": records[0].fields["Id"],
            "Email": "ada@example.org",
            "FirstName": "Ada",
            "LastName": "Love\nlace",
            # what the WSDL declares and the message leaves out: null, as Salesforce means it
            "LastModifiedDate": None,
            "SystemModstamp": None,
        },
    )
    # Values travel as Salesforce sent them: a dateTime keeps its text.
    assert second.fields["LastModifiedDate"] == "2024-05-01T10:00:00.000Z"
    # The raw body is kept only beside a dead letter.
    assert list(redis_client.scan_iter(DEAD_BODY_PREFIX + "*")) == []
    # arq's own job-expiry would drop a job that waited out a long backlog: ours lasts longer.
    job_id = redis_client.zrange(DEFAULT_QUEUE, 0, -1)[0]
    assert redis_client.pttl(JOB_KEY_PREFIX.encode() + job_id) > 7 * 24 * 3600 * 1000


async def test_redelivery_and_rebatching_queue_only_new_notifications(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    old, new = contact(Email="old@example.org"), contact(Email="new@example.org")
    first = outbound_message([old])
    assert ACK_TEXT in (await client.post(URL, content=first, headers=XML)).text
    # Long after arq's one-hour result retention: its job and result keys are gone.
    for key in redis_client.scan_iter("arq:*"):
        redis_client.delete(key)
    seen_key = f"{SEEN_PREFIX}{ORG_ID[:15]}:{old.notification_id}"
    assert redis_client.ttl(seen_key) >= 25 * 3600
    assert ACK_TEXT in (await client.post(URL, content=first, headers=XML)).text
    assert queued_notification_ids(redis_client) == []
    rebatched = outbound_message([old, new])
    assert ACK_TEXT in (await client.post(URL, content=rebatched, headers=XML)).text
    assert queued_notification_ids(redis_client) == [new.notification_id]
    assert redis_client.hget(STATS_KEY, "duplicates") == b"2"


async def test_a_rebatched_message_is_cut_into_its_notifications_byte_for_byte(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Names in any script, a skipped object and a redelivery in one message: only the new
    Contacts are queued, each with its own fields, however many bytes a character takes."""
    client = await make_client()
    seen = contact(Email="seen@example.org", FirstName="Ødegård", LastName="Ζωή")
    assert ACK_TEXT in (await client.post(URL, content=outbound_message([seen]), headers=XML)).text
    for key in redis_client.scan_iter("arq:*"):
        redis_client.delete(key)
    account = Record("Account", {"Id": "0011I000008ZxYzQAK", "Name": "Ünïcödé & Söhne"})
    first = contact(Email="first@example.org", FirstName="鈴木", LastName="𠮷野")
    last = contact(Email="last@example.org", FirstName="Zoë", LastName='O\'Brien, "Jr"')
    body = outbound_message([seen, first, account, last])
    assert ACK_TEXT in (await client.post(URL, content=body, headers=XML)).text
    [job] = queued_jobs(redis_client)
    assert [(n.id, n.fields["FirstName"], n.fields["LastName"]) for n in job.notifications] == [
        (first.notification_id, "鈴木", "𠮷野"),
        (last.notification_id, "Zoë", 'O\'Brien, "Jr"'),
    ]
    assert redis_client.hget(STATS_KEY, "skipped") == b"1"
    assert redis_client.hget(STATS_KEY, "duplicates") == b"1"


async def test_unhandled_objects_are_acked_and_counted_as_skipped(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    account = Record("Account", {"Id": "0011I000008ZxYzQAK", "Name": "Acme"})
    body = outbound_message([account, contact(Email="c@example.org")])
    assert ACK_TEXT in (await client.post(URL, content=body, headers=XML)).text
    assert redis_client.hget(STATS_KEY, "skipped") == b"1"
    assert len(queued_notification_ids(redis_client)) == 1


async def test_unusable_notification_becomes_a_dead_letter_and_the_rest_is_queued(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    good = contact(Email="good@example.org")
    body = outbound_message([good]).replace(
        b"   </Notification>\n  </notifications>",
        b"   </Notification>\n   <Notification>\n    <Id>04l1I000000fzzzQAA</Id>\n"
        b'    <sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">\n'
        b"     <sf:Email>noid@example.org</sf:Email>\n    </sObject>\n   </Notification>\n"
        b"  </notifications>",
    )
    response = await client.post(URL, content=body, headers=XML)
    assert ACK_TEXT in response.text
    assert queued_notification_ids(redis_client) == [good.notification_id]
    [(seen_key, raw)] = redis_client.hgetall(DEAD_KEY).items()
    assert seen_key.decode().endswith(":04l1I000000fzzzQAA")
    dead = orjson.loads(raw)
    assert dead["notification_id"] == "04l1I000000fzzzQAA"
    assert dead["reason"] == "Contact has no sf:Id"
    assert redis_client.get(DEAD_BODY_PREFIX + dead["body_sha256"]) == body
    # Redelivered, it is neither queued nor dead-lettered twice.
    assert ACK_TEXT in (await client.post(URL, content=body, headers=XML)).text
    assert redis_client.hlen(DEAD_KEY) == 1
    assert len(queued_jobs(redis_client)) == 1


async def test_fields_no_wsdl_declares_are_reported_once(
    make_client: ClientFactory, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    for _ in range(2):
        body = outbound_message([contact(Email="a@example.org", Title="CEO", Phone="1")])
        assert ACK_TEXT in (await client.post(URL, content=body, headers=XML)).text
    reports = [r.getMessage() for r in caplog.records if "not declared" in r.getMessage()]
    assert reports == [
        f"Contact.{name} is not declared by any WSDL in SFRELAY_WSDL_DIR: passed on as text; "
        "add this Outbound Message's WSDL to type it"
        for name in ("Phone", "Title")
    ]
    assert [n.fields["Title"] for n in queued_jobs_notifications(redis_client)] == ["CEO"] * 2


@pytest.mark.parametrize(
    "name",
    [
        "aspnet_WebHooks__Salesforce.xml",
        "aspnet_AspNetWebHooks__OutboundMessage1.xml",
        "mulesoft-labs_sfdc-outbound-message-demo__sample_sfdc_outbound.xml",
        "guardian_salesforce-message-handler__soapNotificationsRequest.xml",
    ],
)
async def test_real_messages_are_acked(
    name: str, make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(
        org_ids=["012345678901234", "0123456789ABCDENNN", "00DQ0000000EB93", "someOrganizationId"]
    )
    response = await client.post(URL, content=shared_message(name), headers=XML)
    assert response.status_code == 200, response.text
    assert ACK_TEXT in response.text
    stored = (
        len(queued_notification_ids(redis_client))
        + int(redis_client.hget(STATS_KEY, "skipped") or 0)
        + redis_client.hlen(DEAD_KEY)
    )
    assert stored == shared_message(name).count(b"<Notification>")


async def test_org_ids_compare_on_the_case_restoring_checksum(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(org_ids=[ORG_ID[:15]])
    body = outbound_message([contact(Email="a@example.org")], org_id=ORG_ID.upper())
    assert ACK_TEXT in (await client.post(URL, content=body, headers=XML)).text
    other = "00D1I000003QQQEUAQ"[:15] + "AAA"  # another org: same letters, other case
    response = await client.post(
        URL, content=outbound_message([contact()], org_id=other), headers=XML
    )
    assert response.status_code == 403


# --- one test per refusal: exact response, and Redis untouched ---------------------------------


async def assert_refused(
    response: httpx.Response, status: int, faultstring: str, redis_client: redis.Redis
) -> None:
    assert response.status_code == status
    assert fault_of(response) == faultstring
    assert redis_client.dbsize() == 0


async def test_refuses_unknown_org(make_client: ClientFactory, redis_client: redis.Redis) -> None:
    client = await make_client()
    body = outbound_message([contact()], org_id="00D000000000001AAA")
    response = await client.post(URL, content=body, headers=XML)
    await assert_refused(
        response, 403, "organization 00D000000000001AAA is not in SFRELAY_ORG_IDS", redis_client
    )


async def test_refuses_missing_and_wrong_token(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(endpoint_token="s3cr3t-token-value")
    body = outbound_message([contact()])
    response = await client.post(URL, content=body, headers=XML)
    await assert_refused(
        response,
        401,
        "missing token: add ?token=&lt;SFRELAY_ENDPOINT_TOKEN&gt; to the endpoint URL",
        redis_client,
    )
    response = await client.post(URL + "?token=s3cr3t-token-valuE", content=body, headers=XML)
    await assert_refused(
        response,
        401,
        "wrong token: check the ?token= of the endpoint URL in Salesforce",
        redis_client,
    )
    response = await client.post(URL + "?token=s3cr3t-token-value", content=body, headers=XML)
    assert ACK_TEXT in response.text


async def test_refuses_addresses_outside_the_allowed_networks(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(allowed_networks=["10.0.0.0/8"])
    response = await client.post(URL, content=outbound_message([contact()]), headers=XML)
    await assert_refused(
        response, 403, "address 127.0.0.1 is not allowed to send Outbound Messages", redis_client
    )
    # Behind a trusted proxy, X-Forwarded-For names the sender; a forged left-most hop is ignored.
    proxied = await make_client(allowed_networks=["10.0.0.0/8"], trusted_proxies=["127.0.0.0/8"])
    headers = {**XML, "x-forwarded-for": "192.0.2.9, 10.1.2.3"}
    response = await proxied.post(URL, content=outbound_message([contact()]), headers=headers)
    assert ACK_TEXT in response.text
    headers = {**XML, "x-forwarded-for": "10.1.2.3, 192.0.2.9"}
    response = await proxied.post(URL, content=outbound_message([contact()]), headers=headers)
    assert response.status_code == 403
    assert fault_of(response) == "address 192.0.2.9 is not allowed to send Outbound Messages"


async def test_refuses_wrong_content_type(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    response = await client.post(
        URL, content=outbound_message([contact()]), headers={"content-type": "application/json"}
    )
    await assert_refused(
        response,
        415,
        "content type 'application/json' is not accepted: send text/xml (SOAP 1.1)",
        redis_client,
    )
    response = await client.post(
        URL, content=outbound_message([contact()]), headers={"content-type": "APPLICATION/XML"}
    )
    assert ACK_TEXT in response.text


async def test_refuses_a_compressed_body_saying_so(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    body = gzip.compress(outbound_message([contact()]))
    response = await client.post(URL, content=body, headers={**XML, "content-encoding": "gzip"})
    await assert_refused(
        response,
        415,
        "content encoding 'gzip' is not accepted: send the body uncompressed, as Salesforce does",
        redis_client,
    )
    response = await client.post(
        URL, content=outbound_message([contact()]), headers={**XML, "content-encoding": "identity"}
    )
    assert ACK_TEXT in response.text


async def test_refuses_oversize_bodies_by_header_and_by_stream(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(max_body_bytes=2048)
    big = outbound_message([contact(Email=f"u{i}@example.org") for i in range(20)])
    response = await client.post(URL, content=big, headers=XML)
    await assert_refused(
        response, 413, "the body exceeds 2048 bytes (SFRELAY_MAX_BODY_BYTES)", redis_client
    )

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    response = await client.post(URL, content=chunks(), headers=XML)  # no Content-Length
    await assert_refused(
        response, 413, "the body exceeds 2048 bytes (SFRELAY_MAX_BODY_BYTES)", redis_client
    )


@pytest.mark.parametrize(
    ("body", "faultstring"),
    [
        (
            b"<<<",
            "the body is not well-formed XML: StartTag: invalid element name, line 1, column 2",
        ),
        (
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>',
            "DOCTYPE and entity declarations are not accepted",
        ),
        (
            b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
            b'<o:other xmlns:o="http://soap.sforce.com/2005/09/outbound"/></s:Body></s:Envelope>',
            "unknown operation: expected notifications in http://soap.sforce.com/2005/09/outbound,"
            " got {http://soap.sforce.com/2005/09/outbound}other",
        ),
    ],
)
async def test_refuses_malformed_messages(
    body: bytes, faultstring: str, make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    response = await client.post(URL, content=body, headers=XML)
    await assert_refused(response, 400, faultstring, redis_client)


async def test_refuses_more_than_100_notifications(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client()
    body = outbound_message([contact(Email=f"u{i}@example.org") for i in range(101)])
    response = await client.post(URL, content=body, headers=XML)
    await assert_refused(response, 400, "more than 100 notifications in one message", redis_client)


async def test_redis_unreachable_faults_with_503_and_acks_nothing(
    settings: Settings, make_client: ClientFactory
) -> None:
    client = await make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    response = await client.post(URL, content=outbound_message([contact()]), headers=XML)
    assert response.status_code == 503
    assert fault_of(response).startswith("temporarily unavailable: the queue (Redis) did not")
    assert "<faultcode>soapenv:Server</faultcode>" in response.text
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"


async def test_health_readiness_and_wsdl(make_client: ClientFactory) -> None:
    client = await make_client()
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready", "redis": "ok"}
    contact_wsdl = await client.get(URL + "?wsdl")
    assert contact_wsdl.status_code == 200
    assert b'<complexType name="ContactNotification">' in contact_wsdl.content
    lead_wsdl = await client.get(URL + "?wsdl=Lead")
    assert b'<element name="IsConverted"' in lead_wsdl.content
    missing = await client.get(URL + "?wsdl=Account")
    assert missing.status_code == 404
    assert fault_of(missing) == "no WSDL for 'Account'; known objects: Contact, Lead"


async def test_start_up_warns_when_redis_would_not_keep_acked_messages(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def warnings_at_start_up(redis_url: str) -> list[str]:
        caplog.clear()
        app = create_app(
            Settings(
                _env_file=None,
                **{**settings.model_dump(), "redis_url": redis_url, "ack_durability": "memory"},
            )
        )
        async with app.router.lifespan_context(app):
            pass
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "sfrelay.receiver" and r.levelno >= logging.WARNING
        ]

    assert await warnings_at_start_up(settings.redis_url) == []
    careless = RedisServer(
        free_port(), tmp_path, ("--appendonly", "no", "--maxmemory-policy", "allkeys-lru")
    )
    careless.start()
    try:
        warnings = await warnings_at_start_up(careless.url)
    finally:
        careless.stop()
    assert warnings == [
        "Redis runs without AOF (appendonly no): acked notifications can be lost if Redis "
        "restarts; set appendonly yes",
        "Redis may evict keys (maxmemory-policy allkeys-lru): queued jobs could vanish; "
        "set maxmemory-policy noeviction",
    ]


def test_the_body_is_digested_only_when_a_notification_is_not_queued() -> None:
    """The ack path hashes the ~50 KB body only for what needs it: a skipped object or a
    dead letter (deduped by body and position, kept beside the body)."""
    contract = load_contract(DEFAULT_WSDL_DIR)
    usual = outbound_message([contact(Email="a@example.org"), contact(Email="b@example.org")])
    mixed = outbound_message(
        [contact(Email="c@example.org"), Record("Account", {"Id": "0011I000008ZxYzQAK"})]
    )
    handled = frozenset({"Contact", "Lead"})
    assert body_digest(parse_message(usual, contract, handled), handled, usual) is None
    digest = body_digest(parse_message(mixed, contract, handled), handled, mixed)
    assert digest == hashlib.sha256(mixed).hexdigest()


def test_a_mapped_field_no_wsdl_declares_is_served_with_a_warning(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The Outbound Message does not send what its WSDL does not declare: push never sets
    or clears that field in Drupal. A broken field map is the worker's to refuse."""
    default = (PROJECT_ROOT / "app" / "fieldmap.default.toml").read_text()
    mapped = tmp_path / "fieldmap.toml"
    mapped.write_text(
        default.replace(
            'field_last_name = "LastName"\n',
            'field_last_name = "LastName"\nfield_title = "Title"\n',
            1,
        )
    )
    broken = tmp_path / "broken.toml"
    broken.write_text("[Contact\n")
    with caplog.at_level(logging.WARNING, logger="sfrelay.receiver"):
        create_app(settings.model_copy(update={"field_map": mapped}))
        create_app(settings.model_copy(update={"field_map": broken}))
    assert [r.getMessage() for r in caplog.records if r.name == "sfrelay.receiver"] == [
        f"the Contact WSDL in {DEFAULT_WSDL_DIR} does not declare Title, which the field map "
        "reads: Outbound Messages without it leave it as it is in Drupal (only reconcile and "
        "backfill write it); add it to the Outbound Message's fields and its WSDL to "
        f"{DEFAULT_WSDL_DIR}"
    ]


def test_a_wsdl_without_a_version_field_is_served_with_a_warning(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without SystemModstamp or LastModifiedDate nothing orders a record's versions."""
    for name in ("contact.wsdl", "lead.wsdl"):
        text = (DEFAULT_WSDL_DIR / name).read_text()
        if name == "contact.wsdl":
            lines = text.splitlines(keepends=True)
            text = "".join(
                line
                for line in lines
                if '"SystemModstamp"' not in line and '"LastModifiedDate"' not in line
            )
        (tmp_path / name).write_text(text)
    with caplog.at_level(logging.WARNING, logger="sfrelay.receiver"):
        create_app(settings.model_copy(update={"wsdl_dir": tmp_path}))
        create_app(settings)
    assert [r.getMessage() for r in caplog.records if r.name == "sfrelay.receiver"] == [
        f"the Contact WSDL in {tmp_path} has neither SystemModstamp nor LastModifiedDate: "
        "Salesforce delivers out of order, and without a version an older notification can "
        "overwrite a newer one; add SystemModstamp to the Outbound Message's fields"
    ]
