"""Prometheus metrics scraped from a real receiver and a real worker, checked against Drupal's
database; `sfrelay serve --workers 2` (multiprocess); the Grafana dashboard's metric names."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.main import create_app
from app.metrics import (
    QUEUE_CACHE_S,
    REFUSAL_REASONS,
    _all_queued_counts,
    multiprocess_dir,
    result_counts,
)
from app.queue import DEAD_KEY, DEFAULT_QUEUE, OUTCOME_PREFIX, STATS_KEY, EnqueueResult
from app.receiver import ENDPOINT, to_job
from app.soap import parse_message
from app.wsdl import load_contract
from tests import test_receiver_hostile_clients as hostile
from tests.fixtures_worker import PROJECT, WorkerProcess, drupal_users, settings_env
from tests.messages import Record, contact, lead, outbound_message, sf_id
from tests.servers import RedisServer, UvicornThread, free_port, wait_for_port
from workers.metrics import APPLIED

XML = {"content-type": "text/xml; charset=UTF-8", "SOAPAction": '""'}
DASHBOARD = PROJECT / "deploy" / "grafana" / "sfrelay.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name and v}


def delta(after: Samples, before: Samples) -> Samples:
    return {key: v - before.get(key, 0.0) for key, v in after.items()}


def recent(seconds: float) -> str:
    stamp = datetime.now(UTC) - timedelta(seconds=seconds)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def post(url: str, body: bytes, headers: dict[str, str] = XML) -> int:
    return httpx.post(url + ENDPOINT, content=body, headers=headers, timeout=10).status_code


def history_outcomes(path: Path) -> Counter[str]:
    """Every outcome sfrelay recorded in Drupal's database (sfrelay_record.history)."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT history FROM sfrelay_record").fetchall()
    db.close()
    return Counter(entry["o"] for (history,) in rows for entry in json.loads(history))


def dead_letter_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM sfrelay_dead_letter").fetchone()
    db.close()
    return int(count)


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs, "the dashboard queries nothing"
    return {name for expr in exprs for name in re.findall(r"\bsfrelay_[a-z_]+\b", expr)}


@pytest.fixture
def server(settings: Settings) -> Iterator[UvicornThread]:
    with UvicornThread(create_app(settings)) as running:
        yield running


def _wait_applied(client: redis.Redis, expected: int, worker: WorkerProcess) -> None:
    """Until the workers have counted `expected` outcomes and the queue is empty."""
    deadline = time.monotonic() + 60
    applied = {f"{OUTCOME_PREFIX}{kind.value}".encode() for kind in APPLIED}
    while True:
        done = 0
        for key, count in client.hgetall(STATS_KEY).items():
            done += int(count) if key in applied else 0
        if done >= expected and client.zcard(DEFAULT_QUEUE) == 0:
            return
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"not applied ({done}/{expected}):\n{worker.output()}")
        time.sleep(0.05)


def test_a_real_run_metrics_match_drupal_and_cover_the_dashboard(
    server: UvicornThread,
    worker_settings: Settings,
    worker_process: type[WorkerProcess],
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    receiver_before = scrape(server.url + "/metrics")
    before_at = time.monotonic()
    ada = contact(Email="ada@example.org", FirstName="Ada", SystemModstamp=recent(30))
    ada_again = Record(
        "Contact", {"Id": ada.fields["Id"], "Email": "ada@example.org", "FirstName": "Ada L"}
    )
    ada_again.fields["SystemModstamp"] = recent(20)
    old_ada = Record("Contact", {"Id": ada.fields["Id"], "Email": "ada@example.org"})
    old_ada.fields["SystemModstamp"] = recent(3600)
    first = [
        ada,
        contact(FirstName="No", LastName="Mail", SystemModstamp=recent(10)),
        contact(Email="not an email", SystemModstamp=recent(10)),
        contact(Email="admin@example.com", SystemModstamp=recent(10)),  # uid 1: protected
    ]
    grace = lead(Email="grace@example.org", IsConverted="false", SystemModstamp=recent(5))
    account = Record("Account", {"Id": sf_id("001", 990001), "Name": "Acme"})
    bad_id = Record("Contact", {"Id": sf_id("001", 990002), "Email": "b@example.org"})
    assert post(server.url, outbound_message(first)) == 200
    assert post(server.url, outbound_message(first[:2])) == 200  # redelivered: duplicates
    assert post(server.url, outbound_message([grace])) == 200
    assert post(server.url, outbound_message([account])) == 200  # not handled: skipped
    assert post(server.url, outbound_message([bad_id])) == 200  # an Account id: dead
    assert post(server.url, b"<x/>", {"content-type": "application/json"}) == 415
    assert post(server.url, b"<x/>") == 400

    port = free_port()
    env_settings = worker_settings.model_copy(update={"worker_metrics_port": port})
    worker = worker_process(env_settings, tmp_path)
    worker.wait_ready(redis_client)
    _wait_applied(redis_client, 5, worker)
    # A second version of Ada, then an older one, once the first is applied.
    assert post(server.url, outbound_message([ada_again])) == 200
    _wait_applied(redis_client, 6, worker)
    assert post(server.url, outbound_message([old_ada])) == 200
    _wait_applied(redis_client, 7, worker)

    wait_for_port(port)
    worker_samples = scrape(f"http://127.0.0.1:{port}/metrics")
    # The receiver reads the queue's gauges at most once per QUEUE_CACHE_S: on a fast
    # machine the whole run can take less, and the first scrape's reading would still count.
    time.sleep(max(0.0, before_at + QUEUE_CACHE_S + 0.1 - time.monotonic()))
    receiver_samples = scrape(server.url + "/metrics")
    received = delta(receiver_samples, receiver_before)

    # The worker's outcomes are exactly those Drupal's database recorded.
    recorded = history_outcomes(drupal_db)
    counted = by_label(worker_samples, "sfrelay_worker_outcomes_total", "outcome")
    assert counted == {k: float(v) for k, v in recorded.items()}
    assert counted == {
        "created": 2.0,
        "updated": 1.0,
        "stale": 1.0,
        "skipped_no_email": 1.0,
        "skipped_invalid_email": 1.0,
        "conflict_protected_user": 1.0,
    }
    assert len(drupal_users(drupal_db)) == counted["created"]
    assert value(worker_samples, "sfrelay_worker_dead_letters_total") == dead_letter_rows(drupal_db)
    # Every outcome label exists from the start, taken from the code's own list.
    assert {dict(k)["outcome"] for n, k in worker_samples if n.endswith("outcomes_total")} == {
        kind.value for kind in APPLIED
    }
    # Batches hold every notification applied; the lag is observed for each write.
    assert value(worker_samples, "sfrelay_worker_batch_notifications_sum") == sum(recorded.values())
    assert value(worker_samples, "sfrelay_worker_apply_seconds_count") == value(
        worker_samples, "sfrelay_worker_batch_notifications_count"
    )
    assert value(worker_samples, "sfrelay_worker_lag_seconds_count") == 3  # created 2, updated 1
    assert value(worker_samples, "sfrelay_worker_active") == 1  # alone: it takes the jobs
    assert value(worker_samples, "sfrelay_worker_lag_seconds_sum") >= 5 + 30  # grace, ada

    # The receiver counted what it was sent, by object and result.
    assert by_label(
        {k: v for k, v in received.items() if dict(k[1]).get("object") == "Contact"},
        "sfrelay_receiver_notifications_total",
        "result",
    ) == {"queued": 6.0, "duplicate": 2.0, "dead": 1.0}
    assert value(received, "sfrelay_receiver_notifications_total", object="Lead", result="queued")
    assert (
        value(received, "sfrelay_receiver_notifications_total", object="Account", result="skipped")
        == 1
    )
    assert by_label(received, "sfrelay_receiver_refused_requests_total", "reason") == {
        "unsupported_media_type": 1.0,
        "malformed_message": 1.0,
    }
    assert {
        dict(k)["reason"] for n, k in receiver_samples if n.endswith("refused_requests_total")
    } == set(REFUSAL_REASONS)
    assert value(received, "sfrelay_receiver_ack_seconds_count") == 7
    assert value(received, "sfrelay_receiver_enqueue_seconds_count") == 7
    assert value(receiver_samples, "sfrelay_queue_jobs") == redis_client.zcard(DEFAULT_QUEUE) == 0
    assert value(receiver_samples, "sfrelay_redis_dead_letters") == redis_client.hlen(DEAD_KEY)
    assert value(receiver_samples, "sfrelay_redis_up") == 1

    # The dashboard queries only names these two processes expose.
    exposed = {name for name, _ in receiver_samples} | {name for name, _ in worker_samples}
    assert dashboard_metrics() - exposed == set()
    assert {"sfrelay_queue_jobs", "sfrelay_worker_lag_seconds_bucket"} <= dashboard_metrics()


def test_a_worker_run_by_arqs_own_cli_reports_itself_active(
    server: UvicornThread,
    worker_settings: Settings,
    redis_client: redis.Redis,
    drupal_db: Path,
    tmp_path: Path,
) -> None:
    """`arq workers.main.WorkerSettings` (README: the same worker without standing by) takes
    every job: its sfrelay_worker_active is 1, as the dashboard and the sum over a database's
    workers expect, not 0 while it writes."""
    port = free_port()
    env = settings_env(worker_settings.model_copy(update={"worker_metrics_port": port}))
    log = tmp_path / "arq.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "arq", "workers.main.WorkerSettings"],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(PROJECT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert post(server.url, outbound_message([contact(Email="arq@example.org")])) == 200
        deadline = time.monotonic() + 60
        while redis_client.hget(STATS_KEY, f"{OUTCOME_PREFIX}created") != b"1":
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        wait_for_port(port)
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(samples, "sfrelay_worker_outcomes_total", outcome="created") == 1
        assert len(drupal_users(drupal_db)) == 1
        assert value(samples, "sfrelay_worker_active") == 1
    finally:
        process.terminate()
        process.wait(30)


def test_the_queue_depth_is_read_at_scrape_time(
    server: UvicornThread, redis_client: redis.Redis
) -> None:
    assert value(scrape(server.url + "/metrics"), "sfrelay_queue_jobs") == 0
    assert post(server.url, outbound_message([contact(Email="q@example.org")])) == 200
    assert post(server.url, outbound_message([contact(Email="r@example.org")])) == 200
    time.sleep(1.1)  # past the one-second cache
    assert value(scrape(server.url + "/metrics"), "sfrelay_queue_jobs") == 2


def acks_by_process(directory: Path) -> dict[str, float]:
    """Acks each receiver process recorded in its own multiprocess file."""
    acks: dict[str, float] = {}
    for path in directory.glob("histogram_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "sfrelay_receiver_ack_seconds_bucket":
                acks[pid] = acks.get(pid, 0.0) + count
    return acks


def test_serve_with_two_workers_sums_the_counters_of_both(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    port = free_port()
    temp = tmp_path / "tmp"
    temp.mkdir()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFRELAY_", "PROMETHEUS_"))}
    env.update(
        SFRELAY_ORG_IDS="00D1I000003qqqEUAQ",
        SFRELAY_ALLOWED_NETWORKS="127.0.0.0/8",
        SFRELAY_REDIS_URL=redis_server.url,
        SFRELAY_PORT=str(port),
        SFRELAY_ACK_DURABILITY="memory",
        TMPDIR=str(temp),
        PYTHONPATH=str(PROJECT),
        PYTHONUNBUFFERED="1",
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--workers", "2"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # The parent binds the port; each process says when it serves.
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete") < 2:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        (directory,) = temp.glob("sfrelay-metrics-*")
        url = f"http://127.0.0.1:{port}"

        def send(number: int) -> int:
            records = [contact(Email=f"m{number}-{i}@example.org") for i in range(3)]
            return post(url, outbound_message(records))  # a new connection each time

        # Concurrent connections: the kernel hands them to both processes.
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(send, range(40))) == [200] * 40
        assert post(url, b"<x/>", {"content-type": "application/json"}) == 415
        by_process = acks_by_process(directory)
        # (uvicorn may replace a process that answered its pings late: its files stay counted)
        assert len([pid for pid, acks in by_process.items() if acks]) >= 2, by_process
        assert sum(by_process.values()) == 40
        for _ in range(6):  # whichever process answers, it reports the sum of both
            samples = scrape(url + "/metrics")
            queued = value(
                samples, "sfrelay_receiver_notifications_total", object="Contact", result="queued"
            )
            assert queued == 120
            assert value(samples, "sfrelay_receiver_ack_seconds_count") == 40
            refused = value(
                samples, "sfrelay_receiver_refused_requests_total", reason="unsupported_media_type"
            )
            assert refused == 1
            # The gauge is read by the answering process: one sample, never a sum.
            assert value(samples, "sfrelay_queue_jobs") == redis_client.zcard(DEFAULT_QUEUE) == 40
    finally:
        process.terminate()
        process.wait(30)
    assert process.returncode == 0, log.read_text()
    assert list(temp.glob("sfrelay-metrics-*")) == []  # removed for the operator


async def test_connections_the_guard_closes_are_counted_by_reason(
    settings: Settings, redis_client: redis.Redis
) -> None:
    before = scrape_reasons()
    with hostile.receiver(settings, read_timeout_seconds=1) as server:
        connections = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        stop = asyncio.Event()
        tricklers = [asyncio.create_task(hostile.trickle(w, stop)) for _, w in connections]
        answers = await asyncio.gather(*(hostile.read_until_closed(r) for r, _ in connections))
        stop.set()
        await asyncio.gather(*tricklers)
        for _, writer in connections:
            writer.close()
        assert all(a is not None and a.startswith(b"HTTP/1.1 408 ") for a in answers)
        async with httpx.AsyncClient() as client:
            response = await client.get(server.url + "/metrics")
    after = {
        dict(key)["reason"]: v
        for (name, key), v in parse(response.text).items()
        if name == "sfrelay_receiver_refused_requests_total"
    }
    assert {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)} == {
        "request_head_timeout": 3.0
    }
    assert redis_client.dbsize() == 0


def scrape_reasons() -> dict[str, float]:
    """The refusal counters of this process (the in-process receivers share them)."""
    from app.metrics import REFUSED

    return {
        sample.labels["reason"]: sample.value
        for metric in REFUSED.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def test_an_operators_own_multiproc_dir_is_used_and_emptied_of_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = tmp_path / "prometheus"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"old")
    (given / "notes.txt").write_text("kept")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    with multiprocess_dir(4) as directory:
        assert directory == str(given)
        assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    assert given.is_dir()  # the operator's: not removed


def test_one_process_needs_no_multiproc_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with multiprocess_dir(1) as directory:
        assert directory is None
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


@pytest.mark.parametrize(("queued", "duplicates"), [(3, 0), (1, 2), (0, 3)])
def test_the_usual_messages_short_count_equals_the_general_one(
    settings: Settings, queued: int, duplicates: int
) -> None:
    """An all-queued one-object message is counted without a loop over its notifications;
    the result is the one the general count gives, new and duplicate alike."""
    handled = frozenset(settings.handled_objects)
    records = [contact(Id=sf_id("003", i), Email=f"u{i}@example.org") for i in range(3)]
    message = parse_message(outbound_message(records), load_contract(settings.wsdl_dir), handled)
    job, others = to_job(message, "00D1I000003qqqE", "sha", handled)
    assert len(job.notifications) == 3 and not others
    result = EnqueueResult(queued=queued, skipped=0, dead=0, duplicates=duplicates, job_id=None)
    short = _all_queued_counts(job, result)
    assert short is not None
    assert short == result_counts(message, result, handled)
    assert sum(short.values()) == 3
