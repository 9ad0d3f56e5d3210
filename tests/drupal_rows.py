"""Test helpers: notifications to apply, and the exact Drupal rows a user must have."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.config import Settings
from app.sfid import to18
from app.sync import Syncer
from tests.fixtures_db import DrupalSite

FIELDS = ("field_first_name", "field_last_name", "field_salesforce_id")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
_notes = iter(range(1, 1_000_000))


def sf(n: int, prefix: str = "003") -> str:
    """A real-shaped 18-character Salesforce Id (003 Contact, 00Q Lead)."""
    return to18(f"{prefix}5g0000{n:06d}")


def note(
    record_id: str,
    email: str | None = "",
    first: str | None = None,
    last: str | None = None,
    *,
    minutes: int = 0,
    obj: str | None = None,
    nid: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A decoded notification (as app.queue.decode_notifications returns it)."""
    sobject = obj or ("Lead" if record_id.startswith("00Q") else "Contact")
    fields: dict[str, Any] = {"Id": record_id, "SystemModstamp": T0 + timedelta(minutes=minutes)}
    if email != "":
        fields["Email"] = email
    if first is not None:
        fields["FirstName"] = first
    if last is not None:
        fields["LastName"] = last
    fields.update(extra)
    return {"id": nid or f"04l5g{next(_notes):013d}", "object": sobject, "fields": fields}


async def open_syncer(
    site: DrupalSite, field_map: str | None = None, tmp_path: Path | None = None, **settings: Any
) -> Syncer:
    path = None
    if field_map is not None:
        assert tmp_path is not None
        path = tmp_path / "fieldmap.toml"
        path.write_text(field_map, encoding="utf-8")
    return await Syncer.open(
        Settings(_env_file=None, database_url=site.url, field_map=path, **settings)
    )


async def user_ids(site: DrupalSite) -> list[int]:
    table = "users_field_data" if site.major == 10 else "users"
    return [r["uid"] for r in await site.rows(f"SELECT uid FROM {table} ORDER BY uid")]


async def uids_with_mail(site: DrupalSite, mail: str) -> list[int]:
    table = "users_field_data" if site.major == 10 else "users"
    rows = await site.rows(
        f"SELECT uid FROM {table} WHERE lower(mail) = :m ORDER BY uid",
        m=mail.lower(),
    )
    return [r["uid"] for r in rows]


async def tag(site: DrupalSite, name: str) -> int:
    if site.major == 7:
        return 0  # Drupal 7 has no cache tags
    rows = await site.rows("SELECT invalidations FROM cachetags WHERE tag = :t", t=name)
    return int(rows[0]["invalidations"]) if rows else 0


async def field_values(site: DrupalSite, uid: int) -> dict[str, str]:
    """field -> value, checking every row is exactly what Drupal would store."""
    values = {}
    for name in FIELDS:
        tables = (
            [f"user__{name}"]
            if site.major == 10
            else [f"field_data_{name}", f"field_revision_{name}"]
        )
        found = []
        for table in tables:
            rows = await site.rows(f"SELECT * FROM {table} WHERE entity_id = :u", u=uid)
            for row in rows:
                value = row.pop(f"{name}_value")
                if site.major == 10:
                    assert row == {
                        "bundle": "user",
                        "deleted": 0,
                        "entity_id": uid,
                        "revision_id": uid,
                        "langcode": "en",
                        "delta": 0,
                    }, (table, row)
                else:
                    assert row == {
                        "entity_type": "user",
                        "bundle": "user",
                        "deleted": 0,
                        "entity_id": uid,
                        "revision_id": uid,
                        "language": "und",
                        "delta": 0,
                        f"{name}_format": None,
                    }, (table, row)
                found.append(value)
        if found:
            # D7 keeps the same value in field_data_* and field_revision_*.
            assert len(found) == len(tables) and len(set(found)) == 1, (name, found)
            values[name] = found[0]
    return values


async def roles(site: DrupalSite, uid: int) -> list[str]:
    if site.major == 10:
        rows = await site.rows(
            "SELECT * FROM user__roles WHERE entity_id = :u ORDER BY delta", u=uid
        )
        for delta, row in enumerate(rows):
            assert (row["bundle"], row["deleted"], row["revision_id"]) == ("user", 0, uid)
            assert (row["langcode"], row["delta"]) == ("en", delta)
        return [row["roles_target_id"] for row in rows]
    rows = await site.rows(
        "SELECT r.name FROM users_roles ur JOIN role r ON r.rid = ur.rid WHERE ur.uid = :u "
        "ORDER BY r.name",
        u=uid,
    )
    return [row["name"] for row in rows]


async def base_row(site: DrupalSite, uid: int) -> dict[str, Any]:
    """The user's base row, checked for the columns Drupal needs to load it."""
    if site.major == 10:
        (users,) = await site.rows("SELECT * FROM users WHERE uid = :u", u=uid)
        assert str(uuid.UUID(users["uuid"])) == users["uuid"] and users["langcode"] == "en"
        data = await site.rows("SELECT * FROM users_field_data WHERE uid = :u", u=uid)
        assert len(data) == 1, data  # one translation: the original
        row = data[0]
        assert (row["langcode"], row["default_langcode"]) == ("en", 1)
        return row
    (row,) = await site.rows("SELECT * FROM users WHERE uid = :u", u=uid)
    return row


async def assert_new_user(
    site: DrupalSite,
    uid: int,
    *,
    name: str,
    mail: str,
    fields: dict[str, str],
    extra_roles: tuple[str, ...] = (),
) -> None:
    """Exactly the rows Drupal's own save writes for a new user."""
    row = await base_row(site, uid)
    assert abs(row["created"] - time.time()) < 120 and row["changed"] == row["created"]
    if site.major == 10:
        assert row == {
            **row,
            "preferred_langcode": "en",
            "preferred_admin_langcode": None,
            "name": name,
            "pass": None,
            "mail": mail,
            "timezone": "UTC",
            "status": 1,
            "access": 0,
            "login": 0,
            "init": mail,
        }
    else:
        assert row == {
            **row,
            "name": name,
            "pass": "",
            "mail": mail,
            "theme": "",
            "signature": "",
            "signature_format": None,
            "access": 0,
            "login": 0,
            "status": 1,
            "timezone": None,
            "language": "",
            "picture": 0,
            "init": mail,
            "data": None,
        }
        (seq,) = await site.rows("SELECT MAX(value) AS v FROM sequences")
        assert seq["v"] >= uid  # the next user_save() allocates past this user
    assert await field_values(site, uid) == fields
    assert await roles(site, uid) == sorted(extra_roles)
