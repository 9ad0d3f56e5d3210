"""The mapped user fields: their tables and Drupal's definitions (type, settings, cardinality),
read at start-up, and which of them sfrelay can write (app.drupal.fieldtypes converts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import column, inspect, select, table
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal.php import php_array, php_unserialize
from app.errors import ConfigError

# The field types sfrelay writes, per major (Drupal 8+ names, Drupal 7 names).
SUPPORTED: dict[int, frozenset[str]] = {
    10: frozenset(
        {
            "string",
            "string_long",
            "text",
            "text_long",
            "text_with_summary",
            "boolean",
            "integer",
            "decimal",
            "float",
            "email",
            "telephone",
            "datetime",
            "timestamp",
            "list_string",
            "list_integer",
            "list_float",
        }
    ),
    7: frozenset(
        {
            "text",
            "text_long",
            "text_with_summary",
            "number_integer",
            "number_decimal",
            "number_float",
            "list_text",
            "list_integer",
            "list_float",
            "list_boolean",
        }
    ),
}
# Text types with a `<field>_format` column (the text filter format).
FORMATTED = frozenset({"text", "text_long", "text_with_summary"})
# Types that may take several values: a multi-select picklist's A;B;C, a delta each.
MULTIPLE = frozenset({"list_string", "list_text", "list_integer", "list_float"})
PLAIN_TEXT = "plain_text"  # Drupal's fallback format unless a site changed it

_config = table("config", column("collection"), column("name"), column("data"))
_field_config = table(
    "field_config",
    column("field_name"),
    column("type"),
    column("data"),
    column("cardinality"),
    column("translatable"),
    column("deleted"),
)
_instance7 = table(
    "field_config_instance",
    column("field_name"),
    column("entity_type"),
    column("bundle"),
    column("data"),
    column("deleted"),
)
_variable7 = table("variable", column("name"), column("value"))


@dataclass(frozen=True, slots=True)
class FieldColumn:
    """A configurable user field stored in its own table with a `<field>_value` column."""

    name: str
    length: int | None  # the value column's maximum length, when it is a string
    type: str = "string"  # Drupal's field type (D7 names on Drupal 7)
    # The storage settings (max_length, allowed_values, precision, ...), then the field's
    # own on the user (min, max, text_processing, allowed_formats, ...).
    settings: dict[str, Any] = field(default_factory=dict)
    # The text format written to `<field>_format` (None: NULL); only with `has_format`.
    format: str | None = None
    has_format: bool = False
    cardinality: int = 1  # values it takes (-1: any number); other than 1 for list fields only
    # Drupal 8+: a value per translation of the user (FieldConfig::isTranslatable(): the
    # field's and its storage's `translatable`); else one value, stored in the user's
    # original language only (SqlContentEntityStorage::saveToDedicatedTables).
    # Drupal 7: field_config.translatable, which translates the field only where users have
    # a translation handler (app.drupal.translation7); else its values are under 'und'.
    translatable: bool = False


@dataclass(frozen=True, slots=True)
class _Definition:
    type: str
    settings: dict[str, Any]
    cardinality: int
    translatable: bool = False


def _unserialized_text(data: Any) -> str | None:
    try:
        value = php_unserialize(data)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None


def _settings(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def _definitions10(
    conn: AsyncConnection, names: list[str]
) -> tuple[dict[str, _Definition], str]:
    """Each field's definition (config field.storage.user.<name>, with the settings of
    field.field.user.user.<name> on top), and the site's fallback text format."""
    wanted = ["filter.settings"]
    for name in names:
        wanted += [f"field.storage.user.{name}", f"field.field.user.user.{name}"]
    rows = await conn.execute(
        select(_config.c.name, _config.c.data).where(
            _config.c.collection == "", _config.c.name.in_(wanted)
        )
    )
    config = {name: php_array(data) for name, data in rows}
    fallback = str(config.get("filter.settings", {}).get("fallback_format") or PLAIN_TEXT)
    found = {}
    for name in names:
        storage = config.get(f"field.storage.user.{name}")
        if not storage:
            continue
        on_user = config.get(f"field.field.user.user.{name}", {})
        own = _settings(on_user.get("settings"))
        cardinality = storage.get("cardinality", 1)
        found[name] = _Definition(
            str(storage.get("type", "")),
            {**_settings(storage.get("settings")), **own},
            int(cardinality) if isinstance(cardinality, int | str) else 1,
            bool(storage.get("translatable", True)) and bool(on_user.get("translatable", True)),
        )
    return found, fallback


async def _definitions7(
    conn: AsyncConnection, names: list[str], tables: frozenset[str]
) -> tuple[dict[str, _Definition], str]:
    """Each field's definition (field_config, with its user instance's settings on top), and
    the site's fallback text format (variable filter_fallback_format)."""
    own: dict[str, dict[str, Any]] = {}
    if "field_config_instance" in tables:
        rows = await conn.execute(
            select(_instance7.c.field_name, _instance7.c.data).where(
                _instance7.c.entity_type == "user",
                _instance7.c.bundle == "user",
                _instance7.c.deleted == 0,
                _instance7.c.field_name.in_(names),
            )
        )
        own = {name: _settings(php_array(data).get("settings")) for name, data in rows}
    definitions = await conn.execute(
        select(
            _field_config.c.field_name,
            _field_config.c.type,
            _field_config.c.data,
            _field_config.c.cardinality,
            _field_config.c.translatable,
        ).where(_field_config.c.deleted == 0, _field_config.c.field_name.in_(names))
    )
    found = {
        name: _Definition(
            str(kind),
            {**_settings(php_array(data).get("settings")), **own.get(name, {})},
            int(cardinality),
            bool(int(translatable or 0)),
        )
        for name, kind, data, cardinality, translatable in definitions
    }
    fallback = PLAIN_TEXT
    if "variable" in tables:
        query = select(_variable7.c.value).where(_variable7.c.name == "filter_fallback_format")
        value = (await conn.execute(query)).scalar()
        if value is not None:
            fallback = str(_unserialized_text(value) or PLAIN_TEXT)
    return found, fallback


def table_columns(sync_conn: Connection, name: str) -> dict[str, Any]:
    return {c["name"]: c["type"] for c in inspect(sync_conn).get_columns(name)}


def _refusal(name: str, definition: _Definition, major: int) -> str | None:
    """Why sfrelay cannot write this field (None: it can)."""
    kind = definition.type
    if kind not in SUPPORTED[major]:
        supported = ", ".join(sorted(SUPPORTED[major]))
        return (
            f"the user field {name!r} is of type {kind!r}, which sfrelay cannot write (it "
            f"writes {supported}): leave {name} out of the field map"
        )
    if definition.cardinality != 1 and kind not in MULTIPLE:
        count = "any number of" if definition.cardinality < 0 else str(definition.cardinality)
        return (
            f"the user field {name!r} takes {count} values; sfrelay writes several values "
            f"only into list fields (a multi-select picklist's A;B;C): set its allowed number "
            f"of values to 1, or leave it out of the field map"
        )
    function = definition.settings.get("allowed_values_function")
    if kind.startswith("list_") and function:
        return (
            f"the user field {name!r} takes the allowed values of the PHP function "
            f"{function}, which sfrelay cannot call: list them in the field's settings, or "
            f"leave it out of the field map"
        )
    return None


def _format(name: str, definition: _Definition, fallback: str, major: int) -> str | None:
    """The format written with a text value: the site's fallback format (plain text, which
    every role may use and which shows Salesforce's text as text, never as HTML); on Drupal 7
    only where the field has text processing on (else NULL, as Drupal 7 stores it)."""
    if major == 7:
        # 1 or 0 as code saves it, "1" or "0" as the field UI's form does.
        processing = definition.settings.get("text_processing")
        return fallback if processing not in (None, "", 0, "0") else None
    allowed = definition.settings.get("allowed_formats") or {}
    formats = [str(f) for f in (allowed.values() if isinstance(allowed, dict) else allowed)]
    if formats and fallback not in formats:
        raise ConfigError(
            f"field map: the user field {name!r} allows only the text formats "
            f"{', '.join(formats)}; sfrelay writes {fallback} (the site's fallback format): "
            f"allow it on the field, or leave {name} out of the field map"
        )
    return fallback


async def read_fields(
    conn: AsyncConnection, major: int, tables: frozenset[str], names: set[str]
) -> dict[str, FieldColumn]:
    """The mapped user fields; ConfigError for one the site lacks or sfrelay cannot write."""
    ordered = sorted(names)
    stores = {name: f"user__{name}" if major == 10 else f"field_data_{name}" for name in ordered}
    for name, store in stores.items():
        if store not in tables or (major == 7 and f"field_revision_{name}" not in tables):
            raise ConfigError(
                f"field map: the user field {name!r} does not exist on this Drupal site "
                f"(no table {store}): add it to the site's user fields "
                f"(/admin/config/people/accounts/fields, machine name {name}), or leave it "
                f"out of the field map (SFRELAY_FIELD_MAP: a copy of the default "
                f"app/fieldmap.default.toml without it)"
            )
    if not ordered:
        return {}
    if major == 10:
        found, fallback = (
            await _definitions10(conn, ordered) if "config" in tables else ({}, PLAIN_TEXT)
        )
    else:
        found, fallback = await _definitions7(conn, ordered, tables)
    fields: dict[str, FieldColumn] = {}
    for name in ordered:
        definition, store = found.get(name), stores[name]
        if definition is None:
            where = f"config field.storage.user.{name}" if major == 10 else "field_config"
            raise ConfigError(
                f"field map: the user field {name!r} has no definition on this Drupal site "
                f"(nothing in {where}; its table {store} is left over): recreate the field in "
                f"Drupal, or leave {name} out of the field map"
            )
        if why := _refusal(name, definition, major):
            raise ConfigError(f"field map: {why}")
        columns = await conn.run_sync(table_columns, store)
        value = columns.get(f"{name}_value")
        if value is None:
            raise ConfigError(
                f"field map: {name!r} has no column {name}_value in {store}: not a field "
                f"Drupal stores as sfrelay expects: leave {name} out of the field map"
            )
        has_format = definition.type in FORMATTED and f"{name}_format" in columns
        fields[name] = FieldColumn(
            name,
            getattr(value, "length", None),
            definition.type,
            definition.settings,
            _format(name, definition, fallback, major) if has_format else None,
            has_format,
            definition.cardinality,
            definition.translatable,
        )
    return fields
