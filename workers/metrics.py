"""A worker's Prometheus metrics, served on SFRELAY_WORKER_METRICS_PORT (default: none), and
its log lines per applied batch and per non-trivial outcome.

Outcomes are counted when a job finishes (as `sfrelay:stats` counts them), so a job run again
after an interruption is not counted twice. The lag is the time from a record's SystemModstamp
(Salesforce's last change) to the Drupal write that applied it.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Mapping, Sequence
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from app.jobs import JobNotification
from app.logs import fields
from app.outcomes import Outcome, OutcomeKind

logger = logging.getLogger("sfrelay.worker")

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # the worker's CPU and memory (process_*)

OUTCOMES_TOTAL = Counter(
    "sfrelay_worker_outcomes",
    "Notifications applied to Drupal, by outcome (app/outcomes.py lists them)",
    ["outcome"],
    registry=REGISTRY,
)
# What applying decides; `requeued` and `dead` are what the worker then did with a retry or
# a failure (DEAD_LETTERS counts the latter).
APPLIED = tuple(k for k in OutcomeKind if k not in (OutcomeKind.REQUEUED, OutcomeKind.DEAD))
for _outcome in APPLIED:
    OUTCOMES_TOTAL.labels(_outcome.value)
DEAD_LETTERS = Counter(
    "sfrelay_worker_dead_letters",
    "Notifications the worker dead-lettered (failed, or out of tries): sfrelay dead list",
    registry=REGISTRY,
)
ACTIVE = Gauge(
    "sfrelay_worker_active",
    "1 while this worker takes the jobs of its database and queue, 0 while it stands by "
    "(workers/lease.py: Election)",
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "sfrelay_worker_batch_notifications",
    "Notifications per database transaction (group commit of the jobs running at once)",
    buckets=(1, 5, 10, 25, 50, 100, 200, 500, 1000, 2000, 5000),
    registry=REGISTRY,
)
APPLY_SECONDS = Histogram(
    "sfrelay_worker_apply_seconds",
    "Time to apply one batch to Drupal's database",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
LAG_SECONDS = Histogram(
    "sfrelay_worker_lag_seconds",
    "Time from a record's SystemModstamp in Salesforce to its write in Drupal",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600),
    registry=REGISTRY,
)

# Outcomes that wrote the user (the lag is theirs), and the routine ones, counted in the batch
# line and sfrelay:stats, each record's in its history (`sfrelay why`), not worth a line of
# their own: a nightly batch of 100,000 creates printed 100,000 lines, and formatting them
# was 12% of the worker's time. A link to an existing account, a conflict or a failure
# keeps its line.
WRITTEN = frozenset(
    {OutcomeKind.CREATED, OutcomeKind.UPDATED, OutcomeKind.LINKED, OutcomeKind.CONVERTED}
)
TRIVIAL = frozenset(
    {
        OutcomeKind.CREATED,
        OutcomeKind.UPDATED,
        OutcomeKind.DUPLICATE,
        OutcomeKind.SKIPPED_NO_EMAIL,
    }
)
_WARNED = frozenset({OutcomeKind.RETRY, OutcomeKind.FAILED})
_CONFLICTS = frozenset({OutcomeKind.CONFLICT_DUPLICATE_EMAIL, OutcomeKind.CONFLICT_PROTECTED_USER})

_served: list[int] = []


def serve(port: int | None) -> None:
    """Serve /metrics on `port` (all interfaces), once per process; None: not at all."""
    if port is None or port in _served:
        return
    start_http_server(port, registry=REGISTRY)
    _served.append(port)
    logger.info("metrics on :%d/metrics", port, extra=fields(metrics_port=port))


def batch_applied(
    notifications: int, jobs: int, seconds: float, outcomes: Sequence[Outcome]
) -> None:
    """One applied batch: its size and duration, and its log line."""
    BATCH_SIZE.observe(notifications)
    APPLY_SECONDS.observe(seconds)
    tally = Tally(o.kind.value for o in outcomes)
    summary = " ".join(f"{name}={count}" for name, count in sorted(tally.items()))
    logger.info(
        "applied %d notifications of %d jobs in %.0f ms: %s",
        notifications,
        jobs,
        seconds * 1000,
        summary or "nothing",
        extra=fields(
            event="batch",
            notifications=notifications,
            jobs=jobs,
            duration_ms=round(seconds * 1000, 3),
            outcomes=dict(sorted(tally.items())),
        ),
    )


def _modstamp(item: JobNotification) -> datetime | None:
    value = item.fields.get("SystemModstamp")
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def outcomes_decided(
    job_id: str, notifications: Sequence[JobNotification], outcomes: Sequence[Outcome]
) -> None:
    """The lag of each written record, and a line per non-trivial outcome (Ids and uid only:
    a retry's or failure's error may quote a value, it is kept in the dead letter instead)."""
    now = datetime.now().astimezone()
    for item, outcome in zip(notifications, outcomes, strict=True):
        if outcome.kind in WRITTEN:
            stamp = _modstamp(item)
            if stamp is not None and stamp.tzinfo is not None:
                LAG_SECONDS.observe(max(0.0, (now - stamp).total_seconds()))
        if outcome.kind in TRIVIAL:
            continue
        detail = outcome.detail if outcome.kind in _CONFLICTS else None
        logger.log(
            logging.WARNING if outcome.kind in _WARNED else logging.INFO,
            "job %s: %s %s notification %s uid %s%s",
            job_id,
            outcome.kind.value,
            outcome.record_id or "-",
            outcome.notification_id,
            outcome.uid if outcome.uid is not None else "-",
            f" ({detail})" if detail else "",
            extra=fields(
                event="outcome",
                job_id=job_id,
                outcome=outcome.kind.value,
                record_id=outcome.record_id,
                notification_id=outcome.notification_id,
                uid=outcome.uid,
                detail=detail,
            ),
        )


def job_finished(counts: Mapping[OutcomeKind, int]) -> None:
    """A finished job's outcomes (as counted into sfrelay:stats) and dead letters."""
    for kind, count in counts.items():
        if kind in APPLIED:
            OUTCOMES_TOTAL.labels(kind.value).inc(count)
    if counts.get(OutcomeKind.DEAD):
        DEAD_LETTERS.inc(counts[OutcomeKind.DEAD])
