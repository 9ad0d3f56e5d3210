"""`sfrelay why ID_OR_EMAIL`: what happened to one Salesforce record, or to one email.

Reads, never writes: sfrelay_record (uid, last applied version, the last outcomes), Drupal's
user table (for an email), the queue's jobs (a scan: fine for one question) and the dead
letters in Redis and in sfrelay_dead_letter. Emails are shown only when the question was
that email; any other email in a detail or an error is masked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from arq.jobs import DeserializationError
from redis.exceptions import RedisError
from sqlalchemy import column, func, select, table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app import dead
from app.config import Settings
from app.dead import DeadLetter
from app.drupal import ledger
from app.drupal.errors import driver_text
from app.drupal.readonly import read_engine, table_names
from app.drupal.schema import detect_major
from app.errors import QueueUnavailable, RetryableError
from app.jobs import read as read_job
from app.outcomes import OutcomeKind
from app.queue import JOB_KEY_PREFIX, redis_client
from app.sfid import sf_key

_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
_EMAIL_LIKE = re.compile(r"[^\s@,;:()<>\"']+@[^\s@,;:()<>\"']+")
_PREFIXES = {"003": "Contact", "00Q": "Lead"}
_SCAN_CHUNK = 500


class BadQuery(ValueError):
    """Neither a Salesforce Id nor an email."""


@dataclass(frozen=True, slots=True)
class Query:
    text: str  # as given
    kind: str  # "record" | "email"
    key: str  # the 18-character case-correct Id, or the lower-cased email


def parse_query(value: str) -> Query:
    value = value.strip()
    if "@" in value:
        return Query(value, "email", value.lower())
    if not _ID.fullmatch(value):
        raise BadQuery(
            f"{value!r} is neither a Salesforce record Id (15 or 18 letters and digits, "
            "e.g. 0031I00000AbCdEQAZ) nor an email"
        )
    return Query(value, "record", sf_key(value))


@dataclass(slots=True)
class Answer:
    query: str
    kind: str
    id: str | None  # the 18-character Id asked about (record queries)
    email: str | None  # the email asked about (email queries)
    users: list[dict[str, Any]] = field(default_factory=list)  # Drupal users with the email
    records: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    queued: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def found(self) -> bool:
        return bool(self.users or self.records or self.conflicts or self.queued or self.dead)


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _modstamp_iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    seconds, rest = divmod(micros, 1_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{rest // 1000:03d}Z"


def _same_record(raw: Any, key: str) -> bool:
    return isinstance(raw, str) and _ID.fullmatch(raw) is not None and sf_key(raw) == key


def _mask(text: str | None, email: str | None) -> str | None:
    """Any email but the one asked about becomes <email>."""
    if text is None:
        return None
    return _EMAIL_LIKE.sub(
        lambda m: m.group(0) if email and m.group(0).lower() == email else "<email>", text
    )


async def answer(settings: Settings, query: Query) -> Answer:
    result = Answer(
        query=query.text,
        kind=query.kind,
        id=query.key if query.kind == "record" else None,
        email=query.key if query.kind == "email" else None,
    )
    await _from_database(settings, query, result)
    await _from_redis(settings, query, result)
    return result


async def _from_database(settings: Settings, query: Query, result: Answer) -> None:
    engine = read_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            tables = await table_names(conn)
            major, _ = await detect_major(conn, settings.drupal_version)
            has_records = ledger.records.name in tables
            if query.kind == "record":
                if has_records:
                    result.records = await _records(conn, [query.key], None, major, None)
            else:
                users = await _users_by_mail(conn, major, query.key)
                uids = [u["uid"] for u in users]
                if has_records and uids:
                    mapped = await _records(conn, None, uids, major, query.key)
                    # (not a record whose user was deleted and its uid given to this one)
                    mapped = [r for r in mapped if not r["drupal_uid_given_again"]]
                    for user in users:
                        user["records"] = [r["id"] for r in mapped if r["uid"] == user["uid"]]
                    result.records = mapped
                    owners = {r["id"] for r in mapped if r["converted_to"] is None}
                    owners |= {f"uid {uid}" for uid in uids}
                    result.conflicts = await _conflicts(conn, owners, major, query.key)
                if has_records:
                    # No user holds an address Drupal refuses: the history's detail does.
                    shown = {r["id"] for r in result.records}
                    refused = await _refused_email(conn, major, query.key)
                    result.records += [r for r in refused if r["id"] not in shown]
                result.users = users
            result.dead = await _database_dead(conn, query)
    except (DBAPIError, OSError) as exc:  # asyncpg: a refused connection is a bare OSError
        raise RetryableError(f"cannot read the Drupal database: {driver_text(exc)}") from exc
    finally:
        await engine.dispose()


async def _users_by_mail(conn: AsyncConnection, major: int, mail: str) -> list[dict[str, Any]]:
    users = table("users_field_data" if major == 10 else "users", column("uid"), column("mail"))
    rows = await conn.execute(
        select(users.c.uid)
        .where(func.lower(users.c.mail) == mail, users.c.uid > 0)
        .order_by(users.c.uid)
    )
    return [{"uid": int(uid), "records": []} for (uid,) in rows]


async def _existing_uids(conn: AsyncConnection, major: int, uids: set[int]) -> dict[int, str]:
    """The users of `uids` that exist, each with who it is beyond its uid (sfrelay_record's
    user_key: Drupal 8+ its uuid, Drupal 7 its created time)."""
    if not uids:
        return {}
    users = table("users", column("uid"), column("uuid" if major == 10 else "created"))
    key = users.c.uuid if major == 10 else users.c.created
    rows = await conn.execute(select(users.c.uid, key).where(users.c.uid.in_(sorted(uids))))
    return {int(uid): str(value) for uid, value in rows}


def _record(row: Any, existing: dict[int, str], email: str | None) -> dict[str, Any]:
    history = []
    for entry in orjson.loads(row.history):
        history.append(
            {
                "at": iso(entry.get("at")),
                "outcome": entry.get("o"),
                "uid": entry.get("uid"),
                "detail": _mask(entry.get("d"), email),
                "notification_id": entry.get("n"),
            }
        )
    # A uid deleted in Drupal and given again (MySQL before 8.0) is another user: the record's
    # next version forgets it (app.plan), until then the ledger still names it.
    replaced = row.uid in existing and row.user_key not in (None, existing[row.uid])
    return {
        "id": row.sf_id,
        "object": row.object,
        "uid": row.uid,
        "drupal_user_exists": None if row.uid is None else row.uid in existing and not replaced,
        "drupal_uid_given_again": replaced,
        "last_version": _modstamp_iso(row.modstamp),
        "last_notification_id": row.notification_id,
        "converted_to": row.converted_to,
        "updated_at": iso(row.updated_at),
        "history": history,
    }


async def _records(
    conn: AsyncConnection,
    ids: list[str] | None,
    uids: list[int] | None,
    major: int,
    email: str | None,
) -> list[dict[str, Any]]:
    t = ledger.records
    query = select(t).order_by(t.c.sf_id)
    query = query.where(t.c.sf_id.in_(ids)) if ids is not None else query
    query = query.where(t.c.uid.in_(uids)) if uids is not None else query
    rows = (await conn.execute(query)).all()
    existing = await _existing_uids(conn, major, {r.uid for r in rows if r.uid is not None})
    return [_record(row, existing, email) for row in rows]


async def _with_outcome(
    conn: AsyncConnection,
    outcome: OutcomeKind,
    detail_matches: Callable[[str], bool],
    major: int,
    email: str,
) -> list[dict[str, Any]]:
    """Records whose last outcomes include `outcome` with a detail `detail_matches`. A scan of
    the rows that ever had that outcome (LIKE narrows it; each history is then parsed): fine
    for one question."""
    t = ledger.records
    rows = (
        await conn.execute(
            select(t).where(t.c.history.like(f'%"{outcome.value}"%')).order_by(t.c.sf_id)
        )
    ).all()
    found = [
        row
        for row in rows
        if any(
            entry.get("o") == outcome and detail_matches(entry.get("d") or "")
            for entry in orjson.loads(row.history)
        )
    ]
    existing = await _existing_uids(conn, major, {r.uid for r in found if r.uid is not None})
    return [_record(row, existing, email) for row in found]


async def _conflicts(
    conn: AsyncConnection, owners: set[str], major: int, email: str
) -> list[dict[str, Any]]:
    """Records refused because one of `owners` (the Salesforce Ids and `uid <n>` holding the
    email) has it."""
    return await _with_outcome(
        conn,
        OutcomeKind.CONFLICT_DUPLICATE_EMAIL,
        lambda detail: bool(set(detail.split(", ")) & owners),
        major,
        email,
    )


async def _refused_email(conn: AsyncConnection, major: int, email: str) -> list[dict[str, Any]]:
    """Records skipped because `email` (as the question lower-cases it) is not one Drupal
    accepts: the skip's detail is the address as Salesforce sent it."""
    return await _with_outcome(
        conn,
        OutcomeKind.SKIPPED_INVALID_EMAIL,
        lambda detail: detail.strip().lower() == email,
        major,
        email,
    )


async def _database_dead(conn: AsyncConnection, query: Query) -> list[dict[str, Any]]:
    if query.kind == "record":
        letters = await dead.in_database(conn, record_id=query.key)
    else:
        letters = await dead.in_database(conn, with_email=True)  # narrowed by Email below
    email = query.key if query.kind == "email" else None
    return [_dead(letter, email) for letter in letters if _letter_matches(letter, query)]


def _letter_matches(letter: DeadLetter, query: Query) -> bool:
    notification = letter.notification
    if notification is not None:
        fields = notification.fields
    else:  # refused on receipt: only its record Id is known
        fields = {"Id": letter.record_id} if letter.record_id else {}
    return _matches({"fields": fields}, query, letter.record_id)


def _dead(letter: DeadLetter, email: str | None) -> dict[str, Any]:
    return {
        "id": letter.id,
        "source": letter.kept.value if letter.kept else None,
        "notification_id": letter.notification_id,
        "record_id": letter.record_id,
        "error": _mask(letter.error, email),
        "attempts": letter.attempts,
        "first_seen": iso(letter.first_seen),
        "last_seen": iso(letter.last_seen),
    }


def _matches(notification: dict[str, Any], query: Query, record_id: Any = None) -> bool:
    fields = notification.get("fields") or {}
    if query.kind == "record":
        return _same_record(record_id if record_id is not None else fields.get("Id"), query.key)
    mail = fields.get("Email")
    return isinstance(mail, str) and mail.strip().lower() == query.key


async def _from_redis(settings: Settings, query: Query, result: Answer) -> None:
    redis = redis_client(settings, timeout_s=10)
    email = query.key if query.kind == "email" else None
    try:
        scores = await redis.zrange(settings.queue_name, 0, -1, withscores=True)
        for start in range(0, len(scores), _SCAN_CHUNK):
            chunk = scores[start : start + _SCAN_CHUNK]
            raws = await redis.mget([JOB_KEY_PREFIX + job_id.decode() for job_id, _ in chunk])
            for (job_id, score), raw in zip(chunk, raws, strict=True):
                result.queued += _queued(job_id.decode(), score, raw, query)
        kept = await dead.in_redis(redis)
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot read the queue (Redis): {exc}") from exc
    finally:
        await redis.aclose()
    result.dead += [_dead(letter, email) for letter in kept if _letter_matches(letter, query)]


def _queued(job_id: str, score: float, raw: bytes | None, query: Query) -> list[dict[str, Any]]:
    if raw is None:
        return []
    try:
        job = read_job(raw)
    except (DeserializationError, ValueError, KeyError, TypeError):
        return []  # not one of ours
    found = []
    for item in job.notifications:
        if _matches({"fields": item.fields}, query):
            found.append(
                {
                    "job_id": job_id,
                    "notification_id": item.id,
                    "record_id": item.record_id,
                    "object": item.object,
                    "received_at": iso(job.received_at or None),
                    "ready_at": iso(score / 1000),
                    "attempt": item.attempt,
                }
            )
    return found


# What each outcome means, for someone who knows Salesforce but not sfrelay.
_MEANING: dict[str, str] = {
    OutcomeKind.CREATED: "created Drupal user {uid}",
    OutcomeKind.UPDATED: "updated Drupal user {uid}",
    OutcomeKind.LINKED: "linked to the existing Drupal user {uid}, which has the same email",
    OutcomeKind.CONVERTED: (
        "the Lead was converted: Drupal user {uid} now belongs to Contact {detail}"
    ),
    OutcomeKind.SKIPPED_NO_EMAIL: "skipped: the record has no email, and a Drupal user needs one",
    OutcomeKind.SKIPPED_INVALID_EMAIL: "skipped: its email is not one Drupal accepts",
    OutcomeKind.SKIPPED_CONVERTED: "skipped: {detail}",
    OutcomeKind.STALE: "ignored: older than the version already applied",
    OutcomeKind.DUPLICATE: "ignored: this version was already applied",
    OutcomeKind.CONFLICT_DUPLICATE_EMAIL: (
        "NOT synced: its email already belongs to {detail} in Drupal; give one of them "
        "another email in Salesforce, or merge them"
    ),
    OutcomeKind.CONFLICT_PROTECTED_USER: (
        "NOT synced: a protected Drupal account ({detail}); sfrelay never changes uid 0, uid 1 "
        "or a user holding a protected role (SFRELAY_PROTECTED_ROLES), so nothing was written"
    ),
    OutcomeKind.BLOCKED: (
        "deleted in Salesforce: Drupal user {uid} was blocked (SFRELAY_ON_DELETE=block); "
        "undeleting the record unblocks it"
    ),
    OutcomeKind.UNBLOCKED: (
        "undeleted in Salesforce: Drupal user {uid}, which sfrelay had blocked, was unblocked"
    ),
    OutcomeKind.UNLINKED: (
        "deleted in Salesforce: no longer linked to Drupal user {uid}, which was left as it "
        "was (SFRELAY_ON_DELETE=unlink)"
    ),
    OutcomeKind.MERGED: "merged in Salesforce: {detail} (Drupal user {uid})",
    OutcomeKind.DELETED: "deleted in Salesforce; nothing changed in Drupal: {detail}",
    OutcomeKind.API_LIMIT: (
        "not read from Salesforce: the org's daily API requests ran low "
        "(SFRELAY_SF_MIN_API_REMAINING); the next reconcile resumes"
    ),
    OutcomeKind.RETRY: "failed for now, retried later: {detail}",
    OutcomeKind.FAILED: "FAILED: {detail} (`sfrelay dead list` shows the notification)",
}


# Outcomes whose detail says what of the record was not written as sent (a field value the
# Drupal field cannot take, a character a utf8mb3 column cannot hold).
_WRITTEN = frozenset({OutcomeKind.CREATED, OutcomeKind.UPDATED, OutcomeKind.LINKED})


def _label(sf_id: str) -> str:
    return f"{_PREFIXES.get(sf_id[:3], 'record')} {sf_id}"


def _others(detail: str) -> str:
    """`003..., uid 5` as a Salesforce admin reads it."""
    parts = []
    for part in detail.split(", "):
        if part.startswith("uid "):
            parts.append(f"Drupal user {part[4:]} (not linked to Salesforce)")
        else:
            parts.append(_label(part))
    return " and ".join(parts)


def meaning(entry: dict[str, Any], email: str | None) -> str:
    outcome = entry["outcome"]
    detail = entry["detail"] or ""
    if outcome == OutcomeKind.CONFLICT_DUPLICATE_EMAIL:
        detail = _others(detail)
    text = _MEANING.get(outcome, f"{outcome}: {{detail}}").format(uid=entry["uid"], detail=detail)
    if outcome == OutcomeKind.SKIPPED_INVALID_EMAIL and email and entry["detail"]:
        text += f" ({entry['detail']})"
    if outcome == OutcomeKind.STALE and entry["detail"]:
        text += f" ({entry['detail']})"
    if outcome in _WRITTEN and entry["detail"]:  # what was not written as sent, and why
        text += f"; {entry['detail']}"
    if outcome == OutcomeKind.BLOCKED and entry["detail"]:  # a merge whose survivor has a user
        text = (
            f"merged in Salesforce: {entry['detail']}; Drupal user {entry['uid']} (the merged "
            "record's) was blocked, the survivor's user kept"
        )
    return text


def _when(value: str | None) -> str:
    return value.replace("T", " ").replace("Z", " UTC") if value else "-"


def _record_lines(record: dict[str, Any], email: str | None) -> list[str]:
    label = f"{record['object']} {record['id']}"
    if record["converted_to"]:
        target = record["converted_to"]
        head = f"{label} -> converted to Contact {target} (see `sfrelay why {target}`)"
    elif record["uid"] is None:
        head = f"{label} -> no Drupal user"
    else:
        head = f"{label} -> Drupal user {record['uid']}"
        if record["drupal_uid_given_again"]:
            head += " (deleted in Drupal since; that uid is another user's now)"
        elif record["drupal_user_exists"] is False:
            head += " (deleted in Drupal since)"
    lines = [head]
    if record["last_version"]:
        lines.append(
            f"  last applied version: {_when(record['last_version'])} "
            f"(notification {record['last_notification_id'] or '-'})"
        )
    else:
        lines.append("  last applied version: none")
    history = record["history"]
    lines.append(f"  history (last {len(history)} outcomes, oldest first):")
    for entry in history:
        lines.append(f"    {_when(entry['at'])}  {entry['outcome']:<24}  {meaning(entry, email)}")
    return lines


def render(result: Answer) -> list[str]:
    email = result.email
    lines: list[str] = []
    if result.kind == "email":
        if result.users:
            uids = ", ".join(str(u["uid"]) for u in result.users)
            plural = "s" if len(result.users) > 1 else ""
            lines.append(f"{email}: Drupal user{plural} {uids}")
            for user in result.users:
                mapped = ", ".join(_label(i) for i in user["records"]) or "no Salesforce record"
                lines.append(f"  Drupal user {user['uid']} <- {mapped}")
        else:
            lines.append(f"{email}: no Drupal user has this email")
    elif not result.records:
        lines.append(f"{_label(result.id or '')}: sfrelay has not applied any notification for it")
    for record in result.records:
        lines += _record_lines(record, email)
    if result.conflicts:
        lines.append(f"records not synced because {email} is taken:")
        for record in result.conflicts:
            lines += ["  " + line for line in _record_lines(record, email)]
    if result.queued:
        lines.append("queued now:")
        for item in result.queued:
            when = f"received {_when(item['received_at'])}"
            if item["attempt"] > 1:
                when += f", try {item['attempt']}"
            if item["ready_at"] and item["ready_at"] > (iso(time.time()) or ""):
                when += f", waiting for a retry until {_when(item['ready_at'])}"
            lines.append(
                f"  notification {item['notification_id']} for "
                f"{_label(item['record_id'] or '-')} ({when})"
            )
    else:
        lines.append("queued now: nothing")
    if result.dead:
        lines.append(
            "dead letters (`sfrelay dead replay ID` after fixing the cause; those refused on "
            "receipt: `sfrelay dead discard ID`):"
        )
        for letter in result.dead:
            lines.append(
                f"  {letter['id']}: notification {letter['notification_id'] or '-'} for "
                f"{_label(letter['record_id'] or '-')}, {letter['attempts']} tries, last "
                f"{_when(letter['last_seen'])}: {letter['error']}"
            )
    else:
        lines.append("dead letters: none")
    return lines
