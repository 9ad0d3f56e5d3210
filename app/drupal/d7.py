"""Drupal 7 users (users, users_roles, field_data_* / field_revision_*), as user_save() writes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from sqlalchemy import and_, column, delete, func, insert, select, table, text, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import ColumnElement, TableClause

from app.drupal.cache import delete_cache_rows
from app.drupal.schema import DrupalSchema, SiteRoles, read_roles
from app.drupal.translation7 import LANGUAGE_NONE
from app.drupal.users import (
    ExistingUser,
    Lookups,
    NewUser,
    UserChange,
    chunks,
    deltas,
    in_name_order,
    update_base,
)

_USER_COLUMNS = [
    "uid",
    "name",
    "pass",
    "mail",
    "theme",
    "signature",
    "signature_format",
    "created",
    "changed",
    "access",
    "login",
    "status",
    "timezone",
    "language",
    "picture",
    "init",
    "data",
]
users = table("users", *(column(c) for c in _USER_COLUMNS))
users_roles = table("users_roles", column("uid"), column("rid"))
role = table("role", column("rid"), column("name"))
sequences = table("sequences", column("value"))
_BASE_COLUMNS = {
    "mail": "mail",
    "name": "name",
    "status": "status",
    "timezone": "timezone",
    "langcode": "language",
}
_FIELD_COLUMNS = ("entity_type", "bundle", "deleted", "entity_id", "revision_id", "language")
_PG_NEXTID_LOCK = 1000  # Drupal 7's POSTGRESQL_NEXTID_LOCK, an advisory lock's key


def field_tables(name: str, *, has_format: bool = True) -> tuple[TableClause, TableClause]:
    """field_data_<name> and field_revision_<name>; text types also have `<name>_format`."""
    columns: tuple[str, ...] = (*_FIELD_COLUMNS, "delta", f"{name}_value")
    if has_format:
        columns += (f"{name}_format",)
    return (
        table(f"field_data_{name}", *(column(c) for c in columns)),
        table(f"field_revision_{name}", *(column(c) for c in columns)),
    )


def _stored(change: UserChange) -> UserChange:
    """The change as users' columns hold it: no language is '' (users.language is NOT NULL;
    a Salesforce nil made the UPDATE fail, and the record retried until it was dead)."""
    if "langcode" in change.base and change.base["langcode"] is None:
        return replace(change, base={**change.base, "langcode": ""})
    return change


class Drupal7(Lookups):
    """The user store of a Drupal 7 site."""

    def __init__(self, schema: DrupalSchema, dialect: str) -> None:
        self.schema = schema
        self._dialect = dialect
        # D7's unique index on SQLite is by case (BINARY), but Drupal 7 itself refuses a name
        # that equals one in use LIKE-wise (ASCII case-insensitively): sfrelay compares by
        # SQLite's lower(), which never lets two index-equal names through either.
        self._fields = {
            name: field_tables(name, has_format=f.has_format) for name, f in schema.fields.items()
        }
        written = {name: [("users", column)] for name, column in _BASE_COLUMNS.items()}
        written["mail"].append(("users", "init"))
        for name, pair in self._fields.items():
            written[name] = [(t.name, f"{name}_value") for t in pair]
        super().__init__(users, dialect, nocase_name=False, written=written)
        self._changed = "changed" in schema.user_columns or not schema.user_columns
        # Fields whose values go under the user's language (entity_translation), not 'und'.
        self._translation = schema.translation
        self._translated = frozenset(
            name for name, f in schema.fields.items() if f.translatable and schema.translation
        )
        # role name -> rid, as the site numbers them now (read again per batch: roles()).
        self._rids: dict[str, str | int] = dict(schema.roles or {})

    async def users(self, conn: AsyncConnection, uids: Iterable[int]) -> dict[int, ExistingUser]:
        wanted = sorted({uid for uid in uids if uid > 0})
        rows: list[Any] = []
        for chunk in chunks(wanted):  # the rows first, locked (for_update), then the roles
            query = select(
                users.c.uid,
                users.c.name,
                users.c.mail,
                users.c.login,
                users.c.status,
                users.c.created,
            ).where(users.c.uid.in_(chunk))
            if self._dialect != "sqlite":
                query = query.with_for_update()
            rows.extend(await conn.execute(query))
        held: dict[int, set[str]] = {}
        for chunk in chunks(wanted):
            held_query = (
                select(users_roles.c.uid, role.c.name)
                .join(role, role.c.rid == users_roles.c.rid)
                .where(users_roles.c.uid.in_(chunk))
            )
            for uid, name in await conn.execute(held_query):
                held.setdefault(int(uid), set()).add(name)
        return {
            int(uid): ExistingUser(
                int(uid),
                name,
                mail,
                (LANGUAGE_NONE,),
                frozenset(held.get(int(uid), ())),
                int(login or 0),
                int(status or 0),
                str(created),
            )
            for uid, name, mail, login, status, created in rows
        }

    async def roles(self, conn: AsyncConnection) -> SiteRoles:
        found = await read_roles(conn, 7, self.schema.tables)
        self._rids = found.ids or {}
        return found

    async def _allocate(self, conn: AsyncConnection, count: int) -> list[int]:
        """`count` new uids, taken as Drupal 7's db_next_id(MAX(uid)) takes one on each
        driver, so that a user Drupal registers meanwhile never gets one of them."""
        max_uid = int(await conn.scalar(select(func.max(users.c.uid))) or 0)
        if self._dialect == "sqlite":
            # One writer at a time; Drupal's driver keeps a single row and UPDATEs it.
            max_seq = int(await conn.scalar(select(func.max(sequences.c.value))) or 0)
            top = max(max_uid, max_seq) + count
            result = await conn.execute(update(sequences).values(value=top))
            if not result.rowcount:
                await conn.execute(insert(sequences).values(value=top))
            return list(range(top - count + 1, top + 1))
        if self._dialect == "postgresql":
            return await self._allocate_pg(conn, count, max_uid)
        return await self._allocate_mysql(conn, count, max_uid)

    @staticmethod
    async def _allocate_pg(conn: AsyncConnection, count: int, max_uid: int) -> list[int]:
        """nextval() of the sequence behind sequences.value, as Drupal's pgsql nextId();
        below MAX(uid) (a site whose uids came from elsewhere), moved past it under the
        advisory lock Drupal's nextId() takes for that."""
        take = text(
            "SELECT nextval(pg_get_serial_sequence('sequences', 'value')) "
            "FROM generate_series(1, :count) ORDER BY 1"
        )
        uids = [int(uid) for uid in await conn.scalars(take, {"count": count})]
        if uids[0] > max_uid:
            return uids
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_NEXTID_LOCK})
        uids = [int(uid) for uid in await conn.scalars(take, {"count": count})]
        if uids[0] > max_uid:
            return uids
        await conn.execute(
            text("SELECT setval(pg_get_serial_sequence('sequences', 'value'), :uid)"),
            {"uid": max_uid},
        )
        return [int(uid) for uid in await conn.scalars(take, {"count": count})]

    @staticmethod
    async def _allocate_mysql(conn: AsyncConnection, count: int, max_uid: int) -> list[int]:
        """Rows of sequences by its AUTO_INCREMENT, as Drupal's mysql nextId(): one statement
        of `count` rows takes a run of values no other statement gets, in every
        innodb_autoinc_lock_mode, `auto_increment_increment` apart (1 but on a multi-primary
        cluster: Galera, group replication). A counter below MAX(uid) is first moved past it,
        as nextId() does."""
        rows = ", ".join(["()"] * count)  # no value in the text but `count` empty rows
        take = text(f"INSERT INTO sequences () VALUES {rows}")  # noqa: S608
        step = int(await conn.scalar(text("SELECT @@session.auto_increment_increment")) or 1)
        first = int((await conn.execute(take)).lastrowid)
        unused = None
        if first <= max_uid:
            unused = first
            moved = text("INSERT IGNORE INTO sequences (value) VALUES (:uid)")
            await conn.execute(moved, {"uid": max_uid})
            first = int((await conn.execute(take)).lastrowid)
        # Only the top row is needed (nextId() deletes the older rows); ours alone, so as
        # never to wait for a row another transaction (Drupal's) has added.
        value = sequences.c.value

        def ours(low: int, rows: int) -> ColumnElement[bool]:
            if step == 1:
                return and_(value >= low, value < low + rows)
            return value.in_(range(low, low + rows * step, step))

        await conn.execute(delete(sequences).where(ours(first, count - 1)))
        if unused is not None:
            await conn.execute(delete(sequences).where(ours(unused, count)))
        return list(range(first, first + count * step, step))

    async def create(self, conn: AsyncConnection, new: list[NewUser], now: int) -> None:
        if not new:
            return
        for user, uid in zip(new, await self._allocate(conn, len(new)), strict=True):
            user.uid, user.key = uid, str(now)
        await conn.execute(
            insert(users), [self._user_row(user, now) for user in in_name_order(new)]
        )
        uids = [u.uid or 0 for u in new]
        languages: dict[int, str] = {}
        if self._translation is not None:  # new users: the module's default language
            languages = dict.fromkeys(uids, self._translation.default)
            await self._translation.record(conn, uids, now)
        await self._write_fields(conn, [(u.uid or 0, u.fields) for u in new], languages)
        rows = [{"uid": user.uid, "rid": self._rid(role)} for user in new for role in user.roles]
        if rows:
            await conn.execute(insert(users_roles), rows)

    def _rid(self, role: str) -> int:
        return int(self._rids[role])

    def _user_row(self, user: NewUser, now: int) -> dict[str, Any]:
        row = {
            "uid": user.uid,
            "name": user.name,
            "pass": "",  # no password: the user sets one through Drupal's password reset
            "mail": user.mail,
            "theme": "",
            "signature": "",
            "signature_format": None,
            "created": now,
            "access": 0,
            "login": 0,
            "status": int(user.base.get("status", 1)),
            "timezone": user.base.get("timezone"),
            "language": user.base.get("langcode") or "",
            "picture": 0,
            "init": user.mail,
            "data": None,
        }
        if self._changed:
            row["changed"] = now
        return row

    async def _write_fields(
        self,
        conn: AsyncConnection,
        items: list[tuple[int, dict[str, Any]]],
        languages: dict[int, str],
        *,
        replace: bool = False,
    ) -> None:
        """Field rows per (uid, values): under 'und', a translatable field's under the
        user's language (`languages`); with `replace`, the user's rows of a field are
        deleted first: all of them, a translatable field's in that language and 'und' only
        (its other translations stay, as Drupal's field storage keeps the languages a save
        does not carry; an untranslated value the field had before it was translatable,
        which Drupal shows only where no language has one, gives way to the new one)."""
        for name, pair in self._fields.items():
            translated = name in self._translated
            touched: dict[str, list[int]] = {}  # language -> uids
            for uid, values in items:
                if name in values:
                    language = languages[uid] if translated else LANGUAGE_NONE
                    touched.setdefault(language, []).append(uid)
            field = self.schema.fields[name]
            constant = {f"{name}_format": field.format} if field.has_format else {}
            rows = [
                {
                    "entity_type": "user",
                    "bundle": "user",
                    "deleted": 0,
                    "entity_id": uid,
                    "revision_id": uid,
                    "language": languages[uid] if translated else LANGUAGE_NONE,
                    "delta": delta,
                    f"{name}_value": value,
                    **constant,
                }
                for uid, values in items
                if name in values
                for delta, value in enumerate(deltas(values[name]))
            ]
            for stored in pair:  # field_data_* and field_revision_* alike
                for language, uids in touched.items() if replace else ():
                    for chunk in chunks(uids):
                        where = [stored.c.entity_type == "user", stored.c.entity_id.in_(chunk)]
                        if translated:
                            where.append(stored.c.language.in_(sorted({language, LANGUAGE_NONE})))
                        await conn.execute(delete(stored).where(*where))
                if rows:
                    await conn.execute(insert(stored), rows)

    async def update(self, conn: AsyncConnection, changes: list[UserChange], now: int) -> None:
        if not changes:
            return
        changed = now if self._changed else None  # D7 before 7.83 has no users.changed
        await update_base(conn, users, [_stored(c) for c in changes], _BASE_COLUMNS, changed)
        languages = await self._record_languages(conn, [c.uid for c in changes], now)
        items = [(c.uid, c.fields) for c in changes]
        await self._write_fields(conn, items, languages, replace=True)
        await self._add_roles(conn, [c for c in changes if c.roles])
        uids = sorted({c.uid for c in changes})
        await delete_cache_rows(conn, "cache_field", (f"field:user:{uid}" for uid in uids))
        # The entitycache module's bin, when it is installed.
        await delete_cache_rows(conn, "cache_entity_user", (str(uid) for uid in uids))

    async def _record_languages(
        self, conn: AsyncConnection, uids: list[int], now: int
    ) -> dict[int, str]:
        """Each user's language for its translatable fields: its original translation's
        (entity_translation), else the module's default, and then a row records it, as
        Drupal's next save of the user would (updateTranslations())."""
        if self._translation is None:
            return {}
        found = await self._translation.originals(conn, uids)
        unrecorded = sorted({uid for uid in uids if uid not in found})
        await self._translation.record(conn, unrecorded, now)
        return {uid: found.get(uid, self._translation.default) for uid in uids}

    async def _add_roles(self, conn: AsyncConnection, changes: list[UserChange]) -> None:
        if not changes:
            return
        have: set[tuple[int, int]] = set()
        for chunk in chunks(sorted({c.uid for c in changes})):
            query = select(users_roles.c.uid, users_roles.c.rid).where(users_roles.c.uid.in_(chunk))
            have.update((int(uid), int(rid)) for uid, rid in await conn.execute(query))
        rows: list[Any] = []
        for change in changes:
            for role in change.roles:
                key = (change.uid, self._rid(role))
                if key not in have:
                    have.add(key)
                    rows.append({"uid": key[0], "rid": key[1]})
        if rows:
            await conn.execute(insert(users_roles), rows)
