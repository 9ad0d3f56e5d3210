"""Soak benchmark: does a long-lived worker's and receiver's memory plateau, round after round?

Worker: one real redis-server and one `sfrelay worker` (long-lived, not --burst, as in
production) writing a copy of the Drupal 10 SQLite site, fed --rounds rounds (10) of
--notifications-per-round (100,000: one nightly batch): ten nights through one process. Each
round is enqueued while the worker runs and waited for until every notification has its
outcome; then the worker's RSS and Redis's used_memory are read. The records are a CRM's
(tests.bench.nightly's international names and addresses): 60% new, 30% updates of records
of earlier rounds (round 1 has none: its 30% are new too), 10% without email.

Receiver: `sfrelay serve` (one uvicorn process) receiving --messages-per-round 100-notification
messages a round over 8 keep-alive connections; its RSS after each round. Between rounds the
benchmark takes the queued jobs out of Redis, as a worker would; the dedupe keys (one per
notification, SFRELAY_DEDUPE_TTL_SECONDS) stay, so Redis's memory grows with them, by design.

The baseline is the growth from ready to after round 1 (what `tests.bench.worker` measures);
the verdict is "flat" when the last round's RSS is within FLAT_MB of round 2's (round 1 and 2
fill the caches and the allocator's arenas; a leak of 10 bytes per notification would add 8 MB
over rounds 2 to 10). --tracemalloc shows where Python's allocations grew between rounds.
Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import psutil
import redis
from redis.asyncio import Redis

from app.jobs import ApplyJob, JobNotification, Source
from app.queue import DEFAULT_QUEUE, HEALTH_CHECK_SUFFIX, JOB_KEY_PREFIX, STATS_KEY, enqueue_apply
from tests.bench.nightly import _env, _Names, _process, _wait_serving
from tests.bench.receiver import ACKED, Connection, ContactMessages
from tests.bench.receiver_apps import ORG_ID as RECEIVER_ORG_ID
from tests.messages import ACTION_ID, ORG_ID, sf_id
from tests.servers import SHARED, RedisServer, free_port

DRUPAL10 = SHARED / "drupal" / "sites" / "drupal10-standard.sqlite"
JOB_SIZE = 100  # notifications per job, as Salesforce sends them per message
CONCURRENCY = 8
FLAT_MB = 5.0  # the last round's RSS within this of round 2's: flat
FINAL = ("retry", "requeued", "dead")  # outcomes that are not a notification's last word
TIMEOUT_S = 1800.0  # per round
MB = 2**20
# --tracemalloc: the worker runs under this, and dumps a snapshot of Python's allocations to
# <dir>/<n>.snapshot at each SIGUSR1 (n counting from 1), so the rounds can be compared.
TRACED = """
import os, runpy, signal, sys, tracemalloc
directory, sys.argv = sys.argv[1], ["sfrelay", *sys.argv[2:]]
tracemalloc.start(int(os.environ.get("SOAK_FRAMES", "8")))
taken = 0
def dump(signum, frame):
    global taken
    taken += 1
    path = os.path.join(directory, f"{taken}.snapshot")
    tracemalloc.take_snapshot().dump(path + ".part")
    os.rename(path + ".part", path)
signal.signal(signal.SIGUSR1, dump)
runpy.run_module("app.cli", run_name="__main__")
"""


@dataclass(slots=True)
class Known:
    """A record created in an earlier round: what its next update starts from."""

    sobject: str
    record_id: str
    first: str
    last: str
    mail: str


class Crm:
    """The Salesforce org of the run: each round's notifications, new records and updates."""

    def __init__(self, seed: int = 11) -> None:
        self.rng = random.Random(seed)
        self.names = _Names(self.rng)
        self.known: list[Known] = []
        self.records = 0
        self.notifications = 0
        # Each round a minute later than the last, from 20 hours ago: an update is later than
        # the version it replaces (the order guard), and no stamp is ahead of now.
        self.base = datetime.now(UTC) - timedelta(hours=20)

    def round(self, number: int, total: int) -> list[JobNotification]:
        rng = self.rng
        stamp = (self.base + timedelta(minutes=number)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        updates = min(total * 3 // 10, len(self.known))
        no_email = total // 10
        out = [self._update(known, stamp) for known in rng.sample(self.known, updates)]
        made: list[Known] = []
        for i in range(total - updates):
            self.records += 1
            sobject = "Lead" if rng.random() < 0.3 else "Contact"
            record_id = sf_id("003" if sobject == "Contact" else "00Q", self.records)
            first, last = self.names.person()
            mail = "" if i < no_email else self.names.mail(first, last)
            out.append(self._note(sobject, record_id, first, last, mail, stamp))
            if mail:
                made.append(Known(sobject, record_id, first, last, mail))
        self.known += made
        rng.shuffle(out)
        return out

    def _update(self, known: Known, stamp: str) -> JobNotification:
        if self.rng.random() < 0.5:  # married, or moved
            known.last = self.names.person()[1]
        if self.rng.random() < 0.3:
            known.mail = self.names.mail(known.first, known.last)
        k = known
        return self._note(k.sobject, k.record_id, k.first, k.last, k.mail, stamp)

    def _note(
        self, sobject: str, record_id: str, first: str, last: str, mail: str, stamp: str
    ) -> JobNotification:
        self.notifications += 1
        fields = {"Id": record_id, "FirstName": first, "LastName": last}
        fields["SystemModstamp"] = fields["LastModifiedDate"] = stamp
        if mail:
            fields["Email"] = mail
        return JobNotification(sf_id("04l", self.notifications), sobject, fields)


async def _enqueue(client: Redis, notifications: list[JobNotification]) -> None:
    """One job per 100 notifications of one object, as the receiver queues a message."""
    for sobject in ("Contact", "Lead"):
        mine = [n for n in notifications if n.object == sobject]
        for start in range(0, len(mine), JOB_SIZE):
            chunk = tuple(mine[start : start + JOB_SIZE])
            job = ApplyJob(ORG_ID, Source.OUTBOUND_MESSAGE, time.time(), chunk, ACTION_ID)
            await enqueue_apply(client, DEFAULT_QUEUE, job, job_ttl_s=86400)


@dataclass(frozen=True, slots=True)
class Round:
    number: int
    done: int  # notifications applied (or received) so far
    seconds: float
    writes: int  # users written in the round (created + updated); messages for the receiver
    rss_mb: float  # after the round
    peak_mb: float  # during the round
    redis_mb: float  # Redis's used_memory after the round


def _alive(process: psutil.Process) -> bool:
    """Running: not exited (a child that exited stays a zombie until reaped)."""
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / MB


def _redis_mb(client: redis.Redis) -> float:
    return float(client.info("memory")["used_memory"]) / MB


def _outcomes(client: redis.Redis) -> dict[str, int]:
    raw = client.hgetall(STATS_KEY)
    return {k.decode()[8:]: int(v) for k, v in raw.items() if k.startswith(b"outcome:")}


def soak_worker(
    rounds: int, per_round: int, tmp: Path, traced: Path | None = None
) -> tuple[float, list[Round], str]:
    """(RSS when ready, each round, the outcomes) of one `sfrelay worker` fed round by round;
    with `traced`, a tracemalloc snapshot there after each round (TRACED)."""
    site = tmp / "drupal.sqlite"
    shutil.copyfile(DRUPAL10, site)
    server = RedisServer(port=free_port(), directory=tmp / "redis-worker")
    server.start()
    client = server.client()
    crm = Crm()
    results: list[Round] = []
    try:
        env = _env(server.url, f"sqlite:///{site}")
        launcher = ("-c", TRACED, str(traced)) if traced else ("-m", "app.cli")
        with _process(["worker"], env, tmp / "worker.log", launcher) as process:
            worker = psutil.Process(process.pid)
            deadline = time.monotonic() + 60
            while not client.exists(DEFAULT_QUEUE + HEALTH_CHECK_SUFFIX):
                if not _alive(worker) or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "worker.log").read_text()[-3000:])
                time.sleep(0.05)
            ready = _rss_mb(worker)
            expected = 0
            for number in range(1, rounds + 1):
                notifications = crm.round(number, per_round)  # made before the clock starts
                expected += len(notifications)
                before = _outcomes(client)
                started = time.perf_counter()
                peak = 0.0
                asyncio.run(_enqueue_all(server.url, notifications))
                while True:
                    peak = max(peak, _rss_mb(worker))
                    outcomes = _outcomes(client)
                    done = sum(v for k, v in outcomes.items() if k not in FINAL)
                    if done >= expected and not client.zcard(DEFAULT_QUEUE):
                        break
                    if time.perf_counter() - started > TIMEOUT_S or not _alive(worker):
                        raise RuntimeError(
                            f"round {number}: {done} of {expected} applied\n"
                            + (tmp / "worker.log").read_text()[-3000:]
                        )
                    time.sleep(0.05)
                seconds = time.perf_counter() - started
                writes = sum(outcomes.get(k, 0) - before.get(k, 0) for k in ("created", "updated"))
                rss = _rss_mb(worker)
                results.append(
                    Round(number, done, seconds, writes, rss, max(peak, rss), _redis_mb(client))
                )
                print(f"worker round {number}: {_row(results[0], results[-1])}", file=sys.stderr)
                if traced:
                    worker.send_signal(signal.SIGUSR1)
                    while not (traced / f"{number}.snapshot").exists():
                        time.sleep(0.1)
        summary = " ".join(f"{k}={v}" for k, v in sorted(_outcomes(client).items()))
    finally:
        client.close()
        server.stop()
    return ready, results, summary


async def _enqueue_all(url: str, notifications: list[JobNotification]) -> None:
    client: Redis = Redis.from_url(url)
    try:
        await _enqueue(client, notifications)
    finally:
        await client.aclose()


async def _post(port: int, messages: ContactMessages, count: int) -> list[str]:
    """`count` messages over CONCURRENCY connections; the answers that were not acks."""
    left = iter(range(count))
    errors: list[str] = []

    async def client() -> None:
        connection = await Connection.open(port)
        try:
            for _ in left:
                status, answer = await connection.post(next(messages))
                if status != 200 or ACKED not in answer:
                    errors.append(f"{status} {answer[:200]!r}")
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return errors


def _drain(client: redis.Redis) -> None:
    """Take the queued jobs out of Redis, as a worker would (the seen keys stay, as they do)."""
    while ids := cast(list[bytes], client.zrange(DEFAULT_QUEUE, 0, 999)):
        client.unlink(*(JOB_KEY_PREFIX.encode() + job_id for job_id in ids))
        client.zrem(DEFAULT_QUEUE, *ids)


def soak_receiver(rounds: int, per_round: int, tmp: Path) -> tuple[float, list[Round], str]:
    """(RSS when serving, each round, a note) of one `sfrelay serve` posted to round by round."""
    server = RedisServer(port=free_port(), directory=tmp / "redis-receiver")
    server.start()
    client = server.client()
    messages = ContactMessages(JOB_SIZE)
    results: list[Round] = []
    errors: list[str] = []
    port = free_port()
    try:
        env = _env(server.url, f"sqlite:///{tmp / 'unused.sqlite'}")
        env["SFRELAY_ORG_IDS"] = RECEIVER_ORG_ID  # ContactMessages' organization
        log = tmp / "serve.log"
        with _process(["serve", "--port", str(port)], env, log) as process:
            _wait_serving(process, port, log)
            serve = psutil.Process(process.pid)
            ready = _rss_mb(serve)
            for number in range(1, rounds + 1):
                started = time.perf_counter()
                errors += asyncio.run(_post(port, messages, per_round))
                seconds = time.perf_counter() - started
                rss = _rss_mb(serve)
                _drain(client)
                results.append(
                    Round(
                        number, number * per_round * JOB_SIZE, seconds, per_round, rss, rss,
                        _redis_mb(client),
                    )
                )  # fmt: skip
                print(f"receiver round {number}: {_row(results[0], results[-1])}", file=sys.stderr)
    finally:
        client.close()
        server.stop()
    note = f"{len(errors)} not acked" + (f", e.g. {errors[0]}" if errors else "")
    return ready, results, note


def _row(first: Round, r: Round) -> str:
    return (
        f"| {r.number} | {r.done:,} | {r.writes / r.seconds:,.0f} | {r.rss_mb:.1f} "
        f"| {r.peak_mb:.1f} | {r.rss_mb - first.rss_mb:+.1f} | {r.redis_mb:.1f} |"
    )


def table(part: str, ready: float, rounds: list[Round], note: str) -> str:
    unit = "users/s" if part == "worker" else "messages/s"
    done = "notifications applied" if part == "worker" else "notifications received"
    lines = [
        f"| round | {done} | {unit} of the round | RSS after MB | RSS peak MB "
        "| growth vs round 1 MB | Redis used_memory MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(_row(rounds[0], r) for r in rounds),
        "",
        f"Baseline: RSS {ready:.1f} MB when ready, {rounds[0].rss_mb:.1f} MB after round 1 "
        f"({rounds[0].rss_mb - ready:+.1f} MB: one round's growth"
        + (", as `tests.bench.worker` reports it)." if part == "worker" else ")."),
    ]
    if len(rounds) >= 3:
        later = rounds[-1].rss_mb - rounds[1].rss_mb
        per = later / (len(rounds) - 2)
        verdict = "flat" if abs(later) <= FLAT_MB else "GROWING"
        lines.append(
            f"Round 2 → round {rounds[-1].number}: {later:+.1f} MB ({per:+.2f} MB a round): "
            f"**{verdict}** (flat: within {FLAT_MB:.0f} MB of round 2's)."
        )
    else:
        lines.append("Fewer than 3 rounds: no verdict (round 2 → last is the one that counts).")
    lines.append(note)
    return "\n".join(lines)


def traced_growth(traced: Path, rounds: int, top: int = 15) -> str:
    """Where Python's allocations grew from round 2 to the last (or round 1 to 2), by line."""
    first = min(2, rounds - 1)
    ignored = [tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    before = tracemalloc.Snapshot.load(str(traced / f"{first}.snapshot")).filter_traces(ignored)
    after = tracemalloc.Snapshot.load(str(traced / f"{rounds}.snapshot")).filter_traces(ignored)
    total = [sum(t.size for t in snap.traces) / MB for snap in (before, after)]
    lines = [
        f"\ntracemalloc: Python's live allocations {total[0]:.1f} MB after round {first}, "
        f"{total[1]:.1f} MB after round {rounds} ({total[1] - total[0]:+.2f} MB); "
        "largest changes by line:"
    ]
    for stat in after.compare_to(before, "lineno")[:top]:
        lines.append(f"  {stat}")
    lines.append("\nthe 3 largest by traceback:")
    for stat in after.compare_to(before, "traceback")[:3]:
        lines.append(f"  {stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+,} blocks:")
        lines.extend(f"      {line}" for line in stat.traceback.format())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--notifications-per-round", type=int, default=100_000, metavar="N")
    parser.add_argument(
        "--messages-per-round",
        type=int,
        default=2_000,
        metavar="N",
        help="the receiver's: 100-notification messages a round (2000)",
    )
    parser.add_argument("--parts", default="worker,receiver", help="worker,receiver")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="run the worker under tracemalloc and print where its Python allocations grew "
        "between rounds (~8x slower; its RSS then includes tracemalloc's traces and snapshots)",
    )
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="sfrelay-soak-") as tmp_name:
        tmp = Path(tmp_name)
        if "worker" in parts:
            traced = tmp / "snapshots" if args.tracemalloc else None
            if traced:
                traced.mkdir()
            ready, rounds, outcomes = soak_worker(
                args.rounds, args.notifications_per_round, tmp, traced
            )
            print(
                f"Worker: one `sfrelay worker` (long-lived), {args.rounds} rounds of "
                f"{args.notifications_per_round:,} notifications into a copy of Drupal 10 "
                "(SQLite)\n"
            )
            print(table("worker", ready, rounds, f"Outcomes: {outcomes}"), flush=True)
            if traced and args.rounds >= 2:
                print(traced_growth(traced, args.rounds), flush=True)
        if "receiver" in parts:
            ready, rounds, note = soak_receiver(args.rounds, args.messages_per_round, tmp)
            print(
                f"\nReceiver: one `sfrelay serve`, {args.rounds} rounds of "
                f"{args.messages_per_round:,} messages of {JOB_SIZE} notifications, "
                f"{CONCURRENCY} connections\n"
            )
            print(table("receiver", ready, rounds, note), flush=True)


if __name__ == "__main__":
    main()
