"""Logs of a real run: SFRELAY_LOG_FORMAT=json gives one JSON object per line with stable keys
and never an email, a name, a token or a session id; the text format stays as it was."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from app import logs
from app.config import Settings
from app.logs import JsonFormatter, RedactSecrets, fields, scrub, scrub_line
from app.queue import OUTCOME_PREFIX, STATS_KEY
from app.receiver import ENDPOINT
from tests.fixtures_worker import PROJECT, WorkerProcess
from tests.messages import contact, lead, outbound_message
from tests.servers import RedisServer, free_port, wait_for_port
from workers.metrics import APPLIED

TOKEN = "a-long-random-token-value-0123456789"
SESSION = "00D1I000003qqqE!AQ0AQH0dMHZfz972Szmpkb58urFRkgeBGsxL_QJWwYMfAbUeeG7c"
XML = {"content-type": "text/xml; charset=UTF-8", "SOAPAction": '""'}
EMAILS = ("ada.lovelace@example.org", "grace.h@example.org", "admin@example.com")
NAMES = ("Augusta", "Lovelace", "Hopper", "Gracie")
JSON_KEYS = ["ts", "level", "logger", "msg"]


class Serve:
    """`sfrelay serve` as a real subprocess, its output in a file."""

    def __init__(self, redis_url: str, directory: Path, log_format: str) -> None:
        self.port = free_port()
        self.log = directory / f"serve-{log_format}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
        env.update(
            SFRELAY_ORG_IDS="00D1I000003qqqEUAQ",
            SFRELAY_ENDPOINT_TOKEN=TOKEN,
            SFRELAY_REDIS_URL=redis_url,
            SFRELAY_PORT=str(self.port),
            SFRELAY_ACK_DURABILITY="memory",
            SFRELAY_LOG_FORMAT=log_format,
            PYTHONPATH=str(PROJECT),
            PYTHONUNBUFFERED="1",
        )
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve"],
                cwd=directory,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, timeout=30)

    def post(self, body: bytes, query: str = f"?token={TOKEN}") -> int:
        url = f"http://127.0.0.1:{self.port}{ENDPOINT}{query}"
        return httpx.post(url, content=body, headers=XML, timeout=10).status_code

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        return self.log.read_text()


@pytest.fixture
def serve(redis_server: RedisServer, tmp_path: Path) -> Iterator[type[Serve]]:
    started: list[Serve] = []

    class Tracked(Serve):
        def __init__(self, redis_url: str, directory: Path, log_format: str) -> None:
            super().__init__(redis_url, directory, log_format)
            started.append(self)

    yield Tracked
    for server in started:
        server.stop()


def _traffic(server: Serve) -> None:
    ada = contact(Email=EMAILS[0], FirstName="Augusta", LastName="Lovelace")
    admin = contact(Email=EMAILS[2], FirstName="Admin", LastName="Hopper")
    grace = lead(Email=EMAILS[1], FirstName="Gracie", LastName="Hopper", IsConverted="false")
    assert server.post(outbound_message([ada, admin])) == 200
    assert server.post(outbound_message([ada])) == 200  # duplicate
    assert server.post(outbound_message([grace])) == 200
    # With a session id in the body and in the query, and a wrong token: refused.
    body = outbound_message([grace]).replace(
        b'<SessionId xsi:nil="true"/>', f"<SessionId>{SESSION}</SessionId>".encode()
    )
    assert server.post(body, f"?token=wrong-{TOKEN}&sid={SESSION}") == 401
    assert server.post(body, f"?%74oken={TOKEN}") == 200


def _wait_outcomes(client: redis.Redis, expected: int, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + 60
    applied = {f"{OUTCOME_PREFIX}{kind.value}".encode() for kind in APPLIED}
    while True:
        done = 0
        for key, count in client.hgetall(STATS_KEY).items():
            done += int(count) if key in applied else 0
        if done >= expected:
            return
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"not applied ({done}/{expected}):\n{worker.output()}")
        time.sleep(0.05)


def _parsed(output: str) -> list[dict[str, Any]]:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines
    parsed = []
    for line in lines:
        entry = json.loads(line)  # every line: one JSON object
        assert isinstance(entry, dict), line
        assert list(entry)[:4] == JSON_KEYS, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), line
        parsed.append(entry)
    return parsed


def _assert_clean(output: str) -> None:
    for secret in (*EMAILS, *NAMES, TOKEN, SESSION, SESSION.split("!")[1]):
        assert secret not in output, secret
    assert "@example." not in output


def test_json_logs_of_a_real_run_are_one_object_per_line_without_personal_data(
    serve: type[Serve],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    tmp_path: Path,
) -> None:
    server = serve(redis_server.url, tmp_path, "json")
    _traffic(server)
    worker = worker_process(worker_settings.model_copy(update={"log_format": "json"}), tmp_path)
    worker.wait_ready(redis_client)
    _wait_outcomes(redis_client, 3, worker)
    receiver_log = server.stop()
    worker.signal(signal.SIGTERM)
    worker.wait()
    worker_log = worker.output()

    _assert_clean(receiver_log)
    _assert_clean(worker_log)
    received = [e for e in _parsed(receiver_log) if e.get("event") == "received"]
    assert [
        (e["object"], e["count"], e["queued"], e["duplicates"], e["dead"]) for e in received
    ] == [
        ("Contact", 2, 2, 0, 0),
        ("Contact", 1, 0, 1, 0),
        ("Lead", 1, 1, 0, 0),
        ("Lead", 1, 0, 1, 0),
    ]
    assert all(e["logger"] == "sfrelay.receiver" and e["duration_ms"] > 0 for e in received)
    access = [e for e in _parsed(receiver_log) if e["logger"] == "uvicorn.access"]
    assert [(e["method"], e["status"]) for e in access] == [("POST", 200)] * 3 + [
        ("POST", 401),
        ("POST", 200),
    ]
    assert access[0]["path"] == f"{ENDPOINT}?token=***"
    assert access[3]["path"] == f"{ENDPOINT}?token=***&sid=***"
    assert access[4]["path"] == f"{ENDPOINT}?token=***"

    entries = _parsed(worker_log)
    batches = [e for e in entries if e.get("event") == "batch"]
    assert sum(e["notifications"] for e in batches) == 3
    outcomes = sorted(
        (e["outcome"], e["record_id"][:3], e["uid"], e["detail"])
        for e in entries
        if e.get("event") == "outcome"
    )
    # A line per outcome worth one (a conflict); the routine ones (created) are counted in
    # the batch lines only.
    assert outcomes == [("conflict_protected_user", "003", None, "uid 1")]
    counted: dict[str, int] = {}
    for batch in batches:
        for kind, n in batch["outcomes"].items():
            counted[kind] = counted.get(kind, 0) + n
    assert counted == {"conflict_protected_user": 1, "created": 2}
    jobs = [e for e in entries if e.get("event") == "job"]
    assert sum(e["notifications"] for e in jobs) == 3
    # arq's line for each job it starts shows the notifications as their count, never their
    # contents (app.jobs.Notifications).
    started = [e["msg"] for e in entries if e["logger"] == "arq.worker" and "→" in e["msg"]]
    assert len(started) == len(jobs)
    assert sorted(m.split("notifications=")[1][:17] for m in started) == [
        "<1 notifications>",
        "<2 notifications>",
    ]


def test_text_logs_keep_their_format(
    serve: type[Serve], redis_server: RedisServer, tmp_path: Path
) -> None:
    server = serve(redis_server.url, tmp_path, "text")
    _traffic(server)
    output = server.stop()
    _assert_clean(output)
    lines = output.splitlines()
    acked = [line for line in lines if " sfrelay.receiver acked " in line]
    assert len(acked) == 4
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.match(rf"{stamp} INFO sfrelay\.receiver acked org=00D1I000003qqqEUAQ ", acked[0])
    assert " object=Contact notifications=2 queued=2 skipped=0 dead=0 duplicates=0 " in acked[0]
    assert any(
        re.fullmatch(
            r'INFO: +127\.0\.0\.1:\d+ - "POST /salesforce/outbound-message\?token=\*\*\* '
            r'HTTP/1\.1" 200( OK)?',
            line,
        )
        for line in lines
    ), output
    assert f'"POST {ENDPOINT}?token=***&sid=*** HTTP/1.1" 401' in output
    assert not any(line.startswith("{") for line in lines)


def test_every_line_is_scrubbed_of_emails_and_the_json_fields_too() -> None:
    record = logging.LogRecord(
        "sfrelay.worker",
        logging.WARNING,
        __file__,
        1,
        "job %s: Duplicate entry '%s' for key 'mail' ?token=%s",
        ("j1", "bob.smith@example.org", TOKEN),
        None,
    )
    record.__dict__.update(fields(detail="bob.smith@example.org", uid=7))
    assert RedactSecrets().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "job j1: Duplicate entry '***@***' for key 'mail' ?token=***"
    assert line["detail"] == "***@***"
    assert line["uid"] == 7
    assert list(line) == [*JSON_KEYS, "detail", "uid"]


@given(st.text(alphabet=st.characters(exclude_characters="=!%@")))
@example("00D5g000004Xk2PEAS 003000000000001AAA Ødegaard_2 token sid 04l5")
def test_text_without_marks_needs_no_scrubbing(text: str) -> None:
    """scrub_line returns such a text untouched without running its patterns: every pattern
    must need one of the marks (a new pattern that does not breaks this)."""
    assert scrub(text) == text
    assert logs._EMAIL.sub("***@***", text) == text
    assert scrub_line(text) is text


def test_text_with_marks_is_still_scrubbed() -> None:
    assert scrub_line("see a@b.example?token=s3cret") == "see ***@***?token=***"
    assert scrub_line("sid 00D5g000004Xk2P!AQ4AQFh3") == "sid ***"
    assert scrub_line("GET /x?%74oken=s3cret") == "GET /x?token=***"


FORGED = "2026-01-01 00:00:00,000 INFO sfrelay.receiver forged"


def test_a_request_line_cannot_forge_a_log_line_or_rewrite_the_terminal(
    serve: type[Serve], redis_server: RedisServer, tmp_path: Path
) -> None:
    """Anyone who can reach the receiver chooses the path and query uvicorn's access log
    prints (decoded: the path by uvicorn, a percent-encoded query word by the scrubber)."""
    server = serve(redis_server.url, tmp_path, "text")
    base = f"http://127.0.0.1:{server.port}"
    assert httpx.get(f"{base}/x%0a{FORGED}%1b[2J%e2%80%ae").status_code == 404
    query = f"?a=%0d%0a{FORGED}%1b]52;c;aGk=%07%08&token={TOKEN}"
    assert httpx.get(f"{base}{ENDPOINT}{query}").status_code == 405
    output = server.stop()
    lines = output.splitlines()
    assert not any(line.startswith(FORGED) for line in lines), output
    for unsafe in ("\x1b", "\x07", "\x08", "\r", "\u202e"):
        assert unsafe not in output
    assert f'"GET /x\\x0a{FORGED}\\x1b[2J\\u202e HTTP/1.1" 404' in output
    assert (
        f'"GET {ENDPOINT}?a=\\x0d\\x0a{FORGED}\\x1b]52;c;aGk=\\x07\\x08&token=*** HTTP/1.1" 405'
        in output
    )
    assert TOKEN not in output


def test_json_logs_escape_what_a_terminal_acts_on_and_keep_the_values() -> None:
    record = logging.LogRecord(
        "sfrelay.worker",
        logging.INFO,
        __file__,
        1,
        "record %s: %s",
        ("003", "Zoë\u202e\x9b2J"),
        None,
    )
    record.__dict__.update(fields(detail="Ødegaard\u202e张伟\u2028O'Brien\x9b"))
    assert RedactSecrets().filter(record)
    text = JsonFormatter().format(record)
    for unsafe in ("\u202e", "\x9b", "\u2028"):
        assert unsafe not in text
    line = json.loads(text)
    assert line["msg"] == "record 003: Zoë\\u202e\\x9b2J"
    assert line["detail"] == "Ødegaard\u202e张伟\u2028O'Brien\x9b"  # the value, as it was
