"""What sfrelay asks of a Drupal user store (D7 or D10), in bulk, inside one transaction."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import TableClause

from app.drupal.bulk import fetch_all, padded, placeholders, select_in, update_rows
from app.drupal.engine import nocase_key

if TYPE_CHECKING:  # (schema imports translation7, which imports this module)
    from app.drupal.schema import SiteRoles

# What a name or mail is compared by, as the database compares it: text (SQLite, PostgreSQL)
# or a MySQL collation's weight string (bytes). Equal keys <=> the database says equal.
Key = str | bytes

# Base fields by sfrelay name; `langcode` is the user's preferred language (D10
# preferred_langcode, D7 users.language): the entity's own langcode stays the site's, or
# Drupal would drop field values stored in another language.
BASE = ("mail", "name", "status", "timezone", "langcode")


@dataclass(slots=True)
class NewUser:
    name: str
    mail: str
    base: dict[str, Any]  # status / timezone / langcode
    fields: dict[str, Any]  # field_* -> value as its type stores it (None or "" = no row)
    roles: tuple[str, ...]
    uid: int | None = None  # set by create()
    key: str | None = None  # set by create(): its ExistingUser.key


def in_name_order(new: list[NewUser]) -> list[NewUser]:
    """New users in the order of their names (as NOCASE_UTF8 orders them), for the INSERT of
    the rows that Drupal's name index and sfrelay's lower(name) index cover: each leaf page of
    those indexes is then changed once, by neighbours in a row, instead of by inserts
    scattered over the batch, and leaves the page cache for good once passed. (Into a
    1,000,000-user SQLite site, 10,000 notifications: 80,600 -> 42,500 page reads and 103,000
    -> 83,800 writes, 245 -> 170 MB written; the uids keep the batch's order.)"""
    return sorted(new, key=lambda user: nocase_key(user.name))


@dataclass(slots=True)
class UserChange:
    uid: int
    base: dict[str, Any]  # only what changes: mail / name / status / timezone / langcode
    fields: dict[str, Any]  # only the fields the notification carried
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
    status: int  # 1 active, 0 blocked
    # Who the user is beyond its uid, which Drupal can give again after a deletion (MySQL
    # before 8.0): Drupal 8+ its uuid; Drupal 7 (no uuid in core) its created time.
    key: str


class UserStore(Protocol):
    """One implementation per Drupal major version (d10.Drupal10, d7.Drupal7)."""

    async def users(self, conn: AsyncConnection, uids: Iterable[int]) -> dict[int, ExistingUser]:
        """The users that exist among `uids` (uid 0, the anonymous user, never), with the
        roles they hold now, their rows locked until the transaction ends (for_update)."""
        ...

    async def roles(self, conn: AsyncConnection) -> SiteRoles:
        """The site's roles, and those that protect their holders, read now: roles and
        permissions change while sfrelay runs. Roles are granted by these ids from then on
        (a D7 role deleted and made again has a new rid)."""
        ...

    async def uids_by_mail(
        self, conn: AsyncConnection, mails: Iterable[str]
    ) -> dict[str, list[int]]:
        """Each of `mails` that is in use -> the uids whose mail the database judges equal
        to it (case-insensitively, as Drupal looks mails up)."""
        ...

    async def name_keys(self, conn: AsyncConnection, names: Iterable[str]) -> dict[str, Key]:
        """Each name -> its key: two names are the same username for the database's unique
        index (and Drupal) exactly when their keys are equal."""
        ...

    async def taken_names(self, conn: AsyncConnection, names: Iterable[str]) -> set[Key]:
        """The keys of the names among `names` that are in use."""
        ...

    async def max_suffixes(
        self, conn: AsyncConnection, bases: Iterable[str], *, exact: bool = False
    ) -> dict[Key, int]:
        """Each base's key -> an n with `<base>_<n>` in use and `<base>_<n+1>` free, found in
        a few index probes (1: none). `exact`: the highest n in use, read from every
        `<base>_...` name (a cost growing with the namesakes)."""
        ...

    async def bmp_only(self, conn: AsyncConnection) -> dict[str, str]:
        """The sfrelay names (name, timezone, field_*, ...) whose columns cannot hold a
        character outside the BMP (MySQL utf8mb3: Drupal 7's default) -> their charset."""
        ...

    async def create(self, conn: AsyncConnection, users: list[NewUser], now: int) -> None:
        """Insert the users (setting each `uid`) and invalidate what Drupal's save would."""
        ...

    async def update(self, conn: AsyncConnection, changes: list[UserChange], now: int) -> None:
        """Apply the changes and invalidate/delete the caches Drupal's save would."""
        ...


def for_update(dialect: str) -> str:
    """What makes a read of users' rows lock them until the batch commits (PostgreSQL,
    MySQL; SQLite's BEGIN IMMEDIATE keeps Drupal out already). Drupal's own user save
    writes the user's row before its roles: a save in progress is waited for, and one
    begun later waits for the batch, so what the batch read (roles above all: a user made
    an administrator meanwhile is protected) is still true when it writes."""
    return "" if dialect == "sqlite" else " FOR UPDATE"


CHUNK = 500  # ids per IN (...): far below every backend's bound-parameter limit
SUFFIX_SPLIT = 4  # a suffix probe splits [in use, free] into this many parts per round


def chunks(values: list[Any], size: int = CHUNK) -> Iterable[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def deltas(value: Any) -> tuple[Any, ...]:
    """A field value as its rows' values, delta 0 first: a tuple (a list field of several
    values, app.drupal.fieldtypes) as it is, none for no value, else the one value."""
    if type(value) is tuple:
        return value
    return () if value is None or value == "" else (value,)


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


_IDENTIFIER = re.compile(r"^[A-Za-z0-9_]+$")
# MySQL character sets that hold no character outside the Basic Multilingual Plane: 3-byte
# utf8 (called utf8mb3 since MySQL 8.0 / MariaDB 10.6; Drupal 7's default) and UCS-2.
BMP_CHARSETS = frozenset({"utf8", "utf8mb3", "ucs2"})


async def mysql_collations(
    conn: AsyncConnection, tables: Iterable[str]
) -> dict[tuple[str, str], tuple[str, str]]:
    """MySQL: (table, column) -> (character set, collation) of the text columns of `tables`."""
    query = text(
        "SELECT TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME, COLLATION_NAME"
        " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
        " AND TABLE_NAME IN :tables AND CHARACTER_SET_NAME IS NOT NULL"
    ).bindparams(bindparam("tables", expanding=True))
    rows = await conn.execute(query, {"tables": sorted(set(tables))})
    return {(str(t), str(c)): (str(charset), str(coll)) for t, c, charset, coll in rows}


class Equality:
    """How the database compares one text column of Drupal's user table, so that sfrelay
    asks it exactly the questions its unique index (or Drupal's look-up) answers.

    - ``nocase``: SQLite's NOCASE_UTF8 column collation (Drupal 8+ name): the column's own
      index; keys are the collation's own function (app.drupal.engine.nocase_key).
    - ``lower``: SQLite and PostgreSQL, lower() computed by the database itself, on both
      sides, through the sfrelay_*_lower expression indexes (app.drupal.ledger).
    - ``collation``: MySQL/MariaDB, the column's own collation (utf8mb4_general_ci ignores
      case and accents): the column's index; keys are WEIGHT_STRING()s under it.
    Every look-up is an indexed IN or range: never a scan of the user table.
    """

    def __init__(self, table: TableClause, column: str, dialect: str, *, nocase: bool) -> None:
        self.table, self.name, self.dialect = table, column, dialect
        self.column: Any = table.c[column]
        self.kind = (
            "collation"
            if dialect == "mysql"
            else "nocase"
            if nocase and dialect == "sqlite"
            else "lower"
        )
        self._collation: tuple[str, str] | None = None  # MySQL (charset, collation)
        self._keys_sql_cache: dict[int, str] = {}

    async def _mysql_collation(self, conn: AsyncConnection) -> tuple[str, str]:
        if self._collation is None:
            found = await mysql_collations(conn, [self.table.name])
            row = found.get((self.table.name, self.name))
            if row is None or not all(_IDENTIFIER.match(v) for v in row):
                raise RuntimeError(f"no collation found for {self.table.name}.{self.name}")
            self._collation = row
        return self._collation

    async def _as_column(self, conn: AsyncConnection, param: str) -> str:
        """MySQL: a bound value in the column's own character set and collation (so the
        comparison is the column's and its index serves it, whatever the connection's)."""
        charset, collation = await self._mysql_collation(conn)
        return f"CONVERT(:{param} USING {charset}) COLLATE {collation}"

    def stored_key(self) -> Any:
        """The key of the stored value, as SQL (then `post`)."""
        if self.kind == "collation":
            # PAD SPACE collations ignore trailing spaces in comparisons, not in weights.
            return func.weight_string(func.trim(text(f"TRAILING ' ' FROM {self.name}")))
        if self.kind == "lower":
            return func.lower(self.column)
        return self.column

    def stored_key_sql(self, conn: AsyncConnection) -> str:
        """stored_key() as SQL text (for bulk.select_in)."""
        name = conn.dialect.identifier_preparer.quote(self.name)
        if self.kind == "collation":
            return f"WEIGHT_STRING(TRIM(TRAILING ' ' FROM {name}))"
        if self.kind == "lower":
            return f"lower({name})"
        return name

    async def in_list(self, conn: AsyncConnection) -> tuple[str, str]:
        """(what bulk.select_in's `{in}` tests, the SQL of each listed value) for a
        membership test as the database compares: SQLite, PostgreSQL: lower(column) among
        the keys; MySQL: the column (its own index) among the values, each in its collation."""
        if self.kind == "collation":
            charset, collation = await self._mysql_collation(conn)
            name = conn.dialect.identifier_preparer.quote(self.name)
            return name, f"CONVERT({{}} USING {charset}) COLLATE {collation}"
        return self.stored_key_sql(conn), "{}"

    def post(self, value: Any) -> Key:
        if self.kind == "nocase":
            return nocase_key(value)
        return bytes(value) if isinstance(value, bytes | bytearray) else str(value)

    async def keys(self, conn: AsyncConnection, values: Iterable[str]) -> dict[str, Key]:
        """Each value -> its key, computed by the database (one query per 500 values)."""
        wanted = sorted(set(values))
        if self.kind == "nocase":
            return {v: nocase_key(v) for v in wanted}
        found: dict[str, Key] = {}
        for chunk in chunks(wanted):
            if self.dialect == "postgresql":
                query = text("SELECT v, lower(v) FROM unnest(:vals) AS u(v)").bindparams(
                    bindparam("vals", type_=ARRAY(Text))
                )
                rows = await conn.execute(query, {"vals": chunk})
                found.update((v, self.post(k)) for v, k in rows)
                continue
            # Straight through the driver, padded to a few sizes (bulk.padded).
            values = padded(chunk)
            sql = await self._keys_sql(conn, len(values))
            if self.kind == "collation":  # a row per value, in their order
                numbered = tuple(x for pair in enumerate(values) for x in pair)
                row = [key for (key,) in await fetch_all(conn, sql, numbered)]
            else:
                (row,) = await fetch_all(conn, sql, values)
            found.update((v, self.post(k)) for v, k in zip(chunk, row, strict=False))
        return found

    async def _keys_sql(self, conn: AsyncConnection, count: int) -> str:
        """SELECT the key of each of `count` bound values (the driver's paramstyle).

        MySQL: one row per value, (position, value) bound for each, not one column per
        value: aiomysql parses each result column's definition in Python, which cost more
        than the statement itself (512 definitions per statement)."""
        sql = self._keys_sql_cache.get(count)
        if sql is None:
            marks = placeholders(str(conn.dialect.paramstyle), count)
            if self.kind == "collation":
                charset, collation = await self._mysql_collation(conn)
                mark = marks[0]
                given = f"SELECT {mark} AS i, {mark} AS v" + (
                    f" UNION ALL SELECT {mark}, {mark}" * (count - 1)
                )
                key = f"WEIGHT_STRING(TRIM(TRAILING ' ' FROM CONVERT(v USING {charset})"
                key += f" COLLATE {collation}))"
                sql = f"SELECT {key} FROM ({given}) AS given ORDER BY i"  # noqa: S608
            else:
                sql = "SELECT " + ", ".join(f"lower({mark})" for mark in marks)
            self._keys_sql_cache[count] = sql
        return sql

    async def equal_to(
        self, conn: AsyncConnection, values: list[str], keys: dict[str, Key]
    ) -> ColumnElement[bool]:
        """column = any of `values`, as the database compares (indexed); SQLite and
        PostgreSQL (MySQL: in_list)."""
        if self.kind == "lower":
            wanted = sorted({str(keys[v]) for v in values})
            if self.dialect == "postgresql":  # one array parameter: one statement to plan
                return func.lower(self.column) == any_(bindparam(None, wanted, type_=ARRAY(Text)))
            return func.lower(self.column).in_(wanted)
        return self.column.in_(values)  # type: ignore[no-any-return]

    async def prefixed(
        self, conn: AsyncConnection, values: list[str], keys: dict[str, Key]
    ) -> ColumnElement[bool]:
        """Stored values `<value>_...` of any of `values`, as the database compares: a range
        per value, [value_, value`) ('`' is the code point after '_'), over an index."""
        if self.kind == "lower":
            lowered = func.lower(self.column)
            ranges = []
            for v in values:
                key = str(keys[v])  # lower(): text
                low, high = f"{key}_", f"{key}`"
                if self.dialect == "postgresql":
                    # Code point order whatever the database's locale: the text_pattern_ops
                    # index (app.drupal.ledger) serves ~>=~ / ~<~.
                    ranges.append(and_(lowered.op("~>=~")(low), lowered.op("~<~")(high)))
                else:
                    ranges.append(and_(lowered >= low, lowered < high))
            return or_(*ranges)
        if self.kind == "collation":
            # In the collation's order (a weight per character; '_' then '`').
            parts, params = [], {}
            for i, v in enumerate(values):
                params[f"lo{i}"], params[f"hi{i}"] = f"{v}_", f"{v}`"
                low = await self._as_column(conn, f"lo{i}")
                high = await self._as_column(conn, f"hi{i}")
                parts.append(f"({self.name} >= {low} AND {self.name} < {high})")
            return text(" OR ".join(parts)).bindparams(**params)  # type: ignore[return-value]
        # NOCASE_UTF8 compares the lower-cased strings by code point.
        return or_(*(and_(self.column >= f"{v}_", self.column < f"{v}`") for v in values))


class Lookups:
    """The bulk look-ups both majors share; `table` holds uid, name and mail
    (D10 users_field_data, D7 users). `nocase_name`: the name column is NOCASE_UTF8."""

    def __init__(
        self,
        table: TableClause,
        dialect: str,
        *,
        nocase_name: bool,
        written: dict[str, list[tuple[str, str]]],
    ) -> None:
        self._table = table
        self._dialect = dialect
        self._written = written  # sfrelay name -> the (table, column)s its value goes to
        self._name = Equality(table, "name", dialect, nocase=nocase_name)
        self._mail = Equality(table, "mail", dialect, nocase=False)
        # The suffix probes' lower(name): a database function over the sfrelay_*_name_lower
        # index (app.drupal.ledger), so that a probe costs no Python collation callback.
        self._probe = Equality(table, "name", dialect, nocase=False)

    async def bmp_only(self, conn: AsyncConnection) -> dict[str, str]:
        """Each sfrelay name (name, timezone, field_*, ...) written to a column that cannot hold
        a character outside the BMP (MySQL utf8mb3) -> that column's character set."""
        if self._dialect != "mysql":
            return {}
        tables = {t for columns in self._written.values() for t, _ in columns}
        found = await mysql_collations(conn, tables)
        narrow = {}
        for name, columns in self._written.items():
            for column_ in columns:
                charset = found.get(column_, ("", ""))[0]
                if charset in BMP_CHARSETS:
                    narrow[name] = charset
        return narrow

    async def uids_by_mail(
        self, conn: AsyncConnection, mails: Iterable[str]
    ) -> dict[str, list[int]]:
        eq = self._mail
        keys = await eq.keys(conn, mails)
        found: dict[Key, set[int]] = {}
        # Through the driver (a few statement texts: bulk.select_in), not a select compiled
        # for each list. SQLite, PostgreSQL: the sfrelay_*_mail_lower index, asked for the
        # keys; MySQL: the mail index, asked for the mails in its collation.
        table = conn.dialect.identifier_preparer.quote(self._table.name)
        tested, value = await eq.in_list(conn)
        key = eq.stored_key_sql(conn)
        sql = f"SELECT uid, {key} FROM {table} WHERE uid > 0 AND {tested} {{in}}"  # noqa: S608
        wanted = sorted(keys) if eq.kind == "collation" else sorted({str(k) for k in keys.values()})
        for uid, key in await select_in(conn, sql, wanted, value):
            found.setdefault(eq.post(key), set()).add(int(uid))
        return {mail: sorted(found[key]) for mail, key in keys.items() if key in found}

    async def name_keys(self, conn: AsyncConnection, names: Iterable[str]) -> dict[str, Key]:
        return await self._name.keys(conn, names)

    async def taken_names(self, conn: AsyncConnection, names: Iterable[str]) -> set[Key]:
        eq, wanted = self._name, sorted(set(names))
        taken: set[Key] = set()
        if eq.kind == "nocase":
            # Most names are ASCII: for them lower() is exact, and its index (the suffix
            # probes') is searched in C, where each step of the NOCASE_UTF8 index calls
            # Python. Exact because the one non-ASCII character that lower-cases to ASCII is
            # the Kelvin sign (to "k"): names with a k keep the collation's own index.
            plain = [name for name in wanted if name.isascii() and "k" not in name.lower()]
            taken.update(await self._in_use(conn, [name.lower() for name in plain]))
            wanted = sorted(set(wanted) - set(plain))
        if eq.kind == "collation":
            # MySQL: through the driver, padded to a few statement texts (bulk.select_in).
            # As SQLAlchemy text() each padded text stayed in its compiled cache with its
            # 512 bound parameters: ~9 MB for the names' and the mails' look-ups together.
            table = conn.dialect.identifier_preparer.quote(self._table.name)
            tested, value = await eq.in_list(conn)
            sql = f"SELECT {eq.stored_key_sql(conn)} FROM {table} WHERE {tested} {{in}}"  # noqa: S608
            taken.update(eq.post(key) for (key,) in await select_in(conn, sql, wanted, value))
            return taken
        keys = await eq.keys(conn, wanted) if eq.kind == "lower" else {}
        for chunk in chunks(wanted):
            query = (
                select(eq.stored_key())
                .select_from(self._table)
                .where(await eq.equal_to(conn, chunk, keys))
            )
            taken.update(eq.post(key) for (key,) in await conn.execute(query))
        return taken

    async def max_suffixes(
        self, conn: AsyncConnection, bases: Iterable[str], *, exact: bool = False
    ) -> dict[Key, int]:
        eq = self._name
        if eq.dialect not in ("sqlite", "postgresql"):
            return await self._max_suffixes_read(conn, bases)
        if not exact:
            return await self._probe_suffixes(conn, bases)
        return await self._max_suffixes_exact(conn, bases)

    async def _probe_suffixes(self, conn: AsyncConnection, bases: Iterable[str]) -> dict[Key, int]:
        """For each base, an n with `<base>_<n>` in use and `<base>_<n+1>` free, at or above
        the highest power of two in use: a 1,000,000-user site has thousands of
        `John Smith_<n>`, and reading them all (even in the database) made the first batches'
        cost grow with the site. Doubling, then a search between the last name found and the
        first one missing: point look-ups, a few per base and round, all bases in one query
        per round. A result is a hint, never trusted: picks are checked with taken_names,
        and a base whose picks collide is read again with `exact` (gaps left by deleted
        users; on SQLite, stored names differing in non-ASCII case, which lower() keeps)."""
        keys = await self._name.keys(conn, bases)
        # base -> lower(base), as the database computes it
        stems = keys if self._name.kind == "lower" else await self._probe.keys(conn, keys)
        # stem -> [lo, hi]: `<stem>_<lo>` in use (lo = 1: the base itself), `<stem>_<hi>` free
        bounds: dict[str, list[int]] = {str(stem): [1, 0] for stem in stems.values()}
        while True:
            asked: dict[str, list[int]] = {}
            for stem, (lo, hi) in bounds.items():
                if not hi:  # doubling
                    numbers = [lo << k for k in range(1, 11) if lo << k < 10**18]
                    if not numbers:
                        bounds[stem][1] = lo + 1
                        continue
                elif hi - lo > 1:  # quartering [lo, hi]
                    step = (hi - lo) / SUFFIX_SPLIT
                    numbers = sorted({lo + max(1, round(step * i)) for i in range(1, SUFFIX_SPLIT)})
                    numbers = [n for n in numbers if n < hi]
                else:
                    continue
                asked[stem] = numbers
            if not asked:
                break
            in_use = await self._in_use(
                conn, [f"{stem}_{n}" for stem, numbers in asked.items() for n in numbers]
            )
            for stem, numbers in asked.items():
                bound = bounds[stem]
                free = [n for n in numbers if f"{stem}_{n}" not in in_use]
                if free:
                    bound[1] = free[0]
                elif not bound[1]:  # every doubling in use: double on from the last
                    bound[0] = numbers[-1]
                    continue
                bound[0] = max([bound[0], *(n for n in numbers if n < bound[1] and n not in free)])
        found = dict.fromkeys(keys.values(), 1)
        for base, key in keys.items():
            found[key] = max(found[key], bounds[str(stems[base])][0])
        return found

    async def _in_use(self, conn: AsyncConnection, stems: list[str]) -> set[str]:
        """The lower() keys among `stems` (already lower()ed) that a stored name has."""
        probe, found = self._probe, set[str]()
        stored = probe.stored_key()
        # PostgreSQL: one array parameter, whatever its length (a round probes thousands)
        size = 10 * CHUNK if probe.dialect == "postgresql" else CHUNK
        for chunk in chunks(sorted(set(stems)), size):
            if probe.dialect == "postgresql":
                condition = stored == any_(bindparam("stems", chunk, type_=ARRAY(Text)))
            else:
                condition = stored.in_(chunk)
            query = select(stored).select_from(self._table).where(condition)
            found.update(str(key) for (key,) in await conn.execute(query))
        return found

    async def _max_suffixes_exact(
        self, conn: AsyncConnection, bases: Iterable[str]
    ) -> dict[Key, int]:
        """The highest n per base, computed by the database (SQLite, PostgreSQL): one number
        per base comes back, not its names. A stored name whose case differs in length from
        the base's (a few Unicode letters) is not counted: a pick that collides with it is
        caught by taken_names."""
        eq = self._name
        keys = await eq.keys(conn, bases)
        found = dict.fromkeys(keys.values(), 1)
        for chunk in chunks(sorted(keys), 50):
            columns = []
            for i, base in enumerate(chunk):
                tail = func.substr(eq.column, len(base) + 2)
                if eq.dialect == "sqlite":
                    digits = and_(tail != "", tail.op("NOT GLOB")("*[^0-9]*"))
                    number = cast(tail, Integer)
                else:
                    digits = tail.op("~")("^[0-9]{1,18}$")
                    number = cast(tail, BigInteger)
                columns.append(
                    select(func.max(number))
                    .where(await eq.prefixed(conn, [base], keys), digits, func.length(tail) <= 18)
                    .scalar_subquery()
                    .label(f"n{i}")
                )
            row = (await conn.execute(select(*columns))).one()
            for base, n in zip(chunk, row, strict=True):
                if n is not None:
                    found[keys[base]] = max(found[keys[base]], int(n))
        return found

    async def _max_suffixes_read(
        self, conn: AsyncConnection, bases: Iterable[str]
    ) -> dict[Key, int]:
        """MySQL: the names `<base>_...` read over the index, their numbers taken here."""
        eq = self._name
        keys = await eq.keys(conn, bases)
        found = dict.fromkeys(keys.values(), 1)
        names: set[str] = set()
        for chunk in chunks(sorted(keys), 100):
            query = select(eq.column).where(await eq.prefixed(conn, chunk, keys))
            names.update(name for (name,) in (await conn.execute(query)).all())
        numbered = await self._numbered(conn, names)
        for stem, n in numbered(sorted(names)):
            if stem in found:
                found[stem] = max(found[stem], n)
        return found

    async def _numbered(
        self, conn: AsyncConnection, names: set[str]
    ) -> Callable[[list[str]], list[tuple[Key, int]]]:
        """name -> (its stem's key, n) for the names `<stem>_<n>` among `names`."""
        split: dict[str, tuple[str, int]] = {}
        for name in names:
            stem, _, number = name.rpartition("_")
            if number.isascii() and number.isdigit():
                split[name] = (stem, int(number))
        stems = await self._name.keys(conn, {stem for stem, _ in split.values()})

        def numbered(some: list[str]) -> list[tuple[Key, int]]:
            return [(stems[split[n][0]], split[n][1]) for n in some if n in split]

        return numbered
