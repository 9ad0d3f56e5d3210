"""Shared fixtures: one real redis-server per test session, flushed before each test."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from app.cli import main
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
        # Production needs a token or an address check: the tests' clients are all local.
        allowed_networks=["127.0.0.0/8", "::1/128"],
    )


def shared_message(name: str) -> bytes:
    path = MESSAGES / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: tests read ../shared/ beside the checkout")
    return path.read_bytes()


@pytest.fixture
def shared_messages() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(MESSAGES).glob("*.xml"))}


@dataclass
class CliRun:
    """What one `sfrelay ...` run in this process printed, logged and returned."""

    returncode: int
    stdout: str
    stderr: str
    log: str  # its log records, INFO and up


Cli = Callable[..., CliRun]


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> Cli:
    """`cli(env, *argv, stdin=b"", cwd=tmp_path)`: `app.cli.main(argv)` in this process, with
    exactly the SFRELAY_* variables of `env` (no .env: `cwd` has none), in a thread of its own
    (its commands run their own event loops, also from an async test)."""

    def run(env: dict[str, str], *argv: str, stdin: bytes = b"", cwd: Path = tmp_path) -> CliRun:
        result: list[int] = []
        with monkeypatch.context() as patch:
            for name in [n for n in os.environ if n.startswith("SFRELAY_")]:
                patch.delenv(name)
            for name, value in env.items():
                if name.startswith("SFRELAY_"):
                    patch.setenv(name, value)
            patch.chdir(cwd)
            patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
            capsys.readouterr()
            caplog.clear()
            with caplog.at_level(logging.INFO):
                thread = threading.Thread(target=lambda: result.append(main(list(argv))))
                thread.start()
                thread.join(120)
            out, err = capsys.readouterr()
        assert result, f"sfrelay {' '.join(argv)} did not return:\n{out}\n{err}"
        return CliRun(result[0], out, err, caplog.text)

    return run
