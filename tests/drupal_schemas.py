"""Drupal user schemas for server databases: the shared MySQL dumps, and PostgreSQL DDL
derived from them the way Drupal's pgsql driver writes it; seeded from the real sites."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.servers import SHARED

DRUPAL = SHARED / "drupal"
SITES = DRUPAL / "sites"
MYSQL_DUMPS = {
    10: DRUPAL / "drupal10-mysql-users-schema.sql",
    7: DRUPAL / "drupal7-mysql-users-schema.sql",
}
SITE_FILES = {10: SITES / "drupal10-standard.sqlite", 7: SITES / "drupal7-standard.sqlite"}

# Drupal 8+ keeps roles and site settings in `config`, which the user-table dump leaves out.
CONFIG_DDL = {
    "mysql": "CREATE TABLE config (collection varchar(255) NOT NULL DEFAULT '', "
    "name varchar(255) NOT NULL DEFAULT '', data longblob, PRIMARY KEY (collection, name)) "
    "DEFAULT CHARSET=utf8mb4",
    "postgresql": "CREATE TABLE config (collection varchar(255) NOT NULL DEFAULT '', "
    "name varchar(255) NOT NULL DEFAULT '', data bytea, PRIMARY KEY (collection, name))",
}
# Drupal 7 keeps its settings (e.g. user_admin_role) in `variable`, which the dump leaves out.
VARIABLE_DDL = {
    "mysql": "CREATE TABLE variable (name varchar(128) NOT NULL DEFAULT '', "
    "value longblob NOT NULL, PRIMARY KEY (name)) DEFAULT CHARSET=utf8mb4",
    "postgresql": "CREATE TABLE variable (name varchar(128) NOT NULL DEFAULT '', "
    "value bytea NOT NULL, PRIMARY KEY (name))",
}
# Without it MySQL turns an inserted uid 0 (the anonymous user) into the next AUTO_INCREMENT.
KEEP_ZERO_IDS = "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO')"
# (table, WHERE) of the rows the installer left that sfrelay reads or must not disturb.
SEED = {
    10: [
        ("users", "1=1"),
        ("users_field_data", "1=1"),
        ("user__roles", "1=1"),
        ("cachetags", "1=1"),
        (
            "config",
            "collection = '' AND (name IN ('system.site', 'system.date', 'filter.settings') "
            "OR name LIKE 'user.role.%' OR name LIKE 'field.storage.user.%' "
            "OR name LIKE 'field.field.user.user.%')",
        ),
    ],
    7: [
        ("users", "1=1"),
        ("users_roles", "1=1"),
        ("role", "1=1"),
        ("role_permission", "1=1"),
        ("variable", "name = 'user_admin_role'"),
        ("sequences", "1=1"),
        ("field_config", "1=1"),
        ("field_config_instance", "entity_type = 'user'"),
        *(
            (f"field_{kind}_field_{name}", "entity_type = 'user'")
            for kind in ("data", "revision")
            for name in ("first_name", "last_name", "salesforce_id")
        ),
    ],
}
_PG_TYPES = [
    (r"^varchar\((\d+)\)", r"varchar(\1)"),
    (r"^int\(\d+\)", "integer"),
    (r"^bigint\(\d+\)", "bigint"),
    (r"^tinyint\(\d+\)", "smallint"),
    (r"^smallint\(\d+\)", "smallint"),
    (r"^decimal\((\d+),(\d+)\)", r"numeric(\1,\2)"),
    (r"^longblob", "bytea"),
    (r"^longtext", "text"),
]


def mysql_statements(major: int) -> list[str]:
    """The CREATE TABLE statements of the shared MySQL dump."""
    sql = MYSQL_DUMPS[major].read_text(encoding="utf-8")
    sql = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    return [s.strip() for s in sql.split(";\n") if s.strip().startswith("CREATE TABLE")]


def _pg_column(name: str, spec: str) -> str:
    spec = re.sub(r" COMMENT '(?:[^']|'')*'", "", spec)
    spec = re.sub(r" CHARACTER SET \w+| COLLATE \w+", "", spec)
    unsigned = " unsigned" in spec
    spec = spec.replace(" unsigned", "")
    if "AUTO_INCREMENT" in spec:
        # Drupal's pgsql driver: 'serial' (+ a CHECK for unsigned), sequence <table>_<col>_seq.
        return f'"{name}" serial CHECK ("{name}" >= 0)'
    for pattern, replacement in _PG_TYPES:
        spec, count = re.subn(pattern, replacement, spec)
        if count:
            break
    else:
        raise ValueError(f"no PostgreSQL type for {name} {spec}")
    check = f' CHECK ("{name}" >= 0)' if unsigned else ""
    return f'"{name}" {spec}{check}'


def _cols(spec: str) -> str:
    return ", ".join(f'"{c}"' for c in re.findall(r"`(\w+)`(?:\(\d+\))?", spec))


def pg_statements(major: int) -> list[str]:
    """The dump as Drupal's pgsql driver would create it: same columns and keys, pg types,
    unique keys as <table>__<name>__key constraints, indexes as <table>__<name>__idx."""
    out = []
    for statement in mysql_statements(major):
        table = re.match(r"CREATE TABLE `(\w+)`", statement)
        assert table is not None
        name = table.group(1)
        parts, indexes = [], []
        for line in statement.splitlines()[1:-1]:
            line = line.strip().rstrip(",")
            if column := re.match(r"`(\w+)` (.+)$", line):
                parts.append(_pg_column(column.group(1), column.group(2)))
            elif line.startswith("PRIMARY KEY"):
                parts.append(f"PRIMARY KEY ({_cols(line[len('PRIMARY KEY') :])})")
            elif unique := re.match(r"UNIQUE KEY `(\w+)` \((.+)\)$", line):
                key = f"{name}__{unique.group(1)}__key"
                parts.append(f'CONSTRAINT "{key}" UNIQUE ({_cols(unique.group(2))})')
            elif index := re.match(r"KEY `(\w+)` \((.+)\)$", line):
                idx = f"{name}__{index.group(1)}__idx"
                indexes.append(f'CREATE INDEX "{idx}" ON "{name}" ({_cols(index.group(2))})')
            else:
                raise ValueError(f"unexpected line in {name}: {line}")
        out.append(f'CREATE TABLE "{name}" ({", ".join(parts)})')
        out.extend(indexes)
    return out


def site_rows(major: int, table: str, where: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Rows of the real Drupal-installed SQLite site (read-only; no collation needed)."""
    uri = f"file:{SITE_FILES[major]}?mode=ro&immutable=1"
    with sqlite3.connect(uri, uri=True) as db:
        cursor = db.execute(f"SELECT * FROM {table} WHERE {where}")
        names = [d[0] for d in cursor.description]
        return names, cursor.fetchall()


async def load(conn: AsyncConnection, dialect: str, major: int) -> None:
    """Create Drupal's user tables and copy the installer's rows into them."""
    statements = pg_statements(major) if dialect == "postgresql" else mysql_statements(major)
    statements.append((CONFIG_DDL if major == 10 else VARIABLE_DDL)[dialect])
    if dialect == "mysql":
        await conn.execute(text(KEEP_ZERO_IDS))
    for statement in statements:
        await conn.execute(text(statement))
    for table, where in SEED[major]:
        names, rows = site_rows(major, table, where)
        if not rows:
            continue
        columns = ", ".join(f"{n}" for n in names)
        params = ", ".join(f":{n}" for n in names)
        await conn.execute(
            text(f"INSERT INTO {table} ({columns}) VALUES ({params})"),
            [dict(zip(names, _values(row, dialect), strict=True)) for row in rows],
        )
    if dialect == "postgresql":
        # Explicit ids do not move a pg sequence; Drupal's installer leaves each at the
        # highest id it gave (users.uid, field_config.id, role.rid, D7's sequences.value).
        serials = await conn.execute(
            text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND column_default LIKE 'nextval(%'"
            )
        )
        for table, column in serials.all():
            await conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), MAX({column}))"
                    f" FROM {table}"
                )
            )


_SERIALIZED = re.compile(r"[asbidO]:|N;")  # PHP serialize()'s values


def _values(row: tuple[Any, ...], dialect: str) -> list[Any]:
    if dialect != "postgresql":
        return list(row)  # MySQL takes text for a blob (and aiomysql 0.3 cannot bind bytes)
    # bytea wants bytes: the serialized config values (the only blobs copied).
    return [v.encode() if isinstance(v, str) and _SERIALIZED.match(v) else v for v in row]


def site_copy(name: str, directory: Path) -> Path:
    """A writable copy of one of the real sites (never write to the shared files)."""
    source = SITES / name
    target = directory / name
    target.write_bytes(source.read_bytes())
    return target
