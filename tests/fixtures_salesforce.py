"""Fixtures for the Salesforce side: the local Salesforce (tests/sfserver.py) and settings."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from tests import sfserver
from tests.fixtures_worker import PROJECT, reaped, settings_env, sigkill
from tests.sfserver import FakeOrg, SalesforceServer


@pytest.fixture(scope="session")
def sf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SalesforceServer]:
    server = SalesforceServer(tmp_path_factory.mktemp("salesforce"))
    yield server
    server.stop()


@pytest.fixture
def sf_org(sf_server: SalesforceServer, monkeypatch: pytest.MonkeyPatch) -> FakeOrg:
    """A fresh org; requests (so simple-salesforce) reach it through the proxy and trust its
    CA, exactly as they honour HTTPS_PROXY and REQUESTS_CA_BUNDLE in production."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in sf_server.env().items():
        monkeypatch.setenv(name, value)
    return sf_server.fresh_org()


def sf_settings(flow: str, server: SalesforceServer, **extra: Any) -> Settings:
    """Settings for one login flow against the local Salesforce."""
    values: dict[str, Any] = {"sf_domain": "login"}
    if flow == "jwt-bearer":
        values.update(
            sf_username=sfserver.USERNAME,
            sf_consumer_key=sfserver.CONSUMER_KEY,
            sf_private_key_file=server.private_key_file,
        )
    elif flow == "client-credentials":
        values.update(
            sf_domain="acme.my",
            sf_consumer_key=sfserver.CONSUMER_KEY,
            sf_consumer_secret=sfserver.CONSUMER_SECRET,
        )
    elif flow == "oauth-password":
        values.update(
            sf_username=sfserver.USERNAME,
            sf_password=sfserver.PASSWORD,
            sf_security_token=sfserver.SECURITY_TOKEN,
            sf_consumer_key=sfserver.CONSUMER_KEY,
            sf_consumer_secret=sfserver.CONSUMER_SECRET,
        )
    elif flow == "soap-login":
        values.update(
            sf_username=sfserver.USERNAME,
            sf_password=sfserver.PASSWORD,
            sf_security_token=sfserver.SECURITY_TOKEN,
        )
    values.update(extra)
    return Settings(_env_file=None, env="development", **values)


def sf_env(settings: Settings, server: SalesforceServer, **extra: object) -> dict[str, str]:
    """The environment of an `sfrelay` subprocess with these settings, Salesforce's included
    (reconcile off unless `extra` says otherwise)."""
    return {
        **settings_env(
            settings,
            **{
                "sf_username": settings.sf_username,
                "sf_consumer_key": settings.sf_consumer_key,
                "sf_private_key_file": settings.sf_private_key_file,
                "org_ids": ",".join(settings.org_ids),
                "reconcile_every_seconds": 0,
                **extra,
            },
        ),
        **server.env(),
        "PYTHONPATH": str(PROJECT),
    }


@contextmanager
def holding(
    org: FakeOrg, method: str, when: Callable[..., bool] = lambda *_: True
) -> Iterator[threading.Event]:
    """Calls of `org.<method>` (`query`, `page`) for which `when(*args)` holds wait, up to
    30 s, until the block ends; yields the event set when the first of them arrives."""
    arrived, release = threading.Event(), threading.Event()
    original = getattr(org, method)

    def held(*args: Any) -> Any:
        if when(*args) and not release.is_set():
            arrived.set()
            release.wait(30)
        return original(*args)

    setattr(org, method, held)
    try:
        yield arrived
    finally:
        release.set()
        setattr(org, method, original)


def sigkill_once(
    arrived: threading.Event,
    process: subprocess.Popen[bytes],
    log: Path,
    before: Callable[[], None] | None = None,
) -> None:
    """Once `arrived` is set (within 60 s; `holding`'s): `before()`, then SIGKILL `process`,
    as a crash. Whatever failed, the process is gone afterwards."""
    with reaped(process):
        assert arrived.wait(60), log.read_text()
        if before is not None:
            before()
        sigkill(process)
