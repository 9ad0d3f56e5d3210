"""The URLs managed services give, tried on real servers: TLS with a certificate of our own
CA (rediss://, ?sslmode=, ?ssl_ca=), passwords with URL characters, ACL users, sockets.
Each connection works in every process that uses it, or is refused saying what to write."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.drupal_schemas import site_copy
from tests.servers import free_port, wait_for_port
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
