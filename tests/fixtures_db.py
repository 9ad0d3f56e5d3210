"""Fixtures for Drupal databases: SQLite copies of ../shared/drupal/sites, PostgreSQL, MariaDB.

`drupal_site` is parametrized over every backend the rules must hold on; each test gets a fresh
Drupal database: a copy of a real site (SQLite), or a new database made from a template that
was loaded once per session from the shared dumps (pg: CREATE DATABASE ... TEMPLATE; MariaDB:
CREATE TABLE ... LIKE + INSERT ... SELECT). The servers start once per session, on free
ports in temporary directories, only when a test needs them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.drupal.engine import create_engine
from tests import drupal_schemas
from tests.servers import free_port, wait_for_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_names = itertools.count(1)


def _server_dir(prefix: str, owner: str | None = None) -> Path:
    # Not pytest's tmp_path: its parents are private to root, and postgres runs as postgres.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        shutil.chown(path, owner, owner)
    return path


@dataclass
class Server:
    """A database server process for the session."""

    kind: str  # "postgresql" | "mariadb"
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    templates: set[int] = field(default_factory=set)
    command: list[str] = field(default_factory=list)
    popen_kwargs: dict[str, Any] = field(default_factory=dict)

    def restart(self) -> None:
        """Stop the server as its operator would (PostgreSQL's fast shutdown, MariaDB's
        SIGTERM: every connection closed) and start it again on its data."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT if self.kind == "postgresql" else signal.SIGTERM)
        self.process.wait(30)
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=subprocess.DEVNULL, stderr=log, **self.popen_kwargs
            )
        wait_for_port(self.port, timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            # The data is thrown away: no clean shutdown needed. SIGQUIT is PostgreSQL's
            # immediate shutdown (the postmaster still stops its children); MariaDB is killed.
            if self.kind == "postgresql":
                self.process.send_signal(signal.SIGQUIT)
            else:
                self.process.kill()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str) -> str:
        if self.kind == "postgresql":
            return f"pgsql://postgres@127.0.0.1:{self.port}/{database}"
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def admin_engine(self) -> AsyncEngine:
        if self.kind == "postgresql":
            return create_async_engine(
                f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres",
                isolation_level="AUTOCOMMIT",
            )
        return create_async_engine(
            f"mysql+aiomysql://root@127.0.0.1:{self.port}/?charset=utf8mb4",
            isolation_level="AUTOCOMMIT",
        )

    async def template(self, major: int) -> str:
        """The session's template database for a Drupal major, loaded once."""
        name = f"drupal{major}_template"
        if major in self.templates:
            return name
        admin = self.admin_engine()
        async with admin.connect() as conn:
            await conn.execute(text(f"CREATE DATABASE {name}"))
        await admin.dispose()
        engine = create_engine(self.url(name))
        async with engine.begin() as conn:
            await drupal_schemas.load(conn, engine.dialect.name, major)
        await engine.dispose()
        self.templates.add(major)
        return name

    async def fresh(self, major: int) -> str:
        """A new database holding a copy of the template."""
        template = await self.template(major)
        name = f"site{next(_names)}_d{major}"
        admin = self.admin_engine()
        async with admin.connect() as conn:
            if self.kind == "postgresql":
                await conn.execute(text(f"CREATE DATABASE {name} TEMPLATE {template}"))
            else:
                await conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
                await conn.execute(text(drupal_schemas.KEEP_ZERO_IDS))
                tables = await conn.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"
                    ),
                    {"s": template},
                )
                for (table,) in tables.all():
                    await conn.execute(text(f"CREATE TABLE {name}.{table} LIKE {template}.{table}"))
                    await conn.execute(
                        text(f"INSERT INTO {name}.{table} SELECT * FROM {template}.{table}")
                    )
        await admin.dispose()
        return name


# The tests' PostgreSQL skips what only a crash would need. The benchmarks' keeps
# PostgreSQL's defaults, as a real site runs it: each commit waits for its WAL fsync, and a
# page's first change after a checkpoint writes the whole page to the WAL.
NOT_DURABLE = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def start_postgres(*, durable: bool = False, options: tuple[str, ...] = ()) -> Server:
    """A PostgreSQL server of its own; `durable`: PostgreSQL's own durability (benchmarks);
    `options`: more of the server's command-line arguments (-c ssl=on)."""
    directory = _server_dir("sfrelay-pg-", owner="postgres")
    data = directory / "data"
    initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres"]
    initdb += ["--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
    subprocess.run(initdb, check=True, capture_output=True, **_as_postgres())
    port = free_port()
    command = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port)]
    command += ["-k", str(directory), "-c", "listen_addresses=127.0.0.1"]
    if not durable:
        command += [arg for flag in NOT_DURABLE for arg in ("-c", flag)]
    command += options
    return _start(Server("postgresql", port, directory), command, **_as_postgres())


def _as_postgres() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: as root (CI), run it as the postgres user. Popen's
    own setuid (not runuser), so that signals reach the postmaster itself."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


# The tests' MariaDB skips what only a crash would need (a commit's redo-log flush, the
# doublewrite buffer) and keeps its buffer pool small. The benchmarks' keeps MariaDB's
# defaults, as a real site runs it: each commit flushes the redo log to disk.
MARIADB_NOT_DURABLE = (
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--innodb-buffer-pool-size=64M",
)


def start_mariadb(
    *, durable: bool = False, grants: bool = False, options: tuple[str, ...] = ()
) -> Server:
    """A MariaDB server of its own; `durable`: MariaDB's own durability and buffer pool
    (benchmarks); `grants`: users and passwords are checked (root@localhost has none);
    `options`: more of the server's command-line arguments (--ssl-cert=...)."""
    directory = _server_dir("sfrelay-mariadb-")
    data = directory / "data"
    user = ["--user=root"] if os.geteuid() == 0 else []
    install = ["mariadb-install-db", "--no-defaults", f"--datadir={data}", *user]
    install += ["--auth-root-authentication-method=normal", "--skip-test-db"]
    subprocess.run(install, check=True, capture_output=True)
    port = free_port()
    command = ["mariadbd", "--no-defaults", f"--datadir={data}", f"--port={port}", *user]
    command += ["--bind-address=127.0.0.1", f"--socket={directory / 'mysqld.sock'}"]
    command += [f"--pid-file={directory / 'mysqld.pid'}", "--skip-log-bin"]
    if not grants:
        command += ["--skip-grant-tables"]
    if not durable:
        command += MARIADB_NOT_DURABLE
    command += ["--character-set-server=utf8mb4"]
    command += ["--collation-server=utf8mb4_general_ci", *options]
    return _start(Server("mariadb", port, directory), command)


def _start(server: Server, command: list[str], **kwargs: Any) -> Server:
    server.command, server.popen_kwargs = command, kwargs
    with (server.directory / "server.log").open("wb") as log:
        server.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, **kwargs)
    try:
        wait_for_port(server.port, timeout=30)
    except TimeoutError:
        tail = (server.directory / "server.log").read_text(errors="replace")[-2000:]
        server.stop()
        raise RuntimeError(f"{server.kind} did not start:\n{tail}") from None
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[Server]:
    server = start_mariadb()
    yield server
    server.stop()


@dataclass
class DrupalSite:
    """One fresh Drupal database for a test, and a way to read it back."""

    id: str
    backend: str  # "sqlite" | "postgresql" | "mariadb"
    major: int  # 7 or 10 (= Drupal 8+)
    url: str
    engine: AsyncEngine

    async def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            result = await conn.execute(text(sql), params)
            return [dict(row._mapping) for row in result]

    async def execute(self, sql: str, **params: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(sql), params)


# id -> (backend, major, SQLite site file)
SITES: dict[str, tuple[str, int, str | None]] = {
    "sqlite-d10": ("sqlite", 10, "drupal10-standard.sqlite"),
    "sqlite-d10-minimal": ("sqlite", 10, "drupal10-minimal.sqlite"),
    "sqlite-d7": ("sqlite", 7, "drupal7-standard.sqlite"),
    "pg-d10": ("postgresql", 10, None),
    "pg-d7": ("postgresql", 7, None),
    "mariadb-d10": ("mariadb", 10, None),
    "mariadb-d7": ("mariadb", 7, None),
}


@pytest.fixture(params=list(SITES), ids=list(SITES))
async def drupal_site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DrupalSite]:
    backend, major, filename = SITES[request.param]
    if filename is not None:
        url = f"sqlite:///{drupal_schemas.site_copy(filename, tmp_path)}"
    else:
        server: Server = request.getfixturevalue(
            "pg_server" if backend == "postgresql" else "mariadb_server"
        )
        url = server.url(await server.fresh(major))
    engine = create_engine(url)
    yield DrupalSite(request.param, backend, major, url, engine)
    await engine.dispose()
