"""Which Drupal this database holds (7 or 8+), its site defaults, roles and user field tables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import column, inspect, or_, select, table, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal.fields import FieldColumn as FieldColumn  # (re-exported)
from app.drupal.fields import read_fields, table_columns
from app.drupal.php import php_array
from app.drupal.php import php_unserialize as php_unserialize  # (re-exported)
from app.drupal.translation7 import UserTranslation, read_site_default7, read_user_translation
from app.errors import ConfigError

Major = Literal[7, 10]

# Roles every user has implicitly; Drupal never stores them on a user.
IMPLICIT_ROLES = frozenset({"authenticated", "anonymous", "authenticated user", "anonymous user"})

_config = table("config", column("collection"), column("name"), column("data"))
_role7 = table("role", column("rid"), column("name"))
_permission7 = table("role_permission", column("rid"), column("permission"))
_variable7 = table("variable", column("name"), column("value"))
_languages7 = table("languages", column("language"))

# A role holding one of these (or an admin role) is staff: whoever controls the account can
# change the site, its content or what other users see (Drupal marks most of these
# "restrict access"). sfrelay never writes to a user who has one (SFRELAY_PROTECTED_ROLES adds
# roles): a Contact's Email must not become a way into such an account.
PROTECTING_PERMISSIONS = (
    "administer users",
    "administer permissions",
    "access administration pages",
    "access site reports",
    "import configuration",
    "export configuration",
    "synchronize configuration",
    "use PHP for settings",
    "use text format full_html",
)
# ... and every permission that starts with one of these (any module's).
PROTECTING_PREFIXES = ("administer ", "bypass ", "edit any ", "delete any ")


def is_protecting(permission: str) -> bool:
    return permission in PROTECTING_PERMISSIONS or permission.startswith(PROTECTING_PREFIXES)


@dataclass(frozen=True, slots=True)
class DrupalSchema:
    major: Major  # 10 stands for every Drupal 8+ (8, 9, 10, 11 share the user schema)
    tables: frozenset[str]
    default_langcode: str  # D10: the site's default language; D7: '' (users.language)
    default_timezone: str | None
    # role id (D10 machine name) -> stored value (D10: the same name, D7: the numeric rid);
    # None when the site's roles cannot be read (no config table).
    roles: dict[str, str | int] | None
    fields: dict[str, FieldColumn] = field(default_factory=dict)  # field_* on the user
    user_columns: frozenset[str] = frozenset()  # D7: users columns (`changed` since 7.83)
    # Role ids (D10 machine names, D7 role names) that are admin roles or hold one of
    # PROTECTING_PERMISSIONS, as read at start-up (the planner reads them again per batch).
    protected_roles: frozenset[str] = frozenset()
    # The langcodes a user's preferred language may take: D10 the configurable languages
    # (`language.entity.*`, not the locked und/zxx), D7 the `languages` table (locale);
    # without the language/locale module, the site's default language alone.
    languages: frozenset[str] = frozenset({"en"})
    # D10: the langcode of a new user entity (users, users_field_data, its field and role
    # rows, and its preferred_langcode unless mapped), as User::create() gives it (see
    # new_user_langcode); D7: '' (unused).
    user_langcode: str = ""
    # D7: how entity_translation stores users' translatable fields (None: no module
    # translates them; every field's values are under 'und').
    translation: UserTranslation | None = None


def _php_string(serialized: bytes | str | None, key: str) -> str | None:
    """A string value out of PHP-serialized config (`s:<n>:"key";s:<m>:"value";`)."""
    if serialized is None:
        return None
    data = serialized.decode() if isinstance(serialized, bytes) else serialized
    match = re.search(r's:\d+:"' + re.escape(key) + r'";s:\d+:"([^"]*)";', data)
    return match.group(1) if match else None


def _role10_protected(data: bytes | str | memoryview | None) -> bool:
    """Whether a D10 `user.role.*` config is an admin role or grants a protecting
    permission. Config sfrelay cannot read counts as protected (fail closed)."""
    if data is None:
        return True
    try:
        role = php_unserialize(data)
    except (ValueError, IndexError, UnicodeDecodeError):
        return True
    if not isinstance(role, dict):
        return True
    permissions = role.get("permissions") or {}
    granted = permissions.values() if isinstance(permissions, dict) else ()
    return bool(role.get("is_admin")) or any(is_protecting(str(p)) for p in granted)


@dataclass(frozen=True, slots=True)
class SiteRoles:
    """The site's roles as read now (at start-up, and again for every batch)."""

    # role id (D10 machine name, D7 role name) -> stored value (D10: the same name, D7: the
    # numeric rid); None when the site's roles cannot be read (no config table).
    ids: dict[str, str | int] | None
    # The roles sfrelay must never touch a holder of (see PROTECTING_PERMISSIONS).
    protected: frozenset[str]


async def read_roles(
    conn: AsyncConnection, major: Major, tables: frozenset[str] | set[str]
) -> SiteRoles:
    """The site's roles and which of them protect: D10 from the `user.role.*` config
    (is_admin, permissions), D7 from `role`, the variable `user_admin_role` and
    `role_permission`. A few indexed rows: cheap enough per batch."""
    if major == 10:
        if "config" not in tables:
            return SiteRoles(None, frozenset())
        rows = await conn.execute(
            select(_config.c.name, _config.c.data).where(
                _config.c.collection == "",
                # A range on the primary key ('/' sorts right after '.').
                _config.c.name >= "user.role.",
                _config.c.name < "user.role/",
            )
        )
        ids: dict[str, str | int] = {}
        protected = set()
        for name, data in rows:
            role = name.removeprefix("user.role.")
            ids[role] = role
            if _role10_protected(data):
                protected.add(role)
        return SiteRoles(ids, frozenset(protected))
    ids = {
        str(name): int(rid) for rid, name in await conn.execute(select(_role7.c.rid, _role7.c.name))
    }
    rids: set[int] = set()
    if "role_permission" in tables:
        query = select(_permission7.c.rid).where(
            or_(
                _permission7.c.permission.in_(PROTECTING_PERMISSIONS),
                *(_permission7.c.permission.startswith(p) for p in PROTECTING_PREFIXES),
            )
        )
        rids.update(int(rid) for (rid,) in await conn.execute(query))
    if "variable" in tables:
        query = select(_variable7.c.value).where(_variable7.c.name == "user_admin_role")
        value = (await conn.execute(query)).scalar()
        if value is not None:
            try:
                admin = php_unserialize(value)
            except (ValueError, IndexError, UnicodeDecodeError):
                admin = None
            if isinstance(admin, int | str) and str(admin).isdigit() and int(admin) > 0:
                rids.add(int(admin))
    return SiteRoles(ids, frozenset(name for name, rid in ids.items() if rid in rids))


def _table_names(sync_conn: Connection) -> list[str]:
    return inspect(sync_conn).get_table_names()


async def detect_major(conn: AsyncConnection, forced: str = "auto") -> tuple[Major, set[str]]:
    tables = set(await conn.run_sync(_table_names))
    found: Major | None = None
    if "users_field_data" in tables and "users" in tables:
        found = 10
    elif "users" in tables and "users_roles" in tables and "field_config" in tables:
        found = 7
    if forced != "auto":
        wanted: Major = 7 if forced == "7" else 10
        if found is not None and found != wanted:
            raise ConfigError(
                f"SFRELAY_DRUPAL_VERSION={forced} but the database holds a Drupal "
                f"{'7' if found == 7 else '8 or later'} user schema"
            )
        found = wanted
    if found is None:
        if prefixes := _table_prefixes(tables):
            raise ConfigError(
                "SFRELAY_DATABASE_URL's Drupal tables have a prefix "
                f"({', '.join(repr(p) for p in prefixes)}: the site's settings.php sets "
                "$databases['default']['default']['prefix']), and sfrelay writes only a site "
                "without one: point it at an unprefixed Drupal database"
            )
        raise ConfigError(
            "SFRELAY_DATABASE_URL does not point at a Drupal database: no users_field_data "
            "(Drupal 8+) and no users/users_roles/field_config (Drupal 7) table"
        )
    return found, tables


def _table_prefixes(tables: set[str]) -> list[str]:
    """The prefixes p with a Drupal user schema as p + its table names."""
    found = {t[: -len("users_field_data")] for t in tables if t.endswith("users_field_data")}
    found |= {t[: -len("users_roles")] for t in tables if t.endswith("users_roles")}
    return sorted(p for p in found if p and f"{p}users" in tables)


async def inspect_drupal(conn: AsyncConnection, forced: str, field_names: set[str]) -> DrupalSchema:
    """Read what sfrelay needs to know; ConfigError for a mapped field the site does not
    have or sfrelay cannot write (app.drupal.fields)."""
    major, tables = await detect_major(conn, forced)
    fields = await read_fields(conn, major, frozenset(tables), field_names)
    if major == 10:
        return await _site10(conn, frozenset(tables), fields)
    return await _site7(conn, frozenset(tables), fields)


# The language module's content language settings of the user entity (its one bundle).
USER_LANGUAGE_SETTINGS = "language.content_settings.user.user"
# Their default_langcode values that name no language but say how to find one.
_SITE_DEFAULT, _INTERFACE, _AUTHORS = "site_default", "current_interface", "authors_default"


def new_user_langcode(setting: object, site_default: str) -> str:
    """The langcode User::create() gives a user (without a form, as sfrelay creates them):
    the language module's DefaultLanguageItem, language_get_default_langcode('user', 'user')
    with the user's content language setting `default_langcode` (None: no config, the
    module's default `site_default`; without the module, LanguageItem gives the site's
    default language). `current_interface` and `authors_default` name the request's
    interface language and the acting user's preferred language: a backend has neither,
    and Drupal then takes the site's default language (language negotiation's fallback; an
    anonymous author's getPreferredLangcode()). Any other value is a langcode, taken as it
    is, `und` and `zxx` too."""
    if not isinstance(setting, str) or setting in ("", _SITE_DEFAULT, _INTERFACE, _AUTHORS):
        return site_default
    return setting


async def _site10(
    conn: AsyncConnection, tables: frozenset[str], fields: dict[str, FieldColumn]
) -> DrupalSchema:
    langcode, timezone = "en", "UTC"
    user_default: object = None
    languages: set[str] = set()
    if "config" in tables:
        rows = await conn.execute(
            select(_config.c.name, _config.c.data).where(
                _config.c.collection == "",
                (_config.c.name.in_(["system.site", "system.date", USER_LANGUAGE_SETTINGS]))
                | _config.c.name.like("language.entity.%"),
            )
        )
        for name, data in rows:
            if name == "system.site":
                langcode = _php_string(data, "default_langcode") or langcode
            elif name == USER_LANGUAGE_SETTINGS:
                user_default = php_array(data).get("default_langcode")
            elif name == "system.date":
                # system.date: timezone: {default: 'UTC', user: {...}}
                timezone = _php_string(data, "default") or timezone
            elif not _php_locked(data):  # und and zxx: no one's preferred language
                languages.add(name.removeprefix("language.entity."))
    site_roles = await read_roles(conn, 10, tables)
    return DrupalSchema(
        10,
        tables,
        langcode,
        timezone,
        site_roles.ids,
        fields,
        protected_roles=site_roles.protected,
        languages=frozenset(languages or {langcode}),
        user_langcode=new_user_langcode(user_default, langcode),
    )


def _php_locked(data: bytes | str | memoryview | None) -> bool:
    """Whether a `language.entity.*` config is a locked language (und, zxx)."""
    return bool(php_array(data).get("locked"))


async def _site7(
    conn: AsyncConnection, tables: frozenset[str], fields: dict[str, FieldColumn]
) -> DrupalSchema:
    site_roles = await read_roles(conn, 7, tables)
    columns = frozenset(await conn.run_sync(table_columns, "users"))
    # user_save() leaves language '' and timezone NULL unless the form gives them.
    languages = {"en"}  # language_default() without the locale module
    if "languages" in tables:
        languages = {str(code) for (code,) in await conn.execute(select(_languages7.c.language))}
    site_default = await read_site_default7(conn, tables)
    return DrupalSchema(
        7,
        tables,
        "",
        None,
        site_roles.ids,
        fields,
        columns,
        site_roles.protected,
        frozenset(languages or {"en"}),
        translation=await read_user_translation(conn, tables, site_default),
    )


async def has_table(conn: AsyncConnection, name: str) -> bool:
    """Whether a table exists now (Drupal creates its cache tables on first use)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        query = text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n")
    elif dialect == "postgresql":
        query = text("SELECT 1 WHERE to_regclass(:n) IS NOT NULL")
    else:
        query = text(
            "SELECT 1 FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = :n"
        )
    return (await conn.scalar(query, {"n": name})) is not None
