"""`sfrelay up` as a user runs it: its own redis-server, the receiver and a worker, then Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from tests.fixtures_worker import PROJECT, drupal_users, settings_env
from tests.messages import contact, outbound_message
from tests.servers import free_port, wait_for_port


def start_up(settings: Settings, tmp_path: Path, port: int) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "up.log"
    extra = {"port": port, "org_ids": ",".join(settings.org_ids)}
    env = {**settings_env(settings, **extra), "PYTHONPATH": str(PROJECT)}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--data-dir", str(tmp_path / "data")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return process, log


def post(port: int, body: bytes) -> str:
    url = f"http://127.0.0.1:{port}/salesforce/outbound-message"
    return httpx.post(url, content=body, headers={"content-type": "text/xml"}, timeout=10).text


def stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(40)
    finally:
        if process.poll() is None:
            process.kill()


def test_up_runs_redis_receiver_and_worker_until_interrupted(
    worker_settings: Settings, drupal_db: Path, tmp_path: Path
) -> None:
    settings = worker_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    port = free_port()
    process, log = start_up(settings, tmp_path, port)
    try:
        wait_for_port(port, timeout=30)
        body = outbound_message([contact(Email="up@example.org", FirstName="Up", LastName="Run")])
        assert "<Ack>true</Ack>" in post(port, body)
        deadline = time.monotonic() + 30
        while not drupal_users(drupal_db) and time.monotonic() < deadline:
            time.sleep(0.2)
        [user] = drupal_users(drupal_db)
        assert user[2:6] == ("up@example.org", 1, "Up", "Run")
    finally:
        code = stop(process)
    output = log.read_text()
    assert code == 0, output
    assert "sfrelay up: redis-server on 127.0.0.1" in output
    # The default SFRELAY_ACK_DURABILITY=fsync: up's Redis fsyncs before it replies.
    assert "ack durability fsync: confirmed by appendfsync always" in output
    assert f"sfrelay up: worker applying notifications to sqlite:///{drupal_db}" in output
    # Redis kept an append-only file in the data directory: what was acked survives.
    assert any((tmp_path / "data" / "redis").rglob("*.aof"))


def test_up_without_a_drupal_database_still_receives_and_says_why_no_worker(
    worker_settings: Settings, tmp_path: Path
) -> None:
    settings = worker_settings.model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
            "database_url": f"sqlite:///{tmp_path}/missing.sqlite",
        }
    )
    port = free_port()
    process, log = start_up(settings, tmp_path, port)
    try:
        wait_for_port(port, timeout=30)
        assert "<Ack>true</Ack>" in post(port, outbound_message([contact(Email="q@example.org")]))
    finally:
        code = stop(process)
    output = log.read_text()
    assert code == 0, output
    assert f"no worker: no Drupal SQLite database at {tmp_path}/missing.sqlite" in output


def test_a_process_that_exits_at_start_is_a_failed_process_not_a_config_error() -> None:
    from app.errors import ConfigError, ProcessFailed
    from app.up import _wait_listening

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    port = free_port()
    with pytest.raises(ProcessFailed) as caught:
        _wait_listening("127.0.0.1", port, exited, "redis-server")
    assert not isinstance(caught.value, ConfigError)
    assert str(caught.value) == (
        f"redis-server did not start on 127.0.0.1:{port} (see its output above)"
    )


def test_a_record_error_is_a_permanent_error_of_the_tree() -> None:
    from app.errors import PermanentError, RecordError, SfrelayError

    assert issubclass(RecordError, PermanentError) and issubclass(PermanentError, SfrelayError)
