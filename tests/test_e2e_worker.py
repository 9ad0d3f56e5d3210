"""End to end: Salesforce's messages -> uvicorn receiver -> Redis -> `sfrelay worker` -> Drupal."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import zeep

from app.config import DEFAULT_WSDL_DIR, Settings
from app.main import create_app
from app.receiver import ENDPOINT
from tests.factories import MODIFIED, ORG_ID, sf_id
from tests.fixtures_worker import (
    PROJECT,
    WorkerProcess,
    assert_drupal_can_load,
    drupal_users,
    settings_env,
)
from tests.messages import ESCAPED_NAME, Layout, contact, lead, outbound_message
from tests.servers import UvicornThread

BINDING = "{http://soap.sforce.com/2005/09/outbound}NotificationBinding"
XML = {"content-type": "text/xml; charset=UTF-8", "SOAPAction": '""'}


@pytest.fixture
def server(settings: Settings) -> Iterator[UvicornThread]:
    with UvicornThread(create_app(settings)) as running:
        yield running


def post(server: UvicornThread, body: bytes) -> int:
    return httpx.post(server.url + ENDPOINT, content=body, headers=XML, timeout=10).status_code


def drain(worker_process: type[WorkerProcess], settings: Settings, tmp_path: Path) -> WorkerProcess:
    worker = worker_process(settings, tmp_path, "--burst")
    assert worker.wait(60) == 0, worker.output()
    return worker


def test_shared_salesforce_messages_end_as_exact_drupal_rows(
    server: UvicornThread,
    shared_messages: dict[str, bytes],
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    statuses = {name: post(server, body) for name, body in shared_messages.items()}
    # Only aspnet/WebHooks' capture is from a configured org with a handled object; the
    # others carry placeholder or foreign organization ids, or no notification at all.
    assert statuses == {
        "aspnet_AspNetWebHooks__OutboundMessage1.xml": 403,
        "aspnet_AspNetWebHooks__OutboundMessage2.xml": 400,
        "aspnet_WebHooks__Salesforce.xml": 200,
        "guardian_salesforce-message-handler__soapNotificationsRequest.xml": 403,
        "mulesoft-labs_sfdc-outbound-message-demo__sample_sfdc_outbound.xml": 403,
    }
    worker = drain(worker_process, worker_settings, tmp_path)
    # Jeraldine Black has no Email in the capture (null fields are omitted): no account.
    assert drupal_users(drupal_db) == [
        (2, "Doug Bunting", "drb24@cornell.edu", 1, "Doug", "Bunting", "0031I0000081tb0QAA")
    ]
    assert_drupal_can_load(drupal_db)
    assert "created=1 skipped_no_email=1" in worker.output()
    stats = subprocess.run(
        [sys.executable, "-m", "app.cli", "queue", "stats"],
        cwd=tmp_path,
        env={**settings_env(worker_settings), "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [line.split() for line in stats.stdout.splitlines()][-2:] == [
        ["outcome:created", "1"],
        ["outcome:skipped_no_email", "1"],
    ]
    # Salesforce delivers again (it never saw our Ack, say): nothing is queued twice.
    assert post(server, shared_messages["aspnet_WebHooks__Salesforce.xml"]) == 200
    assert redis_client.zcard(worker_settings.queue_name) == 0


def test_generated_contacts_and_leads_create_update_and_skip(
    server: UvicornThread,
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    ada = contact(
        Email="ada@example.org",
        FirstName="Ada",
        LastName="Lovelace",
        SystemModstamp="2026-11-20T10:00:00.000Z",
    )
    nameless = contact(Email="x@example.org", SystemModstamp="2026-11-20T10:00:00.000Z")
    no_email = contact(FirstName="No", LastName="Mail")
    grace = lead(
        Email="grace@example.org",
        FirstName="Grace",
        LastName="Hopper",
        IsConverted="false",
        SystemModstamp="2026-11-20T10:00:00.000Z",
    )
    # One drain per message: a worker takes the jobs waiting together in either order
    # (a busy machine shows it), and the uids below are in the order applied.
    assert post(server, outbound_message([ada, nameless, no_email])) == 200
    drain(worker_process, worker_settings, tmp_path)
    assert post(server, outbound_message([grace])) == 200
    drain(worker_process, worker_settings, tmp_path)
    ada_id, grace_id, x_id = ada.fields["Id"], grace.fields["Id"], nameless.fields["Id"]
    assert drupal_users(drupal_db) == [
        (2, "Ada Lovelace", "ada@example.org", 1, "Ada", "Lovelace", ada_id),
        (3, "x", "x@example.org", 1, None, None, x_id),
        (4, "Grace Hopper", "grace@example.org", 1, "Grace", "Hopper", grace_id),
    ]
    # A later change of Ada's email, then an older, late delivery that must not win.
    newer = contact(Email="ada@lovelace.example", FirstName="Ada", LastName="Lovelace")
    newer.fields.update(Id=ada_id, SystemModstamp="2026-11-21T10:00:00.000Z")
    older = contact(Email="old@example.org", FirstName="Ada", LastName="Lovelace")
    older.fields.update(Id=ada_id, SystemModstamp="2026-11-19T10:00:00.000Z")
    assert post(server, outbound_message([newer])) == 200
    applied = drain(worker_process, worker_settings, tmp_path)
    assert post(server, outbound_message([older])) == 200
    worker = drain(worker_process, worker_settings, tmp_path)
    assert drupal_users(drupal_db)[0] == (
        2,
        "Ada Lovelace",
        "ada@lovelace.example",
        1,
        "Ada",
        "Lovelace",
        ada_id,
    )
    assert_drupal_can_load(drupal_db)
    assert "updated=1" in applied.output()
    assert "stale=1" in worker.output()


def test_a_field_cleared_in_salesforce_is_cleared_in_drupal(
    server: UvicornThread,
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    """Salesforce leaves a null field out of the message (no element, no xsi:nil): Ada's
    FirstName, cleared in Salesforce, is missing from her next notification, and must not
    stay in Drupal."""
    ada = contact(Email="ada@example.org", FirstName="Ada", LastName="Lovelace")
    ada.fields["SystemModstamp"] = "2026-11-20T10:00:00.000Z"
    assert post(server, outbound_message([ada])) == 200
    drain(worker_process, worker_settings, tmp_path)
    ada_id = ada.fields["Id"]
    assert drupal_users(drupal_db) == [
        (2, "Ada Lovelace", "ada@example.org", 1, "Ada", "Lovelace", ada_id)
    ]
    cleared = contact(Email="ada@example.org", LastName="Lovelace")
    cleared.fields.update(Id=ada_id, SystemModstamp="2026-11-21T10:00:00.000Z")
    assert post(server, outbound_message([cleared])) == 200
    worker = drain(worker_process, worker_settings, tmp_path)
    assert drupal_users(drupal_db) == [
        (2, "Ada Lovelace", "ada@example.org", 1, None, "Lovelace", ada_id)
    ]
    assert_drupal_can_load(drupal_db)
    assert "updated=1" in worker.output()


def test_zeep_as_salesforce_through_to_drupal(
    server: UvicornThread,
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    client = zeep.Client(str(DEFAULT_WSDL_DIR / "contact.wsdl"))
    service = client.create_service(BINDING, server.url + ENDPOINT)
    ack = service.notifications(
        OrganizationId=ORG_ID,
        ActionId=sf_id("04k", 1),
        SessionId=None,
        EnterpriseUrl="https://na73.salesforce.com/services/Soap/c/61.0/00D1I000003qqqE",
        PartnerUrl="https://na73.salesforce.com/services/Soap/u/61.0/00D1I000003qqqE",
        Notification=[
            {
                "Id": sf_id("04l", 900 + n),
                "sObject": {
                    "Id": sf_id("003", 900 + n),
                    "Email": f"zeep{n}@example.org",
                    "FirstName": "Zeep",
                    "LastName": f"Client{n}",
                },
            }
            for n in range(3)
        ],
    )
    assert ack is True
    drain(worker_process, worker_settings, tmp_path)
    assert drupal_users(drupal_db) == [
        (
            2 + n,
            f"Zeep Client{n}",
            f"zeep{n}@example.org",
            1,
            "Zeep",
            f"Client{n}",
            sf_id("003", 900 + n),
        )
        for n in range(3)
    ]
    assert_drupal_can_load(drupal_db)


def test_reshaped_real_messages_end_as_drupal_users(
    server: UvicornThread,
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    """Layouts of real captures (tests/test_e2e_receiver.py REAL_LAYOUTS) reach Drupal alike."""
    zoe = contact(Email="zoe@example.org", SystemModstamp=MODIFIED, **ESCAPED_NAME)
    grace = lead(Email="grace@example.org", IsConverted="false", SystemModstamp=MODIFIED)
    crlf_bom = Layout(newline="\r\n", bom=True, declaration="", session_element=False)
    assert post(server, outbound_message([zoe], layout=Layout(indent="", newline=""))) == 200
    first = drain(worker_process, worker_settings, tmp_path)  # one drain each: uids in order
    assert post(server, outbound_message([grace], layout=crlf_bom, nil=("LastName",))) == 200
    worker = drain(worker_process, worker_settings, tmp_path)
    zoe_id, grace_id = zoe.fields["Id"], grace.fields["Id"]
    assert drupal_users(drupal_db) == [
        # The fields as sent; the username without what Drupal refuses in one ("&", "<").
        (2, "Zoë O'Brien Søn", "zoe@example.org", 1, "Zoë", "O'Brien & <Søn>", zoe_id),
        (3, "grace", "grace@example.org", 1, None, None, grace_id),
    ]
    assert_drupal_can_load(drupal_db)
    assert "created=1" in first.output()
    assert "created=1" in worker.output()
