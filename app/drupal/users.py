"""What sfrelay asks of a Drupal user store (D7 or D10), in bulk, inside one transaction."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import TableClause

from app.drupal.bulk import update_rows

# Base fields by sfrelay name; `langcode` is the user's preferred language (D10
# preferred_langcode, D7 users.language): the entity's own langcode stays the site's, or
# Drupal would drop field values stored in another language.
BASE = ("mail", "name", "status", "timezone", "langcode")


@dataclass(slots=True)
class NewUser:
    name: str
    mail: str
    base: dict[str, Any]  # status / timezone / langcode
    fields: dict[str, str | None]  # field_* -> value (None or '' = no row)
    roles: tuple[str, ...]
    uid: int | None = None  # set by create()


@dataclass(slots=True)
class UserChange:
    uid: int
    base: dict[str, Any]  # only what changes: mail / name / status / timezone / langcode
    fields: dict[str, str | None]  # only the fields the notification carried
    roles: tuple[str, ...]  # roles the user must have (added if missing, never removed)
    langcodes: tuple[str, ...] = ()  # the user's translations (D10); filled by the store


@dataclass(frozen=True, slots=True)
class ExistingUser:
    uid: int
    name: str
    mail: str | None
    langcodes: tuple[str, ...]
    roles: frozenset[str]  # extra roles held now (D10 machine names, D7 role names)
    login: int  # last login time; 0: never logged in


class UserStore(Protocol):
    """One implementation per Drupal major version (d10.Drupal10, d7.Drupal7)."""

    async def users(self, conn: AsyncConnection, uids: Iterable[int]) -> dict[int, ExistingUser]:
        """The users that exist among `uids` (uid 0, the anonymous user, never), with the
        roles they hold now."""
        ...

    async def protected_roles(self, conn: AsyncConnection) -> frozenset[str]:
        """The site's roles that are admin roles or grant `administer users` /
        `administer permissions`, read now (roles and permissions change while sfrelay runs)."""
        ...

    async def uids_by_mail(
        self, conn: AsyncConnection, mails: Iterable[str]
    ) -> dict[str, list[int]]:
        """Lower-cased mail -> uids having it, compared case-insensitively."""
        ...

    async def taken_names(self, conn: AsyncConnection, names: Iterable[str]) -> set[str]:
        """The lower-cased names among `names` that are in use (compared case-insensitively)."""
        ...

    async def max_suffixes(self, conn: AsyncConnection, bases: Iterable[str]) -> dict[str, int]:
        """Lower-cased base -> the highest n of the names `<base>_<n>` in use (1: none)."""
        ...

    async def create(self, conn: AsyncConnection, users: list[NewUser], now: int) -> None:
        """Insert the users (setting each `uid`) and invalidate what Drupal's save would."""
        ...

    async def update(self, conn: AsyncConnection, changes: list[UserChange], now: int) -> None:
        """Apply the changes and invalidate/delete the caches Drupal's save would."""
        ...


CHUNK = 500  # ids per IN (...): far below every backend's bound-parameter limit


def chunks(values: list[Any], size: int = CHUNK) -> Iterable[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


async def update_base(
    conn: AsyncConnection,
    table: TableClause,
    changes: list[UserChange],
    columns: dict[str, str],
    now: int | None,
) -> None:
    """The changes' base values, plus `changed` = now unless None: one executemany UPDATE
    per set of columns written (executemany needs the same columns in every row)."""
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for change in changes:
        pairs = sorted((columns[k], value) for k, value in change.base.items())  # unique keys
        keys, values = tuple(k for k, _ in pairs), tuple(v for _, v in pairs)
        if now is not None:
            keys, values = (*keys, "changed"), (*values, now)
        if keys:
            groups.setdefault(keys, []).append((*values, change.uid))
    for keys, rows in groups.items():
        await update_rows(conn, table.name, keys, ("uid",), rows)


def lower_in(column: Any, values: list[str], case_insensitive_column: bool) -> ColumnElement[bool]:
    """column IN values, compared case-insensitively; uses the column's own index when its
    collation already ignores case (MySQL *_ci, Drupal's NOCASE_UTF8 on SQLite)."""
    if case_insensitive_column:
        return column.in_(values)  # type: ignore[no-any-return]
    return func.lower(column).in_(values)


class Lookups:
    """The bulk look-ups both majors share; `table` holds uid, name and mail
    (D10 users_field_data, D7 users). `*_ci`: the column's collation ignores case."""

    def __init__(self, table: TableClause, dialect: str, *, name_ci: bool, mail_ci: bool) -> None:
        self._table, self._name_ci, self._mail_ci = table, name_ci, mail_ci
        self._regexp = dialect == "postgresql"

    async def uids_by_mail(
        self, conn: AsyncConnection, mails: Iterable[str]
    ) -> dict[str, list[int]]:
        t = self._table
        found: dict[str, set[int]] = {}
        for chunk in chunks(sorted(set(mails))):
            query = select(t.c.uid, t.c.mail).where(
                lower_in(t.c.mail, chunk, self._mail_ci), t.c.uid > 0
            )
            for uid, mail in await conn.execute(query):
                found.setdefault(mail.lower(), set()).add(int(uid))
        return {mail: sorted(uids) for mail, uids in found.items()}

    async def taken_names(self, conn: AsyncConnection, names: Iterable[str]) -> set[str]:
        t = self._table
        taken: set[str] = set()
        for chunk in chunks(sorted({name.lower() for name in names})):
            query = select(func.lower(t.c.name)).where(lower_in(t.c.name, chunk, self._name_ci))
            taken.update(name for (name,) in await conn.execute(query))
        return taken

    async def max_suffixes(self, conn: AsyncConnection, bases: Iterable[str]) -> dict[str, int]:
        t = self._table
        wanted = sorted({base.lower() for base in bases})
        found = dict.fromkeys(wanted, 1)
        for chunk in chunks(wanted, 100):
            where: ColumnElement[bool]
            if self._regexp:
                # A range would depend on the database's locale ordering of '_': one scan
                # (only for bases not seen before; sfrelay remembers suffixes it learnt).
                stem = func.regexp_replace(func.lower(t.c.name), "_[0-9]+$", "")
                where = stem.in_(chunk)
            else:
                # A range per base: '`' sorts right after '_' (SQLite and MySQL compare
                # by code point here), so [base_, base`) holds exactly the names base_*.
                name = t.c.name if self._name_ci else func.lower(t.c.name)
                where = or_(*(and_(name >= f"{b}_", name < f"{b}`") for b in chunk))
            for (name,) in await conn.execute(select(func.lower(t.c.name)).where(where)):
                stem_, _, number = name.rpartition("_")
                if number.isdigit() and stem_ in found:
                    found[stem_] = max(found[stem_], int(number))
        return found
