"""The receiver-side commands: `sfrelay serve`, `send`, `queue stats`.

Through `app.cli.main` in this process (the `cli` fixture); one real `sfrelay` subprocess per
command shows the command line itself works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from app.config import Settings
from app.main import create_app
from tests.conftest import Cli, shared_message
from tests.messages import contact, outbound_message
from tests.servers import RedisServer, UvicornThread, free_port, wait_for_port

SFRELAY = [sys.executable, "-m", "app.cli"]


def run(
    args: list[str], env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    return subprocess.run(
        [*SFRELAY, *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )


@pytest.fixture
def server(settings: Settings) -> Iterator[UvicornThread]:
    with UvicornThread(create_app(settings)) as running:
        yield running


def test_send_prints_the_ack_and_exits_zero(
    server: UvicornThread, redis_server: RedisServer, tmp_path: Path
) -> None:
    """`send` and `queue stats` as a user runs them: subprocesses."""
    message = tmp_path / "message.xml"
    message.write_bytes(outbound_message([contact(Email="a@example.org")]))
    url = f"{server.url}/salesforce/outbound-message"
    result = run(["send", str(message), "--url", url], {})
    assert result.returncode == 0, result.stderr
    assert "<Ack>true</Ack>" in result.stdout
    stats = run(["queue", "stats", "--json"], {"SFRELAY_REDIS_URL": redis_server.url})
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) == {
        "queued": 1,
        "in_progress": 0,
        "dead": 0,
        "skipped": 0,
        "duplicates": 0,
    }


SEND_TOKEN = "a-long-random-send-token"


def test_send_keeps_the_urls_token_or_adds_the_configured_one_and_never_prints_it(
    settings: Settings, tmp_path: Path
) -> None:
    message = tmp_path / "message.xml"
    message.write_bytes(outbound_message([contact(Email="t@example.org")]))
    guarded = settings.model_copy(update={"endpoint_token": SecretStr(SEND_TOKEN)})
    with UvicornThread(create_app(guarded)) as server:
        url = f"{server.url}/salesforce/outbound-message"
        given = run(["send", str(message), "--url", f"{url}?token={SEND_TOKEN}"], {})
        added = run(["send", str(message), "--url", url], {"SFRELAY_ENDPOINT_TOKEN": SEND_TOKEN})
        wrong = run(["send", str(message), "--url", f"{url}?token=wrong-one"], {})
    for result in (given, added):
        assert result.returncode == 0, result.stderr
        assert "<Ack>true</Ack>" in result.stdout
        assert "token=***" in result.stderr  # httpx's request line, scrubbed
    assert wrong.returncode == 1
    assert "<faultstring>wrong token: check the ?token= of the endpoint URL" in wrong.stdout
    gone = f"http://127.0.0.1:{free_port()}/salesforce/outbound-message?token={SEND_TOKEN}"
    unreachable = run(["send", str(message), "--url", gone], {})
    assert unreachable.returncode == 2
    assert "is `sfrelay serve` running?" in unreachable.stderr
    for result in (given, added, wrong, unreachable):
        assert SEND_TOKEN not in result.stdout + result.stderr


def test_send_reads_stdin_and_exits_nonzero_on_a_fault(server: UvicornThread, cli: Cli) -> None:
    url = f"{server.url}/salesforce/outbound-message"
    body = shared_message("aspnet_AspNetWebHooks__OutboundMessage2.xml")
    result = cli({}, "send", "-", "--url", url, stdin=body)
    assert result.returncode == 1
    assert "<faultstring>the message has no OrganizationId</faultstring>" in result.stdout


def test_send_says_what_to_do_when_nothing_listens(tmp_path: Path, cli: Cli) -> None:
    message = tmp_path / "m.xml"
    message.write_bytes(b"<x/>")
    url = f"http://127.0.0.1:{free_port()}/salesforce/outbound-message"
    result = cli({}, "send", str(message), "--url", url)
    assert result.returncode == 2
    assert "is `sfrelay serve` running?" in result.stderr


def test_send_says_why_an_answer_that_is_neither_ack_nor_fault_is_one(
    server: UvicornThread, tmp_path: Path, cli: Cli
) -> None:
    """The endpoint with a trailing slash (a redirect) or a wrong path (404) printed an empty
    line or FastAPI's JSON and exited 1, saying nothing of the path."""
    message = tmp_path / "m.xml"
    message.write_bytes(outbound_message([contact(Email="slash@example.org")]))
    slash = cli({}, "send", str(message), "--url", f"{server.url}/salesforce/outbound-message/")
    assert slash.returncode == 1
    assert slash.stderr.splitlines()[-1] == (
        f"sfrelay: {server.url}/salesforce/outbound-message/ answered HTTP 307, a redirect to "
        f"{server.url}/salesforce/outbound-message, not an Ack: sfrelay's endpoint is "
        "/salesforce/outbound-message exactly, without a trailing slash"
    )
    wrong = cli({}, "send", str(message), "--url", f"{server.url}/salesforce/outbound")
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines()[-1] == (
        f"sfrelay: {server.url}/salesforce/outbound answered HTTP 404, not a SOAP answer: "
        "sfrelay's endpoint is /salesforce/outbound-message exactly, without a trailing slash"
    )


def test_queue_stats_says_what_to_do_when_redis_is_down(cli: Cli) -> None:
    result = cli({"SFRELAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "queue", "stats")
    assert result.returncode == 2
    assert "check SFRELAY_REDIS_URL" in result.stderr


def test_serve_refuses_to_start_without_org_ids(cli: Cli) -> None:
    result = cli({"SFRELAY_ENV": "production"}, "serve")
    assert result.returncode == 2
    assert "SFRELAY_ORG_IDS is not set" in result.stderr


def test_serve_refuses_to_start_without_a_token_or_allowed_networks(cli: Cli) -> None:
    result = cli({"SFRELAY_ORG_IDS": "00D1I000003qqqEUAQ"}, "serve")
    assert result.returncode == 2
    assert (
        "neither SFRELAY_ENDPOINT_TOKEN nor SFRELAY_ALLOWED_NETWORKS is set, so anyone could "
        "post notifications: set SFRELAY_ENDPOINT_TOKEN to a long random secret"
    ) in result.stderr
    assert "Uvicorn running" not in result.stderr


def test_serve_refuses_a_placeholder_token(cli: Cli) -> None:
    env = {"SFRELAY_ORG_IDS": "00D1I000003qqqEUAQ", "SFRELAY_ENDPOINT_TOKEN": "changeme"}
    result = cli(env, "serve")
    assert result.returncode == 2
    assert "SFRELAY_ENDPOINT_TOKEN is a placeholder" in result.stderr


def test_serve_runs_and_never_logs_the_token(redis_server: RedisServer) -> None:
    port = free_port()
    env = {
        "SFRELAY_ORG_IDS": "00D1I000003qqqEUAQ",
        "SFRELAY_ENDPOINT_TOKEN": "a-long-random-token-value",
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_PORT": str(port),
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    process = subprocess.Popen(
        [*SFRELAY, "serve"],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, timeout=20)
        url = f"http://127.0.0.1:{port}/salesforce/outbound-message?token=a-long-random-token-value"
        message = outbound_message([contact(Email="t@example.org")])
        response = httpx.post(url, content=message, headers={"content-type": "text/xml"})
        assert "<Ack>true</Ack>" in response.text
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert "POST /salesforce/outbound-message?token=***" in output
    assert "a-long-random-token-value" not in output


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_makes_serve_unready_while_it_still_acks_then_stop(
    redis_server: RedisServer, tmp_path: Path, workers: int
) -> None:
    """A load balancer polling /readyz must see the receiver go unready before its listener
    closes, or it sends messages to a closed port until its probe notices (uvicorn closes the
    listener at the SIGTERM). Each process drains SFRELAY_SHUTDOWN_DRAIN_SECONDS, then stops."""
    port = free_port()
    project = Path(__file__).resolve().parent.parent
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SFRELAY_", "PROMETHEUS_"))}
    env = {
        **clean,
        "SFRELAY_ORG_IDS": "00D1I000003qqqEUAQ",
        "SFRELAY_ALLOWED_NETWORKS": "127.0.0.0/8",
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_PORT": str(port),
        "SFRELAY_SHUTDOWN_DRAIN_SECONDS": "6",
        "PYTHONPATH": str(project),
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*SFRELAY, "serve", "--workers", str(workers)],
            env=env,
            cwd=project,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete") < workers:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert httpx.get(f"{base}/readyz", timeout=10).json() == {"status": "ready", "redis": "ok"}
        process.send_signal(signal.SIGTERM)
        # Every process (a new connection each time: the kernel spreads them) says it stops.
        stopping = 0
        deadline = time.monotonic() + 20
        while stopping < 5:
            assert time.monotonic() < deadline, log.read_text()
            ready = httpx.get(f"{base}/readyz", timeout=10)
            stopping = stopping + 1 if ready.status_code == 503 else 0
        assert ready.json() == {
            "status": "stopping",
            "reason": "the receiver is shutting down (SIGTERM): it still serves requests for "
            "6 s after the signal (SFRELAY_SHUTDOWN_DRAIN_SECONDS), then closes",
        }
        assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
        # What the load balancer still sends meanwhile is acked.
        message = outbound_message([contact(Email="late@example.org")])
        response = httpx.post(
            f"{base}/salesforce/outbound-message",
            content=message,
            headers={"content-type": "text/xml"},
            timeout=10,
        )
        assert response.status_code == 200
        assert "<Ack>true</Ack>" in response.text
        process.wait(60)  # then it stops by itself
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = log.read_text()
    assert process.returncode in (0, -signal.SIGTERM), output
    assert output.count("SIGTERM: /readyz answers 503 for 6 s") == workers


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`sfrelay check | head -1`: the reader gone, no traceback, the status of SIGPIPE."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    env = {**clean, "SFRELAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    try:
        result = subprocess.run(
            [*SFRELAY, "check"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        os.close(write)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
