"""What Salesforce admins and the org do over months while sfrelay runs: credentials refused,
API versions retired, objects and fields made unreadable. Each against the local Salesforce,
real Redis and a Drupal 10 SQLite copy."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from app.config import Settings
from app.reconcile import run_reconcile
from tests.factories import note, sf
from tests.fixtures_worker import drupal_users, run_worker
from tests.sfserver import FakeOrg
from tests.test_purge import enqueue
from tests.test_reconcile import T0, rc_settings

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
        f"reconcile stopped: {JWT_REFUSED}",  # the cron job's run at start
        f"reconcile stopped early: {JWT_REFUSED}",
    ]
    assert sf_org.counts["token:urn:ietf:params:oauth:grant-type:jwt-bearer"] == 3
