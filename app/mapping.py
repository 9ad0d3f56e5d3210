"""The field map: which Salesforce field goes to which Drupal field, per object (TOML)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.drupal.schema import IMPLICIT_ROLES, DrupalSchema
from app.errors import ConfigError

DEFAULT_FIELD_MAP = Path(__file__).with_name("fieldmap.default.toml")
BASE_FIELDS = frozenset({"mail", "name", "status", "timezone", "langcode"})
EMAIL_LOCAL = "email_local"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class ObjectMap:
    """The mapping of one Salesforce object (e.g. Contact) to a Drupal user."""

    sobject: str
    base: dict[str, str]  # Drupal base field -> Salesforce field; always has "mail"
    fields: dict[str, str]  # Drupal field_* -> Salesforce field
    defaults: dict[str, Any]  # Drupal field -> value for new users
    roles: tuple[str, ...]

    @property
    def email_field(self) -> str:
        return self.base["mail"]


@dataclass(frozen=True, slots=True)
class FieldMap:
    objects: dict[str, ObjectMap]
    username_template: str
    username_fallback: str
    update_username: bool
    # object -> the Salesforce fields whose values its rules write (a version's content:
    # app.records.version_digest), in a fixed order
    sources: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        templates = (
            *placeholders(self.username_template),
            *placeholders(self.username_fallback),
        )
        sources = {
            sobject: tuple(
                dict.fromkeys(
                    (obj.email_field, *obj.base.values(), *obj.fields.values(), *templates)
                )
            )
            for sobject, obj in self.objects.items()
        }
        object.__setattr__(self, "sources", sources)

    @property
    def user_fields(self) -> set[str]:
        return {name for obj in self.objects.values() for name in obj.fields} | {
            name
            for obj in self.objects.values()
            for name in obj.defaults
            if name not in BASE_FIELDS
        }

    def validate(self, schema: DrupalSchema, handled_objects: list[str]) -> None:
        """ConfigError unless every object, field and role exists on this Drupal site."""
        for sobject in handled_objects:
            if sobject not in self.objects:
                raise ConfigError(
                    f"field map: SFRELAY_HANDLED_OBJECTS has {sobject!r} but the field map "
                    f"has no [{sobject}] section"
                )
        for obj in self.objects.values():
            for name in [*obj.fields, *(d for d in obj.defaults if d.startswith("field_"))]:
                if name not in schema.fields:
                    raise ConfigError(f"field map [{obj.sobject}]: unknown Drupal field {name!r}")
        self.check_roles(schema.roles)

    def check_roles(self, roles: dict[str, str | int] | None) -> None:
        """ConfigError unless every role granted is one of the site's `roles` (None: not
        known); at start-up, and for every batch (app.plan: roles are deleted in Drupal)."""
        for obj in self.objects.values():
            for role in obj.roles:
                if roles is not None and role not in roles:
                    known = ", ".join(sorted(set(roles) - IMPLICIT_ROLES)) or "none"
                    raise ConfigError(
                        f"field map [{obj.sobject}]: role {role!r} does not exist on this "
                        f"Drupal site (extra roles there: {known})"
                    )


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"field map: {where}.{key} must be a table")
    return value


def _object(sobject: str, data: dict[str, Any]) -> ObjectMap:
    for key in data:
        if key not in ("roles", "fields", "defaults"):
            raise ConfigError(
                f"field map [{sobject}]: unknown key {key!r} (a section has roles, "
                f"[{sobject}.fields] and [{sobject}.defaults])"
            )
    base: dict[str, str] = {}
    fields: dict[str, str] = {}
    for drupal, source in _table(data, "fields", sobject).items():
        if not isinstance(source, str) or not source:
            raise ConfigError(
                f"field map [{sobject}.fields]: {drupal} must name a Salesforce field"
            )
        if drupal in BASE_FIELDS:
            base[drupal] = source
        elif drupal.startswith("field_"):
            fields[drupal] = source
        else:
            raise ConfigError(
                f"field map [{sobject}.fields]: unknown Drupal field {drupal!r} (base fields: "
                f"{', '.join(sorted(BASE_FIELDS))}; configurable fields start with field_)"
            )
    if "mail" not in base:
        raise ConfigError(f"field map [{sobject}.fields]: map a Salesforce field to mail")
    defaults = _table(data, "defaults", sobject)
    for drupal in defaults:
        if drupal in ("mail", "name") or (
            drupal not in BASE_FIELDS and not drupal.startswith("field_")
        ):
            raise ConfigError(f"field map [{sobject}.defaults]: cannot default {drupal!r}")
    roles = data.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise ConfigError(f"field map [{sobject}]: roles must be a list of role names")
    for role in roles:
        if role in IMPLICIT_ROLES:
            raise ConfigError(
                f"field map [{sobject}]: {role!r} is implicit in Drupal; list extra roles only"
            )
    return ObjectMap(sobject, base, fields, dict(defaults), tuple(roles))


def _template(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _PLACEHOLDER.search(value):
        raise ConfigError(f"field map [username].{where} must be a string with {{Field}} names")
    leftover = _PLACEHOLDER.sub("", value)
    if "{" in leftover or "}" in leftover:
        raise ConfigError(f"field map [username].{where}: a {{placeholder}} is malformed")
    return value


def parse_field_map(text: str, source: str = "field map") -> FieldMap:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    username = _table(data, "username", "")
    for key in username:
        if key not in ("template", "fallback", "update"):
            raise ConfigError(
                f"field map [username]: unknown key {key!r} (it has template, fallback, update)"
            )
    for name, section in data.items():
        if not isinstance(section, dict):
            raise ConfigError(
                f"field map: {name} is a value, not a section: write [{name}] with its "
                f"[{name}.fields] (or move it into the section it belongs to)"
            )
    objects = {name: _object(name, section) for name, section in data.items() if name != "username"}
    if not objects:
        raise ConfigError(f"{source}: no object sections such as [Contact]")
    update = username.get("update", False)
    if not isinstance(update, bool):
        raise ConfigError("field map [username].update must be true or false")
    return FieldMap(
        objects=objects,
        username_template=_template(username.get("template", "{FirstName} {LastName}"), "template"),
        username_fallback=_template(username.get("fallback", "{email_local}"), "fallback"),
        update_username=update,
    )


def load_field_map(path: Path | None) -> FieldMap:
    """The map at `path` (SFRELAY_FIELD_MAP), or the documented default."""
    path = path or DEFAULT_FIELD_MAP
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"SFRELAY_FIELD_MAP: cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"SFRELAY_FIELD_MAP: {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
            f"on line {line}): save it as UTF-8"
        ) from exc
    return parse_field_map(text, str(path))


def placeholders(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


def render(template: str, values: dict[str, Any], email: str) -> str:
    """The template with each {Field} replaced (missing or empty fields give '')."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == EMAIL_LOCAL:
            return email.rpartition("@")[0]
        found = values.get(name)
        return "" if found is None else str(found)

    return _PLACEHOLDER.sub(value, template)
