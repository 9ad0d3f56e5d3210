"""The business rules: filter, order guard, create-vs-update, applied to Drupal in batches.

Public API (the worker codes against this; it imports neither arq nor FastAPI)::

    syncer = await Syncer.open(settings)     # engine, Drupal version, sfrelay_ migrations,
                                             # field map validated against the real schema
                                             # (ConfigError here, never at the first job)
    outcomes = await syncer.apply(notifications)
    await syncer.close()

`apply` takes an `app.jobs.ApplyJob`'s notifications (``JobNotification(id, object,
fields)``, the fields as Salesforce sent them) and returns one `app.outcomes.Outcome` per
notification, in order. The whole list is written in ONE transaction; if the database refuses
it on a per-record problem (constraint, trigger, bad value), the list is bisected: each half in
its own transaction, recursively, so one bad record costs about 2 * log2(n) extra transactions
and never blocks or rolls back the others. Per-record problems become outcomes, never
exceptions:

==========================  ===================================================================
OutcomeKind                 meaning
==========================  ===================================================================
created                     a new Drupal user (uid) was written
updated                     the mapped Drupal user was updated
linked                      no mapping yet; the one Drupal user with that email was linked
                            and updated (SFRELAY_MATCH_BY_EMAIL; ``never-logged-in``: only a
                            user with login = 0, else conflict_duplicate_email)
converted                   a converted Lead: its user is now mapped to ConvertedContactId
skipped_no_email            no email: nothing written but the history (never retry)
skipped_invalid_email       an email Drupal would refuse (never retry)
skipped_converted           a converted Lead that was never synced: nothing to re-map
stale                       older than the version last applied for this record (by
                            SystemModstamp, else LastModifiedDate), or a Lead already converted
duplicate                   this version (or notification id) was already applied: no effect
conflict_duplicate_email    another Salesforce record (detail: its Id) or an unmapped Drupal
                            user (detail: ``uid <n>``) already has this email; nothing written
conflict_protected_user     the Drupal user is uid 0 or 1 or holds a protected role (detail:
                            ``uid 1``, ``uid <n> has role <role>``): never linked, updated,
                            blocked, unblocked, unlinked or handed over by a merge; nothing
                            written, never retried
blocked                     deleted in Salesforce (or a merge loser whose survivor has a user):
                            its user got status 0 (SFRELAY_ON_DELETE=block; app/lifecycle.py)
unblocked                   a live version of a record whose user sfrelay had blocked
unlinked                    deleted in Salesforce: the mapping was forgotten (ON_DELETE=unlink)
merged                      a merge loser's user now belongs to the survivor (detail: both Ids)
deleted                     a deletion with nothing to change (detail: why)
retry                       transient per-record error (detail: the error): try again later
failed                      permanent per-record error (detail: the error): dead-letter it
==========================  ===================================================================

`apply` raises `app.errors.RetryableError` only when the database as a whole cannot be used
(unreachable, locked, deadlock, read-only, disk full, I/O error: classified by the driver's error
code in app/drupal/errors.py): the whole call can simply be repeated, because
applying the same notifications again has no second effect; and `app.errors.SiteChanged` (a
ConfigError) when the database refused the batch because the site no longer has what the field
map writes (a mapped field deleted in Drupal while the worker ran). `Syncer.open` raises
`ConfigError` for a wrong field map, role or Drupal version, and `RetryableError` when the
database cannot be reached.

Rules in detail (app/plan.py decides, app/drupal/ writes):

- One writer at a time per Drupal database (SQLite BEGIN IMMEDIATE, PostgreSQL advisory
  lock, MySQL GET_LOCK), so concurrent workers never race on uids, usernames or emails.
- Versions: the 18-character Id keys the record; a notification id already applied, or a
  modstamp equal to the last applied one with the same values (app.records.version_digest),
  is `duplicate`; an older one is `stale`. The same modstamp with other values is a second
  change within that second (Salesforce stamps to the second): applied.
- A record whose email belongs to several Drupal users, or to one when
  SFRELAY_MATCH_BY_EMAIL is off, is `conflict_duplicate_email` (detail: ``uid <n>``).
- Protected users (uid 0 and 1; holders of SFRELAY_PROTECTED_ROLES, by default the site's
  admin roles and those granting ``administer users`` / ``administer permissions``) are
  checked at each batch with the users' current roles: a link, an update of an already
  mapped user or a Lead conversion onto one is `conflict_protected_user`.
- Only fields present in the notification change; a field sent as nil deletes its value
  (the receiver makes a field its WSDL declares and the message omits a nil: app.soap).
  `langcode` maps to the user's preferred language (the entity keeps the site's language).
- A mapped user deleted in Drupal (its uid gone, or given again to someone else: its
  uuid, on Drupal 7 its created time, differs from sfrelay_record.user_key) is forgotten:
  the record is as new (its email links or creates a user), the outcome's detail says
  ``uid <n> was deleted in Drupal``; a uid given again is never written for the record.
- A converted Lead's user keeps its account under the Contact Id (fields mapped from ``Id``
  are set to the Contact Id); a Contact already mapped to another user is `failed`.
- sfrelay_record keeps the last 10 outcomes of each record (app.plan.HISTORY_SIZE), failed
  and retried attempts included (written apart, after their transaction rolled back).
- Usernames (and mails) are compared exactly as the database compares them (its unique
  index: NOCASE_UTF8, the MySQL collation, PostgreSQL lower()): app.drupal.users.Equality.
- A MySQL column in 3-byte utf8 (utf8mb3, Drupal 7's default; app.drupal.users.BMP_CHARSETS)
  cannot hold a character outside the BMP (emoji, U+1D400): sfrelay writes U+FFFD there and
  leaves it out of usernames (an address with one is skipped_invalid_email); the
  created/updated/linked outcome's detail says what changed.
- SQLite and PostgreSQL get sfrelay_* indexes on lower(mail) / lower(name) of Drupal's user
  table, and PostgreSQL's statistics are refreshed during bulk loads (app/drupal/stats.py).

Dead letters (what the worker does with `failed` and exhausted `retry` outcomes) are
`app.dead`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from functools import partial

from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.config import Settings
from app.drupal import ledger
from app.drupal.d7 import Drupal7
from app.drupal.d10 import Drupal10
from app.drupal.engine import create_engine, writer
from app.drupal.errors import classify, driver_text, names_missing_object
from app.drupal.fieldtypes import Converter, field_converters, site_language
from app.drupal.schema import IMPLICIT_ROLES, DrupalSchema, detect_major, inspect_drupal
from app.drupal.stats import Statistics
from app.drupal.users import Key, UserStore
from app.errors import ConfigError, RecordError, RetryableError, SiteChanged
from app.jobs import JobNotification
from app.lifecycle import decide_batch
from app.mapping import FieldMap, load_field_map
from app.outcomes import Outcome, OutcomeKind
from app.plan import Planner, note_failure
from app.records import Record, to_record

__all__ = ["Outcome", "OutcomeKind", "Syncer"]

logger = logging.getLogger("sfrelay.worker")
# Username bases whose last suffix in use the Syncer remembers across batches, at most
# (~150 bytes each): a CRM's distinct namesakes would otherwise grow a long-lived worker.
SUFFIXES_KEPT = 50_000
# How often a running worker reads the site again (the mapped fields' definitions, its
# languages): an allowed value or a language added in Drupal is taken within this, seconds.
SITE_REFRESH_S = 60.0


def _error(exc: BaseException) -> str:
    return driver_text(exc)[:2000]


class Syncer:
    """Applies notifications to one Drupal database; open once per process."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        schema: DrupalSchema,
        store: UserStore,
        field_map: FieldMap,
        bmp_only: frozenset[str] = frozenset(),
    ) -> None:
        self.engine = engine
        self.bmp_only = bmp_only  # UserStore.bmp_only(): read once, at start-up
        self.settings = settings
        self.schema = schema
        self.store = store
        self.field_map = field_map
        self._converters: dict[str, Converter] = {}
        self._use_site(schema)
        self._languages = schema.languages
        self._site_read_at = time.monotonic()
        # Username suffixes known in use, kept across batches (checked again before use).
        self._suffixes: dict[Key, int] = {}
        self._statistics = Statistics(engine, schema)

    @classmethod
    async def open(cls, settings: Settings) -> Syncer:
        """Connect, detect Drupal, migrate sfrelay_ tables, validate the field map."""
        field_map = load_field_map(settings.field_map)  # ConfigError before connecting
        engine = create_engine(settings.database_url)
        try:
            async with engine.connect() as conn:
                schema = await inspect_drupal(conn, settings.drupal_version, field_map.user_fields)
                store: UserStore = (
                    Drupal10(schema, engine.dialect.name)
                    if schema.major == 10
                    else Drupal7(schema, engine.dialect.name)
                )
                narrow = await store.bmp_only(conn)
            field_map.validate(schema, settings.handled_objects)
            check_protected_roles(schema, field_map, settings.protected_roles)
            check_field_defaults(schema, field_map, engine.dialect.name)
            if schema.major == 10 and "cachetags" not in schema.tables:
                await _create_cachetags(engine)
            await ledger.migrate(engine)
            await ledger.ensure_indexes(engine, schema.major)
        except BaseException as exc:
            await engine.dispose()
            if isinstance(exc, DBAPIError | OSError):
                raise RetryableError(f"cannot use the Drupal database: {_error(exc)}") from exc
            raise
        if narrow:
            columns = ", ".join(f"{name} ({charset})" for name, charset in sorted(narrow.items()))
            logger.warning(
                "Drupal columns without 4-byte characters: %s; a character outside the BMP "
                "(emoji, ...) is written there as U+FFFD, left out of usernames, and an address "
                "with one is skipped_invalid_email",
                columns,
            )
        return cls(engine, settings, schema, store, field_map, frozenset(narrow))

    def prepare(self, notifications: Sequence[JobNotification]) -> list[Record | Outcome]:
        """What of the rules needs no database: each notification as a Record, or the
        Outcome of one refused outright (no Id, an object the field map lacks). A worker
        prepares a job when it arrives, before its turn to write (workers/group_commit.py)."""
        items: list[Record | Outcome] = []
        drupal7 = self.schema.major == 7
        for notification in notifications:
            try:
                items.append(to_record(0, notification, self.field_map, drupal7=drupal7))
            except RecordError as exc:
                failed = OutcomeKind.FAILED
                items.append(
                    Outcome(notification.id, notification.record_id, failed, None, str(exc))
                )
        return items

    async def apply(self, notifications: Sequence[JobNotification]) -> list[Outcome]:
        """One Outcome per notification, in order (see the module docstring)."""
        return await self.apply_prepared(self.prepare(notifications))

    async def apply_prepared(self, items: Sequence[Record | Outcome]) -> list[Outcome]:
        """apply() of what prepare() made: one Outcome per item, in order."""
        outcomes: list[Outcome | None] = [None] * len(items)
        records: list[Record] = []
        for index, item in enumerate(items):
            if isinstance(item, Outcome):
                outcomes[index] = item
            else:
                item.index = index  # its place in this call
                records.append(item)
        if records:
            await self._bisect(records, outcomes, whole=True)
        return [o for o in outcomes if o is not None]

    async def _bisect(
        self, records: list[Record], outcomes: list[Outcome | None], *, whole: bool = False
    ) -> None:
        """Apply `records` in one transaction; if the database refuses it, apply each half
        in its own (recursively), so a record no validation could foresee (a constraint or
        trigger of the site) costs about 2 * log2(n) extra transactions, and the others are
        written in few large ones. A record that fails alone gets `retry` or `failed`."""
        try:
            await self._apply(records, outcomes)
            return
        except Exception as exc:
            if whole and names_missing_object(exc):
                await self._check_site()
            await self._raise_if_transient(exc)
            if not isinstance(exc, DBAPIError):
                raise
            failure = exc
        if len(records) == 1 and whole and isinstance(failure, IntegrityError):
            # A lone record gets the second try, in a transaction of its own, that a record of
            # a larger batch gets from the bisection: a name or uid Drupal itself took while
            # the batch ran is seen then, and another picked (not a retry 30 s later).
            await self._bisect(records, outcomes)
            return
        if len(records) > 1:
            if whole:
                logger.info(
                    "a batch of %d records was refused (%s): bisecting it",
                    len(records),
                    classify(failure).code or type(failure.orig).__name__,
                )
            middle = len(records) // 2
            await self._bisect(records[:middle], outcomes)
            await self._bisect(records[middle:], outcomes)
            return
        (record,) = records
        # A constraint can be another writer (Drupal itself) that took the same name or id
        # meanwhile: worth another try. Anything else will fail again.
        kind = OutcomeKind.RETRY if isinstance(failure, IntegrityError) else OutcomeKind.FAILED
        outcomes[record.index] = Outcome(
            record.notification_id, record.raw_id, kind, None, _error(failure)
        )
        with suppress(DBAPIError):  # the history is a record, not the outcome
            async with writer(self.engine) as conn:
                await note_failure(conn, record, kind, _error(failure))

    def _use_site(self, schema: DrupalSchema) -> None:
        """Convert values as `schema`'s fields and languages take them (app.drupal.fieldtypes):
        at start-up, and when the site changed (`_refresh_site`). The stores write by the
        fields' definitions in `self.schema.fields`, updated in place."""
        if schema is not self.schema:
            self.schema.fields.update(schema.fields)
        fields = field_converters(schema.fields, schema.major, self.engine.dialect.name)
        self._converters.update(fields)
        # The preferred language: one of the site's (app.drupal.fieldtypes.site_language).
        self._converters["langcode"] = Converter(
            None, partial(site_language, languages=schema.languages)
        )

    async def _read_site(self, conn: AsyncConnection) -> DrupalSchema | None:
        """The site as Syncer.open reads it, now: SiteChanged when the field map no longer
        fits it (a mapped field deleted in Drupal), None while Drupal's own user tables are
        missing (a restore running: the database's errors say so, retried)."""
        try:
            await detect_major(conn)
        except ConfigError:
            return None
        try:
            schema = await inspect_drupal(
                conn, self.settings.drupal_version, self.field_map.user_fields
            )
            self.field_map.validate(schema, self.settings.handled_objects)
        except ConfigError as exc:
            raise SiteChanged.of(exc) from None
        return schema

    async def _refresh_site(self, conn: AsyncConnection) -> None:
        """Every SITE_REFRESH_S: the mapped fields' definitions and the site's languages as
        they are now (an allowed value, a maximum length or a language changed in Drupal:
        before, a value refused by the old definition stayed unwritten, the version applied)."""
        if time.monotonic() - self._site_read_at < SITE_REFRESH_S:
            return
        schema = await self._read_site(conn)
        self._site_read_at = time.monotonic()
        if schema is not None and (
            schema.fields != self.schema.fields or schema.languages != self._languages
        ):
            logger.info(
                "the mapped fields' definitions or the site's languages changed in "
                "Drupal: values are converted as they are now"
            )
            self._use_site(schema)
            self._languages = schema.languages

    async def _check_site(self) -> None:
        """After the database refused a whole batch for a table or column it does not have
        (app.drupal.errors.names_missing_object): SiteChanged when the site no longer has
        what the field map writes (a user field deleted in Drupal while the worker ran, its
        table gone), which Syncer.open would refuse: every record would fail alike, into the
        dead letters. While Drupal's own user tables are missing (a restore running) or the
        database cannot be read, the batch's error stands."""
        try:
            async with self.engine.connect() as conn:
                await self._read_site(conn)
        except (DBAPIError, OSError):
            return

    async def _raise_if_transient(self, exc: BaseException) -> None:
        verdict = classify(exc)
        if not verdict.transient:
            return
        if verdict.reconnect:
            # A SQLite file opened read-only stays read-only, a dropped server connection
            # stays dropped: the next attempt must open new connections.
            await self.engine.dispose()
        raise RetryableError(f"Drupal database: {_error(exc)}") from exc

    async def _apply(self, records: list[Record], outcomes: list[Outcome | None]) -> None:
        if len(self._suffixes) > SUFFIXES_KEPT:
            # A hint (each pick is checked against the database): forgetting it costs a probe
            # per base again, while kept it would grow with every distinct name ever taken.
            self._suffixes.clear()
        async with writer(self.engine) as conn:
            await self._refresh_site(conn)
            planner = Planner(
                conn,
                self.store,
                self.field_map,
                self.settings.match_by_email,
                self._converters,
                self._suffixes,
                frozenset(self.settings.protected_roles),
                self.bmp_only,
                drupal7=self.schema.major == 7,
            )
            await planner.load(records)
            lifecycle = await decide_batch(
                conn, planner, records, self.settings.on_delete, self.schema.major
            )
            await planner.pick_usernames()
            plan = planner.plan
            now = int(time.time())
            await self.store.create(conn, list(plan.new.values()), now)
            plan.resolve_new_uids()
            await self.store.update(conn, list(plan.changes.values()), now)
            await ledger.save(conn, plan.states.values())
            await lifecycle.save(conn, time.time())
        await self._statistics.created(len(plan.new))
        for record in records:
            decision = plan.decisions[record.index]
            if decision.uid is not None and decision.uid < 0:  # a new user: its uid now
                decision = Outcome(
                    decision.notification_id,
                    decision.record_id,
                    decision.kind,
                    plan.resolve(decision.uid),
                    decision.detail,
                )
            outcomes[record.index] = decision

    async def close(self) -> None:
        await self.engine.dispose()


def check_protected_roles(schema: DrupalSchema, field_map: FieldMap, configured: list[str]) -> None:
    """SFRELAY_PROTECTED_ROLES must name the site's roles; the field map must grant none."""
    known = schema.roles
    for role in configured:
        if known is not None and role not in known:
            others = ", ".join(sorted(set(known) - IMPLICIT_ROLES)) or "none"
            raise ConfigError(
                f"SFRELAY_PROTECTED_ROLES: role {role!r} does not exist on this Drupal site "
                f"(its roles: {others}; D10 machine names, D7 role names)"
            )
    protected = frozenset(configured) | schema.protected_roles
    for obj in field_map.objects.values():
        for role in sorted(set(obj.roles) & protected):
            raise ConfigError(
                f"field map [{obj.sobject}]: role {role!r} is protected (an admin role, a role "
                "with a staff permission such as administer *, or SFRELAY_PROTECTED_ROLES): "
                "sfrelay never grants it; remove it from roles"
            )


def check_field_defaults(schema: DrupalSchema, field_map: FieldMap, dialect: str) -> None:
    """Each [<Object>.defaults] value of a user field must be one its Drupal type takes."""
    converters = field_converters(schema.fields, schema.major, dialect)
    for obj in field_map.objects.values():
        try:
            site_language(obj.defaults.get("langcode"), schema.languages)
        except ValueError as exc:
            raise ConfigError(
                f"field map [{obj.sobject}.defaults]: langcode {exc}: give one of them, or "
                f"leave langcode out of [{obj.sobject}.defaults]"
            ) from None
        for name, value in obj.defaults.items():
            if name not in converters:
                continue
            try:
                converters[name](value)
            except ValueError as exc:
                kind = schema.fields[name].type
                raise ConfigError(
                    f"field map [{obj.sobject}.defaults]: {name} is a field of type {kind!r}: "
                    f"{exc}: give it a value of that type, or leave {name} out of "
                    f"[{obj.sobject}.defaults]"
                ) from None


async def _create_cachetags(engine: AsyncEngine) -> None:
    """Drupal creates cachetags on first use; sfrelay must invalidate before that. Under the
    writer lock: workers starting together on a site without it each saw it missing and
    created it, and all but one failed ("relation already exists", MySQL's 1050)."""
    table = Table(
        "cachetags",
        MetaData(),
        Column("tag", String(255), primary_key=True, server_default=""),
        Column("invalidations", Integer, nullable=False, server_default="0"),
    )
    async with writer(engine) as conn:
        await conn.run_sync(table.create, checkfirst=True)
