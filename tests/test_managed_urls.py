"""The URLs managed services give, tried on real servers: TLS with a certificate of our own
CA (rediss://, ?sslmode=, ?ssl_ca=), passwords with URL characters, ACL users, sockets.
Each connection works in every process that uses it, or is refused saying what to write."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.errors import RetryableError
from app.sync import Syncer
from tests.drupal_schemas import site_copy
from tests.factories import note, sf
from tests.fixtures_db import Server, start_mariadb, start_postgres
from tests.fixtures_worker import PROJECT
from tests.servers import RedisServer, free_port, wait_for_port
from tests.test_cli_settings import sfrelay
from tests.tls import Certificates, make_certificates

# Every character a URL gives a meaning to; written percent-encoded, as providers say.
PASSWORD = "p@ss:w/rd%#?x"
ENCODED = "p%40ss%3Aw%2Frd%25%23%3Fx"


@dataclass
class TlsRedis:
    port: int
    socket: Path
    certs: Certificates

    def url(self, query: str = "", *, password: str = ENCODED, db: int = 3) -> str:
        return f"rediss://relay:{password}@127.0.0.1:{self.port}/{db}" + (
            f"?{query}" if query else ""
        )


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    """A redis-server that speaks TLS only, with an ACL user and no default user, as a
    managed Redis with in-transit encryption and AUTH has it."""
    directory = Path(tempfile.mkdtemp(prefix="sfrelay-tls-redis-"))
    certs = make_certificates(directory / "certs")
    port = free_port()
    command = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    command += ["--dir", str(directory), "--save", "", "--appendonly", "yes"]
    command += ["--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key)]
    command += ["--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no"]
    command += ["--unixsocket", str(directory / "redis.sock")]
    command += ["--user", "default", "off", "--user", "relay", "on", f">{PASSWORD}"]
    command += ["~*", "&*", "+@all"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield TlsRedis(port, directory / "redis.sock", certs)
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(
    "form",
    [
        # arq's from_dsn dropped the query: the worker verified against the system's CAs and
        # failed (CERTIFICATE_VERIFY_FAILED) where status, check and the receiver connected.
        "ssl_ca_certs",
        # Heroku's Redis has a self-signed certificate: its docs say ssl_cert_reqs=none.
        "ssl_cert_reqs=none",
        "unix socket",
    ],
)
def test_every_process_connects_to_redis_as_the_url_says(
    tls_redis: TlsRedis, tmp_path: Path, form: str
) -> None:
    url = {
        "ssl_ca_certs": tls_redis.url(f"ssl_ca_certs={tls_redis.certs.ca}"),
        "ssl_cert_reqs=none": tls_redis.url("ssl_cert_reqs=none"),
        "unix socket": f"unix://relay:{ENCODED}@{tls_redis.socket}?db=2",
    }[form]
    site = site_copy("drupal10-standard.sqlite", tmp_path)
    env = {"SFRELAY_REDIS_URL": url, "SFRELAY_DATABASE_URL": f"sqlite:///{site}"}
    for command in (["status"], ["worker", "--burst"], ["dead", "list"]):
        result = sfrelay(tmp_path, env, *command)
        assert result.returncode == 0, result.stderr


def test_an_unverified_redis_certificate_is_refused_without_the_password(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    site = site_copy("drupal10-standard.sqlite", tmp_path)
    env = {"SFRELAY_REDIS_URL": tls_redis.url(), "SFRELAY_DATABASE_URL": f"sqlite:///{site}"}
    for command in (["status"], ["worker", "--burst"]):
        result = sfrelay(tmp_path, env, *command)
        assert result.returncode == 2
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr.splitlines()[-1]
        assert "check SFRELAY_REDIS_URL" in result.stderr.splitlines()[-1]
        assert "p@ss" not in result.stderr and ENCODED not in result.stderr


def test_a_wrong_redis_password_is_refused_without_showing_it(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    url = tls_redis.url(f"ssl_ca_certs={tls_redis.certs.ca}", password="s3cret%2Fx")
    result = sfrelay(tmp_path, {"SFRELAY_REDIS_URL": url}, "status")
    assert (result.returncode, result.stderr) == (
        2,
        "sfrelay: cannot read the queue (Redis): invalid username-password pair or user is "
        "disabled.; check SFRELAY_REDIS_URL and that Redis runs\n",
    )


@pytest.mark.parametrize(
    ("query", "line"),
    [
        (  # redis-py passed it to its connection: a TypeError traceback at the first command
            "ssl=true",
            "SFRELAY_REDIS_URL: ?ssl= is not read by sfrelay; a rediss:// URL is TLS, and its "
            "query may give db, ssl_ca_certs, ssl_cert_reqs, ssl_certfile, ssl_keyfile, "
            "ssl_check_hostname",
        ),
        (
            "ssl_cert_reqs=CERT_NONE",
            "SFRELAY_REDIS_URL: ssl_cert_reqs must be none, optional or required (not 'CERT_NONE')",
        ),
        (
            "ssl_check_hostname=yes",
            "SFRELAY_REDIS_URL: ssl_check_hostname must be true or false (not 'yes')",
        ),
    ],
)
def test_a_redis_url_parameter_not_every_process_reads_is_refused(
    tmp_path: Path, query: str, line: str
) -> None:
    for command in (["status"], ["worker", "--burst"], ["serve"]):
        result = sfrelay(
            tmp_path, {"SFRELAY_REDIS_URL": f"rediss://:s3cret@db:6380/0?{query}"}, *command
        )
        assert (result.returncode, result.stderr) == (2, f"sfrelay: invalid settings:\n  {line}\n")


def test_a_tls_parameter_on_a_plain_redis_url_asks_for_rediss(tmp_path: Path) -> None:
    """redis-py passed ssl_ca_certs to its plain connection: a TypeError traceback."""
    result = sfrelay(
        tmp_path, {"SFRELAY_REDIS_URL": "redis://:s3cret@db:6379/0?ssl_ca_certs=/ca.pem"}, "status"
    )
    assert (result.returncode, result.stderr) == (
        2,
        "sfrelay: invalid settings:\n  SFRELAY_REDIS_URL: ?ssl_ca_certs= is for TLS: write the "
        "URL with rediss://\n",
    )


@dataclass
class TlsDatabase:
    server: Server
    database: str
    certs: Certificates

    def url(self, query: str = "", *, user: str = "relay", password: str = ENCODED) -> str:
        scheme = "pgsql" if self.server.kind == "postgresql" else "mysql"
        where = f"{user}:{password}@127.0.0.1:{self.server.port}/{self.database}"
        return f"{scheme}://{where}" + (f"?{query}" if query else "")


def _fresh_site(server: Server) -> str:
    """A Drupal 10 database, once the server accepts logins (wait_for_port saw it listen)."""
    _fresh_site_ready(server)
    return asyncio.run(server.fresh(10))


def _fresh_site_ready(server: Server) -> None:
    """Until the server takes logins: PostgreSQL listens before it has started up."""
    deadline = time.monotonic() + 30
    while True:
        try:
            asyncio.run(_admin(server, "SELECT 1"))
            return
        except DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsDatabase]:
    """PostgreSQL 15 taking the user relay over TLS only, with a password (scram-sha-256),
    as a managed PostgreSQL does; postgres itself logs in without one, for the fixtures."""
    directory = Path(tempfile.mkdtemp(prefix="sfrelay-pg-tls-"))
    shutil.chown(directory, "postgres", "postgres")
    certs = make_certificates(directory, owner="postgres")
    hba = directory / "pg_hba.conf"
    hba.write_text(
        "local all all trust\n"
        "hostssl all relay 127.0.0.1/32 scram-sha-256\n"
        "host all postgres 127.0.0.1/32 trust\n"
    )
    shutil.chown(hba, "postgres", "postgres")
    options = ("-c", "ssl=on", "-c", f"ssl_cert_file={certs.cert}", "-c")
    server = start_postgres(
        options=(*options, f"ssl_key_file={certs.key}", "-c", f"hba_file={hba}")
    )
    try:
        database = _fresh_site(server)
        asyncio.run(_admin(server, f"CREATE ROLE relay LOGIN SUPERUSER PASSWORD '{PASSWORD}'"))
        yield TlsDatabase(server, database, certs)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_mariadb() -> Iterator[TlsDatabase]:
    """MariaDB checking passwords, with the user relay REQUIRE SSL, as a managed MySQL."""
    directory = Path(tempfile.mkdtemp(prefix="sfrelay-mariadb-tls-"))
    certs = make_certificates(directory)
    options = (f"--ssl-ca={certs.ca}", f"--ssl-cert={certs.cert}", f"--ssl-key={certs.key}")
    server = start_mariadb(grants=True, options=options)
    try:
        database = _fresh_site(server)
        asyncio.run(
            _admin(
                server,
                f"CREATE USER 'relay'@'%' IDENTIFIED BY '{PASSWORD}' REQUIRE SSL",
                "GRANT ALL ON *.* TO 'relay'@'%'",
            )
        )
        yield TlsDatabase(server, database, certs)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def _admin(server: Server, *statements: str) -> None:
    engine = server.admin_engine()
    async with engine.connect() as conn:
        for statement in statements:
            await conn.execute(text(statement))
    await engine.dispose()


def _connects(tmp_path: Path, redis_url: str, database_url: str) -> None:
    """What a newcomer runs: check (reads, and an UPDATE rolled back), status (read-only
    engine), and a worker, which creates its tables."""
    env = {"SFRELAY_REDIS_URL": redis_url, "SFRELAY_DATABASE_URL": database_url}
    for command in (["check"], ["worker", "--burst"], ["status", "--json"]):
        result = sfrelay(tmp_path, env, *command)
        assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["database"]["reachable"] is True


@pytest.mark.parametrize(
    ("backend", "query"),
    [
        ("postgres", ""),  # Heroku's, Render's: the server requires TLS, asyncpg prefers it
        ("postgres", "sslmode=require"),  # Azure, DigitalOcean, Aiven, Supabase: TypeError before
        ("postgres", "sslmode=verify-full&sslrootcert={ca}"),  # RDS: TypeError before
        (
            "postgres",
            "sslmode=verify-ca&sslrootcert={ca}&application_name=sfrelay&connect_timeout=9",
        ),
        ("postgres", "ssl=true"),  # node-postgres's spelling: refused at the first connection
        ("postgres", "ssl=require"),  # asyncpg's own
        # PgBouncer's transaction pooling: asyncpg's statement_cache_size was a TypeError
        ("postgres", "sslmode=require&prepared_statement_cache_size=0&statement_cache_size=0"),
        ("mariadb", "ssl=true"),  # AttributeError: 'str' object has no attribute 'wrap_bio'
        ("mariadb", "ssl-mode=REQUIRED"),  # DigitalOcean, Aiven: TypeError before
        ("mariadb", "ssl_mode=VERIFY_CA&ssl_ca={ca}"),
        ("mariadb", "ssl_ca={ca}"),  # Azure, PlanetScale, RDS (SQLAlchemy's form): AttributeError
    ],
)
def test_a_url_as_providers_give_it(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tmp_path: Path,
    backend: str,
    query: str,
) -> None:
    database: TlsDatabase = request.getfixturevalue(f"tls_{backend}")
    _connects(tmp_path, redis_server.url, database.url(query.format(ca=database.certs.ca)))


@pytest.mark.parametrize("backend", ["postgres", "mariadb"])
def test_a_database_socket(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path, backend: str
) -> None:
    database: TlsDatabase = request.getfixturevalue(f"tls_{backend}")
    server, name = database.server, database.database
    url = {  # the socket file's folder and the port name it; MySQL's names the file
        "postgres": f"pgsql://postgres@/{name}?host={server.directory}&port={server.port}",
        "mariadb": f"mysql://root@localhost/{name}?unix_socket={server.directory}/mysqld.sock",
    }[backend]
    _connects(tmp_path, redis_server.url, url)


def _refused(tmp_path: Path, redis_url: str, database_url: str) -> list[str]:
    """The last line of each command's refusal; none shows the password."""
    env = {"SFRELAY_REDIS_URL": redis_url, "SFRELAY_DATABASE_URL": database_url}
    lines = []
    for command in (["worker", "--burst"], ["dead", "list"]):
        result = sfrelay(tmp_path, env, *command)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "p@ss" not in result.stderr and ENCODED not in result.stderr
        lines.append(result.stderr.splitlines()[-1])
    return lines


@pytest.mark.parametrize(
    ("query", "line"),
    [
        (
            "sslmode=required",
            "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full "
            "(not 'required')",
        ),
        (  # Neon's URLs carry it: asyncpg cannot bind, and would have ignored it
            "sslmode=require&channel_binding=require",
            "channel_binding=require: sfrelay's PostgreSQL driver (asyncpg) cannot bind the "
            "login to the TLS channel; remove it and keep sslmode=verify-full to be sure of the "
            "server",
        ),
        ("statement_cache_size=none", "statement_cache_size must be a number (not 'none')"),
        (
            "sslmode=verify-full&sslrootcert=/nowhere/rds-ca.pem",
            "sslrootcert=/nowhere/rds-ca.pem: no such file (give the path of the file the "
            "provider gives)",
        ),
    ],
)
def test_a_postgresql_parameter_that_cannot_be_honoured_says_what_to_write(
    tls_postgres: TlsDatabase, redis_server: RedisServer, tmp_path: Path, query: str, line: str
) -> None:
    lines = _refused(tmp_path, redis_server.url, tls_postgres.url(query))
    assert lines == [f"sfrelay: SFRELAY_DATABASE_URL: {line}"] * 2


def test_a_mysql_ssl_mode_that_does_not_exist_says_what_to_write(
    tls_mariadb: TlsDatabase, redis_server: RedisServer, tmp_path: Path
) -> None:
    lines = _refused(tmp_path, redis_server.url, tls_mariadb.url("ssl_mode=ON"))
    assert (
        lines
        == [
            "sfrelay: SFRELAY_DATABASE_URL: ssl_mode must be one of DISABLED, PREFERRED, REQUIRED, "
            "VERIFY_CA, VERIFY_IDENTITY (not 'ON')"
        ]
        * 2
    )


def test_a_mysql_certificate_that_fails_verification_is_named(
    tls_mariadb: TlsDatabase, redis_server: RedisServer, tmp_path: Path
) -> None:
    """PyMySQL said only "Can't connect to MySQL server on '127.0.0.1'" (2003)."""
    lines = _refused(tmp_path, redis_server.url, tls_mariadb.url("ssl_mode=VERIFY_IDENTITY"))
    for line in lines:
        assert "(2003, \"Can't connect to MySQL server on '127.0.0.1'\"): [SSL: " in line
        assert "CERTIFICATE_VERIFY_FAILED" in line and line.endswith("check SFRELAY_DATABASE_URL")


def test_a_mysql_server_without_tls_is_refused_when_the_url_requires_it(
    mariadb_server: Server, redis_server: RedisServer, tmp_path: Path
) -> None:
    """aiomysql went on in plain text, quietly, when the server did not offer TLS."""
    url = f"{mariadb_server.url('mysql')}?ssl_mode=REQUIRED"
    lines = _refused(tmp_path, redis_server.url, url)
    refusal = (
        "the MySQL server did not offer TLS, which SFRELAY_DATABASE_URL requires (ssl_mode): "
        "enable TLS on the server, or ask for ssl_mode=PREFERRED"
    )
    assert lines == [
        f"sfrelay: the Drupal database is unavailable: cannot use the Drupal database: {refusal}; "
        "check SFRELAY_DATABASE_URL",
        f"sfrelay: the Drupal database is unavailable: cannot read the Drupal database: {refusal}; "
        "check SFRELAY_DATABASE_URL",
    ]


def test_a_wrong_database_password_is_refused_without_showing_it(
    tls_postgres: TlsDatabase, tls_mariadb: TlsDatabase, redis_server: RedisServer, tmp_path: Path
) -> None:
    for database, why in (
        (tls_postgres, 'password authentication failed for user "relay"'),
        (
            tls_mariadb,
            "(1045, \"Access denied for user 'relay'@'localhost' (using password: YES)\")",
        ),
    ):
        url = database.url("ssl=true", password="wr%40ng%2Fs3cret")
        env = {"SFRELAY_REDIS_URL": redis_server.url, "SFRELAY_DATABASE_URL": url}
        for command in (["check"], ["status"], ["worker", "--burst"]):
            result = sfrelay(tmp_path, env, *command)
            assert why in result.stdout + result.stderr
            assert "s3cret" not in result.stdout + result.stderr


_RECORDS = itertools.count(1)  # the module's databases outlive a test: a new record each time


async def _apply_until_created(syncer: Syncer, n: int) -> tuple[int, str]:
    """Apply one new record as the worker's retries would: (failed tries, final outcome)."""
    for failed in range(20):
        try:
            (outcome,) = await syncer.apply([note(sf(n), f"u{n}@example.com", "A", "B")])
        except RetryableError:
            await asyncio.sleep(0.5)  # the server still starting up: the retry's backoff
            continue
        return failed, outcome.kind
    raise AssertionError("never applied")


@pytest.mark.parametrize("backend", ["postgres", "mariadb"])
def test_a_database_restarted_between_batches_costs_no_retry(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """The pool's connections died with the server: each is pinged before use and replaced,
    so the next batch applies at its first try, over TLS as before."""
    database: TlsDatabase = request.getfixturevalue(f"tls_{backend}")
    url = database.url("sslmode=require" if backend == "postgres" else "ssl=true")

    async def restart() -> None:
        database.server.restart()
        await asyncio.to_thread(_fresh_site_ready, database.server)

    assert asyncio.run(_two_batches(url, restart)) == [(0, "created"), (0, "created")]


def test_a_connection_mariadb_closed_while_idle_costs_no_retry(tls_mariadb: TlsDatabase) -> None:
    """wait_timeout: MariaDB closes a connection idle longer (a managed one often sets it
    short); the pool's ping finds it closed and opens another."""

    async def idle() -> None:
        await _admin(tls_mariadb.server, "SET GLOBAL wait_timeout = 1")
        await asyncio.sleep(3)

    try:
        batches = asyncio.run(_two_batches(tls_mariadb.url("ssl=true"), idle))
    finally:
        asyncio.run(_admin(tls_mariadb.server, "SET GLOBAL wait_timeout = 28800"))
    assert batches == [(0, "created"), (0, "created")]


async def _two_batches(url: str, between: Callable[[], Awaitable[None]]) -> list[tuple[int, str]]:
    """One record applied, `between()`, another: (failed tries, outcome) of each."""
    syncer = await Syncer.open(Settings(_env_file=None, database_url=url))
    try:
        first = await _apply_until_created(syncer, next(_RECORDS))
        await between()
        return [first, await _apply_until_created(syncer, next(_RECORDS))]
    finally:
        await syncer.close()


@pytest.mark.parametrize(
    ("password", "status", "body", "logged"),
    [
        (ENCODED, 200, {"status": "ready", "redis": "ok"}, None),
        (  # it said "Redis does not answer", and logged no more: the network looked at fault
            "wr%40ng%2Fs3cret",
            503,
            {
                "status": "unavailable",
                "redis": "Redis refuses sfrelay's login: check the user and password in "
                "SFRELAY_REDIS_URL",
            },
            "invalid username-password pair or user is disabled.",
        ),
    ],
    ids=["ready", "wrong password"],
)
def test_the_receivers_readyz_over_rediss(
    tls_redis: TlsRedis,
    tmp_path: Path,
    password: str,
    status: int,
    body: dict[str, str],
    logged: str | None,
) -> None:
    port = free_port()
    env = {
        "SFRELAY_ENV": "development",
        "SFRELAY_PORT": str(port),
        "SFRELAY_ACK_DURABILITY": "memory",
        "SFRELAY_REDIS_URL": tls_redis.url(f"ssl_ca_certs={tls_redis.certs.ca}", password=password),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    with subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=tmp_path,
        env={**base, "PYTHONPATH": str(PROJECT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as server:
        try:
            wait_for_port(port, timeout=30)
            answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        finally:
            server.terminate()
            log, _ = server.communicate(timeout=30)
    assert (answer.status_code, answer.json()) == (status, body)
    if logged is not None:
        assert f"not ready: {body['redis']}: {logged}" in log
    assert "s3cret" not in log and "p@ss" not in log and ENCODED not in log


def test_check_shows_no_client_key_password(redis_server: RedisServer, tmp_path: Path) -> None:
    """check printed the URL with libpq's sslpassword (a client key's passphrase) as given."""
    port = free_port()
    url = f"pgsql://drupal:s3cret@127.0.0.1:{port}/drupal?sslmode=require&sslpassword=K3yPass"
    env = {"SFRELAY_REDIS_URL": redis_server.url, "SFRELAY_DATABASE_URL": url}
    result = sfrelay(tmp_path, env, "check")
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("drupal")]
    assert line.split(None, 2)[2] == (
        f"cannot use pgsql://drupal:***@127.0.0.1:{port}/drupal?sslmode=require&sslpassword=***: "
        f"[Errno 111] Connect call failed ('127.0.0.1', {port}); check SFRELAY_DATABASE_URL"
    )
