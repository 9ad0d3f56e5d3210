"""`sfrelay check [--json]`: every part configured, some not, a failing one.

Through `app.cli.main` in this process (the `cli` fixture); one real subprocess shows the
command line itself works."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from app.drupal.engine import create_engine, nocase_utf8
from tests import sfserver
from tests.conftest import Cli, CliRun
from tests.drupal_fields import TypedField, add_field
from tests.drupal_schemas import site_copy
from tests.fixtures_db import DrupalSite, Server
from tests.fixtures_worker import PROJECT
from tests.servers import RedisServer, free_port
from tests.sfserver import FakeOrg, SalesforceServer


def check_subprocess(
    cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "check", *args],
        cwd=cwd,  # a folder without a .env: the environment alone sets everything
        env={**base, "PYTHONPATH": str(PROJECT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def jwt_env(server: SalesforceServer) -> dict[str, str]:
    return {
        **server.env(),
        "SFRELAY_SF_USERNAME": sfserver.USERNAME,
        "SFRELAY_SF_CONSUMER_KEY": sfserver.CONSUMER_KEY,
        "SFRELAY_SF_PRIVATE_KEY_FILE": str(server.private_key_file),
    }


def lines(output: str) -> dict[str, tuple[str, str]]:
    """part -> (status, detail) from the text output."""
    parsed = {}
    for line in output.splitlines():
        part, rest = line.split(maxsplit=1)
        status = "not configured" if rest.startswith("not configured") else rest.split()[0]
        parsed[part] = (status, rest[len(status) :].strip())
    return parsed


def failed_drupal_check(redis_server: RedisServer, cli: Cli, db: Path) -> tuple[str, str]:
    """`sfrelay check` of the SQLite site `db`, which fails: its drupal line."""
    env = {"SFRELAY_REDIS_URL": redis_server.url, "SFRELAY_DATABASE_URL": f"sqlite:///{db}"}
    text = cli(env, "check")
    assert text.returncode == 1
    return lines(text.stdout)["drupal"]


@pytest.mark.parametrize("site", ["drupal10-standard.sqlite", "drupal7-standard.sqlite"])
def test_all_parts_configured_and_working(
    redis_server: RedisServer,
    sf_server: SalesforceServer,
    sf_org: FakeOrg,
    tmp_path: Path,
    cli: Cli,
    site: str,
) -> None:
    sf_org.api_used = 42
    database = site_copy(site, tmp_path)
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    env = {
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_DATABASE_URL": f"sqlite:///{database}",
        **jwt_env(sf_server),
    }
    text = cli(env, "check")
    assert text.returncode == 0, text.stdout + text.stderr
    parts = lines(text.stdout)
    assert list(parts) == ["redis", "drupal", "salesforce", "outbound"]
    assert {status for status, _ in parts.values()} == {"ok"}
    assert parts["outbound"][1] == (
        "2 Outbound Messages to /salesforce/outbound-message: 'sfrelay Contact' (Contact), "
        "'sfrelay Lead' (Lead), every mapped field their WSDL declares selected"
    )
    drupal = "Drupal 7" if "drupal7" in site else "Drupal 8 or later"
    assert parts["drupal"][1].startswith(f"{drupal} (sqlite), ")
    kind = "text" if "drupal7" in site else "string"  # each field with its Drupal type
    assert (
        f"field map valid (Contact, Lead; user fields: field_first_name ({kind}), "
        f"field_last_name ({kind}), field_salesforce_id ({kind}))" in parts["drupal"][1]
    )
    assert "sfrelay tables not created yet" in parts["drupal"][1]
    assert parts["salesforce"][1].startswith(
        f"login ok (jwt-bearer) to {sfserver.INSTANCE}, API 62.0, mapped fields readable on "
        "Contact, Lead, "
    )

    as_json = cli(env, "check", "--json")
    assert as_json.returncode == 0
    report = orjson.loads(as_json.stdout)
    assert report["ok"] is True
    assert report["parts"]["drupal"]["drupal"] == (7 if "drupal7" in site else 8)
    assert report["parts"]["drupal"]["sfrelay_schema"] is None
    assert report["parts"]["drupal"]["user_field_types"] == {
        "field_first_name": kind,
        "field_last_name": kind,
        "field_salesforce_id": kind,
    }
    salesforce = report["parts"]["salesforce"]
    assert salesforce["status"] == "ok"
    assert (salesforce["flow"], salesforce["api_version"]) == ("jwt-bearer", "62.0")
    assert salesforce["api_requests_max"] == 15_000
    assert salesforce["api_requests_left"] == 15_000 - salesforce["api_requests_used"]
    assert salesforce["unreadable_fields"] == {}
    # Read-only: no migration, no sfrelay table, not a byte changed.
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before


def test_parts_not_configured_are_not_failures(
    redis_server: RedisServer, sf_org: FakeOrg, tmp_path: Path, cli: Cli
) -> None:
    text = check_subprocess(tmp_path, {"SFRELAY_REDIS_URL": redis_server.url})
    assert text.returncode == 0, text.stdout + text.stderr
    parts = lines(text.stdout)
    assert parts["redis"][0] == "ok"
    assert parts["drupal"] == (
        "not configured",
        "SFRELAY_DATABASE_URL is not set, and there is no drupal.sqlite here (its default, "
        "sqlite:///drupal.sqlite): set it to your Drupal site's database; a worker cannot "
        "start without one",
    )
    assert parts["salesforce"][0] == "not configured"
    assert parts["outbound"] == (
        "not configured",
        "no SFRELAY_SF_* credentials: the org's Outbound Messages are not compared with "
        "SFRELAY_WSDL_DIR and the field map",
    )
    report = orjson.loads(cli({"SFRELAY_REDIS_URL": redis_server.url}, "check", "--json").stdout)
    assert report["ok"] is True
    assert report["parts"]["salesforce"]["status"] == "not configured"
    assert sf_org.connects == []


def test_without_a_database_url_the_default_site_a_worker_would_use_is_checked(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A drupal.sqlite where the command runs is what a worker would write: checked as such."""
    site_copy("drupal10-standard.sqlite", tmp_path).rename(tmp_path / "drupal.sqlite")
    text = check_subprocess(tmp_path, {"SFRELAY_REDIS_URL": redis_server.url})
    assert text.returncode == 0, text.stdout + text.stderr
    status, detail = lines(text.stdout)["drupal"]
    assert status == "ok" and detail.startswith("Drupal 8 or later (sqlite), 67 tables"), detail


def test_an_unreadable_mapped_field_fails_the_check(
    redis_server: RedisServer,
    sf_server: SalesforceServer,
    sf_org: FakeOrg,
    tmp_path: Path,
    cli: Cli,
) -> None:
    del sf_org.fields["Lead"]["LastName"]
    env = {"SFRELAY_REDIS_URL": redis_server.url, **jwt_env(sf_server)}
    text = cli(env, "check")
    assert text.returncode == 1
    parts = lines(text.stdout)
    assert parts["redis"][0] == "ok"
    assert parts["salesforce"][0] == "failed"
    assert "but Lead: cannot read LastName (fix SFRELAY_FIELD_MAP" in parts["salesforce"][1]
    report = orjson.loads(cli(env, "check", "--json").stdout)
    assert report["ok"] is False
    assert report["parts"]["salesforce"]["unreadable_fields"] == {"Lead": ["LastName"]}


def test_a_refused_salesforce_login_fails_without_showing_secrets(
    redis_server: RedisServer,
    sf_server: SalesforceServer,
    sf_org: FakeOrg,
    tmp_path: Path,
    cli: Cli,
) -> None:
    env = {
        "SFRELAY_REDIS_URL": redis_server.url,
        **sf_server.env(),
        "SFRELAY_SF_USERNAME": sfserver.USERNAME,
        "SFRELAY_SF_PASSWORD": "wrong-Pa55",
        "SFRELAY_SF_SECURITY_TOKEN": sfserver.SECURITY_TOKEN,
        "SFRELAY_SF_CONSUMER_KEY": sfserver.CONSUMER_KEY,
        "SFRELAY_SF_CONSUMER_SECRET": sfserver.CONSUMER_SECRET,
    }
    text = cli(env, "check")
    assert text.returncode == 1
    status, detail = lines(text.stdout)["salesforce"]
    assert status == "failed"
    assert detail.startswith(
        "Salesforce refused the login (oauth-password at login.salesforce.com): invalid_grant"
    )
    for secret in ("wrong-Pa55", sfserver.SECURITY_TOKEN, sfserver.CONSUMER_SECRET):
        assert secret not in text.stdout + text.stderr + text.log
    assert sf_org.api_used == 0


def test_unreachable_redis_and_missing_database_fail(
    sf_org: FakeOrg, tmp_path: Path, cli: Cli
) -> None:
    env = {
        "SFRELAY_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        "SFRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'missing.sqlite'}",
    }
    text = cli(env, "check")
    assert text.returncode == 1
    parts = lines(text.stdout)
    assert parts["redis"][0] == "failed"
    assert parts["redis"][1].startswith("no answer from redis://:***@127.0.0.1:")
    assert parts["drupal"] == (
        "failed",
        f"no Drupal SQLite database at {tmp_path / 'missing.sqlite'}: set SFRELAY_DATABASE_URL "
        "to your site's file (sqlite:////path/to/sites/default/files/.ht.sqlite)",
    )
    assert "hunter2" not in text.stdout + text.stderr + text.log
    assert not (tmp_path / "missing.sqlite").exists()


@pytest.mark.parametrize(
    ("site", "tables"),
    [
        ("drupal10-standard.sqlite", ["user__field_last_name"]),
        (
            "drupal7-standard.sqlite",
            ["field_data_field_last_name", "field_revision_field_last_name"],
        ),
    ],
)
def test_a_site_without_a_field_of_the_default_map_says_how_to_add_or_unmap_it(
    redis_server: RedisServer, tmp_path: Path, cli: Cli, site: str, tables: list[str]
) -> None:
    """A stock Drupal site has none of the default map's custom user fields: the check says
    where to add the field in Drupal and how to leave it out of the map, not only what is
    missing."""
    db = site_copy(site, tmp_path)
    with sqlite3.connect(db) as conn:
        for name in tables:
            conn.execute(f'DROP TABLE "{name}"')
    assert failed_drupal_check(redis_server, cli, db) == (
        "failed",
        f"sqlite:///{db}: field map: the user field 'field_last_name' does not exist on this "
        f"Drupal site (no table {tables[0]}): add it to the site's user fields "
        "(/admin/config/people/accounts/fields, machine name field_last_name), or leave it "
        "out of the field map (SFRELAY_FIELD_MAP: a copy of the default "
        "app/fieldmap.default.toml without it)",
    )


WRITE_ACCESS = (
    "give the user sfrelay runs as write access (SQLite: to the file and its folder; "
    "PostgreSQL, MySQL: the database user may write Drupal's tables), or use a writable database"
)


@pytest.mark.parametrize("site", ["drupal10-standard.sqlite", "drupal7-standard.sqlite"])
def test_a_read_only_sqlite_site_fails_the_check_as_it_would_fail_every_record(
    redis_server: RedisServer, tmp_path: Path, cli: Cli, site: str
) -> None:
    """The check said ok, then every notification failed its tries on 'attempt to write a
    readonly database' and went dead. Read-only as SQLite itself marks a file it must not
    write (the header's write version above 2), which it refuses as it refuses a file the
    process may not write; the check still writes nothing."""
    db = site_copy(site, tmp_path)
    with db.open("r+b") as file:
        file.seek(18)
        file.write(bytes([3]))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert failed_drupal_check(redis_server, cli, db) == (
        "failed",
        f"sqlite:///{db}: the database refuses sfrelay's writes (attempt to write a readonly "
        f"database): {WRITE_ACCESS}",
    )
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


async def test_a_postgresql_user_that_may_only_read_fails_the_check(
    pg_server: Server, redis_server: RedisServer, cli: Cli
) -> None:
    name = await pg_server.fresh(10)
    admin = create_engine(pg_server.url(name))
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE ROLE reader_{name} LOGIN"))
        await conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader_{name}"))
    await admin.dispose()
    url = pg_server.url(name).replace("//postgres@", f"//reader_{name}@")
    env = {"SFRELAY_REDIS_URL": redis_server.url, "SFRELAY_DATABASE_URL": url}
    result = await asyncio.to_thread(cli, env, "check")
    assert result.returncode == 1
    assert lines(result.stdout)["drupal"] == (
        "failed",
        f"{url}: the database refuses sfrelay's writes (permission denied for table users): "
        f"{WRITE_ACCESS}",
    )


@pytest.mark.parametrize("site", ["drupal10-standard.sqlite", "drupal7-standard.sqlite"])
def test_a_site_with_prefixed_tables_is_named_as_such(
    redis_server: RedisServer, tmp_path: Path, cli: Cli, site: str
) -> None:
    """A site installed with a table prefix (settings.php's 'prefix' => 'drupal_'): what it
    is and that sfrelay does not write it, not "not a Drupal database"."""
    db = site_copy(site, tmp_path)
    with sqlite3.connect(db) as conn:
        conn.create_collation("NOCASE_UTF8", nocase_utf8)
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for name in names:
            if not name.startswith("sqlite_"):
                conn.execute(f'ALTER TABLE "{name}" RENAME TO "drupal_{name}"')
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert failed_drupal_check(redis_server, cli, db) == (
        "failed",
        f"sqlite:///{db}: SFRELAY_DATABASE_URL's Drupal tables have a prefix ('drupal_': the "
        "site's settings.php sets $databases['default']['default']['prefix']), and sfrelay "
        "writes only a site without one: point it at an unprefixed Drupal database",
    )
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("site", ["drupal10-standard.sqlite", "drupal7-standard.sqlite"])
def test_a_field_map_granting_a_protected_role_fails_the_check_as_it_fails_the_worker(
    redis_server: RedisServer, tmp_path: Path, cli: Cli, site: str
) -> None:
    role = "administrator"
    default = (PROJECT / "app" / "fieldmap.default.toml").read_text()
    assert "roles = []" in default
    field_map = tmp_path / "fieldmap.toml"
    field_map.write_text(default.replace("roles = []", f'roles = ["{role}"]', 1))
    db = site_copy(site, tmp_path)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    env = {
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_DATABASE_URL": f"sqlite:///{db}",
        "SFRELAY_FIELD_MAP": str(field_map),
    }
    text = cli(env, "check")
    assert text.returncode == 1
    assert lines(text.stdout)["drupal"] == (
        "failed",
        f"sqlite:///{db}: field map [Contact]: role '{role}' is protected (an admin role, a "
        "role with a staff permission such as administer *, or SFRELAY_PROTECTED_ROLES): "
        "sfrelay never grants it; remove it from roles",
    )
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # a check writes nothing


def test_a_salesforce_field_its_drupal_field_cannot_take_is_flagged(
    redis_server: RedisServer,
    sf_server: SalesforceServer,
    sf_org: FakeOrg,
    tmp_path: Path,
    cli: Cli,
) -> None:
    """Each mapped field with its Drupal type; a Salesforce field whose describe type the
    Drupal field cannot take (text into a checkbox) is said, the status stays."""
    db = site_copy("drupal10-standard.sqlite", tmp_path)
    site = DrupalSite(
        "sqlite-d10", "sqlite", 10, f"sqlite:///{db}", create_engine(f"sqlite:///{db}")
    )

    async def add() -> None:
        await add_field(site, TypedField("field_opt_out", "boolean", {"value": "tinyint"}))
        await add_field(site, TypedField("field_score", "integer", {"value": "int"}))
        await site.engine.dispose()

    asyncio.run(add())
    sf_org.fields["Contact"].update(OptOut__c="string", Score__c="double")
    default = (PROJECT / "app" / "fieldmap.default.toml").read_text()
    mapped = 'field_opt_out = "OptOut__c"\nfield_score = "Score__c"\n'
    field_map = tmp_path / "fieldmap.toml"
    field_map.write_text(default.replace('"Id"\n', f'"Id"\n{mapped}', 1))
    env = {
        "SFRELAY_REDIS_URL": redis_server.url,
        "SFRELAY_DATABASE_URL": f"sqlite:///{db}",
        "SFRELAY_FIELD_MAP": str(field_map),
        **jwt_env(sf_server),
    }
    text = cli(env, "check")
    assert text.returncode == 0, text.stdout + text.stderr
    parts = lines(text.stdout)
    assert (
        "field_opt_out (boolean), field_salesforce_id (string), field_score (integer))"
        in (parts["drupal"][1])
    )
    assert parts["salesforce"][0] == "ok"
    assert parts["salesforce"][1].endswith(
        "; field types: field_opt_out (boolean) cannot take Contact.OptOut__c (string)"
    )
    report = orjson.loads(cli(env, "check", "--json").stdout)
    assert report["parts"]["salesforce"]["type_mismatches"] == [
        "field_opt_out (boolean) cannot take Contact.OptOut__c (string)"
    ]
    assert report["parts"]["salesforce"]["field_types"]["Contact"]["Score__c"] == "double"


# --- the org's Outbound Messages against the WSDLs and the field map (Tooling API) ---------

CONTACT_OM = "04k5g000000AbCdAAK"  # tests.sfserver's default Contact message
LABEL = f"Outbound Message 'sfrelay Contact' (Contact, {CONTACT_OM})"


def outbound_check(
    redis_server: RedisServer, server: SalesforceServer, cli: Cli
) -> tuple[CliRun, tuple[str, str], Any]:
    """`sfrelay check` and `check --json` with Salesforce (no Drupal site): the run, its
    outbound line and the JSON report; the Salesforce part works whatever that line says."""
    env = {"SFRELAY_REDIS_URL": redis_server.url, **jwt_env(server)}
    text = cli(env, "check")
    parts = lines(text.stdout)
    assert parts["salesforce"][0] == "ok", text.stdout
    return text, parts["outbound"], orjson.loads(cli(env, "check", "--json").stdout)


def test_a_mapped_field_the_outbound_message_leaves_out_fails_the_check(
    redis_server: RedisServer, sf_server: SalesforceServer, sf_org: FakeOrg, cli: Cli
) -> None:
    """The admin took LastName out of the Contact message; sfrelay's WSDL still declares it
    and the map writes it to field_last_name: every notification would clear it."""
    sf_org.outbound_messages[CONTACT_OM]["Metadata"]["fields"].remove("LastName")
    text, outbound_line, report = outbound_check(redis_server, sf_server, cli)
    assert text.returncode == 1, text.stdout
    assert outbound_line == (
        "failed",
        f"{LABEL} does not select LastName, which the Contact WSDL in SFRELAY_WSDL_DIR "
        "declares: every notification would clear field_last_name in Drupal for every user "
        "(select LastName in the Outbound Message, or put that message's own WSDL in "
        "SFRELAY_WSDL_DIR, or unmap field_last_name in SFRELAY_FIELD_MAP)",
    )
    assert report["ok"] is False
    outbound = report["parts"]["outbound"]
    assert outbound["status"] == "failed"
    assert [m["unselected_mapped_fields"] for m in outbound["messages"]] == [["LastName"], []]
    assert outbound["problems"] == [outbound_line[1]]


def test_a_selected_field_no_wsdl_declares_is_a_warning(
    redis_server: RedisServer, sf_server: SalesforceServer, sf_org: FakeOrg, cli: Cli
) -> None:
    sf_org.outbound_messages[CONTACT_OM]["Metadata"]["fields"].append("Phone")
    text, (status, detail), report = outbound_check(redis_server, sf_server, cli)
    assert text.returncode == 0, text.stdout
    warning = (
        f"{LABEL} selects Phone, which no WSDL in SFRELAY_WSDL_DIR declares: taken as text, "
        "and never cleared when left out (put that message's own WSDL in SFRELAY_WSDL_DIR)"
    )
    assert status == "ok"
    assert detail.endswith(f"every mapped field their WSDL declares selected; {warning}")
    assert report["ok"] is True
    assert report["parts"]["outbound"]["warnings"] == [warning]
    assert report["parts"]["outbound"]["messages"][0]["undeclared_fields"] == ["Phone"]


def test_an_outbound_message_sending_the_session_id_is_a_warning(
    redis_server: RedisServer, sf_server: SalesforceServer, sf_org: FakeOrg, cli: Cli
) -> None:
    sf_org.outbound_messages[CONTACT_OM]["Metadata"]["includeSessionId"] = True
    text, (status, detail), report = outbound_check(redis_server, sf_server, cli)
    assert text.returncode == 0, text.stdout
    warning = f'{LABEL} sends the session ID, which sfrelay never uses: turn "Send Session ID" off'
    assert (status, detail.rpartition("; ")[2]) == ("ok", warning)
    assert report["parts"]["outbound"]["warnings"] == [warning]
    assert report["parts"]["outbound"]["messages"][0]["include_session_id"] is True


def test_outbound_messages_to_another_endpoint_are_not_sfrelays(
    redis_server: RedisServer, sf_server: SalesforceServer, sf_org: FakeOrg, cli: Cli
) -> None:
    """A Contact message to another listener (or another path on sfrelay's host) selects
    only Email: not sfrelay's business, so not a failure."""
    for record_id, url in [
        ("04k5g000000AbCfAAK", "https://erp.example.org/salesforce/contact"),
        ("04k5g000000AbCgAAK", "https://sfrelay.example.org/other-path?token=x"),
    ]:
        sf_org.outbound_messages[record_id] = sfserver.outbound_message(
            "Contact", "ERP Contact", ["Email", "Id"], endpoint_url=url, include_session_id=True
        )
    text, outbound_line, report = outbound_check(redis_server, sf_server, cli)
    assert text.returncode == 0, text.stdout
    assert outbound_line == (
        "ok",
        "2 Outbound Messages to /salesforce/outbound-message: 'sfrelay Contact' (Contact), "
        "'sfrelay Lead' (Lead), every mapped field their WSDL declares selected",
    )
    outbound = report["parts"]["outbound"]
    assert [m["id"] for m in outbound["messages"]] == [CONTACT_OM, "04k5g000000AbCeAAK"]
    assert outbound["other_endpoints"] == 2


def test_a_tooling_api_refusal_says_which_permission_without_failing_the_check(
    redis_server: RedisServer, sf_server: SalesforceServer, sf_org: FakeOrg, cli: Cli
) -> None:
    sf_org.tooling_refusal = (
        403,
        "INSUFFICIENT_ACCESS",
        "insufficient access rights on object id",
    )
    text, outbound_line, report = outbound_check(redis_server, sf_server, cli)
    assert text.returncode == 0, text.stdout
    assert outbound_line == (
        "skipped",
        "Salesforce refused to read the Outbound Messages through the Tooling API "
        '(INSUFFICIENT_ACCESS): give the integration user the "View Setup and Configuration" '
        "permission (a permission set) so that check can compare the org's Outbound Messages "
        "with SFRELAY_WSDL_DIR and the field map; nothing else needs it",
    )
    assert report["ok"] is True
    assert report["parts"]["outbound"]["status"] == "skipped"
    assert report["parts"]["outbound"]["tooling_error"] == "INSUFFICIENT_ACCESS"
    assert sf_org.counts["tooling"] == 2  # one refused query per run
    for token in sf_org.tokens:
        assert token not in text.stdout + text.stderr + text.log
