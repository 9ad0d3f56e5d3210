"""Test helpers: the exact Drupal rows a user must have, and sfrelay's ledger read back.

`sf`, `note` and `T0` live in tests.factories (re-exported here for older imports)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from app.config import Settings
from app.drupal.php import php_serialize
from app.sync import Syncer
from tests.factories import T0 as T0
from tests.factories import note as note
from tests.factories import sf as sf
from tests.fixtures_db import DrupalSite

FIELDS = ("field_first_name", "field_last_name", "field_salesforce_id")


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


async def ledger_history(site: DrupalSite, sf_id: str) -> tuple[int | None, list[dict[str, Any]]]:
    """The record's uid in sfrelay's ledger and its history, parsed: one dict per attempt
    ("o" the outcome, "d" its detail, "uid", "n" the notification, "at")."""
    (row,) = await site.rows("SELECT uid, history FROM sfrelay_record WHERE sf_id = :s", s=sf_id)
    entries: list[dict[str, Any]] = orjson.loads(row["history"])
    return row["uid"], entries


def user_table(site: DrupalSite) -> str:
    """The table holding uid, name and mail: D10 users_field_data, D7 users."""
    return "users_field_data" if site.major == 10 else "users"


async def user_ids(site: DrupalSite) -> list[int]:
    table = user_table(site)
    return [r["uid"] for r in await site.rows(f"SELECT uid FROM {table} ORDER BY uid")]


async def uids_with_mail(site: DrupalSite, mail: str) -> list[int]:
    table = user_table(site)
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
        assert await uids_allocated(site) >= uid  # the next user_save() allocates past it
    assert await field_values(site, uid) == fields
    assert await roles(site, uid) == sorted(extra_roles)


async def uids_allocated(site: DrupalSite) -> int:
    """The highest uid Drupal's next allocation counts as taken: Drupal 7's sequences (its
    pgsql driver's sequence behind sequences.value), Drupal 10's users_uid_seq on PostgreSQL."""
    if site.backend == "postgresql":
        sequence = "sequences_value_seq" if site.major == 7 else "users_uid_seq"
        (row,) = await site.rows(f"SELECT last_value AS v FROM {sequence}")
    else:
        assert site.major == 7, "Drupal 10 numbers users by the users table's own counter"
        (row,) = await site.rows("SELECT MAX(value) AS v FROM sequences")
    return int(row["v"])


async def add_role(
    site: DrupalSite, role: str, *, is_admin: bool = False, permissions: tuple[str, ...] = ()
) -> None:
    """A role made in Drupal's UI: D10 config `user.role.<role>`, D7 role + role_permission."""
    if site.major == 10:
        data = php_serialize(
            {
                "uuid": str(uuid.uuid4()),
                "langcode": "en",
                "status": True,
                "dependencies": [],
                "id": role,
                "label": role.title(),
                "weight": 5,
                "is_admin": is_admin,
                "permissions": list(permissions),
            }
        )
        value: Any = data.encode() if site.backend == "postgresql" else data
        await site.execute(
            "INSERT INTO config (collection, name, data) VALUES ('', :n, :d)",
            n=f"user.role.{role}",
            d=value,
        )
        return
    (top,) = await site.rows("SELECT MAX(rid) AS rid FROM role")
    rid = int(top["rid"]) + 1
    await site.execute("INSERT INTO role (rid, name, weight) VALUES (:r, :n, 5)", r=rid, n=role)
    await grant_permissions(site, role, permissions)
    if is_admin:
        await site.execute(
            "UPDATE variable SET value = :v WHERE name = 'user_admin_role'", v=f"i:{rid};"
        )


async def delete_role(site: DrupalSite, role: str) -> None:
    """Delete a role as Drupal's UI does: the role, and every user's grant of it."""
    if site.major == 10:
        await site.execute(
            "DELETE FROM config WHERE collection = '' AND name = :n", n=f"user.role.{role}"
        )
        await site.execute("DELETE FROM user__roles WHERE roles_target_id = :r", r=role)
        return
    (found,) = await site.rows("SELECT rid FROM role WHERE name = :n", n=role)
    for table in ("users_roles", "role_permission", "role"):
        await site.execute(f"DELETE FROM {table} WHERE rid = :r", r=found["rid"])


async def grant_permissions(site: DrupalSite, role: str, permissions: tuple[str, ...]) -> None:
    """Give an existing role more permissions, as Drupal's permissions page does."""
    if site.major == 10:
        from app.drupal.schema import php_unserialize

        (row,) = await site.rows(
            "SELECT data FROM config WHERE collection = '' AND name = :n", n=f"user.role.{role}"
        )
        config = php_unserialize(row["data"])
        config["permissions"] = [*config["permissions"].values(), *permissions]
        data = php_serialize(config)
        await site.execute(
            "UPDATE config SET data = :d WHERE collection = '' AND name = :n",
            d=data.encode() if site.backend == "postgresql" else data,
            n=f"user.role.{role}",
        )
        return
    (found,) = await site.rows("SELECT rid FROM role WHERE name = :n", n=role)
    for permission in permissions:
        await site.execute(
            "INSERT INTO role_permission (rid, permission, module) VALUES (:r, :p, 'user')",
            r=found["rid"],
            p=permission,
        )


async def give_role(site: DrupalSite, uid: int, role: str) -> None:
    """Add a role to a user, as Drupal's user edit form does."""
    if site.major == 10:
        rows = await site.rows("SELECT delta FROM user__roles WHERE entity_id = :u", u=uid)
        delta = max((r["delta"] for r in rows), default=-1) + 1
        await site.execute(
            "INSERT INTO user__roles (bundle, deleted, entity_id, revision_id, langcode, delta, "
            "roles_target_id) VALUES ('user', 0, :u, :u, 'en', :d, :r)",
            u=uid,
            d=delta,
            r=role,
        )
        return
    (found,) = await site.rows("SELECT rid FROM role WHERE name = :n", n=role)
    await site.execute("INSERT INTO users_roles (uid, rid) VALUES (:u, :r)", u=uid, r=found["rid"])


async def add_member(
    site: DrupalSite,
    name: str,
    mail: str,
    *,
    login: int = 0,
    roles: tuple[str, ...] = (),
    uid: int | None = None,
) -> int:
    """A user that registered in Drupal itself (not from Salesforce); returns its uid (the
    next one, or `uid`: a uid Drupal gives again, as MySQL < 8.0 does after a restart)."""
    uid = max(await user_ids(site)) + 1 if uid is None else uid
    now = int(time.time()) - 3600
    if site.major == 10:
        await site.execute(
            "INSERT INTO users (uid, uuid, langcode) VALUES (:u, :k, 'en')",
            u=uid,
            k=str(uuid.uuid4()),
        )
        if site.backend == "postgresql":  # an explicit uid does not move the serial
            await site.execute("SELECT setval(pg_get_serial_sequence('users', 'uid'), :u)", u=uid)
        await site.execute(
            "INSERT INTO users_field_data (uid, langcode, preferred_langcode, name, pass, mail, "
            "timezone, status, created, changed, access, login, init, default_langcode) VALUES "
            "(:u, 'en', 'en', :n, '$2y$10$hash', :m, 'UTC', 1, :t, :t, :l, :l, :m, 1)",
            u=uid,
            n=name,
            m=mail,
            t=now,
            l=login,
        )
    else:
        await site.execute(
            "INSERT INTO users (uid, name, pass, mail, theme, signature, created, changed, "
            "access, login, status, language, picture, init) VALUES "
            "(:u, :n, '$S$hash', :m, '', '', :t, :t, :l, :l, 1, '', 0, :m)",
            u=uid,
            n=name,
            m=mail,
            t=now,
            l=login,
        )
    for role in roles:
        await give_role(site, uid, role)
    return uid


def _user_tables(site: DrupalSite) -> list[tuple[str, str]]:
    """(table, its uid column) of every table holding a user's rows (base, fields, roles)."""
    if site.major == 10:
        tables = ["users", "users_field_data", "user__roles", *(f"user__{f}" for f in FIELDS)]
    else:
        tables = ["users", "users_roles"]
        tables += [f"field_{kind}_{f}" for f in FIELDS for kind in ("data", "revision")]
    base = ("users", "users_field_data", "users_roles")
    return [(table, "uid" if table in base else "entity_id") for table in tables]


async def user_rows(site: DrupalSite, uid: int) -> dict[str, list[dict[str, Any]]]:
    """Every row Drupal keeps for the user (base, fields, roles), to compare exactly."""
    found = {}
    for table, key in _user_tables(site):
        rows = await site.rows(f"SELECT * FROM {table} WHERE {key} = :u", u=uid)
        found[table] = sorted(rows, key=repr)
    return found


async def delete_user(site: DrupalSite, uid: int) -> None:
    """Cancel the account as Drupal's "Delete the account and its content" does: every row
    of the user gone."""
    for table, key in _user_tables(site):
        await site.execute(f"DELETE FROM {table} WHERE {key} = :u", u=uid)


async def enable_languages(site: DrupalSite, *langcodes: str, default: str | None = None) -> None:
    """Languages added as Drupal's UI adds them. Drupal 8+: the language module's config
    `language.entity.<code>` (installing it wrote en and the locked und and zxx), and
    `system.site` default_langcode when `default` is given. Drupal 7: locale's `languages`."""
    if site.major == 7:
        await site.execute(
            "CREATE TABLE languages (language varchar(12) NOT NULL PRIMARY KEY, "
            "name varchar(64) NOT NULL DEFAULT '', enabled integer NOT NULL DEFAULT 0, "
            "weight integer NOT NULL DEFAULT 0)"
        )
        for code in ("en", *langcodes):
            await site.execute(
                "INSERT INTO languages (language, name, enabled) VALUES (:c, :c, 1)", c=code
            )
        return

    def blob(data: str) -> Any:
        return data.encode() if site.backend == "postgresql" else data

    from app.drupal.schema import php_unserialize

    for code in ("en", "und", "zxx", *langcodes):
        config = {
            "uuid": str(uuid.uuid4()),
            "langcode": "en",
            "status": True,
            "dependencies": [],
            "id": code,
            "label": code,
            "direction": "ltr",
            "weight": 0,
            "locked": code in ("und", "zxx"),
        }
        await site.execute(
            "INSERT INTO config (collection, name, data) VALUES ('', :n, :d)",
            n=f"language.entity.{code}",
            d=blob(php_serialize(config)),
        )
    if default is not None:
        (row,) = await site.rows(
            "SELECT data FROM config WHERE collection = '' AND name = 'system.site'"
        )
        config = php_unserialize(row["data"])
        config["default_langcode"] = default
        await site.execute(
            "UPDATE config SET data = :d WHERE collection = '' AND name = 'system.site'",
            d=blob(php_serialize(config)),
        )
