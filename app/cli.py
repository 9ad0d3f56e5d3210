"""The `sfrelay` command: up, serve, send, queue stats, status, why, worker, dead, check."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import httpx
import orjson
from pydantic import ValidationError

from app.config import Settings, describe_invalid
from app.errors import ConfigError, ProcessFailed, QueueUnavailable, RetryableError
from app.visible import visible, visible_json

if TYPE_CHECKING:
    from app.dead import DeadLetter

Command = Callable[[argparse.Namespace, Settings], int]


def _show(lines: Iterable[str], file: TextIO | None = None) -> None:
    """Print text that quotes stored or received values (a name, an email, an error), each
    line visible-safe (app.visible): no escape sequence or bidi override reaches the terminal."""
    print("\n".join(visible(line) for line in lines), file=file or sys.stdout)


def _show_json(value: object) -> None:
    print(visible_json(orjson.dumps(value).decode()))


def _fail(message: str, *lines: str) -> int:
    _show([f"sfrelay: {message}", *lines], file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from app.logs import uvicorn_config
    from app.main import check_redis_at_start_up, create_app
    from app.metrics import multiprocess_dir
    from app.server import uvicorn_options

    settings.require_receiver_ready()
    create_app(settings)  # fail here, with a clear message, not inside a worker process
    asyncio.run(check_redis_at_start_up(settings))  # and refuse a Redis that cannot keep acks
    with multiprocess_dir(args.workers):  # metrics: PROMETHEUS_MULTIPROC_DIR for N processes
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=args.workers,
            log_level="info",
            log_config=uvicorn_config(settings.log_format),  # logging: app/logs.py
            **uvicorn_options(settings),
        )
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from app.up import up

    def say(line: str) -> None:
        if settings.log_format == "json":  # logging: one JSON object per line (app/logs.py)
            logging.getLogger("sfrelay.up").info(line)
            return
        print(f"sfrelay up: {line}", file=sys.stderr, flush=True)

    return up(settings, Path(args.data_dir), say)


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    from app.receiver import ENDPOINT

    url = httpx.URL(args.url or f"http://{settings.host}:{settings.port}{ENDPOINT}")
    if settings.endpoint_token is not None and "token" not in url.params:
        url = url.copy_merge_params({"token": settings.endpoint_token.get_secret_value()})
    headers = {
        "Content-Type": "text/xml; charset=UTF-8",
        "SOAPAction": '""',
        "User-Agent": "sfrelay-send (Salesforce Outbound Message replay)",
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        shown = url.copy_remove_param("token")
        return _fail(f"cannot reach {shown}: {exc} (is `sfrelay serve` running?)")
    print(response.text)
    acked = response.status_code == 200 and b"<Ack>true</Ack>" in response.content
    if not acked and b"Fault>" not in response.content:  # not sfrelay's SOAP answer: say why
        why = f"{url.copy_remove_param('token')} answered HTTP {response.status_code}"
        if response.is_redirect:
            moved = httpx.URL(response.headers.get("location", "")).copy_remove_param("token")
            why += f", a redirect to {moved}, not an Ack"
        else:
            why += ", not a SOAP answer"
        if response.is_redirect or response.status_code in (404, 405):
            why += f": sfrelay's endpoint is {ENDPOINT} exactly, without a trailing slash"
        print(f"sfrelay: {why}", file=sys.stderr)
    return 0 if acked else 1


def cmd_queue_stats(args: argparse.Namespace, settings: Settings) -> int:
    from app.queue import QueueStats, queue_stats, redis_client

    async def read() -> QueueStats:
        redis = redis_client(settings)
        try:
            return await queue_stats(redis, settings.queue_name)
        finally:
            await redis.aclose()

    try:
        queue = asyncio.run(read())
    except QueueUnavailable as exc:
        return _fail(f"{exc}; check SFRELAY_REDIS_URL")
    stats, outcomes = queue.as_dict(), queue.outcomes
    # Dead letters are also kept by the workers in Drupal's database, where one is configured.
    from app.dead import count_in_database

    try:
        stats["dead"] += asyncio.run(count_in_database(settings))
    except (ConfigError, RetryableError) as exc:
        _show(
            [f"sfrelay: dead counts only Redis's dead letters: {exc} (check SFRELAY_DATABASE_URL)"],
            sys.stderr,
        )
    if args.json:
        _show_json(stats)
    else:
        _show(f"{key:<20} {value}" for key, value in {**stats, **outcomes}.items())
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from app.status import collect, render

    status = asyncio.run(collect(settings))
    if args.json:
        _show_json(status.as_dict())
    else:
        _show(render(status))
    return 0


def cmd_why(args: argparse.Namespace, settings: Settings) -> int:
    from app.why import BadQuery, answer, parse_query, render

    try:
        query = parse_query(args.id_or_email)
    except BadQuery as exc:
        return _fail(str(exc))
    result = asyncio.run(answer(settings, query))
    if args.json:
        _show_json(result.as_dict())
    else:
        _show(render(result))
    return 0 if result.found else 1


def cmd_queue_purge(args: argparse.Namespace, settings: Settings) -> int:
    from app.purge import run_purge

    if not args.no_email:
        return _fail("say what to purge: --no-email (queued records without a usable email)")
    report = asyncio.run(
        run_purge(settings, check_salesforce=args.check_salesforce, dry_run=args.dry_run)
    )
    if args.json:
        print(orjson.dumps({**report.as_dict(), "dry_run": args.dry_run}).decode())
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {report.removed} queued notifications without a usable email")
        if report.kept:
            print(f"kept {report.kept}: Salesforce has an email for them now")
        if report.busy:
            print(f"left {report.busy} jobs a worker was running (it skips those records)")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from redis.exceptions import RedisError, ResponseError

    from app.queue import refusal

    # app/ never imports workers/ at module level: the receiver's image needs no worker code.
    worker_main = importlib.import_module("workers.main")
    worker = worker_main.Worker(settings, burst=args.burst)
    try:
        worker.run()
    except ResponseError as exc:  # Redis answers, and refuses (out of memory, read-only, ...)
        return _fail(f"Redis refuses the worker's writes: {refusal(exc)}")
    except (RedisError, OSError) as exc:
        return _fail(f"cannot use Redis: {exc}; check SFRELAY_REDIS_URL and that Redis runs")
    return 0


def _dead_table(letters: Sequence[DeadLetter]) -> list[str]:
    """`sfrelay dead list`'s table: a header, then a line per dead letter."""
    width = max([28] + [len(letter.id) for letter in letters])  # the receiver's are longer
    lines = [
        f"{'ID':<{width}} {'NOTIFICATION':<18} {'RECORD':<18} {'TRIES':>5}  LAST SEEN (UTC)      "
        "ERROR"
    ]
    for letter in letters:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.last_seen))
        lines.append(
            f"{letter.id:<{width}} {letter.notification_id or '-':<18} "
            f"{letter.record_id or '-':<18} {letter.attempts:>5}  {seen}  {letter.error}"
        )
    return lines


def cmd_dead_list(args: argparse.Namespace, settings: Settings) -> int:
    from app.dead import list_dead_letters

    letters = asyncio.run(list_dead_letters(settings))
    if args.json:
        _show_json([letter.as_dict() for letter in letters])
        return 0
    if not letters:
        print("no dead letters")
        return 0
    _show(_dead_table(letters))
    refused = sum(1 for letter in letters if letter.refused_on_receipt)
    if refused:
        print(
            f"\n{refused} {'dead letter' if refused == 1 else 'dead letters'} refused on "
            "receipt cannot be replayed: fix the record in Salesforce, which sends a new "
            "notification, then `sfrelay dead discard ID`"
        )
    return 0


def _dead_ids(args: argparse.Namespace, verb: str) -> str | None:
    """What is wrong with `dead replay|discard`'s IDs and --all, if anything."""
    if not args.ids and not args.all:
        return f"name the dead letters to {verb} (IDs from `sfrelay dead list`) or --all"
    if args.ids and args.all:
        return "give IDs or --all, not both"
    return None


def cmd_dead_replay(args: argparse.Namespace, settings: Settings) -> int:
    from app.dead import replay_dead_letters

    wrong = _dead_ids(args, "replay")
    if wrong:
        return _fail(wrong)

    def progress(done: int, total: int) -> None:
        print(f"\rreplayed {done}/{total}", end="", file=sys.stderr, flush=True)

    result = asyncio.run(replay_dead_letters(settings, None if args.all else args.ids, progress))
    if result.replayed:
        print(file=sys.stderr)
    print(f"replayed {result.replayed} dead letters as {result.jobs} jobs")
    for letter_id, why in result.refused.items():
        _show([f"not replayed {letter_id}: {why}"], sys.stderr)
    return 1 if result.refused else 0


def cmd_dead_discard(args: argparse.Namespace, settings: Settings) -> int:
    from app.dead import discard_dead_letters

    wrong = _dead_ids(args, "discard")
    if wrong:
        return _fail(wrong)
    result = asyncio.run(discard_dead_letters(settings, None if args.all else args.ids))
    if result.refused:
        for given, why in result.refused.items():
            _show([f"not discarded {given}: {why}"], sys.stderr)
        return _fail("nothing discarded: name each dead letter by an ID `sfrelay dead list` shows")
    if result.discarded:
        _show(_dead_table(result.discarded))
    print(f"discarded {len(result.discarded)} dead letters")
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from app.check import all_ok, run_checks

    results = asyncio.run(run_checks(settings))
    ok = all_ok(results)
    if args.json:
        _show_json({"ok": ok, "parts": {r.part: r.as_dict() for r in results}})
    else:
        _show(f"{r.part:<11} {r.status:<15} {r.detail}" for r in results)
    return 0 if ok else 1


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from app.reconcile import Progress, parse_since, run_reconcile

    since = parse_since(args.since) if args.since else None
    tty = sys.stderr.isatty()

    def progress(sobject: str) -> Progress:
        return Progress(sys.stderr, tty, label=sobject)

    report = asyncio.run(
        run_reconcile(settings, since=since, dry_run=args.dry_run, progress=progress)
    )
    if report.stopped:
        _show([f"sfrelay: reconcile stopped early: {report.stopped}"], sys.stderr)
    if args.json:
        _show_json({**report.as_dict(), "dry_run": args.dry_run})
    else:
        counts = {k: v for k, v in report.as_dict().items() if k != "stopped"}
        print(
            ("would queue: " if args.dry_run else "")
            + ", ".join(f"{k} {v}" for k, v in counts.items())
        )
    return 1 if report.errors else 0


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from app.backfill import run_backfill
    from app.reconcile import Progress, parse_since

    since = parse_since(args.since) if args.since else None
    tty = sys.stderr.isatty()

    def progress(sobject: str) -> Progress:
        return Progress(sys.stderr, tty, label=sobject)

    started = time.monotonic()
    report = asyncio.run(
        run_backfill(
            settings,
            objects=[args.object] if args.object else None,
            since=since,
            dry_run=args.dry_run,
            progress=progress,
        )
    )
    elapsed = time.monotonic() - started
    if report.stopped:
        _show(
            [f"sfrelay: backfill stopped early: {report.stopped}; run it again to resume"],
            sys.stderr,
        )
    counts = ", ".join(f"{k} {v}" for k, v in report.as_dict().items() if k != "stopped")
    prefix = "dry run (nothing queued): " if args.dry_run else "backfill done: "
    if report.stopped and not args.dry_run:
        prefix = "backfill stopped: "
    print(f"{prefix}{counts} in {elapsed:.0f} s")
    return 1 if report.errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfrelay",
        description="Salesforce Outbound Messages in, Drupal user accounts out. "
        "Settings are SFRELAY_* environment variables (or a .env file).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the receiver (Salesforce posts here)")
    serve.add_argument("--host", help="address to bind (SFRELAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (SFRELAY_PORT, default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="receiver processes (default 1)")
    serve.set_defaults(func=cmd_serve)

    up = sub.add_parser(
        "up", help="everything on one machine: a local Redis, the receiver and a worker"
    )
    up.add_argument(
        "--data-dir",
        default="var",
        help="Redis's data, the demo site and sfrelay.env for the other commands (default var/)",
    )
    up.set_defaults(func=cmd_up)

    send = sub.add_parser("send", help="POST a SOAP file the way Salesforce does")
    send.add_argument("file", help="the message file, or - for standard input")
    send.add_argument(
        "--url", help="endpoint (default: the one `sfrelay serve` answers on SFRELAY_HOST:PORT)"
    )
    send.set_defaults(func=cmd_send)

    queue = sub.add_parser("queue", help="look at the queue")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    stats = queue_sub.add_parser("stats", help="notifications waiting, being applied, dead")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(func=cmd_queue_stats)
    purge = queue_sub.add_parser(
        "purge", help="take queued notifications out (recorded as skipped), safe while workers run"
    )
    purge.add_argument(
        "--no-email", action="store_true", help="those whose record has no usable email"
    )
    purge.add_argument(
        "--check-salesforce",
        action="store_true",
        help="only if Salesforce still has no email for the record",
    )
    purge.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    purge.add_argument("--json", action="store_true", help="one JSON object")
    purge.set_defaults(func=cmd_queue_purge)

    status = sub.add_parser(
        "status", help="queue, traffic, outcomes, dead letters, workers, database: one screen"
    )
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=cmd_status)

    why = sub.add_parser("why", help="what happened to one Salesforce record or one email")
    why.add_argument("id_or_email", metavar="ID_OR_EMAIL", help="a record Id (15/18) or email")
    why.add_argument("--json", action="store_true", help="one JSON object")
    why.set_defaults(func=cmd_why)

    worker = sub.add_parser("worker", help="apply queued notifications to Drupal (arq worker)")
    worker.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    worker.set_defaults(func=cmd_worker)

    dead = sub.add_parser("dead", help="notifications that could not be applied")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="COMMAND")
    dead_list = dead_sub.add_parser("list", help="list the dead letters")
    dead_list.add_argument("--json", action="store_true", help="one JSON array")
    dead_list.set_defaults(func=cmd_dead_list)
    replay = dead_sub.add_parser("replay", help="queue dead letters again for the workers")
    replay.add_argument(
        "ids", nargs="*", metavar="ID", help="IDs (or notification Ids) from `sfrelay dead list`"
    )
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.set_defaults(func=cmd_dead_replay)
    discard = dead_sub.add_parser(
        "discard", help="remove dead letters for good (those refused on receipt, say)"
    )
    discard.add_argument(
        "ids", nargs="*", metavar="ID", help="IDs (or notification Ids) from `sfrelay dead list`"
    )
    discard.add_argument("--all", action="store_true", help="every dead letter (asks nothing)")
    discard.set_defaults(func=cmd_dead_discard)

    check = sub.add_parser(
        "check", help="whether Redis, the Drupal database and Salesforce work (read-only)"
    )
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.set_defaults(func=cmd_check)

    reconcile = sub.add_parser(
        "reconcile", help="queue what push missed: records changed or deleted in Salesforce"
    )
    reconcile.add_argument("--since", help="ISO 8601 start (default: the stored watermark)")
    reconcile.add_argument("--dry-run", action="store_true", help="count, queue nothing")
    reconcile.add_argument("--json", action="store_true", help="one JSON object as the last line")
    reconcile.set_defaults(func=cmd_reconcile)

    backfill = sub.add_parser(
        "backfill", help="queue every matching Salesforce record (resumable; then reconcile)"
    )
    backfill.add_argument("--object", choices=["Contact", "Lead"], help="one object only")
    backfill.add_argument("--since", help="only records changed from this ISO 8601 time")
    backfill.add_argument("--dry-run", action="store_true", help="count, queue nothing")
    backfill.set_defaults(func=cmd_backfill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from app.logs import configure, configure_default

    configure_default()
    args = build_parser().parse_args(argv)
    try:
        # `up` writes var/sfrelay.env (LOCAL_ENV_FILE) for the other commands: never its input.
        settings = Settings(_env_file=".env") if args.command == "up" else Settings()
    except ValidationError as exc:
        return _fail("invalid settings:", *(f"  {it}" for it in describe_invalid(exc)))
    configure(settings.log_format)  # logging of every command: app/logs.py
    func: Command = args.func
    try:
        return func(args, settings)
    except (ConfigError, ProcessFailed) as exc:
        return _fail(str(exc))
    except QueueUnavailable as exc:
        return _fail(f"{exc}; check SFRELAY_REDIS_URL and that Redis runs")
    except RetryableError as exc:
        return _fail(f"the Drupal database is unavailable: {exc}; check SFRELAY_DATABASE_URL")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sfrelay status | head`: the reader has all it wanted
        # Python would flush stdout again at exit and complain: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
