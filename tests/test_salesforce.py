"""The Salesforce client against a local HTTPS Salesforce: login flows, one session renewal,
paging without holding everything, limits, error mapping, the poll helpers' shapes."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from app.config import Settings
from app.errors import (
    ApiLimitReached,
    ConfigError,
    RetryableError,
    SalesforceLoginFailed,
    SalesforceQueryRefused,
    SalesforceRequestRefused,
    SalesforceUnavailable,
)
from app.jobs import JobNotification
from app.mapping import load_field_map
from app.records import to_record
from app.salesforce import SalesforceApi, SalesforceClient
from app.salesforce.soql import IDS_PER_QUERY
from tests import sfserver
from tests.factories import sf_id
from tests.fixtures_salesforce import sf_settings
from tests.sfserver import FakeOrg, SalesforceServer

FLOWS = ["jwt-bearer", "client-credentials", "oauth-password", "soap-login"]
T0 = datetime(2026, 11, 20, 8, 0, 0, tzinfo=UTC)


def client_for(
    server: SalesforceServer, flow: str = "jwt-bearer", **extra: Any
) -> SalesforceClient:
    return SalesforceClient(sf_settings(flow, server, **extra))


def add_contacts(org: FakeOrg, count: int, start: datetime = T0, step_s: float = 1) -> list[str]:
    ids = []
    for n in range(count):
        record_id = sf_id("003", n + 1)
        org.add(
            "Contact",
            record_id,
            Email=f"c{n + 1}@example.org",
            FirstName="Ada",
            LastName=f"L{n + 1}",
            SystemModstamp=start + timedelta(seconds=n * step_s),
        )
        ids.append(record_id)
    return ids


async def collect(pages: Any) -> list[JobNotification]:
    return [n async for page in pages for n in page]


# --- logins ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flow", "grant", "login_host"),
    [
        ("jwt-bearer", "token:urn:ietf:params:oauth:grant-type:jwt-bearer", "login.salesforce.com"),
        ("client-credentials", "token:client_credentials", "acme.my.salesforce.com"),
        ("oauth-password", "token:password", "login.salesforce.com"),
        ("soap-login", "soap:login", "login.salesforce.com"),
    ],
)
async def test_each_login_flow(
    sf_server: SalesforceServer, sf_org: FakeOrg, flow: str, grant: str, login_host: str
) -> None:
    client = client_for(sf_server, flow)
    try:
        assert client.flow == flow
        assert await client.login() == sfserver.INSTANCE
        assert sf_org.counts[grant] == 1
        assert sf_org.connects[0] == f"{login_host}:443"
        assert "FirstName" in await client.describe_fields("Contact")
        assert sf_org.connects[-1] == f"{sfserver.INSTANCE}:443"
        assert client.logins == 1
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("domain", "audience"),
    [
        ("acme.my", "login"),
        ("acme--uat.sandbox.my", "test"),
        ("acme--uat.my", "test"),  # a sandbox before enhanced domains
        ("test", "test"),
    ],
)
async def test_jwt_bearer_with_a_my_domain_asks_it_with_login_or_test_as_audience(
    sf_server: SalesforceServer, sf_org: FakeOrg, domain: str, audience: str
) -> None:
    """The JWT's audience may only be login or test.salesforce.com; SFRELAY_SF_DOMAIN set to
    a My Domain (as client credentials needs) must not break JWT bearer."""
    client = client_for(sf_server, "jwt-bearer", sf_domain=domain)
    try:
        assert await client.login() == sfserver.INSTANCE
        assert sf_org.counts["token:urn:ietf:params:oauth:grant-type:jwt-bearer"] == 1
        assert sf_org.connects[0] == f"{domain}.salesforce.com:443"
        assert sf_org.audiences == [f"https://{audience}.salesforce.com"]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("flow", "wrong", "code", "hint"),
    [
        ("jwt-bearer", {"sf_username": "someone@example.org"}, "invalid_grant", "pre-authorized"),
        (
            "client-credentials",
            {"sf_consumer_secret": "nope"},
            "invalid_client",
            "client credentials flow",
        ),
        ("oauth-password", {"sf_password": "nope"}, "invalid_grant", "SFRELAY_SF_SECURITY_TOKEN"),
        ("soap-login", {"sf_security_token": "nope"}, "INVALID_LOGIN", "SFRELAY_SF_PASSWORD"),
    ],
)
async def test_refused_login_says_what_to_check_and_calls_nothing(
    sf_server: SalesforceServer,
    sf_org: FakeOrg,
    flow: str,
    wrong: dict[str, str],
    code: str,
    hint: str,
) -> None:
    client = client_for(sf_server, flow, **wrong)
    try:
        with pytest.raises(SalesforceLoginFailed) as refused:
            await client.describe_fields("Contact")
        assert refused.value.error_code == code
        assert hint in str(refused.value)
        assert isinstance(refused.value, ConfigError)
        assert "nope" not in str(refused.value)
        assert sf_org.api_used == 0
        assert sf_org.counts["Contact:describe"] == 0
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sf_consumer_key": "k", "sf_consumer_secret": "s"},
            "client credentials login needs your My Domain",
        ),
        ({"sf_username": "u@example.org"}, "the Salesforce settings are incomplete"),
        ({"sf_private_key_file": "/nonexistent.key"}, "also needs SFRELAY_SF_CONSUMER_KEY and"),
        (
            {"sf_username": "u@example.org", "sf_password": "p", "sf_api_version": "65.0"},
            r"SOAP login\(\) does not exist in API 65\.0",
        ),
    ],
)
def test_incomplete_credentials_are_refused_before_any_request(
    sf_org: FakeOrg, values: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SalesforceClient(Settings(_env_file=None, **values))
    assert sf_org.connects == []


async def test_missing_private_key_file(sf_server: SalesforceServer, sf_org: FakeOrg) -> None:
    client = client_for(sf_server, sf_private_key_file="/nonexistent/key.pem")
    with pytest.raises(ConfigError, match="SFRELAY_SF_PRIVATE_KEY_FILE: no file at"):
        await client.login()
    assert sf_org.connects == []
    await client.close()


def test_settings_refuse_a_url_as_domain_and_a_v_version() -> None:
    with pytest.raises(ValueError, match=r"the part before \.salesforce\.com"):
        Settings(_env_file=None, sf_domain="https://acme.my.salesforce.com")
    with pytest.raises(ValueError, match="no leading v"):
        Settings(_env_file=None, sf_api_version="v62.0")


def test_blank_salesforce_settings_mean_not_configured() -> None:
    from app.salesforce import salesforce_configured

    blank = Settings(
        _env_file=None,
        sf_username=" ",
        sf_password="",
        sf_consumer_key="",
        sf_consumer_secret="",
        sf_private_key_file="",
    )
    assert blank.sf_private_key_file is None
    assert not salesforce_configured(blank)


def test_secrets_are_not_in_the_settings_repr(sf_server: SalesforceServer) -> None:
    settings = sf_settings("oauth-password", sf_server)
    text = repr(settings) + str(settings.model_dump())
    for secret in (sfserver.PASSWORD, sfserver.SECURITY_TOKEN, sfserver.CONSUMER_SECRET):
        assert secret not in text


# --- session renewal ------------------------------------------------------------------------


async def test_expired_session_is_renewed_once_transparently(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    client = client_for(sf_server)
    try:
        await client.login()
        sf_org.expire_sessions()
        assert "Email" in await client.describe_fields("Contact")
        assert sf_org.counts["401"] == 1
        assert client.logins == 2
        assert await client.describe_fields("Lead")  # the new session simply works
        assert client.logins == 2
    finally:
        await client.close()


async def test_a_refused_renewed_session_is_an_error_not_a_loop(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    client = client_for(sf_server)
    try:
        await client.login()
        sf_org.reject_all_sessions = True
        with pytest.raises(SalesforceLoginFailed) as refused:
            await client.describe_fields("Contact")
        assert refused.value.error_code == "INVALID_SESSION_ID"
        assert sf_org.counts["401"] == 2  # the first attempt and the one after renewing
        assert client.logins == 2
        assert sf_org.counts["token:urn:ietf:params:oauth:grant-type:jwt-bearer"] == 2
    finally:
        await client.close()


async def test_concurrent_calls_share_one_renewal(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    client = client_for(sf_server)
    try:
        await client.login()
        sf_org.expire_sessions()
        results = await asyncio.gather(*(client.describe_fields("Contact") for _ in range(4)))
        assert all("Email" in r for r in results)
        assert client.logins == 2
    finally:
        await client.close()


async def test_calls_run_off_the_event_loop(sf_server: SalesforceServer, sf_org: FakeOrg) -> None:
    client = client_for(sf_server)
    try:
        await client.login()
        sf_org.hold = True
        call = asyncio.create_task(client.describe_fields("Contact"))
        # The server holds the request until this coroutine, on the same loop, releases it:
        # a call blocking the loop would never let it run (the server then answers 503).
        while not sf_org.arrived.is_set():
            await asyncio.sleep(0.01)
        assert not call.done()
        sf_org.release.set()
        assert "Email" in await call
    finally:
        await client.close()


# --- polls ----------------------------------------------------------------------------------


async def test_changed_records_page_by_page_in_the_queue_shape(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    sf_org.page_size = 100
    ids = add_contacts(sf_org, 350)
    client = client_for(sf_server)
    api: SalesforceApi = client
    try:
        pages = api.changed_records("Contact", T0, T0 + timedelta(hours=1))
        first = await anext(pages)
        # Only the first page was asked for and sent: nothing beyond it exists here.
        assert len(first) == 100
        assert (sf_org.counts["query"], sf_org.counts["query_more"]) == (1, 0)
        assert sf_org.served_records == 100
        rest = [n async for page in pages for n in page]
        assert sf_org.counts["query_more"] == 3
        notifications = first + rest
        assert [n.fields["Id"] for n in notifications] == ids
        one = notifications[0]
        assert one == JobNotification(
            f"{ids[0]}@20261120080000000",
            "Contact",
            {
                "Id": ids[0],
                "Email": "c1@example.org",
                "FirstName": "Ada",
                "LastName": "L1",
                "SystemModstamp": "2026-11-20T08:00:00.000Z",
                "LastModifiedDate": "2026-11-20T08:00:00.000Z",
                "IsDeleted": False,
                "MasterRecordId": None,
            },
        )
        record = to_record(0, one, load_field_map(None))  # the rules read it as pushed
        assert record.email == "c1@example.org"
        assert record.modstamp == int(T0.timestamp() * 1_000_000)
        assert "SystemModstamp >= 2026-11-20T08:00:00Z" in sf_org.last_query
    finally:
        await client.close()


async def test_changed_records_window_is_half_open_and_utc(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    ids = add_contacts(sf_org, 5, start=T0 - timedelta(seconds=1))  # T0-1s, T0, ..., T0+3s
    client = client_for(sf_server)
    try:
        cet = T0.astimezone(ZoneInfo("Europe/Paris"))
        found = await collect(client.changed_records("Contact", cet, T0 + timedelta(seconds=3)))
        assert [n.fields["Id"] for n in found] == ids[1:4]
        with pytest.raises(ValueError, match="has no time zone"):
            client.changed_records("Contact", datetime(2026, 11, 20), T0)
        assert sf_org.counts["query"] == 1
    finally:
        await client.close()


async def test_lead_fields_and_deleted_merged_records_with_query_all(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    winner, loser = sf_id("003", 1), sf_id("003", 2)
    sf_org.add("Contact", winner, Email="w@example.org", SystemModstamp=T0)
    sf_org.add("Contact", loser, Email="l@example.org", SystemModstamp=T0)
    sf_org.delete("Contact", loser, T0 + timedelta(minutes=1), master=winner)
    lead = sf_id("00Q", 1)
    sf_org.add(
        "Lead",
        lead,
        Email="x@example.org",
        IsConverted=True,
        ConvertedContactId=winner,
        SystemModstamp=T0,
    )
    client = client_for(sf_server)
    try:
        end = T0 + timedelta(hours=1)
        live = await collect(client.changed_records("Contact", T0, end))
        assert [n.fields["Id"] for n in live] == [winner]
        everything = await collect(client.changed_records("Contact", T0, end, include_deleted=True))
        deleted = everything[1].fields
        assert (deleted["Id"], deleted["IsDeleted"], deleted["MasterRecordId"]) == (
            loser,
            True,
            winner,
        )
        (lead_notification,) = await collect(client.changed_records("Lead", T0, end))
        assert lead_notification.fields["IsConverted"] is True
        assert lead_notification.fields["ConvertedContactId"] == winner
    finally:
        await client.close()


async def test_records_by_id_in_batches_under_the_url_limit(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    ids = add_contacts(sf_org, 650)
    sf_org.delete("Contact", ids[5], T0 + timedelta(hours=1))
    wanted = [*ids, ids[0], ids[1][:15], sf_id("003", 9999)]  # a repeat, a 15-char form, unknown
    client = client_for(sf_server)
    try:
        found = await collect(client.records_by_id("Contact", wanted))
        assert sorted(n.fields["Id"] for n in found) == sorted(set(ids) - {ids[5]})
        assert sf_org.counts["query"] == -(-651 // IDS_PER_QUERY) == 3
        assert max(sf_org.request_lines) < 16_384
        with_deleted = await collect(
            client.records_by_id("Contact", [ids[5]], include_deleted=True)
        )
        assert with_deleted[0].fields["IsDeleted"] is True
        with pytest.raises(ValueError, match="is not a Salesforce record Id"):
            await collect(client.records_by_id("Contact", ["003' OR Id != '"]))
        assert sf_org.counts["query"] + sf_org.counts["queryAll"] == 4
    finally:
        await client.close()


async def test_deleted_and_updated_windows_and_server_time(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    now = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)  # the server's clock, years from ours
    sf_org.fixed_time = now
    ids = add_contacts(sf_org, 3, start=now - timedelta(hours=2))
    sf_org.delete("Contact", ids[1], now - timedelta(minutes=30))
    client = client_for(sf_server)
    try:
        assert await client.server_time() == now
        window = await client.deleted_records("Contact", now - timedelta(days=1), now)
        assert [(r.id, r.deleted_at) for r in window.records] == [
            (ids[1], now - timedelta(minutes=30))
        ]
        assert window.latest_covered == now.replace(second=0)
        assert window.earliest_available == now - timedelta(days=15)
        updated = await client.updated_ids("Contact", now - timedelta(days=1), now)
        assert updated.ids == [ids[0], ids[2]]
        assert updated.latest_covered == now.replace(second=0)
    finally:
        await client.close()


async def test_the_delete_log_outlives_query_all_and_refuses_what_it_no_longer_keeps(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    """getDeleted lists a hard-deleted record (gone from queryAll) and a restored one; seconds
    are ignored; a start older than earliestDateAvailable, or less than a minute before the
    end, is refused with INVALID_REPLICATION_DATE (a SalesforceRequestRefused)."""
    now = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    sf_org.fixed_time = now
    ids = add_contacts(sf_org, 3, start=now - timedelta(hours=2))
    sf_org.hard_delete("Contact", ids[0], now - timedelta(minutes=30, seconds=5))
    sf_org.delete("Contact", ids[1], now - timedelta(minutes=20))
    sf_org.undelete("Contact", ids[1], now - timedelta(minutes=10))
    client = client_for(sf_server)
    try:
        everything = await collect(
            client.changed_records("Contact", now - timedelta(days=1), now, include_deleted=True)
        )
        assert [n.fields["Id"] for n in everything] == ids[2:] + ids[1:2]
        assert not await collect(client.records_by_id("Contact", ids[:1], include_deleted=True))
        # Seconds ignored: a start of 07:38:04 covers the deletion at 07:38:04.
        window = await client.deleted_records(
            "Contact", now - timedelta(minutes=30, seconds=5), now
        )
        assert [(r.id, r.deleted_at) for r in window.records] == [
            (ids[0], now - timedelta(minutes=30, seconds=5)),
            (ids[1], now - timedelta(minutes=20)),
        ]
        assert window.latest_covered == now.replace(second=0)
        refusals = [
            (now - timedelta(days=15, minutes=1), "startDate before org replication enabled date"),
            (now - timedelta(seconds=40), "startDate must be at least one minute greater than"),
        ]
        sf_org.purge_delete_log(now - timedelta(hours=1))
        refusals.append((now - timedelta(hours=2), "startDate before org replication enabled"))
        for start, message in refusals:
            with pytest.raises(SalesforceRequestRefused, match=message) as refused:
                await client.deleted_records("Contact", start, now)
            assert refused.value.error_code == "INVALID_REPLICATION_DATE"
        window = await client.deleted_records("Contact", now - timedelta(minutes=59), now)
        assert window.earliest_available == now - timedelta(hours=1)
    finally:
        await client.close()


# --- limits and errors ----------------------------------------------------------------------


async def test_poll_refused_when_too_few_api_requests_left(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    sf_org.api_used = 14_500
    client = client_for(sf_server)
    try:
        with pytest.raises(ApiLimitReached, match=r"only 499 of the org's 15000 daily API"):
            await client.require_api_headroom()
        assert sf_org.counts["query"] == 0
        sf_org.api_used = 1000  # the next day: a low reading is read again, not kept
        usage = await client.require_api_headroom()
        assert (usage.used, usage.max, usage.remaining) == (1001, 15_000, 13_999)
        await client.describe_fields("Contact")
        assert client.api_usage is not None and client.api_usage.used == 1002
    finally:
        await client.close()


async def test_api_limit_reached_mid_run_stops_between_pages(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    sf_org.page_size = 100
    add_contacts(sf_org, 300)
    sf_org.api_max = 1000
    client = client_for(sf_server, sf_min_api_remaining=999)
    try:
        await client.require_api_headroom()  # 999 left: enough to start
        pages = client.changed_records("Contact", T0, T0 + timedelta(hours=1))
        assert len(await anext(pages)) == 100  # this page's request left 998
        with pytest.raises(ApiLimitReached, match="polling stops here"):
            await anext(pages)
        assert sf_org.counts["query_more"] == 0
    finally:
        await client.close()


async def test_request_limit_exceeded_is_retryable(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    sf_org.api_used = sf_org.api_max
    client = client_for(sf_server, sf_min_api_remaining=0)
    try:
        with pytest.raises(ApiLimitReached) as limited:
            await collect(client.changed_records("Contact", T0, T0 + timedelta(hours=1)))
        assert limited.value.error_code == "REQUEST_LIMIT_EXCEEDED"
        assert isinstance(limited.value, RetryableError)
        assert sf_org.served_records == 0
    finally:
        await client.close()


async def test_the_concurrent_request_limit_is_not_the_daily_one(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    """REQUEST_LIMIT_EXCEEDED also means too many long requests running at once: soon over,
    and not the daily limit the polls' reserve is about."""
    message = "ConcurrentPerOrgLongTxn Limit exceeded."
    sf_org.fail_next = [(403, "REQUEST_LIMIT_EXCEEDED", message)]
    client = client_for(sf_server)
    try:
        with pytest.raises(SalesforceUnavailable) as busy:
            await collect(client.changed_records("Contact", T0, T0 + timedelta(hours=1)))
        assert not isinstance(busy.value, ApiLimitReached)
        assert str(busy.value) == (
            "Salesforce refused the Contact changes: too many long-running requests at once in "
            f"the org ({message}); the next run tries again"
        )
        assert isinstance(busy.value, RetryableError)
    finally:
        await client.close()


async def test_a_field_the_org_lacks_is_a_config_error_naming_it(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    del sf_org.fields["Contact"]["FirstName"]
    client = client_for(sf_server)
    try:
        with pytest.raises(SalesforceQueryRefused) as refused:
            await collect(client.changed_records("Contact", T0, T0 + timedelta(hours=1)))
        assert (refused.value.error_code, refused.value.sobject, refused.value.field) == (
            "INVALID_FIELD",
            "Contact",
            "FirstName",
        )
        assert "Salesforce has no readable field Contact.FirstName" in str(refused.value)
        assert isinstance(refused.value, ConfigError)
        assert await client.missing_fields("Contact") == ["FirstName"]
        assert await client.missing_fields("Lead") == []
    finally:
        await client.close()


async def test_malformed_query_is_a_config_error(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    client = client_for(sf_server)
    try:
        await client.login()
        sf_org.fail_next = [(400, "MALFORMED_QUERY", "unexpected token: 'FROM'")]
        with pytest.raises(SalesforceQueryRefused, match=r"\(MALFORMED_QUERY\): unexpected token"):
            await collect(client.changed_records("Contact", T0, T0 + timedelta(hours=1)))
    finally:
        await client.close()


async def test_server_errors_and_network_errors_are_retryable(
    sf_server: SalesforceServer, sf_org: FakeOrg, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(sf_server)
    try:
        await client.login()
        sf_org.fail_next = [(503, "SERVER_UNAVAILABLE", "down for maintenance")]
        with pytest.raises(SalesforceUnavailable, match="HTTP 503, SERVER_UNAVAILABLE"):
            await client.describe_fields("Contact")
        assert "Email" in await client.describe_fields("Contact")  # the next try works
    finally:
        await client.close()
    # Nothing listens on the proxy's port now: the login cannot even connect.
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    offline = client_for(sf_server)
    try:
        with pytest.raises(SalesforceUnavailable, match=r"cannot reach login\.salesforce\.com"):
            await offline.login()
    finally:
        await offline.close()


async def test_session_expiring_between_pages_is_renewed_and_paging_goes_on(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    sf_org.page_size = 10
    ids = add_contacts(sf_org, 25)
    client = client_for(sf_server)
    try:
        pages = client.changed_records("Contact", T0, T0 + timedelta(hours=1))
        first = await anext(pages)
        sf_org.expire_sessions()
        rest = [n async for page in pages for n in page]
        assert [n.fields["Id"] for n in first + rest] == ids
        assert (client.logins, sf_org.counts["401"], sf_org.counts["query_more"]) == (2, 1, 2)
    finally:
        await client.close()
