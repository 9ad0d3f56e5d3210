"""Shared fixtures: one real redis-server per test session, flushed before each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.config import Settings
from tests.servers import SHARED, RedisServer, free_port

# Fixtures of the Drupal databases (SQLite copies, PostgreSQL, MariaDB) and of worker processes.
pytest_plugins = ["tests.fixtures_db", "tests.fixtures_worker", "tests.fixtures_salesforce"]

MESSAGES = SHARED / "salesforce" / "messages"
SHARED_WSDLS = SHARED / "salesforce" / "wsdl"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), directory=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: RedisServer, redis_client: redis.Redis) -> Settings:
    """Receiver settings for the tests: built explicitly, never from the environment."""
    return Settings(
        _env_file=None,
        env="production",
        redis_url=redis_server.url,
        org_ids=["00D1I000003qqqEUAQ", "012345678901234"],
        endpoint_token=None,
    )


def shared_message(name: str) -> bytes:
    path = MESSAGES / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: tests read ../shared/ beside the checkout")
    return path.read_bytes()


@pytest.fixture
def shared_messages() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(MESSAGES).glob("*.xml"))}
