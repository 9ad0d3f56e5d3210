"""`sfrelay up`: everything on one machine: a private redis-server, the receiver, a worker."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from app.config import Settings
from app.drupal.engine import create_engine
from app.errors import ConfigError, ProcessFailed

RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 30.0
Say = Callable[[str], None]


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
        return True
    return False


def _wait_listening(host: str, port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not _listening(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise ProcessFailed(f"{what} did not start on {host}:{port} (see its output above)")
        time.sleep(0.05)


@dataclass
class Stack:
    """The processes `sfrelay up` runs, stopped in reverse order of start."""

    settings: Settings
    data_dir: Path
    say: Say
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stopping: bool = False

    def start_redis(self) -> None:
        """A redis-server with AOF on, unless one already answers at SFRELAY_REDIS_URL."""
        url = urlsplit(self.settings.redis_url)
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        if _listening(host, port):
            self.say(f"using the Redis already running at {host}:{port}")
            return
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"nothing answers at SFRELAY_REDIS_URL ({host}:{port})")
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server is not installed: sudo apt-get install redis-server")
        directory = self.data_dir / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--maxmemory-policy", "noeviction", "--loglevel", "warning",
        ]  # fmt: skip
        process = subprocess.Popen(command)
        self.processes.append(("redis-server", process))
        _wait_listening("127.0.0.1", port, process, "redis-server")
        self.say(f"redis-server on 127.0.0.1:{port}, data in {directory}")

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=self.env)
        self.processes.append((name, process))
        return process

    def start_receiver(self) -> None:
        process = self.spawn("receiver", "serve")
        _wait_listening(self.settings.host, self.settings.port, process, "the receiver")
        self.say(
            f"receiver on http://{self.settings.host}:{self.settings.port}"
            "/salesforce/outbound-message"
        )

    def supervise(self, worker_wanted: bool) -> int:
        """Keep the worker running (it exits to shed memory); stop all if another dies."""
        worker = self.spawn("worker", "worker") if worker_wanted else None
        while not self.stopping:
            time.sleep(0.2)
            for name, process in list(self.processes):
                code = process.poll()
                if code is None or self.stopping:
                    continue
                if process is worker:
                    self.processes.remove((name, process))
                    self.say(f"worker exited ({code}); starting a fresh one")
                    time.sleep(RESTART_DELAY_S if code else 0)
                    worker = self.spawn("worker", "worker")
                else:
                    self.say(f"{name} exited ({code}); stopping everything")
                    return 1
        return 0

    def stop(self) -> None:
        self.stopping = True
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.say(f"{name} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")
                    process.kill()
                    process.wait()


def _drupal_database_problem(settings: Settings) -> str | None:
    try:
        create_engine(settings.database_url)
    except ConfigError as exc:
        return str(exc)
    return None


def up(settings: Settings, data_dir: Path, say: Say) -> int:
    """Run Redis, the receiver and a worker until SIGINT/SIGTERM; returns the exit code."""
    settings.require_receiver_ready()
    stack = Stack(settings, data_dir, say)

    def on_signal(signum: int, _frame: object) -> None:
        stack.stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start_redis()
        stack.env["SFRELAY_REDIS_URL"] = settings.redis_url
        stack.start_receiver()
        problem = _drupal_database_problem(settings)
        if problem:
            say(f"no worker: {problem}; notifications stay queued until it is fixed")
        else:
            say(f"worker applying notifications to {settings.database_url}")
        say("running; Ctrl-C stops everything")
        return stack.supervise(worker_wanted=problem is None)
    finally:
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
