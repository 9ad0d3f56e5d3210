"""Settings: parsing of the comma-separated forms, refusals, and .env.example staying complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import PROJECT_ROOT, Settings
from app.errors import ConfigError


def test_env_example_documents_every_setting() -> None:
    text = (PROJECT_ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?SFRELAY_([A-Z_]+)=", text, re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_comma_separated_settings_from_a_dotenv_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "SFRELAY_ORG_IDS=00D1I000003qqqEUAQ, 012345678901234\n"
        "SFRELAY_ALLOWED_NETWORKS=10.0.0.0/8,2001:db8::/32\n"
    )
    settings = Settings(_env_file=env)
    assert settings.org_ids == ["00D1I000003qqqEUAQ", "012345678901234"]
    assert settings.canonical_org_ids == {"00D1I000003qqqE", "012345678901234"}
    assert [str(n) for n in settings.allowed_networks] == ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"org_ids": "00D-not-an-id"}, "is not a Salesforce organization id"),
        ({"allowed_networks": "10.0.0.0/33"}, "not a CIDR network"),
        ({"dedupe_ttl_seconds": 3600}, "greater than or equal to 90000"),
        ({"endpoint_token": "changeme"}, "SFRELAY_ENDPOINT_TOKEN is a placeholder"),
    ],
)
def test_refused_settings(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None, **values)


def test_production_needs_org_ids_development_does_not() -> None:
    with pytest.raises(ConfigError, match="SFRELAY_ORG_IDS is not set"):
        Settings(_env_file=None, env="production").require_receiver_ready()
    Settings(_env_file=None, env="development").require_receiver_ready()


def test_production_needs_a_token_or_allowed_networks() -> None:
    """The org id is public (Web-to-Lead forms carry it): alone it authenticates no one."""
    org = {"org_ids": ["00D1I000003qqqEUAQ"]}
    with pytest.raises(ConfigError, match=r"^neither SFRELAY_ENDPOINT_TOKEN nor SFRELAY_ALLOWED"):
        Settings(_env_file=None, env="production", **org).require_receiver_ready()
    token = "a-long-random-token-value"
    Settings(_env_file=None, endpoint_token=token, **org).require_receiver_ready()
    Settings(_env_file=None, allowed_networks="13.108.0.0/14", **org).require_receiver_ready()
    Settings(_env_file=None, env="development").require_receiver_ready()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", "true"),
        ("1", "true"),
        ("Yes", "true"),
        ("on", "true"),
        ("false", "false"),
        ("0", "false"),
        ("off", "false"),
        ("never-logged-in", "never-logged-in"),
        (" Never_Logged_In ", "never-logged-in"),
        (True, "true"),
        (False, "false"),
    ],
)
def test_match_by_email_values(value: object, expected: str) -> None:
    assert Settings(_env_file=None, match_by_email=value).match_by_email == expected


@pytest.mark.parametrize("value", ["maybe", "", "never", 2])
def test_match_by_email_refuses_other_values(value: object) -> None:
    with pytest.raises(ValidationError, match="must be true, false or never-logged-in"):
        Settings(_env_file=None, match_by_email=value)


def test_protected_roles_from_a_dotenv_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("SFRELAY_PROTECTED_ROLES=administrator, user_manager ,\n")
    assert Settings(_env_file=env).protected_roles == ["administrator", "user_manager"]
    assert Settings(_env_file=None).protected_roles == []  # the site's own (the default)
