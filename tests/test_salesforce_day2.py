"""What Salesforce admins and the org do over months while sfrelay runs: credentials refused,
API versions retired, objects and fields made unreadable. Each against the local Salesforce,
real Redis and a Drupal 10 SQLite copy."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
import redis

from app.check import check_salesforce
from app.config import Settings
from app.errors import SalesforceLoginFailed
from app.queue import DEAD_KEY, RECONCILE_DUE_KEY
from app.reconcile import run_reconcile
from app.salesforce import SalesforceClient
from tests.conftest import Cli
from tests.factories import note, sf
from tests.fixtures_salesforce import sf_env, sf_settings
from tests.fixtures_worker import drupal_users, reaped, run_worker, settings_env
from tests.sfserver import FakeOrg, SalesforceServer
from tests.test_purge import enqueue
from tests.test_reconcile import T0, add, queued, rc_settings

__all__ = ["rc_settings"]

JWT_REFUSED = (
    "Salesforce refused the login (jwt-bearer at login.salesforce.com): invalid_grant: user "
    "hasn't approved this consumer; check SFRELAY_SF_CONSUMER_KEY, SFRELAY_SF_USERNAME, that "
    "the certificate of SFRELAY_SF_PRIVATE_KEY_FILE is the Connected App's, and that the user "
    "is pre-authorized (Admin approved users + the user's profile or permission set)"
)


def last_names(path: Path) -> dict[str, str]:
    return {row[6]: row[5] for row in drupal_users(path)}


async def test_a_refused_login_never_keeps_a_worker_from_applying_what_salesforce_pushes(
    rc_settings: Settings,
    sf_org: FakeOrg,
    drupal_db: Path,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Months in, the Connected App's policy changes (or the certificate is rotated, the
    user deactivated): Salesforce refuses the login. A worker started then (a deploy, its
    memory guard) must still apply pushed notifications, which need no API; the log says
    what to fix. Before, it refused to start: push stopped with the reconcile safety net."""
    sf_org.fixed_time = T0 + timedelta(hours=1)
    assert (await run_reconcile(rc_settings, since=T0)).errors == 0  # it worked for months
    settings = rc_settings.model_copy(
        update={"reconcile_every_seconds": 600, "sf_username": "moved-on@example.org"}
    )
    await enqueue(settings, [[note(sf(1), "r1@example.org", "R", "Pushed")]])
    with caplog.at_level(logging.WARNING):
        await run_worker(settings)
    assert last_names(drupal_db) == {sf(1): "Pushed"}
    assert int(redis_client.hget("sfrelay:stats", "outcome:created") or 0) == 1
    errors = [r.getMessage() for r in caplog.records if r.name == "sfrelay.reconcile"]
    assert errors == [
        f"{JWT_REFUSED}: reconcile cannot run until this is fixed; pushed notifications are "
        "still applied (`sfrelay check` shows every part)",
        f"reconcile stopped: {JWT_REFUSED}",  # the cron job's run at start, said once
    ]
    assert sf_org.counts["token:urn:ietf:params:oauth:grant-type:jwt-bearer"] == 3


def test_refetch_mode_stops_and_keeps_its_jobs_when_salesforce_refuses_the_login_mid_run(
    rc_settings: Settings,
    sf_org: FakeOrg,
    sf_server: SalesforceServer,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    """Refetch mode reads every record: the Connected App's policy changed under a running
    worker (its session revoked, every login refused), each notification would fail alike.
    The worker stops (exit 0, for its supervisor) and leaves its jobs queued, none a dead
    letter; a restart refuses, saying what to fix; fixed, the jobs apply. Before, every job
    became a dead letter at once, each after a login attempt of its own."""
    refetch = rc_settings.model_copy(update={"payload_mode": "refetch"})
    for n in range(1, 5):
        sf_org.add("Contact", sf(n), Email=f"r{n}@example.org", FirstName="R",
                   LastName=f"Now{n}", SystemModstamp=T0)  # fmt: skip
    env = sf_env(refetch, sf_server, payload_mode="refetch")

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        with (tmp_path / name).open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", *args],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    worker = start("first.log")
    with reaped(worker):
        asyncio.run(enqueue(refetch, [[note(sf(1), "r1@example.org", "R", "Pushed1")]]))
        deadline = time.monotonic() + 30
        while last_names(drupal_db) != {sf(1): "Now1"}:
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        logins = sf_org.counts["token:urn:ietf:params:oauth:grant-type:jwt-bearer"]
        sf_org.refuse_logins = (400, "invalid_grant", "user hasn't approved this consumer")
        sf_org.expire_sessions()
        asyncio.run(
            enqueue(refetch, [[note(sf(n), f"r{n}@example.org", "R", "P")] for n in (2, 3, 4)])
        )
        assert worker.wait(30) == 0
    assert (
        f"{JWT_REFUSED}: refetch mode reads every record from Salesforce; the worker stops and "
        "leaves its jobs queued"
    ) in (tmp_path / "first.log").read_text()
    assert redis_client.zcard(refetch.queue_name) == 3
    assert redis_client.hlen(DEAD_KEY) == 0
    assert b"outcome:dead" not in redis_client.hgetall("sfrelay:stats")
    assert last_names(drupal_db) == {sf(1): "Now1"}
    # No login per job: the jobs the worker had taken at once, at most.
    assert sf_org.counts["token:urn:ietf:params:oauth:grant-type:jwt-bearer"] - logins <= 3
    restarted = start("restarted.log")
    with reaped(restarted):
        assert restarted.wait(30) != 0
    assert JWT_REFUSED in (tmp_path / "restarted.log").read_text()
    sf_org.refuse_logins = None  # the administrator put the policy back
    fixed = start("fixed.log", "--burst")
    with reaped(fixed):
        assert fixed.wait(60) == 0
    assert last_names(drupal_db) == {sf(n): f"Now{n}" for n in range(1, 5)}
    assert redis_client.hlen(DEAD_KEY) == 0


async def test_a_retired_api_version_names_the_setting_to_change(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, redis_client: redis.Redis
) -> None:
    """Salesforce retires API versions over 3 years old (410 GONE on every REST resource):
    reconcile and `sfrelay check` say which setting to change, not 'refused limits'."""
    sf_org.fixed_time = T0 + timedelta(hours=1)
    add(sf_org, 1, T0 + timedelta(minutes=1))
    old = rc_settings.model_copy(update={"sf_api_version": "30.0"})
    retired = (
        "Salesforce no longer serves API version 30.0 (HTTP 410, GONE: API version 30.0 is "
        "retired): set SFRELAY_SF_API_VERSION to a version the org serves (62.0, sfrelay's "
        "default, or later)"
    )
    report = await run_reconcile(old, since=T0)
    assert (report.errors, report.queued, report.stopped) == (1, 0, retired)
    assert await queued(old) == 0
    result, outbound = await check_salesforce(old)
    assert (result.status, result.detail) == ("failed", retired)
    assert (outbound.status, outbound.detail) == (
        "skipped",
        "not compared: the Salesforce part failed (see its line)",
    )


async def test_an_object_the_integration_user_can_no_longer_read_is_named_and_only_it_stops(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, redis_client: redis.Redis
) -> None:
    """An administrator takes Read on Lead from the integration user's profile: SOQL calls
    Lead 'not supported' (INVALID_TYPE) and its describe does not exist (404). Reconcile still
    queues the Contacts and says what to do about Lead; `sfrelay check` says the same, not
    'The requested resource does not exist' or a SOQL excerpt cut before the reason."""
    sf_org.fixed_time = T0 + timedelta(hours=1)
    contact = add(sf_org, 1, T0 + timedelta(minutes=1))
    sf_org.unreadable_objects.add("Lead")
    cannot = (
        "the integration user cannot read Lead (INVALID_TYPE: sObject type 'Lead' is not "
        "supported): give it Read on Lead (its profile or a permission set), or leave Lead "
        "out of SFRELAY_HANDLED_OBJECTS"
    )
    report = await run_reconcile(rc_settings, since=T0)
    assert (report.errors, report.queued, report.stopped) == (1, 1, f"Lead: {cannot}")
    assert await queued(rc_settings) == 1
    await run_worker(rc_settings.model_copy(update={"reconcile_every_seconds": 0}))
    assert list(last_names(drupal_db)) == [contact]
    result, outbound = await check_salesforce(rc_settings)
    assert (outbound.status, outbound.detail) == (
        "skipped",
        "not compared: the Salesforce part failed (see its line)",
    )
    assert (result.status, result.detail) == (
        "failed",
        "the integration user cannot read Lead (NOT_FOUND on sobjects/Lead/describe): give "
        "it Read on "
        "Lead (its profile or a permission set), or leave Lead out of SFRELAY_HANDLED_OBJECTS",
    )


def test_a_backfill_whose_login_is_refused_stops_at_once_and_says_so(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, cli: Cli
) -> None:
    """`sfrelay backfill` of Contact and Lead with a login Salesforce refuses: one login
    attempt, not one per object, and the summary says the run stopped. Before, it asked for
    a second login for Lead, counted two errors, and printed 'backfill done: ...'."""
    sf_org.refuse_logins = (400, "invalid_grant", "user hasn't approved this consumer")
    env = settings_env(
        rc_settings,
        sf_username=rc_settings.sf_username,
        sf_consumer_key=rc_settings.sf_consumer_key,
        sf_private_key_file=rc_settings.sf_private_key_file,
    )
    run = cli(env, "backfill")
    assert run.returncode == 1
    assert run.stderr == (
        f"sfrelay: backfill stopped early: Contact: {JWT_REFUSED}; run it again to resume\n"
    )
    assert run.stdout.startswith(
        "backfill stopped: queried 0, queued 0, current 0, no_email 0, deleted 0, merged 0, "
        "purged 0, errors 1 in "
    )
    assert sf_org.counts["token:urn:ietf:params:oauth:grant-type:jwt-bearer"] == 1
    assert sf_org.api_used == 0


async def test_a_soap_login_at_a_retired_api_version_names_the_setting_to_change(
    sf_server: SalesforceServer, sf_org: FakeOrg
) -> None:
    """The legacy SOAP login at a retired version: Salesforce's fault says the version is
    too old; sfrelay's hint must not send the operator to the password and token."""
    client = SalesforceClient(sf_settings("soap-login", sf_server, sf_api_version="30.0"))
    try:
        with pytest.raises(SalesforceLoginFailed) as refused:
            await client.login()
    finally:
        await client.close()
    assert str(refused.value) == (
        "Salesforce refused the login (soap-login at login.salesforce.com): "
        "UNSUPPORTED_API_VERSION: The API version that was specified (30.0) is below the "
        "minimum supported (31.0). Change the version number and run the request again.; set "
        "SFRELAY_SF_API_VERSION to a version the org serves (62.0, sfrelay's default, or later)"
    )
    assert refused.value.error_code == "UNSUPPORTED_API_VERSION"


async def test_sfrelay_status_shows_how_the_workers_last_reconcile_ended(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, redis_client: redis.Redis, cli: Cli
) -> None:
    """Credentials refused months in: the worker's reconcile stops every run, which only its
    log said. `sfrelay status` (text and --json) now shows how the last run ended."""
    sf_org.fixed_time = T0 + timedelta(hours=1)
    add(sf_org, 1, T0 + timedelta(minutes=1))
    assert (await run_reconcile(rc_settings, since=T0)).errors == 0
    env = settings_env(rc_settings)
    status = cli(env, "status")
    assert not [line for line in status.stdout.splitlines() if line.startswith("reconcile")]
    settings = rc_settings.model_copy(update={"reconcile_every_seconds": 600})
    await run_worker(settings)  # its reconcile run at start: fine
    status = cli(env, "status")
    (line,) = [line for line in status.stdout.splitlines() if line.startswith("reconcile")]
    assert re.fullmatch(r"reconcile    a worker's last run \d+ s ago: queued 0, errors 0", line)
    redis_client.delete(RECONCILE_DUE_KEY)  # due again
    sf_org.refuse_logins = (400, "invalid_grant", "user hasn't approved this consumer")
    sf_org.expire_sessions()
    await run_worker(settings)
    status = cli(env, "status")
    (line,) = [line for line in status.stdout.splitlines() if line.startswith("reconcile")]
    assert re.fullmatch(r"reconcile    a worker's last run \d+ s ago: STOPPED: (.*)", line)
    assert line.endswith(f"ago: STOPPED: {JWT_REFUSED}")
    as_json = orjson.loads(cli(env, "status", "--json").stdout)["reconcile"]
    assert (as_json["stopped"], as_json["queued"], as_json["errors"]) == (JWT_REFUSED, 0, 1)
