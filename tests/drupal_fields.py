"""Typed user fields made as Drupal makes them: the field's table(s) with the column types
Drupal's schema gives that field type on each backend, and its definition (Drupal 8+: config
field.storage.user.<name> and field.field.user.user.<name>; Drupal 7: field_config and
field_config_instance), PHP-serialized as Drupal writes it."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.drupal.php import php_serialize
from tests.fixtures_db import DrupalSite

# Drupal schema column -> (SQLite, MySQL/MariaDB, PostgreSQL), as Drupal's drivers map them.
_SQL = {
    "int": ("INTEGER", "int(11)", "integer"),
    "tinyint": ("INTEGER", "tinyint(4)", "smallint"),
    "float": ("FLOAT", "float", "real"),
    "text": ("TEXT", "longtext", "text"),
}
_BACKENDS = {"sqlite": 0, "mariadb": 1, "postgresql": 2}


def column_sql(spec: str, backend: str) -> str:
    """int, tinyint, float, text, varchar(N) or numeric(P,S) in `backend`'s spelling."""
    at = _BACKENDS[backend]
    if spec in _SQL:
        return _SQL[spec][at]
    if match := re.fullmatch(r"varchar\((\d+)\)", spec):
        return f"VARCHAR({match[1]})" if at == 0 else f"varchar({match[1]})"
    if match := re.fullmatch(r"numeric\((\d+),(\d+)\)", spec):
        p, s = match[1], match[2]
        return (f"NUMERIC({p}, {s})", f"decimal({p},{s})", f"numeric({p},{s})")[at]
    raise ValueError(spec)


@dataclass
class TypedField:
    name: str
    type: str
    columns: dict[str, str]  # column suffix (value, format, target_id) -> schema spec
    settings: dict[str, Any] = field(default_factory=dict)  # storage settings
    own: dict[str, Any] = field(default_factory=dict)  # the field's settings on the user
    cardinality: int = 1


async def add_field(site: DrupalSite, f: TypedField) -> None:
    if site.major == 10:
        await _add10(site, f)
        await _define10(site, f)
    else:
        await _add7(site, f)
        await _define7(site, f)


async def redefine_field(site: DrupalSite, f: TypedField) -> None:
    """Save the field's settings again, as its settings form does (its table stays)."""
    if site.major == 10:
        for name in (f"field.storage.user.{f.name}", f"field.field.user.user.{f.name}"):
            await site.execute("DELETE FROM config WHERE collection = '' AND name = :n", n=name)
        await _define10(site, f)
        return
    for table in ("field_config_instance", "field_config"):
        await site.execute(f"DELETE FROM {table} WHERE field_name = :n", n=f.name)
    await _define7(site, f)


def _blob(site: DrupalSite, data: str) -> Any:
    return data.encode() if site.backend == "postgresql" else data


async def _add10(site: DrupalSite, f: TypedField) -> None:
    main = next(iter(f.columns))
    columns = ", ".join(
        # Drupal makes the main property NOT NULL in a dedicated field table.
        f"{f.name}_{suffix} {column_sql(spec, site.backend)}"
        + (" NOT NULL" if suffix == main else " NULL DEFAULT NULL")
        for suffix, spec in f.columns.items()
    )
    await site.execute(
        f"CREATE TABLE user__{f.name} (bundle varchar(128) NOT NULL DEFAULT '', "
        f"deleted {column_sql('tinyint', site.backend)} NOT NULL DEFAULT 0, "
        "entity_id integer NOT NULL, revision_id integer NOT NULL, "
        "langcode varchar(32) NOT NULL DEFAULT '', delta integer NOT NULL, "
        f"{columns}, PRIMARY KEY (entity_id, deleted, delta, langcode))"
    )


async def _define10(site: DrupalSite, f: TypedField) -> None:
    storage = {
        "uuid": str(uuid.uuid4()),
        "langcode": "en",
        "status": True,
        "dependencies": {"module": ["user"]},
        "id": f"user.{f.name}",
        "field_name": f.name,
        "entity_type": "user",
        "type": f.type,
        "settings": f.settings,
        "module": "core",
        "locked": False,
        "cardinality": f.cardinality,
        "translatable": True,
        "indexes": {},
        "persist_with_no_fields": False,
        "custom_storage": False,
    }
    instance = {
        "uuid": str(uuid.uuid4()),
        "langcode": "en",
        "status": True,
        "dependencies": {"config": [f"field.storage.user.{f.name}"]},
        "id": f"user.user.{f.name}",
        "field_name": f.name,
        "entity_type": "user",
        "bundle": "user",
        "label": f.name,
        "description": "",
        "required": False,
        "translatable": True,
        "default_value": [],
        "default_value_callback": "",
        "settings": f.own,
        "field_type": f.type,
    }
    for name, data in (
        (f"field.storage.user.{f.name}", storage),
        (f"field.field.user.user.{f.name}", instance),
    ):
        await site.execute(
            "INSERT INTO config (collection, name, data) VALUES ('', :n, :d)",
            n=name,
            d=_blob(site, php_serialize(data)),
        )


async def _add7(site: DrupalSite, f: TypedField) -> None:
    columns = ", ".join(
        f"{f.name}_{suffix} {column_sql(spec, site.backend)} NULL DEFAULT NULL"
        for suffix, spec in f.columns.items()
    )
    for kind in ("data", "revision"):
        revision_key = ", revision_id" if kind == "revision" else ""
        await site.execute(
            f"CREATE TABLE field_{kind}_{f.name} (entity_type varchar(128) NOT NULL DEFAULT '', "
            "bundle varchar(128) NOT NULL DEFAULT '', "
            f"deleted {column_sql('tinyint', site.backend)} NOT NULL DEFAULT 0, "
            f"entity_id integer NOT NULL, revision_id integer {'NOT ' if revision_key else ''}"
            "NULL, language varchar(32) NOT NULL DEFAULT '', delta integer NOT NULL, "
            f"{columns}, PRIMARY KEY (entity_type, entity_id{revision_key}, deleted, delta, "
            "language))"
        )


async def _define7(site: DrupalSite, f: TypedField) -> None:
    module = {"text": "text", "number": "number", "list": "list"}.get(f.type.split("_")[0], "")
    data = {
        "settings": f.settings,
        "entity_types": [],
        "translatable": False,
        "storage": {
            "type": "field_sql_storage",
            "settings": [],
            "module": "field_sql_storage",
            "active": 1,
        },
        "foreign keys": [],
        "indexes": [],
    }
    await site.execute(
        "INSERT INTO field_config (field_name, type, module, active, storage_type, "
        "storage_module, storage_active, locked, data, cardinality, translatable, deleted) "
        "VALUES (:n, :t, :m, 1, 'field_sql_storage', 'field_sql_storage', 1, 0, :d, :c, 0, 0)",
        n=f.name,
        t=f.type,
        m=module,
        d=_blob(site, php_serialize(data)),
        c=f.cardinality,
    )
    (row,) = await site.rows("SELECT id FROM field_config WHERE field_name = :n", n=f.name)
    instance = {"label": f.name, "settings": {"user_register_form": False, **f.own}}
    await site.execute(
        "INSERT INTO field_config_instance (field_id, field_name, entity_type, bundle, data, "
        "deleted) VALUES (:i, :n, 'user', 'user', :d, 0)",
        i=row["id"],
        n=f.name,
        d=_blob(site, php_serialize(instance)),
    )


async def stored(site: DrupalSite, name: str, uid: int) -> dict[str, Any] | None:
    """The user's row of a field (D7: field_data_*, checked equal to field_revision_*):
    column suffix -> value; None without a row."""
    tables = (
        [f"user__{name}"]
        if site.major == 10
        else [f"field_{k}_{name}" for k in ("data", "revision")]
    )
    found = []
    for table in tables:
        rows = await site.rows(f"SELECT * FROM {table} WHERE entity_id = :u", u=uid)
        assert len(rows) <= 1, rows
        found.append(
            {k.removeprefix(f"{name}_"): v for k, v in rows[0].items() if k.startswith(name)}
            if rows
            else None
        )
    assert all(f == found[0] for f in found), found
    return found[0]
