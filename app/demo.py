"""The demo Drupal 10 site `sfrelay up` gives the worker when no SFRELAY_DATABASE_URL is set.

Not a Drupal site: only the tables sfrelay reads and writes, created with exactly the SQLite
DDL Drupal 10.5's installer writes (tests/test_demo.py compares them table by table, column by
column with real sites), and the rows a fresh install leaves there: uid 0 (anonymous), uid 1
(the admin), the site's default language and time zone, and the standard profile's roles.
The user fields are those of sfrelay's default field map (app/fieldmap.default.toml).
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path

from app.drupal.engine import nocase_utf8
from app.drupal.php import php_serialize

DEMO_SITE_NAME = "sfrelay demo site (not a real Drupal)"

# The user fields the default field map writes, with Drupal's max length for each.
DEMO_FIELDS = {"field_first_name": 255, "field_last_name": 255, "field_salesforce_id": 18}

_CACHE_BIN = """CREATE TABLE "{name}" (
"cid" VARCHAR(255) NOT NULL DEFAULT '',
"data" BLOB NULL DEFAULT NULL,
"expire" INTEGER NOT NULL DEFAULT 0,
"created" FLOAT NOT NULL DEFAULT 0,
"serialized" INTEGER NOT NULL DEFAULT 0,
"tags" TEXT NULL DEFAULT NULL,
"checksum" VARCHAR(255) NOT NULL,
 PRIMARY KEY ("cid")
);
CREATE INDEX "{name}_created" ON "{name}" ("created");
CREATE INDEX "{name}_expire" ON "{name}" ("expire");
"""

_FIELD = """CREATE TABLE "user__{name}" (
"bundle" VARCHAR(128) NOT NULL DEFAULT '',
"deleted" INTEGER NOT NULL DEFAULT 0,
"entity_id" INTEGER NOT NULL CHECK ("entity_id">= 0),
"revision_id" INTEGER NOT NULL CHECK ("revision_id">= 0),
"langcode" VARCHAR(32) NOT NULL DEFAULT '',
"delta" INTEGER NOT NULL CHECK ("delta">= 0),
"{name}_value" VARCHAR({length}) COLLATE NOCASE_UTF8 NOT NULL,
 PRIMARY KEY ("entity_id", "deleted", "delta", "langcode")
);
CREATE INDEX "user__{name}_bundle" ON "user__{name}" ("bundle");
CREATE INDEX "user__{name}_revision_id" ON "user__{name}" ("revision_id");
"""

_TABLES = """CREATE TABLE "cachetags" (
"tag" VARCHAR(255) NOT NULL DEFAULT '',
"invalidations" INTEGER NOT NULL DEFAULT 0,
 PRIMARY KEY ("tag")
);
CREATE TABLE "config" (
"collection" VARCHAR(255) NOT NULL DEFAULT '',
"name" VARCHAR(255) NOT NULL DEFAULT '',
"data" BLOB NULL DEFAULT NULL,
 PRIMARY KEY ("collection", "name")
);
CREATE TABLE "user__roles" (
"bundle" VARCHAR(128) NOT NULL DEFAULT '',
"deleted" INTEGER NOT NULL DEFAULT 0,
"entity_id" INTEGER NOT NULL CHECK ("entity_id">= 0),
"revision_id" INTEGER NOT NULL CHECK ("revision_id">= 0),
"langcode" VARCHAR(32) NOT NULL DEFAULT '',
"delta" INTEGER NOT NULL CHECK ("delta">= 0),
"roles_target_id" VARCHAR(255) NOT NULL,
 PRIMARY KEY ("entity_id", "deleted", "delta", "langcode")
);
CREATE INDEX "user__roles_bundle" ON "user__roles" ("bundle");
CREATE INDEX "user__roles_revision_id" ON "user__roles" ("revision_id");
CREATE INDEX "user__roles_roles_target_id" ON "user__roles" ("roles_target_id");
CREATE TABLE "users" (
"uid" INTEGER PRIMARY KEY AUTOINCREMENT CHECK ("uid">= 0),
"uuid" VARCHAR(128) COLLATE NOCASE_UTF8 NOT NULL,
"langcode" VARCHAR(12) NOT NULL
);
CREATE UNIQUE INDEX "users_user_field__uuid__value" ON "users" ("uuid");
CREATE TABLE "users_data" (
"uid" INTEGER NOT NULL CHECK ("uid">= 0) DEFAULT 0,
"module" VARCHAR(50) NOT NULL DEFAULT '',
"name" VARCHAR(128) NOT NULL DEFAULT '',
"value" BLOB NULL DEFAULT NULL,
"serialized" INTEGER CHECK ("serialized">= 0) DEFAULT 0,
 PRIMARY KEY ("uid", "module", "name")
);
CREATE INDEX "users_data_module" ON "users_data" ("module");
CREATE INDEX "users_data_name" ON "users_data" ("name");
CREATE TABLE "users_field_data" (
"uid" INTEGER NOT NULL CHECK ("uid">= 0),
"langcode" VARCHAR(12) NOT NULL,
"preferred_langcode" VARCHAR(12) NULL DEFAULT NULL,
"preferred_admin_langcode" VARCHAR(12) NULL DEFAULT NULL,
"name" VARCHAR(60) COLLATE NOCASE_UTF8 NOT NULL,
"pass" VARCHAR(255) COLLATE NOCASE_UTF8 NULL DEFAULT NULL,
"mail" VARCHAR(254) NULL DEFAULT NULL,
"timezone" VARCHAR(32) COLLATE NOCASE_UTF8 NULL DEFAULT NULL,
"status" INTEGER NULL DEFAULT NULL,
"created" INTEGER NOT NULL,
"changed" INTEGER NULL DEFAULT NULL,
"access" INTEGER NOT NULL,
"login" INTEGER NULL DEFAULT NULL,
"init" VARCHAR(254) NULL DEFAULT NULL,
"default_langcode" INTEGER NOT NULL,
 PRIMARY KEY ("uid", "langcode")
);
CREATE INDEX "users_field_data_user__id__default_langcode__langcode" ON "users_field_data" ("uid", "default_langcode", "langcode");
CREATE UNIQUE INDEX "users_field_data_user__name" ON "users_field_data" ("name", "langcode");
CREATE INDEX "users_field_data_user_field__access" ON "users_field_data" ("access");
CREATE INDEX "users_field_data_user_field__created" ON "users_field_data" ("created");
CREATE INDEX "users_field_data_user_field__mail" ON "users_field_data" ("mail");
"""  # noqa: E501 (Drupal's DDL as it is)


def _role(role_id: str, label: str, weight: int, is_admin: bool, permissions: list[str]) -> str:
    return php_serialize(
        {
            "uuid": str(uuid.uuid4()),
            "langcode": "en",
            "status": True,
            "dependencies": {},
            "id": role_id,
            "label": label,
            "weight": weight,
            "is_admin": is_admin,
            "permissions": permissions,
        }
    )


def _config_rows() -> list[tuple[str, str, bytes]]:
    site = {
        "langcode": "en",
        "uuid": str(uuid.uuid4()),
        "name": DEMO_SITE_NAME,
        "mail": "admin@example.com",
        "slogan": "",
        "page": {403: "", 404: "", "front": "/user/login"},
        "admin_compact_mode": False,
        "weight_select_max": 100,
        "default_langcode": "en",
        "mail_notification": None,
    }
    date = {
        "first_day": 0,
        "country": {"default": None},
        "timezone": {
            "default": "UTC",
            "user": {"configurable": True, "default": 0, "warn": False},
        },
    }
    rows = {
        "system.site": php_serialize(site),
        "system.date": php_serialize(date),
        "user.role.anonymous": _role("anonymous", "Anonymous user", 0, False, ["access content"]),
        "user.role.authenticated": _role(
            "authenticated", "Authenticated user", 1, False, ["access content"]
        ),
        # The standard profile's editor: staff (access administration pages, administer url
        # aliases), so protected (app.drupal.schema.PROTECTING_PERMISSIONS).
        "user.role.content_editor": _role(
            "content_editor",
            "Content editor",
            2,
            False,
            [
                "access administration pages",
                "access content overview",
                "administer url aliases",
                "create article content",
                "edit own article content",
                "view the administration theme",
            ],
        ),
        "user.role.administrator": _role("administrator", "Administrator", 3, True, []),
    }
    for name, length in DEMO_FIELDS.items():  # the storage definitions sfrelay reads
        rows[f"field.storage.user.{name}"] = php_serialize(
            {
                "uuid": str(uuid.uuid4()),
                "langcode": "en",
                "status": True,
                "dependencies": {"module": ["user"]},
                "id": f"user.{name}",
                "field_name": name,
                "entity_type": "user",
                "type": "string",
                "settings": {"max_length": length, "case_sensitive": False, "is_ascii": False},
                "module": "core",
                "locked": False,
                "cardinality": 1,
                "translatable": True,
                "indexes": {},
                "persist_with_no_fields": False,
                "custom_storage": False,
            }
        )
    return [("", name, data.encode()) for name, data in rows.items()]


def demo_ddl() -> str:
    """The demo's DDL, as Drupal's SQLite driver writes it (", " then a newline per column)."""
    fields = "".join(
        _FIELD.format(name=name, length=length) for name, length in DEMO_FIELDS.items()
    )
    return (_TABLES + _CACHE_BIN.format(name="cache_entity") + fields).replace(",\n", ", \n")


def create_demo_site(path: Path) -> bool:
    """Create the demo database at `path` unless it exists; True when it was created."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    now = int(time.time())
    conn = sqlite3.connect(partial)
    try:
        conn.create_collation("NOCASE_UTF8", nocase_utf8)
        conn.executescript(demo_ddl())
        with conn:
            conn.executemany(
                'INSERT INTO "users" ("uid", "uuid", "langcode") VALUES (?, ?, ?)',
                [(0, str(uuid.uuid4()), "en"), (1, str(uuid.uuid4()), "en")],
            )
            conn.executemany(
                'INSERT INTO "users_field_data" ("uid", "langcode", "preferred_langcode", '
                '"name", "pass", "mail", "timezone", "status", "created", "changed", "access", '
                '"login", "init", "default_langcode") '
                "VALUES (?, 'en', 'en', ?, NULL, ?, ?, ?, ?, ?, 0, 0, ?, 1)",
                [
                    (0, "", None, None, 0, now, now, None),
                    (1, "admin", "admin@example.com", "UTC", 1, now, now, "admin@example.com"),
                ],
            )
            conn.execute(
                "INSERT INTO \"user__roles\" VALUES ('user', 0, 1, 1, 'en', 0, 'administrator')"
            )
            conn.executemany('INSERT INTO "config" VALUES (?, ?, ?)', _config_rows())
    finally:
        conn.close()
    partial.replace(path)
    return True
