"""Which database errors are transient, decided by the driver's error code, never by words.

`classify(exc)` reads the code the driver itself gives: sqlite3's ``sqlite_errorname``,
asyncpg's SQLSTATE, MySQL/MariaDB's error number. Transient means "the database as a whole
cannot be used now; the same work will succeed later": the worker retries it with backoff up
to SFRELAY_MAX_TRIES, then dead-letters it, and `sfrelay dead replay` brings it back. Anything
else that the database refuses is about the records written (a constraint, a trigger, a value
too long) and is settled per record. A privilege the database user lacks, or a table that
is missing (a restore under way), is no record's fault (every record would be refused
alike): it is transient until the operator grants it or the restore ends. SQLite's missing
table is its generic SQLITE_ERROR, which no code tells apart: it stays per record.
`reconnect` means the connection itself is spoiled (a SQLite file opened read-only stays
read-only; a server connection may be gone): the pool is dropped so that the next attempt
opens fresh connections.

=========================================  =========  =========  =============================
code                                       transient  reconnect  meaning
=========================================  =========  =========  =============================
SQLite SQLITE_BUSY*, SQLITE_LOCKED*        yes        no         another writer holds the lock
SQLite SQLITE_FULL                         yes        no         disk (or temp store) full
SQLite SQLITE_NOMEM, SQLITE_INTERRUPT,     yes        no         memory, interrupted, locking
SQLITE_PROTOCOL                                                  protocol race
SQLite SQLITE_READONLY*                    yes        yes        file or directory read-only
SQLite SQLITE_IOERR*, SQLITE_CANTOPEN*     yes        yes        disk I/O, file cannot be opened
SQLite SQLITE_CORRUPT*, SQLITE_NOTADB      yes        yes        the file is damaged: repair it
SQLite SQLITE_CONSTRAINT*, other codes     no         no         about the records written
PostgreSQL 08xxx                           yes        yes        connection exception
PostgreSQL 40001, 40P01                    yes        no         serialization failure, deadlock
PostgreSQL 53xxx                           yes        no         insufficient resources: 53100
                                                                 disk full, 53200 out of memory,
                                                                 53300 too many connections
PostgreSQL 55P03, 55006                    yes        no         lock not available, in use
PostgreSQL 57014                           yes        no         statement/lock timeout, cancel
PostgreSQL 57P01-57P05                     yes        yes        admin/crash shutdown, cannot
                                                                 connect now, idle timeouts
PostgreSQL 25006                           yes        yes        read-only transaction (standby)
PostgreSQL 25P03                           yes        yes        idle-in-transaction timeout
PostgreSQL 26000                           yes        yes        prepared statement gone: a
                                                                 pooler in transaction mode
                                                                 (README: the URL forms)
PostgreSQL 58xxx                           yes        no         system error (I/O)
PostgreSQL 42501                           yes        no         privilege missing (GRANT it)
PostgreSQL 42P01                           yes        no         table missing (a restore)
PostgreSQL 23xxx, 22xxx, other             no         no         about the records written
MySQL 1205, 1213                           yes        no         lock wait timeout, deadlock
MySQL 1040, 1203, 1226, 1037, 1038, 1041   yes        no         too many connections, memory
MySQL 1021, 1114                           yes        no         disk full, table full
MySQL 3024, 1969, 1317                     yes        no         statement timeout, interrupted
MySQL 1142, 1143                           yes        no         privilege missing on a table
                                                                 or column (GRANT it)
MySQL 1146                                 yes        no         table missing (a restore)
MySQL 1290, 1836, 1792                     yes        yes        server or transaction read-only
MySQL 2002, 2003, 2006, 2013, 2055, 1053,  yes        yes        cannot connect, server gone or
1927, 4031, 1152-1161                                            shutting down, connection lost
MySQL 1062, 1406, 1644, other              no         no         about the records written
OSError, ConnectionError, TimeoutError     yes        yes        the network or the file system
=========================================  =========  =========  =============================

Any DBAPIError that SQLAlchemy marks `connection_invalidated` is transient with reconnect.

`names_missing_object(exc)`: the statement may have named a table or column that does not
exist (PostgreSQL 42P01, 42703; MySQL 1146, 1054; SQLite's generic SQLITE_ERROR, which it
also is): the site's schema may have changed under the worker, which app.sync then checks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError

__all__ = ["Classified", "classify", "error_code", "is_transient", "names_missing_object"]


@dataclass(frozen=True, slots=True)
class Classified:
    transient: bool
    reconnect: bool
    code: str | None  # as the driver gives it: "SQLITE_READONLY", "53100", "1205"


_PERMANENT = Classified(False, False, None)

# SQLite: primary result code names (extended codes start with the primary name + "_").
_SQLITE_WAIT: tuple[str, ...] = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_NOMEM")
_SQLITE_WAIT += ("SQLITE_INTERRUPT", "SQLITE_PROTOCOL")
_SQLITE_REOPEN: tuple[str, ...] = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")
_SQLITE_REOPEN += ("SQLITE_CORRUPT", "SQLITE_NOTADB")

# PostgreSQL SQLSTATE: whole classes, then single codes.
_PG_CLASS_WAIT = ("53", "58")
_PG_CLASS_REOPEN = ("08",)
_PG_WAIT = frozenset({"40001", "40P01", "55P03", "55006", "57014", "42501", "42P01"})
_PG_REOPEN = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "25006", "25P03", "26000"})

# MySQL / MariaDB error numbers.
_MYSQL_WAIT = frozenset({1205, 1213, 1040, 1203, 1226, 1037, 1038, 1041, 1021, 1114})
_MYSQL_WAIT |= {3024, 1969, 1317, 1142, 1143, 1146}
_MYSQL_REOPEN = frozenset({1290, 1836, 1792, 2002, 2003, 2006, 2013, 2055, 1053, 1927, 4031})
_MYSQL_REOPEN |= set(range(1152, 1162))


def _sqlite(name: str) -> Classified:
    if any(name == p or name.startswith(p + "_") for p in _SQLITE_REOPEN):
        return Classified(True, True, name)
    if any(name == p or name.startswith(p + "_") for p in _SQLITE_WAIT):
        return Classified(True, False, name)
    return Classified(False, False, name)


def _postgres(sqlstate: str) -> Classified:
    if sqlstate in _PG_REOPEN or sqlstate[:2] in _PG_CLASS_REOPEN:
        return Classified(True, True, sqlstate)
    if sqlstate in _PG_WAIT or sqlstate[:2] in _PG_CLASS_WAIT:
        return Classified(True, False, sqlstate)
    return Classified(False, False, sqlstate)


def _mysql(number: int) -> Classified:
    if number in _MYSQL_REOPEN:
        return Classified(True, True, str(number))
    if number in _MYSQL_WAIT:
        return Classified(True, False, str(number))
    return Classified(False, False, str(number))


def classify(exc: BaseException) -> Classified:
    """The driver's verdict on `exc` (a SQLAlchemy DBAPIError, or what a driver raised)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return Classified(True, True, None)
        found = _classify_driver(exc.orig)
        if found is not None:
            return found
        # A driver error without a code (asyncpg's InterfaceError on a closed connection):
        # what lies beneath decides.
        cause = exc.orig.__cause__ if exc.orig is not None else None
        if cause is not None:
            found = _classify_driver(cause)
            if found is not None:
                return found
            if isinstance(cause, OSError | ConnectionError | asyncio.TimeoutError):
                return Classified(True, True, type(cause).__name__)
        return _PERMANENT
    found = _classify_driver(exc)
    if found is not None:
        return found
    if isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError):
        return Classified(True, True, type(exc).__name__)
    return _PERMANENT


def _classify_driver(orig: BaseException | None) -> Classified | None:
    if orig is None:
        return None
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str):
        return _sqlite(name)
    if type(orig).__module__.startswith(("pymysql", "aiomysql", "MySQLdb")):
        number = orig.args[0] if orig.args else None
        if isinstance(number, int):
            return _mysql(number)
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return _postgres(sqlstate)
    cause = orig.__cause__
    if cause is not None and cause is not orig:
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and len(sqlstate) == 5:
            return _postgres(sqlstate)
    return None


def is_transient(exc: BaseException) -> bool:
    return classify(exc).transient


# Undefined table or column, by each driver's code (SQLite's is its generic error).
_MISSING_OBJECT = frozenset({"42P01", "42703", "1146", "1054", "SQLITE_ERROR"})


def names_missing_object(exc: BaseException) -> bool:
    return classify(exc).code in _MISSING_OBJECT


def error_code(exc: BaseException) -> str | None:
    return classify(exc).code


def driver_text(exc: BaseException) -> str:
    """A database error in the driver's own words. SQLAlchemy's text of a DBAPIError adds
    the statement and its parameters (users' names and emails, a dead letter's payload): never
    for a log line or an outcome."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    text = str(cause).strip() or type(cause).__name__
    # PyMySQL's "Can't connect to MySQL server" hides why: a refused TLS certificate, a
    # refused connection. The network's own words hold no statement or value.
    beneath = cause.__cause__ if cause is not None else None
    if isinstance(beneath, OSError) and str(beneath) and str(beneath) not in text:
        text = f"{text}: {beneath}"
    return text
