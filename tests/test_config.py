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
