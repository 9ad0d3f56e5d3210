"""The receiver's Prometheus metrics and its `GET /metrics` (prometheus-client).

Counters and histograms are recorded where the receiver acks or refuses; the queue's depth is
read from Redis when scraped (ZCARD of the queue and HLEN of the dead letters, one round trip,
cached for `QUEUE_CACHE_S`), by the process that answers the scrape, so it is never summed
across processes. Under `sfrelay serve --workers N` the counters live in prometheus-client's
multiprocess files: `multiprocess_dir` makes (and afterwards removes) the directory named by
PROMETHEUS_MULTIPROC_DIR, and `/metrics` adds up every process's files.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect

from app.errors import QueueUnavailable, RejectedMessage
from app.queue import DEAD_KEY

if TYPE_CHECKING:
    from app.jobs import ApplyJob
    from app.queue import EnqueueResult
    from app.receiver import ReceiverState
    from app.soap import OutboundMessage

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
QUEUE_CACHE_S = 1.0
# A scrape never waits longer than this for Redis: the gauges are then left out.
QUEUE_READ_TIMEOUT_S = 0.5
# Objects no mapping handles keep their own label up to this many per process, then "other".
OTHER_OBJECTS_MAX = 20

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the output for nothing here

REGISTRY = CollectorRegistry()

RESULTS = ("queued", "duplicate", "skipped", "dead")
NOTIFICATIONS = Counter(
    "sfrelay_receiver_notifications",
    "Notifications received in authentic messages, by object and result "
    "(queued, duplicate, skipped: object not handled, dead: unusable, see sfrelay dead list)",
    ["object", "result"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "sfrelay_receiver_refused_requests",
    "Requests to the Outbound Message endpoint answered with a SOAP Fault, by reason",
    ["reason"],
    registry=REGISTRY,
)
ACK_SECONDS = Histogram(
    "sfrelay_receiver_ack_seconds",
    "Time from a message's arrival to its ack (verify, read, parse, enqueue)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
ENQUEUE_SECONDS = Histogram(
    "sfrelay_receiver_enqueue_seconds",
    "Time of the Redis round trip that queues a message (and confirms its durability)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _subclasses(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


# Every reason is known at start-up: the refusal classes, and what the receiver's except
# branches answer besides them.
CLIENT_DISCONNECTED = "client_disconnected"
INTERNAL_ERROR = "internal_error"
# Answered by the connection guard (app/server.py) before any request reaches the app.
CONNECTION_REFUSALS = {"408": "request_head_timeout", "503": "too_many_connections"}
REFUSAL_REASONS = tuple(
    sorted(
        {
            *(_snake(c.__name__) for c in _subclasses(RejectedMessage)),
            _snake(QueueUnavailable.__name__),
            *(_snake(c.__name__) for c in _subclasses(QueueUnavailable)),
            CLIENT_DISCONNECTED,
            INTERNAL_ERROR,
            *CONNECTION_REFUSALS.values(),
        }
    )
)
for _reason in REFUSAL_REASONS:
    REFUSED.labels(_reason)


def refused(exc: BaseException) -> None:
    """Count a request answered with a SOAP Fault, by the class of what refused it."""
    if isinstance(exc, RejectedMessage | QueueUnavailable):
        reason = _snake(type(exc).__name__)
    elif isinstance(exc, ClientDisconnect):
        reason = CLIENT_DISCONNECTED
    else:
        reason = INTERNAL_ERROR
    REFUSED.labels(reason if reason in REFUSAL_REASONS else INTERNAL_ERROR).inc()


def connection_refused(status: str) -> None:
    """Count a connection app/server.py answered and closed ("408 ...", "503 ...")."""
    REFUSED.labels(CONNECTION_REFUSALS.get(status[:3], INTERNAL_ERROR)).inc()


_other_objects: set[str] = set()


def _object_label(sobject: str, handled: frozenset[str]) -> str:
    if sobject in handled:
        return sobject
    if not sobject:
        return "unknown"
    label = sobject[:40]
    if label in _other_objects or len(_other_objects) < OTHER_OBJECTS_MAX:
        _other_objects.add(label)
        return label
    return "other"


def result_counts(
    message: OutboundMessage, result: EnqueueResult, handled: Iterable[str]
) -> dict[tuple[str, str], int]:
    """Notifications by (object, result).

    Each notification's kind is decided as `app.receiver.to_job` decides it (queued: usable
    and handled; skipped: object not handled; dead: the rest); the enqueue script returns how
    many of each kind were new, the rest of the kind were duplicates. A Salesforce Outbound
    Message carries one object, so this is exact; in a hand-made message mixing objects, a kind's
    duplicates are attributed to its objects in order.
    """
    handled = frozenset(handled)
    by_kind: dict[str, Tally[str]] = {"queued": Tally(), "skipped": Tally(), "dead": Tally()}
    for n in message.notifications:
        if n.problem is None and n.sobject in handled:
            kind = "queued"
        elif n.sobject and n.sobject not in handled:
            kind = "skipped"
        else:
            kind = "dead"
        by_kind[kind][_object_label(n.sobject, handled)] += 1
    stored = {"queued": result.queued, "skipped": result.skipped, "dead": result.dead}
    counts: dict[tuple[str, str], int] = {}
    for kind, objects in by_kind.items():
        duplicates = sum(objects.values()) - stored[kind]
        for obj, count in objects.items():
            dupes = min(count, max(duplicates, 0))
            duplicates -= dupes
            if count - dupes:
                counts[(obj, kind)] = count - dupes
            if dupes:
                counts[(obj, "duplicate")] = counts.get((obj, "duplicate"), 0) + dupes
    return counts


def _all_queued_counts(job: ApplyJob, result: EnqueueResult) -> dict[tuple[str, str], int] | None:
    """The usual message (every notification queued, one object) counted without a loop in
    Python over its notifications; None for any other."""
    objects = {n.object for n in job.notifications}
    if len(objects) != 1:
        return None
    (obj,) = objects
    counts = {(obj, "queued"): result.queued}
    if result.duplicates:
        counts[(obj, "duplicate")] = result.duplicates
    return {key: count for key, count in counts.items() if count}


def acked(
    message: OutboundMessage,
    job: ApplyJob,
    result: EnqueueResult,
    handled: Iterable[str],
    seconds: float,
) -> dict[tuple[str, str], int]:
    """Record an acked message (`job`: its queued notifications, see app.receiver.to_job);
    returns its counts by (object, result) for the log line."""
    counts = None
    if len(job.notifications) == len(message.notifications) and not result.skipped:
        counts = _all_queued_counts(job, result)
    if counts is None:
        counts = result_counts(message, result, handled)
    for (obj, kind), count in counts.items():
        NOTIFICATIONS.labels(obj, kind).inc(count)
    ACK_SECONDS.observe(seconds)
    return counts


class QueueGauges(Collector):
    """The queue's depth and Redis's dead letters, read at scrape time (cached)."""

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.read_at = -QUEUE_CACHE_S
        self.values: tuple[int, int] | None = None
        self.lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self.lock:
            if time.monotonic() - self.read_at < QUEUE_CACHE_S:
                return
            try:
                async with asyncio.timeout(QUEUE_READ_TIMEOUT_S):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.zcard(self.queue_name)
                        pipe.hlen(DEAD_KEY)
                        jobs, dead = await pipe.execute()
                self.values = (int(jobs), int(dead))
            except (RedisError, OSError, TimeoutError):
                self.values = None
            self.read_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "sfrelay_redis_up", "1 if the receiver read the queue from Redis at this scrape"
        )
        up.add_metric([], 0 if self.values is None else 1)
        yield up
        if self.values is None:
            return
        jobs, dead = self.values
        yield GaugeMetricFamily(
            "sfrelay_queue_jobs",
            "Jobs in the queue (waiting, deferred for a retry, or being applied): ZCARD",
            value=jobs,
        )
        yield GaugeMetricFamily(
            "sfrelay_redis_dead_letters",
            "Dead letters kept in Redis (refused on receipt, or the database could not take "
            "them); the rest are in Drupal's database: sfrelay dead list",
            value=dead,
        )


def _scrape_registry() -> CollectorRegistry:
    """What a scrape reports besides the queue: this process's, or all processes' files."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


ProcessCollector(registry=REGISTRY)  # this process's CPU and memory (single-process only)

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state: ReceiverState = request.app.state.receiver
    gauges = state.queue_gauges
    await gauges.refresh()
    registry = _scrape_registry()
    body = generate_latest(registry) + generate_latest(_Only(gauges))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class _Only(CollectorRegistry):
    """A registry of one collector, built per scrape without registering anything globally."""

    def __init__(self, collector: Collector) -> None:
        super().__init__(auto_describe=False)
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        yield from self._collector.collect()


@contextmanager
def multiprocess_dir(workers: int) -> Iterator[str | None]:
    """For `sfrelay serve --workers N` (N > 1): a fresh PROMETHEUS_MULTIPROC_DIR for the
    processes uvicorn starts, removed afterwards. An operator's own directory is used as
    given, emptied of old files first (prometheus-client's rule)."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        yield given
        return
    if workers <= 1:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="sfrelay-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
