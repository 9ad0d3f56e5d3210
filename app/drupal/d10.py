"""Drupal 8+ users (users, users_field_data, user__*), written the way User::save() does."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import column, func, select, table, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import TableClause

from app.drupal.bulk import execute_in, insert_rows, select_in, update_rows
from app.drupal.cache import delete_cache_rows, invalidate_tags
from app.drupal.schema import DrupalSchema, FieldColumn, SiteRoles, read_roles
from app.drupal.users import (
    ExistingUser,
    Lookups,
    NewUser,
    UserChange,
    chunks,
    deltas,
    for_update,
    in_name_order,
    update_base,
)

_FIELD_COLUMNS = ("bundle", "deleted", "entity_id", "revision_id", "langcode", "delta")
users = table("users", column("uid"), column("uuid"), column("langcode"))
_DATA_COLUMNS = (
    "uid",
    "langcode",
    "preferred_langcode",
    "preferred_admin_langcode",
    "name",
    "pass",
    "mail",
    "timezone",
    "status",
    "created",
    "changed",
    "access",
    "login",
    "init",
    "default_langcode",
)
field_data = table("users_field_data", *(column(name) for name in _DATA_COLUMNS))
roles = table("user__roles", *(column(c) for c in _FIELD_COLUMNS), column("roles_target_id"))
_ROLE_COLUMNS = (*_FIELD_COLUMNS, "roles_target_id")
# sfrelay name -> users_field_data column
_BASE_COLUMNS = {
    "mail": "mail",
    "name": "name",
    "status": "status",
    "timezone": "timezone",
    "langcode": "preferred_langcode",
}


_USERS = (
    "SELECT uid, name, mail, langcode, default_langcode, login, status"
    " FROM users_field_data WHERE uid {in}"
)
_ROLE_DELTAS = "SELECT entity_id, roles_target_id, delta FROM user__roles WHERE entity_id {in}"
_UUIDS = "SELECT uid, uuid FROM users WHERE uid {in}"
_HELD_ROLES = (
    "SELECT entity_id, roles_target_id FROM user__roles WHERE deleted = 0 AND entity_id {in}"
)


_RAND_B = (1 << 62) - 1  # a version 7 UUID's rand_b: its low 62 bits


def time_ordered_uuids(count: int) -> list[str]:
    """`count` RFC 9562 version 7 UUIDs: the Unix time in milliseconds, then 74 random bits.

    Drupal's own are version 4 (random); it accepts any valid UUID. A batch of random ones
    lands on a different leaf page of the uuid index for every user (on a site of a million
    users, as many page reads and writes as users, each batch); these land together, at
    one place of the index, as a growing uid does, whatever version the site's others are.
    """
    head = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | 0b10 << 62
    noise = os.urandom(10 * count)
    out = []
    for start in range(0, 10 * count, 10):
        bits = int.from_bytes(noise[start : start + 10])  # 80: 12 for rand_a, 62 for rand_b
        h = f"{head | (bits >> 68) << 64 | bits & _RAND_B:032x}"  # str(UUID(int=...)), 3x faster
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def field_table(name: str) -> TableClause:
    return table(f"user__{name}", *(column(c) for c in _FIELD_COLUMNS), column(f"{name}_value"))


def _constant_columns(field: FieldColumn) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The columns written beside the value, with the same value in every row: a text
    type's `<field>_format` (app.drupal.fields.FieldColumn.format)."""
    if field.has_format:
        return (f"{field.name}_format",), (field.format,)
    return (), ()


class Drupal10(Lookups):
    """The user store of a Drupal 8, 9, 10 or 11 site."""

    def __init__(self, schema: DrupalSchema, dialect: str) -> None:
        self.schema = schema
        # A new user's langcode: the user entity's content language setting (not the
        # site's default language when the language module says otherwise).
        self.langcode = schema.user_langcode
        # name: NOCASE_UTF8 on SQLite (app.drupal.users.Equality for the others).
        self._fields = {name: field_table(name) for name in schema.fields}
        written = {name: [(field_data.name, column)] for name, column in _BASE_COLUMNS.items()}
        written["mail"].append((field_data.name, "init"))
        for name, t in self._fields.items():
            written[name] = [(t.name, f"{name}_value")]
        super().__init__(field_data, dialect, nocase_name=True, written=written)

    async def users(self, conn: AsyncConnection, uids: Iterable[int]) -> dict[int, ExistingUser]:
        wanted = sorted({uid for uid in uids if uid > 0})
        rows: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        read = _USERS + for_update(self._dialect)
        while wanted:
            for row in await select_in(conn, read, wanted):
                rows[int(row[0])].append(tuple(row))
            if self._dialect != "postgresql":
                break
            # Drupal's save deletes the user's users_field_data rows and inserts them again:
            # a PostgreSQL row lock that waited for it finds its row deleted and returns
            # nothing; the new rows are there for the next statement. (Taken for a missing
            # user, that one got a second account, or lost its changes to an UPDATE of
            # nothing.)
            wanted = [uid for uid in wanted if uid not in rows]
            if not wanted or not await conn.scalar(
                text("SELECT count(*) FROM users_field_data WHERE uid = ANY(:uids)"),
                {"uids": wanted},
            ):
                break
        held: dict[int, set[str]] = defaultdict(set)
        for entity_id, target in await select_in(conn, _HELD_ROLES, sorted(rows)):
            held[int(entity_id)].add(str(target))
        uuids = {int(uid): str(key) for uid, key in await select_in(conn, _UUIDS, sorted(rows))}
        found = {}
        for uid, translations in rows.items():
            if len(translations) > 1:
                translations.sort(key=lambda r: -int(r[4]))  # the original (default_langcode) first
            _, name, mail, _, _, login, status = translations[0]
            langcodes = tuple(r[3] for r in translations)
            found[uid] = ExistingUser(
                uid,
                name,
                mail,
                langcodes,
                frozenset(held[uid]),
                int(login or 0),
                int(status or 0),
                uuids.get(uid, ""),
            )
        return found

    async def roles(self, conn: AsyncConnection) -> SiteRoles:
        return await read_roles(conn, 10, self.schema.tables)

    async def create(self, conn: AsyncConnection, new: list[NewUser], now: int) -> None:
        if not new:
            return
        by_uuid = dict(zip(time_ordered_uuids(len(new)), new, strict=True))
        # The uids the database gives: read back as one range of the primary key above the
        # highest uid before the insert (500 look-ups of random uuids cost 20 times more),
        # matched by uuid, so that a user another writer (Drupal) added meanwhile is ignored.
        before = int(await conn.scalar(select(func.max(users.c.uid))) or 0)
        await insert_rows(
            conn, "users", ("uuid", "langcode"), [(key, self.langcode) for key in by_uuid]
        )
        query = select(users.c.uid, users.c.uuid).where(users.c.uid > before)
        for uid, key in (await conn.execute(query)).all():
            if (user := by_uuid.get(key)) is not None:
                user.uid, user.key = int(uid), key
        # A sequence set below the highest uid (a restored database) numbers them lower.
        missing = [key for key, user in by_uuid.items() if user.uid is None]
        for chunk in chunks(missing):
            query = select(users.c.uid, users.c.uuid).where(users.c.uuid.in_(chunk))
            for uid, key in (await conn.execute(query)).all():
                by_uuid[key].uid, by_uuid[key].key = int(uid), key
        rows = [self._data_row(user, now) for user in in_name_order(new)]
        await insert_rows(conn, "users_field_data", _DATA_COLUMNS, rows)
        await self._write_fields(conn, [(u.uid or 0, (self.langcode,), u.fields) for u in new])
        role_rows = [
            self._field_row(user.uid or 0, self.langcode, delta, role)
            for user in new
            for delta, role in enumerate(user.roles)
        ]
        await insert_rows(conn, "user__roles", _ROLE_COLUMNS, role_rows)
        await invalidate_tags(conn, ["user_list", "4xx-response"])

    def _data_row(self, user: NewUser, now: int) -> tuple[Any, ...]:
        """A users_field_data row, in _DATA_COLUMNS order."""
        base = user.base
        return (
            user.uid,
            self.langcode,
            base.get("langcode") or self.langcode,  # preferred_langcode
            None,  # preferred_admin_langcode
            user.name,
            None,  # pass: none; the user sets one through Drupal's password reset
            user.mail,
            base.get("timezone") or self.schema.default_timezone,
            int(base.get("status", 1)),
            now,  # created
            now,  # changed
            0,  # access
            0,  # login
            user.mail,  # init
            1,  # default_langcode
        )

    @staticmethod
    def _field_row(uid: int, langcode: str, delta: int, value: Any) -> tuple[Any, ...]:
        """A user__* row: _FIELD_COLUMNS, then the value column."""
        # Users are not revisionable: revision_id is the uid.
        return ("user", 0, uid, uid, langcode, delta, value)

    async def _write_fields(
        self,
        conn: AsyncConnection,
        items: list[tuple[int, tuple[str, ...], dict[str, Any]]],
        *,
        replace: bool = False,
    ) -> None:
        """Field rows per (uid, its languages: the original first, values), as Drupal saves
        the user's original (SqlContentEntityStorage::saveToDedicatedTables): the values go
        to the original language; a translatable field's other translations keep theirs,
        and an untranslatable field has rows in the original language only. With `replace`,
        a user's rows of a field are deleted and written again, as Drupal does, but only
        where they differ from what is stored: most updates change one field."""
        for name, field in self._fields.items():
            value_column = f"{name}_value"
            more, constant = _constant_columns(self.schema.fields[name])
            columns = (*_FIELD_COLUMNS, value_column, *more)
            if not replace:  # new users: their one language
                rows = [
                    ("user", 0, uid, uid, langcodes[0], delta, value, *constant)
                    for uid, langcodes, values in items
                    if name in values
                    for delta, value in enumerate(deltas(values[name]))
                ]
                await insert_rows(conn, field.name, columns, rows)
                continue
            wanted = {
                uid: {
                    (langcodes[0], delta): value for delta, value in enumerate(deltas(values[name]))
                }
                for uid, langcodes, values in items
                if name in values
            }
            if wanted:
                stored: dict[int, dict[tuple[str, int], Any]] = defaultdict(dict)
                q = conn.dialect.identifier_preparer.quote
                name_q, value_q = q(field.name), q(value_column)
                read = (
                    f"SELECT entity_id, langcode, delta, {value_q} FROM {name_q}"  # noqa: S608
                    " WHERE entity_id {in}"
                )
                for uid, langcode, delta, value in await select_in(conn, read, sorted(wanted)):
                    stored[int(uid)][(langcode, int(delta))] = value
                if self.schema.fields[name].translatable:
                    for uid, langcodes, _ in items:
                        if uid in wanted:
                            translated = set(langcodes[1:])
                            kept = stored[uid].items()
                            wanted[uid].update((k, v) for k, v in kept if k[0] in translated)
                wanted = {uid: rows for uid, rows in wanted.items() if stored[uid] != rows}
                # Same rows, other values: UPDATE in place (no index but the row's changes).
                same = [
                    uid
                    for uid, rows in wanted.items()
                    if rows and stored[uid].keys() == rows.keys()
                ]
                changed = [
                    (value, uid, lc, delta)
                    for uid in same
                    for (lc, delta), value in wanted.pop(uid).items()
                    if stored[uid][(lc, delta)] != value
                ]
                await update_rows(
                    conn,
                    field.name,
                    (value_column,),
                    ("entity_id", "langcode", "delta"),
                    changed,
                )
                stale = [uid for uid in wanted if stored[uid]]
                drop = f"DELETE FROM {name_q} WHERE entity_id {{in}}"  # noqa: S608
                await execute_in(conn, drop, stale)
            rows = [
                (*self._field_row(uid, langcode, delta, value), *constant)
                for uid, values in wanted.items()
                for (langcode, delta), value in values.items()
            ]
            await insert_rows(conn, field.name, columns, rows)

    async def update(self, conn: AsyncConnection, changes: list[UserChange], now: int) -> None:
        if not changes:
            return
        await update_base(conn, field_data, changes, _BASE_COLUMNS, now)
        items = [(c.uid, c.langcodes or (self.langcode,), c.fields) for c in changes]
        await self._write_fields(conn, items, replace=True)
        await self._add_roles(conn, [c for c in changes if c.roles])
        uids = sorted({c.uid for c in changes})
        await delete_cache_rows(conn, "cache_entity", (f"values:user:{uid}" for uid in uids))
        await invalidate_tags(conn, [*(f"user:{uid}" for uid in uids), "user_list", "4xx-response"])

    async def _add_roles(self, conn: AsyncConnection, changes: list[UserChange]) -> None:
        if not changes:
            return
        have: dict[int, dict[str, int]] = defaultdict(dict)  # uid -> role -> delta
        uids = sorted({c.uid for c in changes})
        for uid, role, delta in await select_in(conn, _ROLE_DELTAS, uids):
            have[int(uid)][role] = int(delta)
        rows = []
        for change in changes:
            current = have[change.uid]
            delta = max(current.values(), default=-1)
            for role in change.roles:
                if role not in current:
                    delta += 1
                    current[role] = delta
                    # roles: untranslatable, in the original language only (as fields)
                    langcode = (change.langcodes or (self.langcode,))[0]
                    rows.append(self._field_row(change.uid, langcode, delta, role))
        await insert_rows(conn, "user__roles", _ROLE_COLUMNS, rows)
