"""The `sfrelay` command: serve, send, queue stats (and the worker-side commands)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import orjson
from pydantic import ValidationError

from app.config import Settings
from app.errors import ConfigError, QueueUnavailable
from app.receiver import ENDPOINT

Command = Callable[[argparse.Namespace, Settings], int]


def _fail(message: str) -> int:
    print(f"sfrelay: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from app.main import create_app

    settings.require_receiver_ready()
    create_app(settings)  # fail here, with a clear message, not inside a worker process
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers,
        proxy_headers=False,  # X-Forwarded-For is judged by SFRELAY_TRUSTED_PROXIES alone
        server_header=False,
        log_level="info",
    )
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    url = args.url or f"http://{settings.host}:{settings.port}{ENDPOINT}"
    params = {}
    if settings.endpoint_token is not None and "token=" not in url:
        params["token"] = settings.endpoint_token.get_secret_value()
    headers = {
        "Content-Type": "text/xml; charset=UTF-8",
        "SOAPAction": '""',
        "User-Agent": "sfrelay-send (Salesforce Outbound Message replay)",
    }
    try:
        response = httpx.post(url, content=body, headers=headers, params=params, timeout=60)
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach {url}: {exc} (is `sfrelay serve` running?)")
    print(response.text)
    acked = response.status_code == 200 and b"<Ack>true</Ack>" in response.content
    return 0 if acked else 1


def cmd_queue_stats(args: argparse.Namespace, settings: Settings) -> int:
    from app.main import redis_client
    from app.queue import queue_stats

    async def read() -> dict[str, int]:
        redis = redis_client(settings)
        try:
            return (await queue_stats(redis, settings.queue_name)).as_dict()
        finally:
            await redis.aclose()

    try:
        stats = asyncio.run(read())
    except QueueUnavailable as exc:
        return _fail(f"{exc}; check SFRELAY_REDIS_URL")
    if args.json:
        print(orjson.dumps(stats).decode())
    else:
        for key, value in stats.items():
            print(f"{key:<12} {value}")
    return 0


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

    send = sub.add_parser("send", help="POST a SOAP file the way Salesforce does")
    send.add_argument("file", help="the message file, or - for standard input")
    send.add_argument(
        "--url", help=f"endpoint (default http://SFRELAY_HOST:SFRELAY_PORT{ENDPOINT})"
    )
    send.set_defaults(func=cmd_send)

    queue = sub.add_parser("queue", help="look at the queue")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    stats = queue_sub.add_parser("stats", help="notifications waiting, being applied, dead")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(func=cmd_queue_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        return _fail(f"invalid settings:\n{exc}")
    func: Command = args.func
    try:
        return func(args, settings)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
