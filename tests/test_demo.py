"""The demo `sfrelay up` offers: Drupal 10's own user schema (compared with real sites), and a
sample Contact message the receiver accepts."""

from __future__ import annotations

import sqlite3
import tomllib
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import DEFAULT_WSDL_DIR, PROJECT_ROOT
from app.demo import DEMO_SITE_NAME, create_demo_site
from app.drupal.engine import create_engine, nocase_utf8
from app.drupal.schema import DrupalSchema, inspect_drupal, php_unserialize
from app.sfid import is_valid_id
from app.soap import is_notification_id, parse_message
from app.up import SAMPLE_CONTACT_ID, SAMPLE_MESSAGE
from app.wsdl import load_contract
from tests.drupal_schemas import DRUPAL, SITES

REFERENCE_SQL = DRUPAL / "drupal10-sqlite-users-schema.sql"
REAL_SITES = [SITES / "drupal10-minimal.sqlite", SITES / "drupal10-standard.sqlite"]
# In the reference dump but not in the demo: tables sfrelay never reads or writes.
LEFT_OUT = {
    "cache_dynamic_page_cache",
    "cache_page",
    "cache_render",
    "key_value",
    "sequences",
    "user__user_picture",
}


def _open(path: Path | str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.create_collation("NOCASE_UTF8", nocase_utf8)
    return db


def _reference() -> sqlite3.Connection:
    """The reference dump loaded as Drupal 10.5.4's installer wrote it, plus `config` from a
    real site (the dump has only the user tables)."""
    db = _open(":memory:")
    db.executescript(REFERENCE_SQL.read_text())
    with _open(REAL_SITES[0]) as site:
        (config,) = site.execute("SELECT sql FROM sqlite_master WHERE name = 'config'").fetchone()
    site.close()
    db.execute(config)
    return db


def _tables(db: sqlite3.Connection) -> set[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows} - {"sqlite_sequence"}


def _shape(db: sqlite3.Connection, table: str) -> dict[str, Any]:
    """Everything SQLite knows of a table: its DDL, each column, each index and its columns."""
    indexes = {}
    for _, name, unique, origin, partial in db.execute(f'PRAGMA index_list("{table}")'):
        info = db.execute(f'PRAGMA index_xinfo("{name}")').fetchall()
        indexes[name] = (unique, origin, partial, info)
    index_sql = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)
    ).fetchall()
    return {
        "sql": db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone(),
        "columns": db.execute(f'PRAGMA table_xinfo("{table}")').fetchall(),
        "indexes": indexes,
        "index_sql": sorted(index_sql),
    }


def test_the_demo_tables_are_drupal_10s_table_by_table_column_by_column(tmp_path: Path) -> None:
    demo_path = tmp_path / "demo.sqlite"
    assert create_demo_site(demo_path)
    demo, reference = _open(demo_path), _reference()
    sites = [_open(path) for path in REAL_SITES]
    try:
        assert _tables(demo) == _tables(reference) - LEFT_OUT
        for table in sorted(_tables(demo)):
            assert _shape(demo, table) == _shape(reference, table), table
            for site, path in zip(sites, REAL_SITES, strict=True):
                if table in _tables(site):  # cache_entity is created on first use
                    assert _shape(demo, table) == _shape(site, table), (table, path.name)
        # The collation Drupal's SQLite driver registers, where Drupal puts it.
        (ddl,) = demo.execute("SELECT sql FROM sqlite_master WHERE name = 'users_field_data'")
        assert '"name" VARCHAR(60) COLLATE NOCASE_UTF8 NOT NULL' in ddl[0]
    finally:
        for db in (demo, reference, *sites):
            db.close()


def test_the_demo_has_a_table_for_every_field_of_the_default_field_map(tmp_path: Path) -> None:
    field_map = tomllib.loads((PROJECT_ROOT / "app" / "fieldmap.default.toml").read_text())
    mapped = {
        name
        for section in field_map.values()
        if isinstance(section, dict) and "fields" in section
        for name in section["fields"]
        if name.startswith("field_")
    }
    assert mapped  # the default map has user fields to write
    demo_path = tmp_path / "demo.sqlite"
    create_demo_site(demo_path)
    with _open(demo_path) as demo:
        assert {f"user__{name}" for name in mapped} <= _tables(demo)
    demo.close()


async def _read(path: Path) -> DrupalSchema:
    engine: AsyncEngine = create_engine(f"sqlite:///{path}")
    try:
        async with engine.connect() as conn:
            return await inspect_drupal(conn, "auto", {"field_first_name", "field_salesforce_id"})
    finally:
        await engine.dispose()


async def test_sfrelay_reads_the_demo_as_it_reads_a_fresh_standard_site(tmp_path: Path) -> None:
    demo_path = tmp_path / "demo.sqlite"
    create_demo_site(demo_path)
    real = tmp_path / "standard.sqlite"
    real.write_bytes((SITES / "drupal10-standard.sqlite").read_bytes())
    demo, site = await _read(demo_path), await _read(real)
    assert (demo.major, demo.default_langcode, demo.default_timezone) == (10, "en", "UTC")
    assert (demo.major, demo.default_langcode, demo.default_timezone) == (
        site.major,
        site.default_langcode,
        site.default_timezone,
    )
    assert demo.roles == site.roles
    assert demo.protected_roles == site.protected_roles == {"administrator", "content_editor"}
    assert demo.fields == site.fields


def test_the_demo_holds_the_rows_of_a_fresh_install_and_says_it_is_a_demo(tmp_path: Path) -> None:
    demo_path = tmp_path / "demo.sqlite"
    create_demo_site(demo_path)
    shown = (
        "SELECT d.uid, u.langcode, d.langcode, d.preferred_langcode, d.name, d.mail, "
        "d.timezone, d.status, d.access, d.login, d.init, d.default_langcode "
        "FROM users u JOIN users_field_data d ON d.uid = u.uid ORDER BY d.uid"
    )
    roles = "SELECT * FROM user__roles"
    with _open(demo_path) as demo, _open(SITES / "drupal10-standard.sqlite") as site:
        assert demo.execute(shown).fetchall() == site.execute(shown).fetchall()
        assert demo.execute(roles).fetchall() == site.execute(roles).fetchall()
        (data,) = demo.execute("SELECT data FROM config WHERE name = 'system.site'").fetchone()
        # uid 1 has no password: nobody can log in to the demo.
        assert demo.execute("SELECT pass FROM users_field_data").fetchall() == [(None,), (None,)]
    demo.close()
    site.close()
    assert (
        php_unserialize(data)["name"] == DEMO_SITE_NAME == "sfrelay demo site (not a real Drupal)"
    )


def test_an_existing_demo_site_is_kept_as_it_is(tmp_path: Path) -> None:
    demo_path = tmp_path / "var" / "demo" / "drupal.sqlite"
    assert create_demo_site(demo_path)
    with _open(demo_path) as db:
        db.execute("UPDATE users_field_data SET mail = 'kept@example.org' WHERE uid = 1")
    db.close()
    before = demo_path.read_bytes()
    assert not create_demo_site(demo_path)
    assert demo_path.read_bytes() == before
    assert [p.name for p in demo_path.parent.iterdir()] == ["drupal.sqlite"]  # no partial file


def test_the_sample_contact_is_a_usable_notification_with_valid_ids() -> None:
    body = SAMPLE_MESSAGE.read_bytes()
    message = parse_message(body, load_contract(DEFAULT_WSDL_DIR), ["Contact", "Lead"])
    [notification] = message.notifications
    assert notification.problem is None
    assert is_notification_id(notification.id) and len(notification.id) == 18
    assert notification.record_id == SAMPLE_CONTACT_ID
    assert is_valid_id(SAMPLE_CONTACT_ID) and SAMPLE_CONTACT_ID.startswith("003")
    assert is_valid_id(message.organization_id) and message.organization_id.startswith("00D")
    assert is_valid_id(message.action_id) and message.action_id.startswith("04k")
    assert notification.fields["Email"] == "ada.lovelace@example.org"
