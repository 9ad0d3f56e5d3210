"""Fixtures for the Salesforce side: the local Salesforce (tests/sfserver.py) and settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from app.config import Settings
from tests import sfserver
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
