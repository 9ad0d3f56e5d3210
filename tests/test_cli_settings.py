"""Wrong settings, given to the real `sfrelay` command: one line each naming the variable and
what it must be, exit code 2, never a traceback and never a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.drupal_schemas import site_copy
from tests.fixtures_worker import PROJECT
from tests.servers import RedisServer, free_port

# Every command reads its settings first: each refuses wrong ones the same way.
COMMANDS = [
    ["serve"],
    ["worker", "--burst"],
    ["up"],
    ["check"],
    ["status"],
    ["reconcile", "--dry-run"],
    ["backfill", "--dry-run"],
    ["dead", "list"],
]


def sfrelay(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,  # a folder without a .env: the environment alone sets everything
        env={**base, "PYTHONPATH": str(PROJECT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_names_the_wrong_setting_and_what_it_must_be(
    tmp_path: Path, command: list[str]
) -> None:
    result = sfrelay(tmp_path, {"SFRELAY_PORT": "abc"}, *command)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "sfrelay: invalid settings:\n  SFRELAY_PORT must be a whole number (not 'abc')\n"
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"SFRELAY_PORT": "0"}, "SFRELAY_PORT must be at least 1 (not '0')"),
        ({"SFRELAY_PORT": "70000"}, "SFRELAY_PORT must be at most 65535 (not '70000')"),
        ({"SFRELAY_MAX_TRIES": "-1"}, "SFRELAY_MAX_TRIES must be at least 1 (not '-1')"),
        (
            {"SFRELAY_READ_TIMEOUT_SECONDS": "soon"},
            "SFRELAY_READ_TIMEOUT_SECONDS must be a number (not 'soon')",
        ),
        (
            {"SFRELAY_READ_TIMEOUT_SECONDS": "0"},
            "SFRELAY_READ_TIMEOUT_SECONDS must be more than 0 (not '0')",
        ),
        (
            {"SFRELAY_DEDUPE_TTL_SECONDS": "3600"},
            "SFRELAY_DEDUPE_TTL_SECONDS must be at least 90000 (not '3600')",
        ),
        (  # Redis refuses an expiry this far off: every ack would have faulted
            {"SFRELAY_DEDUPE_TTL_SECONDS": "10000000000000000"},
            "SFRELAY_DEDUPE_TTL_SECONDS must be at most 31536000 (not '10000000000000000')",
        ),
        (  # the worker died on it at start-up (math.ceil(inf))
            {"SFRELAY_JOB_TIMEOUT_SECONDS": "inf"},
            "SFRELAY_JOB_TIMEOUT_SECONDS must be at most 86400 (not 'inf')",
        ),
        (
            {"SFRELAY_READ_TIMEOUT_SECONDS": "inf"},
            "SFRELAY_READ_TIMEOUT_SECONDS must be at most 3600 (not 'inf')",
        ),
        (
            {"SFRELAY_RECONCILE_EVERY_SECONDS": "99999999999999"},
            "SFRELAY_RECONCILE_EVERY_SECONDS must be at most 2592000 (not '99999999999999')",
        ),
        (
            {"SFRELAY_ENV": "prod"},
            "SFRELAY_ENV must be 'development' or 'production' (not 'prod')",
        ),
        (
            {"SFRELAY_ON_DELETE": "Block"},
            "SFRELAY_ON_DELETE must be 'block', 'unlink' or 'ignore' (not 'Block')",
        ),
        (
            {"SFRELAY_ORG_IDS": "00D"},
            "SFRELAY_ORG_IDS: '00D' is not a Salesforce organization id (15 or 18 letters and "
            "digits; Setup > Company Information shows it)",
        ),
        (
            {"SFRELAY_ALLOWED_NETWORKS": "10.0.0.0/33"},
            "SFRELAY_ALLOWED_NETWORKS: not a CIDR network: '10.0.0.0/33' does not appear to be "
            "an IPv4 or IPv6 network (write networks such as 13.108.0.0/14, comma-separated)",
        ),
        (
            {"SFRELAY_MATCH_BY_EMAIL": "maybe"},
            "SFRELAY_MATCH_BY_EMAIL must be true, false or never-logged-in (not 'maybe')",
        ),
        (
            {"SFRELAY_HANDLED_OBJECTS": " , "},
            "SFRELAY_HANDLED_OBJECTS is empty, so every notification would be acked and "
            "dropped: name the objects to sync (Contact,Lead), or leave it unset",
        ),
    ],
)
def test_a_wrong_setting_says_what_it_must_be(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    result = sfrelay(tmp_path, env, "status")
    assert (result.returncode, result.stderr) == (2, f"sfrelay: invalid settings:\n  {line}\n")


SECRETS = {
    "SFRELAY_SF_PASSWORD": "hunter2-password",
    "SFRELAY_SF_SECURITY_TOKEN": "security-token-value",
    "SFRELAY_SF_CONSUMER_SECRET": "consumer-secret-value",
    "SFRELAY_DATABASE_URL": "mysql://drupal:db-password@db/drupal",
}


def test_a_refused_combination_shows_no_secret(tmp_path: Path) -> None:
    """pydantic's own text showed every setting given (secrets too) for a refused combination."""
    result = sfrelay(tmp_path, {**SECRETS, "SFRELAY_ENDPOINT_TOKEN": "changeme"}, "check")
    assert (result.returncode, result.stderr) == (
        2,
        "sfrelay: invalid settings:\n"
        "  SFRELAY_ENDPOINT_TOKEN is a placeholder: set a long random value "
        "(python -c 'import secrets; print(secrets.token_urlsafe(32))')\n",
    )
    for secret in ("hunter2-password", "security-token-value", "consumer-secret-value"):
        assert secret not in result.stderr
    assert "db-password" not in result.stderr


def test_each_wrong_setting_has_its_line(tmp_path: Path) -> None:
    env = {**SECRETS, "SFRELAY_MAX_TRIES": "many", "SFRELAY_PAYLOAD_MODE": "fetch"}
    result = sfrelay(tmp_path, env, "worker")
    assert (result.returncode, result.stderr) == (
        2,
        "sfrelay: invalid settings:\n"
        "  SFRELAY_MAX_TRIES must be a whole number (not 'many')\n"
        "  SFRELAY_PAYLOAD_MODE must be 'message' or 'refetch' (not 'fetch')\n",
    )


def test_a_wrong_setting_in_a_dotenv_file_is_named_the_same(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SFRELAY_WORKER_BATCH_SIZE=0\n")
    result = sfrelay(tmp_path, {}, "status")
    assert (result.returncode, result.stderr) == (
        2,
        "sfrelay: invalid settings:\n  SFRELAY_WORKER_BATCH_SIZE must be at least 1 (not '0')\n",
    )


REDIS_URL_HELP = (
    "SFRELAY_REDIS_URL is not a Redis URL such as redis://:password@host:6379/0: {}; write a "
    "/, ?, #, @ or : in the password as %2F, %3F, %23, %40 or %3A"
)


@pytest.mark.parametrize(
    ("url", "line"),
    [
        (
            "localhost:6379",
            "SFRELAY_REDIS_URL must start with redis://, rediss:// (TLS) or unix:// (a socket), "
            "as in redis://localhost:6379/0",
        ),
        (
            "http://localhost:6379/0",
            "SFRELAY_REDIS_URL must start with redis://, rediss:// (TLS) or unix:// (a socket), "
            "as in redis://localhost:6379/0",
        ),
        (
            "redis://localhost:port/0",
            REDIS_URL_HELP.format("its port is not a number from 1 to 65535"),
        ),
        (
            "redis://localhost:99999/0",
            REDIS_URL_HELP.format("its port is not a number from 1 to 65535"),
        ),
        ("redis:///0", REDIS_URL_HELP.format("it names no host")),
        ("redis://localhost:6379/zero", REDIS_URL_HELP.format("its database is not a number (/0)")),
        (
            "redis://localhost:6379?db=one",
            REDIS_URL_HELP.format("its database is not a number (/0)"),
        ),
        # A / in the password ends the host: "s3cr" would be its port, "x" the host.
        (
            "redis://:s3cr/et@localhost:6379/0",
            REDIS_URL_HELP.format("its port is not a number from 1 to 65535"),
        ),
        (
            "redis://u:s3cr@x/et@localhost:6379/0",
            REDIS_URL_HELP.format("its database is not a number (/0)"),
        ),
        ("unix://", "SFRELAY_REDIS_URL names no socket file: write unix:///path/to/redis.sock"),
    ],
)
def test_a_malformed_redis_url_is_refused_by_every_command_without_showing_it(
    tmp_path: Path, url: str, line: str
) -> None:
    """redis-py and arq raised ValueError (a traceback), for a password's / too."""
    for command in (["status"], ["worker", "--burst"], ["dead", "list"]):
        result = sfrelay(tmp_path, {"SFRELAY_REDIS_URL": url}, *command)
        assert (result.returncode, result.stderr) == (2, f"sfrelay: invalid settings:\n  {line}\n")
        assert "s3cr" not in result.stderr


def test_a_worker_logs_in_with_a_percent_encoded_redis_password(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The receiver's and the CLI's client decoded %2F and %40; the worker's (arq) did not."""
    port = redis_server.url.rsplit(":", 1)[1]
    with redis_server.client() as client:
        client.execute_command("ACL", "SETUSER", "relay", "on", ">p/ss@word", "~*", "&*", "+@all")
        try:
            site = site_copy("drupal10-standard.sqlite", tmp_path)
            env = {
                "SFRELAY_REDIS_URL": f"redis://relay:p%2Fss%40word@127.0.0.1:{port}",
                "SFRELAY_DATABASE_URL": f"sqlite:///{site}",
            }
            for command in (["status"], ["worker", "--burst"]):
                result = sfrelay(tmp_path, env, *command)
                assert result.returncode == 0, result.stderr
        finally:
            client.execute_command("ACL", "DELUSER", "relay")


DATABASE_URL_HELP = (
    "sfrelay: SFRELAY_DATABASE_URL is not a URL such as mysql://user:password@host:3306/database:"
    " {}; write a /, ?, #, @ or : in the password as %2F, %3F, %23, %40 or %3A"
)


@pytest.mark.parametrize(
    ("url", "line"),
    [
        (
            "mysql://drupal:s3cret@db:port/drupal",
            DATABASE_URL_HELP.format("its port is not a number from 1 to 65535"),
        ),
        (
            "pgsql://drupal:s3cret@db:99999/drupal",
            DATABASE_URL_HELP.format("its port is not a number from 1 to 65535"),
        ),
        # A / in the password ends the host ("x"): the rest was taken for the database name.
        (
            "mysql://drupal:s3cret@x/y@db/drupal",
            DATABASE_URL_HELP.format("what follows the host is not a database name"),
        ),
        (
            "/var/www/sites/default/files/.ht.sqlite",
            "sfrelay: SFRELAY_DATABASE_URL is not a database URL: write mysql://user:password@"
            "host/database, pgsql://user:password@host/database or sqlite:////path/to/.ht.sqlite",
        ),
    ],
)
def test_a_malformed_database_url_says_what_is_wrong_without_showing_it(
    redis_server: RedisServer, tmp_path: Path, url: str, line: str
) -> None:
    """SQLAlchemy's int() of the port raised ValueError, and the worker's lease key parsed a
    URL without :// itself: tracebacks (the worker's for a path alone, too)."""
    env = {"SFRELAY_REDIS_URL": redis_server.url, "SFRELAY_DATABASE_URL": url}
    for command in (["worker", "--burst"], ["dead", "list"]):
        result = sfrelay(tmp_path, env, *command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines()[-1] == line
        assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


@pytest.mark.parametrize(
    ("command", "verb"),
    [
        (["dead", "list"], "read"),
        (["why", "someone@example.com"], "read"),
        (["queue", "purge", "--no-email", "--dry-run"], "use"),
    ],
    ids=lambda c: " ".join(c) if isinstance(c, list) else c,
)
def test_a_postgresql_url_nothing_answers_at_says_so(
    redis_server: RedisServer, tmp_path: Path, command: list[str], verb: str
) -> None:
    """asyncpg raises a bare OSError for a refused connection (no DBAPIError): a traceback."""
    port = free_port()
    env = {
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_DATABASE_URL": f"pgsql://drupal:s3cret@127.0.0.1:{port}/drupal",
    }
    result = sfrelay(tmp_path, env, *command)
    assert (result.returncode, result.stderr) == (
        2,
        f"sfrelay: the Drupal database is unavailable: cannot {verb} the Drupal database: "
        f"[Errno 111] Connect call failed ('127.0.0.1', {port}); check SFRELAY_DATABASE_URL\n",
    )


def test_a_field_map_that_is_not_utf8_names_its_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """read_text's UnicodeDecodeError was a traceback in check and the worker."""
    site = site_copy("drupal10-standard.sqlite", tmp_path)
    (tmp_path / "map.toml").write_bytes(b'[Contact.fields]\nmail = "Email"\n# Bas\xe9 on\n')
    env = {
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_DATABASE_URL": f"sqlite:///{site}",
        "SFRELAY_FIELD_MAP": "map.toml",
    }
    message = (
        "SFRELAY_FIELD_MAP: map.toml is not UTF-8 text (byte 0xe9 on line 3): save it as UTF-8"
    )
    worker = sfrelay(tmp_path, env, "worker", "--burst")
    assert (worker.returncode, worker.stderr.splitlines()[-1]) == (2, f"sfrelay: {message}")
    check = sfrelay(tmp_path, env, "check")
    assert check.returncode == 1
    assert f"drupal      failed          {message}\n" in check.stdout


def test_a_misspelt_field_map_key_stops_the_worker(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    site = site_copy("drupal10-standard.sqlite", tmp_path)
    (tmp_path / "map.toml").write_text(
        '[username]\nupdat = true\n[Contact.fields]\nmail = "Email"\n'
    )
    env = {
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_DATABASE_URL": f"sqlite:///{site}",
        "SFRELAY_FIELD_MAP": "map.toml",
        "SFRELAY_HANDLED_OBJECTS": "Contact",
    }
    worker = sfrelay(tmp_path, env, "worker", "--burst")
    assert (worker.returncode, worker.stderr.splitlines()[-1]) == (
        2,
        "sfrelay: field map [username]: unknown key 'updat' (it has template, fallback, update)",
    )
