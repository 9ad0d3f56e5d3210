"""The rules for one batch, decided in memory from bulk reads, then written in bulk.

Order guard, Lead conversion, email filter, then update / link-by-email / create, with the
batch's own earlier decisions visible to its later records (two records with one email, a
record twice in one batch). Pending new users carry negative keys until their uid exists.

Salesforce never gains power over a privileged account: uid 0 and 1, and every user holding
a protected role (read again for each batch, with the users' roles), are never linked,
updated, blocked or unblocked (`conflict_protected_user`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import MatchByEmail
from app.drupal import ledger
from app.drupal.fieldtypes import TEXT_CONVERTER, Convert, Converter
from app.drupal.ledger import RecordState
from app.drupal.users import ExistingUser, Key, NewUser, UserChange, UserStore
from app.errors import ConfigError, SiteChanged
from app.mapping import FieldMap
from app.outcomes import Outcome, OutcomeKind
from app.records import (
    Record,
    as_text,
    base_values,
    outside_bmp,
    username_base,
    version_digest,
    with_suffix,
    within_bmp,
)

logger = logging.getLogger("sfrelay.worker")

HISTORY_SIZE = 10  # outcomes kept per Salesforce record in sfrelay_record.history
SUPERUSERS = frozenset({0, 1})  # the anonymous user and Drupal's own administrator


@dataclass(slots=True)
class Plan:
    """Everything one batch will write."""

    decisions: dict[int, Outcome] = field(default_factory=dict)  # record index -> outcome
    new: dict[int, NewUser] = field(default_factory=dict)  # negative key -> user
    new_sources: dict[int, Record] = field(default_factory=dict)  # key -> latest record
    changes: dict[int, UserChange] = field(default_factory=dict)  # uid -> change
    renames: dict[int, tuple[Record, str]] = field(default_factory=dict)  # uid -> (rec, name)
    states: dict[str, RecordState] = field(default_factory=dict)

    def resolve(self, key: int | None) -> int | None:
        if key is not None and key < 0:
            return self.new[key].uid
        return key

    def resolve_new_uids(self) -> None:
        """Once the new users have uids: put them where pending keys stood."""
        for st in self.states.values():
            if st.uid is not None and st.uid < 0:
                user = self.new[st.uid]
                st.uid, st.user_key = user.uid, user.key
            for entry in st.history:
                if isinstance(entry.get("uid"), int) and entry["uid"] < 0:
                    entry["uid"] = self.resolve(entry["uid"])


def add_history(st: RecordState, r: Record, decision: Outcome, now: float) -> None:
    entry: dict[str, Any] = {"at": round(now, 3), "n": r.notification_id, "o": decision.kind}
    if decision.uid is not None:
        entry["uid"] = decision.uid  # a pending user's key until Plan.resolve_new_uids()
    if decision.detail:
        entry["d"] = decision.detail
    st.history = [*st.history, entry][-HISTORY_SIZE:]
    st.dirty = True


async def note_failure(conn: AsyncConnection, r: Record, kind: OutcomeKind, detail: str) -> None:
    """Add a failed attempt to the record's history (its batch was rolled back)."""
    states = await ledger.load(conn, [r.sf_id])
    st = states.setdefault(r.sf_id, RecordState(r.sf_id, r.obj.sobject))
    add_history(st, r, Outcome(r.notification_id, r.raw_id, kind, None, detail), time.time())
    await ledger.save(conn, [st])


def _joined(*details: str | None) -> str | None:
    """One outcome detail of several (None: none)."""
    return "; ".join(d for d in details if d) or None


def _address_key(mail: str) -> str:
    """An address in lower case, Greek's final sigma as any sigma (ΟΔΟΣ@ is οδοσ@)."""
    return mail.lower().replace("\u03c2", "\u03c3")


class Planner:
    def __init__(
        self,
        conn: AsyncConnection,
        store: UserStore,
        field_map: FieldMap,
        match_by_email: MatchByEmail,
        converters: dict[str, Converter],
        suffixes: dict[Key, int],
        protected_roles: frozenset[str] = frozenset(),
        bmp_only: frozenset[str] = frozenset(),
        *,
        drupal7: bool = False,
    ) -> None:
        self.conn, self.store, self.field_map = conn, store, field_map
        # The sfrelay names (name, field_*, ...) written to utf8mb3 columns (UserStore.bmp_only)
        self.bmp_only = bmp_only
        self.bmp_name = "name" in bmp_only
        self.bmp_mail = "mail" in bmp_only
        self.drupal7 = drupal7  # usernames without "+" (Drupal 7 refuses it)
        self.match_by_email = match_by_email
        # SFRELAY_PROTECTED_ROLES, on top of the site's own (read in load())
        self.configured_protected = protected_roles
        self.protected: frozenset[str] = protected_roles
        # Drupal field -> its converter (app.drupal.fieldtypes), decided at start-up.
        self.converters = converters
        self.suffixes = suffixes  # base name's key -> highest _<n> known in use
        self.plan = Plan()
        self.existing: dict[int, ExistingUser] = {}
        self.by_mail: dict[str, set[int]] = {}
        self.mail_of: dict[int, str] = {}
        self.owner: dict[int, str] = {}  # uid or key -> the Salesforce Id mapped to it
        # Records whose mapped user was deleted in Drupal -> why (their next outcome's detail),
        # and the uids they were mapped to (forgotten: see forget_gone_users).
        self.gone: dict[str, str] = {}
        self.forgotten: dict[int, str] = {}
        self.now = time.time()
        # per object: (Drupal field, Salesforce field, text length, typed converter or None)
        self._columns: dict[str, tuple[tuple[str, str, int | None, Convert | None], ...]] = {}
        self._custom_defaults: dict[str, dict[str, Any]] = {}

    async def load(self, records: list[Record]) -> None:
        ids = {r.sf_id for r in records} | {r.converted_to for r in records if r.converted_to}
        self.plan.states = await ledger.load(self.conn, ids)
        roles = await self.store.roles(self.conn)
        self.protected = self.configured_protected | roles.protected
        try:  # a role the field map grants, deleted in Drupal since
            self.field_map.check_roles(roles.ids)
        except ConfigError as exc:
            raise SiteChanged.of(exc) from None
        mapped = {s.uid for s in self.plan.states.values() if s.uid is not None}
        mails = {r.mail_key for r in records if r.mail_ok}
        # The database lower-cases its own way (SQLite ASCII only, PostgreSQL without Greek's
        # final sigma): an address beyond ASCII is also looked up as sent, so that the very
        # same text always finds its user. What is found files under the batch's key.
        mails |= {r.email for r in records if r.mail_ok and r.email and not r.email.isascii()}
        found = await self.store.uids_by_mail(self.conn, mails)
        by_mail = {uid for uids in found.values() for uid in uids}
        self.existing = await self.store.users(self.conn, mapped | by_mail)
        self.by_mail = {}
        for mail, uids in found.items():
            self.by_mail.setdefault(mail.lower(), set()).update(uids)
            for uid in uids:
                self.mail_of[uid] = mail.lower()
        for user in self.existing.values():
            # A user found by mail stays under the batch's spelling of it (the database
            # judged them equal), so that a change of its mail leaves no stale entry.
            if user.mail and user.uid not in self.mail_of:
                self.mail_of[user.uid] = user.mail.lower()
                self.by_mail.setdefault(user.mail.lower(), set()).add(user.uid)
        self.forget_gone_users(self.plan.states.values())
        owners = await ledger.owners(self.conn, set(self.mail_of) | mapped)
        self.owner = {uid: sf_id for uid, (sf_id, key) in owners.items() if self.is_user(uid, key)}

    def is_user(self, uid: int, key: str | None) -> bool:
        """Whether the user mapped as (uid, key) is still in Drupal: the uid exists and,
        when sfrelay knows it, with the same ExistingUser.key (not a uid given again)."""
        user = self.existing.get(uid)
        return user is not None and key in (None, user.key)

    def forget_gone_users(self, states: Iterable[RecordState]) -> None:
        """Mappings to users deleted in Drupal are forgotten: the record is then as new (its
        email links or creates a user, by the usual rules), and a uid that Drupal gave again
        to someone else (MySQL before 8.0 after a restart) never hands that person's account
        to the record. The record's next outcome says so in its detail. uid 0 and 1 stay
        mapped (never written: conflict_protected_user)."""
        for st in states:
            uid = st.uid
            if uid is None or uid in SUPERUSERS or self.is_user(uid, st.user_key):
                continue
            why = f"uid {uid} was deleted in Drupal"
            if uid in self.existing:
                why += f" (uid {uid} is another user now)"
            self.gone[st.sf_id] = why
            self.forgotten[uid] = st.sf_id
            st.uid, st.user_key, st.dirty = None, None, True

    def _set_outcome(
        self,
        r: Record,
        kind: OutcomeKind,
        key: int | None = None,
        detail: str | None = None,
        *,
        applied: bool = False,
    ) -> None:
        if r.sf_id in self.gone:  # its first outcome since
            detail = _joined(detail, self.gone.pop(r.sf_id))
        decision = Outcome(r.notification_id, r.raw_id, kind, key, detail)
        self.plan.decisions[r.index] = decision
        st = self._state(r)
        add_history(st, r, decision, self.now)
        if applied:
            if r.modstamp is not None:  # an unstamped version keeps the one applied before
                st.modstamp, st.digest = r.modstamp, self.digest(r)
            st.notification_id = r.notification_id

    def digest(self, r: Record) -> str:
        return version_digest(r.fields, self.field_map.sources[r.obj.sobject])

    def same_version(self, r: Record, st: RecordState) -> bool:
        return st.same_version(r.fields, self.field_map.sources[r.obj.sobject])

    def _protection(self, uid: int) -> str | None:
        """Why sfrelay must not write to this existing user (None: it may)."""
        if uid in SUPERUSERS:
            return f"uid {uid}"
        user = self.existing.get(uid)
        if user is None:
            return f"uid {uid} could not be read"  # never write what could not be checked
        held = sorted(user.roles & self.protected)
        if held:
            return f"uid {uid} has role{'s' if len(held) > 1 else ''} {', '.join(held)}"
        return None

    def _other_mailbox(self, uid: int, r: Record) -> str | None:
        """Why the user the database found by `r`'s email is not that mailbox's: MySQL's
        collations make hans@muller.de equal to hans@m\u00fcller.de (and ß equal to s), so
        Drupal counts the address as taken, but linking would hand that account (its
        password-reset mail) to whoever owns the other mailbox. Linking needs the same
        address but for letter case."""
        mail = self.existing[uid].mail or ""
        if _address_key(mail) == _address_key(r.mail_key):
            return None
        return f"uid {uid} has {mail}: the same address to the database, another mailbox"

    def _granted(self, roles: tuple[str, ...]) -> str | None:
        """A protected role the field map would grant (it became protected after start-up)."""
        held = sorted(set(roles) & self.protected)
        return f"the field map grants role {', '.join(held)}" if held else None

    def decide(self, r: Record) -> None:
        st = self.plan.states.get(r.sf_id)
        if st is not None:
            if r.notification_id and r.notification_id == st.notification_id:
                return self._set_outcome(r, OutcomeKind.DUPLICATE, st.uid)
            if r.modstamp is not None and st.modstamp is not None:
                if r.modstamp < st.modstamp:
                    return self._set_outcome(r, OutcomeKind.STALE, st.uid)
                if r.modstamp == st.modstamp and self.same_version(r, st):
                    return self._set_outcome(r, OutcomeKind.DUPLICATE, st.uid)
            if st.converted_to:
                detail = f"the Lead was converted to {st.converted_to}"
                return self._set_outcome(r, OutcomeKind.STALE, st.uid, detail)
        if r.converted_to:
            return self._convert(r, st)
        if r.email is None:
            return self._set_outcome(r, OutcomeKind.SKIPPED_NO_EMAIL)
        if not r.mail_ok or (self.bmp_mail and outside_bmp(r.email or "")):
            # (a letter beyond the BMP in an address, which a utf8mb3 mail column cannot hold
            # and U+FFFD would make another address)
            return self._set_outcome(r, OutcomeKind.SKIPPED_INVALID_EMAIL, detail=r.email)
        if granted := self._granted(r.obj.roles):
            return self._set_outcome(r, OutcomeKind.CONFLICT_PROTECTED_USER, None, granted)
        key = st.uid if st is not None else None
        if key is not None and (key < 0 or key in self.existing):
            return self._update(r, key, OutcomeKind.UPDATED)
        candidates = self.by_mail.get(r.mail_key, set())
        if not candidates:
            return self._create(r)
        only = next(iter(candidates))
        if (
            len(candidates) > 1
            or self.match_by_email == "false"
            or only < 0
            or self.owner.get(only, r.sf_id) != r.sf_id
        ):
            # Linking would merge two Salesforce records (or pick one of several users).
            others = [self.owner.get(k) or f"uid {k}" for k in sorted(candidates)]
            return self._set_outcome(
                r, OutcomeKind.CONFLICT_DUPLICATE_EMAIL, None, ", ".join(others)
            )
        if why := self._protection(only):
            return self._set_outcome(r, OutcomeKind.CONFLICT_PROTECTED_USER, None, why)
        if why := self._other_mailbox(only, r):
            return self._set_outcome(r, OutcomeKind.CONFLICT_DUPLICATE_EMAIL, None, why)
        if self.match_by_email == "never-logged-in" and self.existing[only].login != 0:
            detail = f"uid {only} has logged in (SFRELAY_MATCH_BY_EMAIL=never-logged-in)"
            return self._set_outcome(r, OutcomeKind.CONFLICT_DUPLICATE_EMAIL, None, detail)
        return self._update(r, only, OutcomeKind.LINKED)

    def _state(self, r: Record) -> RecordState:
        st = self.plan.states.get(r.sf_id)
        if st is None:
            st = self.plan.states[r.sf_id] = RecordState(r.sf_id, r.obj.sobject)
        return st

    def _map(self, r: Record, key: int) -> RecordState:
        st = self._state(r)
        st.uid, st.object, st.dirty = key, r.obj.sobject, True
        # A new user's is known once it is made (Plan.resolve_new_uids).
        st.user_key = self.existing[key].key if key >= 0 else None
        self.owner[key] = r.sf_id
        return st

    def _set_mail(self, key: int, mail: str) -> None:
        old = self.mail_of.get(key)
        if old is not None and old != mail:
            self.by_mail.get(old, set()).discard(key)
        self.mail_of[key] = mail
        self.by_mail.setdefault(mail, set()).add(key)

    def _base_values(
        self, r: Record, defaults: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], str | None]:
        """The record's base values (over `defaults`), the preferred language as one of the
        site's (app.drupal.fieldtypes.site_language), and what was not written (None: all
        was). A language the site does not have is left out: as it was on an update, the
        default on a new user."""
        values = base_values(r)
        refused = None
        language = self.converters.get("langcode")
        if language is not None and "langcode" in values:
            try:
                values["langcode"] = language(values["langcode"])
            except ValueError as exc:
                del values["langcode"]
                refused = f"langcode not written ({r.obj.base['langcode']}: {exc})"
                logger.warning(
                    "%s %s: langcode not written: its %s value is not one of the site's "
                    "languages (sfrelay why %s)",
                    r.obj.sobject,
                    r.raw_id,
                    r.obj.base["langcode"],
                    r.raw_id,
                )
        if defaults:
            merged = {**defaults, **values}
            if language is not None and "langcode" in defaults and "langcode" not in values:
                # (checked at start-up: app.sync.check_field_defaults)
                merged["langcode"] = language(defaults["langcode"])
            values = merged
        return values, refused

    def _field_values(self, r: Record) -> tuple[dict[str, Any], str | None]:
        """The record's values of the mapped user fields, each as its Drupal type stores it,
        and what could not be converted (None: all were). Such a field is left out: as it
        was on an update, empty on a new user."""
        columns = self._columns.get(r.obj.sobject)
        if columns is None:  # once per object and batch
            converters = [
                (d, s, self.converters.get(d, TEXT_CONVERTER)) for d, s in r.obj.fields.items()
            ]
            columns = tuple((d, s, c.length, c.typed) for d, s, c in converters)
            self._columns[r.obj.sobject] = columns
        values = r.fields
        try:  # the usual case: every value converts (text: as_text called as it always was)
            return {
                drupal: as_text(values[s], n) if typed is None else typed(values[s])
                for drupal, s, n, typed in columns
                if s in values
            }, None
        except ValueError:
            pass
        converted: dict[str, Any] = {}
        refused = []
        for drupal, source, n, typed in columns:
            if source not in values:
                continue
            value = values[source]
            try:
                converted[drupal] = as_text(value, n) if typed is None else typed(value)
            except ValueError as exc:
                refused.append(f"{drupal} not written ({source}: {exc})")
                # Without the value, which may be personal data: `sfrelay why` shows it.
                logger.warning(
                    "%s %s: %s not written: its %s value does not fit the Drupal field "
                    "(sfrelay why %s)",
                    r.obj.sobject,
                    r.raw_id,
                    drupal,
                    source,
                    r.raw_id,
                )
        return converted, "; ".join(refused)

    def _create(self, r: Record) -> None:
        key = -(len(self.plan.new) + 1)
        base, unwritten = self._base_values(r, r.obj.defaults)
        custom = self._custom_defaults.get(r.obj.sobject)
        if custom is None:
            defaults = r.obj.defaults.items()
            # (checked at start-up: app.sync.check_field_defaults)
            custom = {
                k: self.converters.get(k, TEXT_CONVERTER)(v)
                for k, v in defaults
                if k.startswith("field_")
            }
            self._custom_defaults[r.obj.sobject] = custom
        values, refused = self._field_values(r)
        fields = {**custom, **values}
        detail = self._fit(r, base, fields, named=True) if self.bmp_only else None
        detail = _joined(detail, unwritten, refused)
        user = NewUser("", r.email or "", base, fields, r.obj.roles)
        self.plan.new[key] = user
        self.plan.new_sources[key] = r
        self._map(r, key)
        self._set_mail(key, r.mail_key)
        self._set_outcome(r, OutcomeKind.CREATED, key, detail, applied=True)

    def _fit(
        self, r: Record, base: dict[str, Any], fields: dict[str, Any], *, named: bool
    ) -> str | None:
        """Values for columns that hold no character outside the BMP (MySQL utf8mb3, Drupal 7's
        default; Drupal itself cannot store one there): each such character becomes U+FFFD
        and the username goes without them (Drupal refuses U+FFFD in a name). `named`: the
        record's username is picked (a new user, a rename). What changed, for the outcome's
        detail; None when nothing did (an ASCII value costs one isascii())."""
        replaced = []
        for values in (base, fields):
            for drupal, value in values.items():
                if type(value) is str and outside_bmp(value) and drupal in self.bmp_only:
                    values[drupal] = within_bmp(value)
                    replaced.append(drupal)
        dropped = (
            named
            and self.bmp_name
            and any(type(v) is str and outside_bmp(v) for v in r.fields.values())
            and self._username(r, bmp_only=True) != self._username(r, bmp_only=False)
        )
        if not replaced and not dropped:
            return None
        parts = [f"replaced with U+FFFD in {', '.join(sorted(replaced))}"] if replaced else []
        if dropped:
            parts.append("dropped from name")
        return "utf8mb3 column: characters outside the BMP " + "; ".join(parts)

    def _update(self, r: Record, key: int, outcome: OutcomeKind) -> None:
        if key >= 0 and (why := self._protection(key)):
            # Mapped before it became protected: the mapping stays, nothing is written.
            shown = key if outcome is OutcomeKind.UPDATED else None
            return self._set_outcome(r, OutcomeKind.CONFLICT_PROTECTED_USER, shown, why)
        clash = sorted(k for k in self.by_mail.get(r.mail_key, set()) if k != key)
        if clash:
            detail = ", ".join(self.owner.get(k) or f"uid {k}" for k in clash)
            return self._set_outcome(r, OutcomeKind.CONFLICT_DUPLICATE_EMAIL, key, detail)
        self._map(r, key)
        self._set_mail(key, r.mail_key)
        (values, unwritten), (fields, refused) = self._base_values(r), self._field_values(r)
        altered = None
        if self.bmp_only:
            named = key < 0 or self.field_map.update_username
            altered = self._fit(r, values, fields, named=named)
        altered = _joined(altered, unwritten, refused)
        base = {**values, "mail": r.email}
        if key < 0:  # created earlier in this batch: the newer values win
            user = self.plan.new[key]
            user.mail = r.email or user.mail
            user.base.update(values)
            user.fields.update(fields)
            self.plan.new_sources[key] = r
        else:
            change = self.plan.changes.get(key)
            if change is None:
                langcodes = self.existing[key].langcodes
                change = UserChange(key, {}, {}, (), langcodes)
                self.plan.changes[key] = change
            change.base.update(base)
            if change.base["mail"] == self.existing[key].mail:
                # Unchanged (byte for byte, as most updates are): no UPDATE of the mail
                # column and its indexes (Drupal's, sfrelay's lower(mail)) for nothing.
                del change.base["mail"]
            change.fields.update(fields)
            change.roles = tuple(dict.fromkeys((*change.roles, *r.obj.roles)))
            if self.field_map.update_username:
                self.plan.renames[key] = (r, self.existing[key].name)
        self._set_outcome(r, outcome, key, altered, applied=True)

    def _convert(self, r: Record, st: RecordState | None) -> None:
        if st is None or st.uid is None:
            detail = "the Lead was never synced; the Contact's own notifications sync it"
            return self._set_outcome(r, OutcomeKind.SKIPPED_CONVERTED, None, detail)
        key, target_id = st.uid, r.converted_to or ""
        contact = self.field_map.objects.get("Contact", r.obj)
        why = self._protection(key) if key in self.existing or key in SUPERUSERS else None
        if why := why or self._granted(contact.roles):
            return self._set_outcome(r, OutcomeKind.CONFLICT_PROTECTED_USER, key, why)
        target = self.plan.states.get(target_id)
        if target is not None and target.uid not in (None, key) and not target.converted_to:
            detail = f"Contact {target_id} is already mapped to uid {target.uid}: merge in Drupal"
            return self._set_outcome(r, OutcomeKind.FAILED, key, detail)
        if target is None:
            target = self.plan.states[target_id] = RecordState(target_id, "Contact")
        # The Contact's own versions apply from now on: it starts without a modstamp.
        target.uid, target.object, target.dirty = key, "Contact", True
        target.user_key = st.user_key
        st.converted_to = target_id
        self.owner[key] = target_id
        ids = {f: r.converted_raw for f, source in contact.fields.items() if source == "Id"}
        if key < 0:
            self.plan.new[key].fields.update(ids)
        elif key in self.existing:
            change = self.plan.changes.setdefault(
                key, UserChange(key, {}, {}, (), self.existing[key].langcodes)
            )
            change.fields.update(ids)
            change.roles = tuple(dict.fromkeys((*change.roles, *contact.roles)))
        self._set_outcome(r, OutcomeKind.CONVERTED, key, target_id, applied=True)

    def _username(self, r: Record, *, bmp_only: bool) -> str:
        return username_base(r, self.field_map, bmp_only=bmp_only, drupal7=self.drupal7)

    async def pick_usernames(self) -> None:
        """Unique usernames for the new users (and renames, when configured).

        Names are compared by their keys (UserStore.name_keys): exactly as the database's
        unique index compares them (Unicode case, and accents on MySQL), never Python's
        lower(). Exact look-ups only, indexed: the names wanted, then, for bases already
        taken, the highest `_<n>` in use, remembered in `suffixes` across batches; suffixed
        picks are checked against the database and the batch again, so a stale memory only
        costs a round. A few round trips per batch, whatever its size.
        """
        store, conn, bmp = self.store, self.conn, self.bmp_name
        wanted: dict[int, str] = {
            key: self._username(r, bmp_only=bmp) for key, r in self.plan.new_sources.items()
        }
        renames = self.plan.renames
        current = {uid: name for uid, (_, name) in renames.items()}
        renamed = {uid: self._username(r, bmp_only=bmp) for uid, (r, _) in renames.items()}
        stems: dict[str, str] = {}
        for name in current.values():
            stem, _, number = name.rpartition("_")
            if number.isdigit():
                stems[name] = stem
        if not wanted and not renamed:
            return
        keys = await store.name_keys(
            conn, {*wanted.values(), *renamed.values(), *current.values(), *stems.values()}
        )
        own = {uid: keys[name] for uid, name in current.items()}  # a rename keeps its own
        for uid, base in renamed.items():
            # Already this name, or this name with the suffix it needed: keep it.
            stem_key = keys[stems[current[uid]]] if current[uid] in stems else None
            if keys[base] not in (own[uid], stem_key):
                wanted[uid] = base
        picked: dict[int, str] = {}
        claimed: dict[Key, int] = {}  # key -> who took it in this batch
        taken = await store.taken_names(conn, set(wanted.values()))
        reprobed: set[str] = set()  # bases whose suffix was probed again in this batch
        while wanted:
            unknown = {keys[b] for b in wanted.values()} & taken - self.suffixes.keys()
            if unknown:
                bases = {b for b in wanted.values() if keys[b] in unknown}
                self.suffixes.update(await store.max_suffixes(conn, bases))
            proposed: dict[int, str] = {}
            for key in sorted(wanted, key=lambda k: (k > 0, abs(k))):
                base = wanted[key]
                bk = keys[base]
                if bk == own.get(key) or (bk not in taken and bk not in claimed):
                    picked[key], claimed[bk] = base, key
                    continue
                self.suffixes[bk] = self.suffixes.get(bk, 1) + 1
                proposed[key] = with_suffix(base, self.suffixes[bk])
            if not proposed:
                break
            # Suffixed picks came from memory: the database says whether they are in use
            # (another writer may hold one) and what they equal (two picks, one key).
            keys.update(await store.name_keys(conn, proposed.values()))
            in_use = await store.taken_names(conn, proposed.values())
            taken |= in_use
            retry: dict[int, str] = {}
            behind: set[str] = set()
            for key in sorted(proposed, key=lambda k: (k > 0, abs(k))):
                name = proposed[key]
                if keys[name] in in_use or keys[name] in claimed:
                    retry[key] = wanted[key]
                    if keys[name] in in_use:
                        behind.add(wanted[key])
                    continue
                picked[key], claimed[keys[name]] = name, key
            if behind:  # memory is behind the database: read it again (never go back)
                # Probed again first (another worker took names since: the probe finds its
                # picks); read exactly (every namesake) only for a base behind twice, where
                # a gap or a case difference misleads the probe.
                exact = behind & reprobed
                reprobed |= behind
                found = {}
                if behind - exact:
                    found.update(await store.max_suffixes(conn, behind - exact))
                if exact:
                    found.update(await store.max_suffixes(conn, exact, exact=True))
                for bk, n in found.items():
                    self.suffixes[bk] = max(self.suffixes.get(bk, 1), n)
            wanted = retry
        for key, name in picked.items():
            if key < 0:
                self.plan.new[key].name = name
            elif keys[name] != own[key]:
                self.plan.changes[key].base["name"] = name
