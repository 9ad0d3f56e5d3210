"""Drupal 7's field translation of users (the entity_translation module): the language a
translatable user field's values are stored in, and the user's original-language record."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import column, insert, select, table
from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal.fields import table_columns
from app.drupal.php import php_array
from app.drupal.users import chunks

LANGUAGE_NONE = "und"  # an untranslated field's values (and every field's without a handler)
MODULE = "entity_translation"  # the module's name in `system`, and its table
# entity_translation_settings_user__user's default_language values naming no language:
# the site's default, the current content language, the acting user's language.
_NAMED_NONE = frozenset({"", "xx-et-default", "xx-et-current", "xx-et-author"})
# The table's columns (primary key: entity_type, entity_id, language); the module's early
# versions have no revision_id: only the columns the table has are written.
_RECORD_COLUMNS = (
    "entity_type",
    "entity_id",
    "revision_id",
    "language",
    "source",
    "uid",
    "status",
    "translate",
    "created",
    "changed",
)
_system = table("system", column("name"), column("type"), column("status"))
_variable = table("variable", column("name"), column("value"))
_record = table(MODULE, *(column(c) for c in _RECORD_COLUMNS))


@dataclass(frozen=True, slots=True)
class UserTranslation:
    """How a Drupal 7 site with entity_translation enabled stores users' translatable fields
    (field_config.translatable = 1; the module gives users a translation handler, so that
    field_is_translatable() holds): under the user's language, not 'und'."""

    # Users are enabled for translation (variable entity_translation_entity_types): each
    # user's language is its original translation, a row of `entity_translation` (source
    # ''), which Drupal's save writes; else entity_language() is NULL, and Drupal's forms
    # store the values in the site's default language (field_valid_language()).
    recorded: bool
    # The language of a user without that row (a new one): entity_translation's
    # getDefaultLanguage() for users, or the site's default language (not recorded).
    default: str
    columns: tuple[str, ...] = ()  # entity_translation's columns, in _RECORD_COLUMNS order

    async def originals(self, conn: AsyncConnection, uids: Iterable[int]) -> dict[int, str]:
        """The users' original languages, of those with a row (recorded sites only)."""
        found: dict[int, str] = {}
        if not self.recorded:
            return found
        for chunk in chunks(sorted(set(uids))):
            query = select(_record.c.entity_id, _record.c.language).where(
                _record.c.entity_type == "user",
                _record.c.source == "",
                _record.c.entity_id.in_(chunk),
            )
            found.update((int(uid), str(language)) for uid, language in await conn.execute(query))
        return found

    async def record(self, conn: AsyncConnection, uids: list[int], now: int) -> None:
        """The users' original-language rows, in `default`, as the module writes a new
        user's (hook_field_attach_insert: initTranslations(); source '', status 1; uid 0:
        sfrelay acts as no Drupal user), and Drupal's next save of a user without one
        (updateTranslations())."""
        if not self.recorded or not uids:
            return
        rows = [
            {
                "entity_type": "user",
                "entity_id": uid,
                "revision_id": uid,  # users have no revisions
                "language": self.default,
                "source": "",
                "uid": 0,
                "status": 1,
                "translate": 0,
                "created": now,
                "changed": now,
            }
            for uid in uids
        ]
        kept = [{c: row[c] for c in self.columns} for row in rows]
        await conn.execute(insert(table(MODULE, *(column(c) for c in self.columns))), kept)


async def read_user_translation(
    conn: AsyncConnection, tables: frozenset[str], site_default: str
) -> UserTranslation | None:
    """How the site translates users' fields; None where no module translates them
    (entity_translation not enabled in `system`): every field's values are under 'und'.
    `site_default`: the variable language_default's language."""
    if "system" not in tables or MODULE not in tables:
        return None
    query = select(_system.c.status).where(_system.c.name == MODULE, _system.c.type == "module")
    if not (await conn.scalar(query)):
        return None
    names = ("entity_translation_entity_types", "entity_translation_settings_user__user")
    variables: dict[str, dict[object, object]] = {}
    if "variable" in tables:
        query = select(_variable.c.name, _variable.c.value).where(_variable.c.name.in_(names))
        variables = {str(name): php_array(value) for name, value in await conn.execute(query)}
    recorded = bool(variables.get(names[0], {}).get("user"))
    setting = variables.get(names[1], {}).get("default_language")
    default = site_default
    if recorded and isinstance(setting, str) and setting not in _NAMED_NONE:
        default = setting  # a language named in the settings
    present = await conn.run_sync(table_columns, MODULE)
    columns = tuple(c for c in _RECORD_COLUMNS if c in present)
    return UserTranslation(recorded, default, columns)


async def read_site_default7(conn: AsyncConnection, tables: frozenset[str]) -> str:
    """language_default()'s language: the variable language_default (a stdClass), else 'en'."""
    if "variable" not in tables:
        return "en"
    query = select(_variable.c.value).where(_variable.c.name == "language_default")
    language = php_array(await conn.scalar(query)).get("language")
    return language if isinstance(language, str) and language else "en"
