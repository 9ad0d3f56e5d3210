"""One notification as a sync record: its Id, version, email and the Drupal values it maps to."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson

from app.errors import RecordError
from app.jobs import JobNotification
from app.mapping import FieldMap, ObjectMap, render
from app.sfid import sf_key

NAME_MAX = 60  # Drupal's UserInterface::USERNAME_MAX_LENGTH
MAIL_MAX = 254  # Drupal's users_field_data.mail / D7 users.mail
_NAME_PUNCTUATION = frozenset(" .@+_'-")
# ASCII whitespace stays for split() to make a word separator of; other controls go.
_NOT_NAME_ASCII = re.compile(r"[^A-Za-z0-9 \t\n\r\f\v.@+_'-]")
# The code points Drupal's UserNameConstraintValidator refuses (its /u regex), as ranges.
_DRUPAL_REFUSED = (
    (0x00, 0x1F), (0x80, 0xA0), (0xAD, 0xAD), (0x2000, 0x200F), (0x2028, 0x202F),
    (0x205F, 0x206F), (0xFEFF, 0xFEFF), (0xFF01, 0xFF60), (0xFFF9, 0xFFFD),
)  # fmt: skip
# Non-ASCII names, before the per-character rule: those code points dropped, but the
# full-width forms of ASCII (U+FF01-FF5E: NFKC gives the ASCII character, which the ASCII
# rule then judges) and the space separators (Zs: NBSP, U+2000-200A, U+202F, U+205F,
# U+3000, ...) made a plain space, which separates words as a space does.
_NAME_TRANSLATION: dict[int, str | None] = {
    c: None for low, high in _DRUPAL_REFUSED for c in range(low, high + 1)
}
_NAME_TRANSLATION.update({c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFF5F)})
_NAME_TRANSLATION.update(  # no Zs past U+3000; line breaks separate words too
    {c: " " for c in range(0x80, 0x3001) if unicodedata.category(chr(c)) == "Zs"}
    | {ord(c): " " for c in "\t\n\v\f\r\x85\u2028\u2029"}
)
# Drupal 7's valid_email_address(), the stricter of the two majors (D10's RFC validator
# accepts all of these too), and no dot at either end of the local part or doubled.
# Each character can match one way only (labels are split by their dots): the time is
# linear in the address, never the exponential backtracking of nested repeats.
_LOCAL_CHARS = r"a-zA-Z0-9_\-\.\+\^!#\$%&*+\/\=\?\`\|\{\}~\'"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_IPV4 = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"
_IPV6 = r"[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4}){7}"
_EMAIL = re.compile(rf"[{_LOCAL_CHARS}]+@(?:{_DOMAIN}|\[(?:{_IPV4}|{_IPV6})\])")
# Drupal 8+ (Egulias's RFC validator) also takes addresses in other scripts (RFC 6531:
# jürgen@müller.de, инфо@письмо.рф, संपर्क@डाटामेल.भारत): each character beyond ASCII is an
# atom of its own there, refused only when it is a symbol or a control, format, private-use
# or unassigned code point (its lexer's [^\p{S}\p{C}]): letters, digits and the combining
# marks of Devanagari, Thai or a decomposed "ñ" all pass. Each such character is checked by
# its category, then stands as an ASCII letter for _EMAIL (still linear time).
_REFUSED_BEYOND_ASCII = frozenset("SC")


def _as_ascii(mail: str) -> str | None:
    """`mail` with each character beyond ASCII that Drupal 8+ takes as an "a"; None if one
    is refused."""
    out = []
    for char in mail:
        if char.isascii():
            out.append(char)
        elif unicodedata.category(char)[0] in _REFUSED_BEYOND_ASCII:
            return None
        else:
            out.append("a")
    return "".join(out)


# A character outside the Basic Multilingual Plane (4 bytes in UTF-8: emoji, U+1D400, ...).
_OUTSIDE_BMP = re.compile("[\U00010000-\U0010ffff]")
REPLACEMENT = "\ufffd"  # U+FFFD, 3 bytes in UTF-8


def outside_bmp(text: str) -> bool:
    """Whether `text` has a character outside the BMP (ASCII text: one isascii())."""
    return not text.isascii() and _OUTSIDE_BMP.search(text) is not None


def within_bmp(text: str) -> str:
    """`text` with each character outside the BMP replaced with U+FFFD, which a 3-byte utf8
    (utf8mb3) column stores: the value keeps its length and shows where something was."""
    return _OUTSIDE_BMP.sub(REPLACEMENT, text)


def _escape_pair(match: re.Match[str]) -> str:
    n = ord(match.group()) - 0x10000
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


def json_within_bmp(data: bytes) -> str:
    """JSON text (orjson's UTF-8) with each character outside the BMP as its \\u escape pair:
    the same JSON, which a 3-byte utf8 column takes too (sfrelay's tables get their database's
    default character set). Such a character can only be inside a JSON string."""
    text = data.decode()
    return _OUTSIDE_BMP.sub(_escape_pair, text) if outside_bmp(text) else text


def valid_email(mail: str, *, international: bool = False) -> bool:
    """Whether Drupal accepts `mail`: Drupal 7 only ASCII addresses, Drupal 8+ (international)
    those of any script too."""
    if len(mail) > MAIL_MAX:
        return False
    checked = _as_ascii(mail) if international and not mail.isascii() else mail
    if checked is None or not _EMAIL.fullmatch(checked):
        return False
    local = mail.rpartition("@")[0]
    return not (local.startswith(".") or local.endswith(".") or ".." in local)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# What orders a record's versions, the first one present.
VERSION_FIELDS = ("SystemModstamp", "LastModifiedDate")


def modstamp(fields: dict[str, Any]) -> int | None:
    """The record version: SystemModstamp, else LastModifiedDate, in microseconds (UTC)."""
    for name in VERSION_FIELDS:
        value = fields.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)  # Python 3.11+ reads the "Z" too
            except ValueError as exc:
                raise RecordError(f"{name} is not a dateTime: {value!r}") from exc
        if not isinstance(value, datetime):
            raise RecordError(f"{name} is not a dateTime: {value!r}")
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # Salesforce sends UTC
        delta = value - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return None


def as_text(value: Any, length: int | None = None) -> str | None:
    """A Salesforce value as the text a Drupal field stores (None = no value)."""
    if type(value) is str:  # the usual case
        return (value[:length] if length else value) or None
    if value is None:
        return None
    if isinstance(value, bool):
        text = "1" if value else "0"
    elif isinstance(value, datetime | date):
        text = value.isoformat()
    else:
        text = str(value)
    if text == "":
        return None
    return text[:length] if length else text


_TRUE = (True, "true", "1", 1)


def version_digest(fields: dict[str, Any], sources: tuple[str, ...]) -> str:
    """What a version of a record says, as a short hash (sfrelay_record.digest).

    Salesforce stamps a version to the second (`.000Z`), so two changes within one second
    share a SystemModstamp: with the digest of the version applied last it is that version
    again (`duplicate`), with another it is the other change (applied: the later to arrive
    wins, as Salesforce sends in order). It covers the values the rules write (`sources`:
    FieldMap.sources) and, by meaning, whether the record is deleted, merged or converted,
    so that a REST row (reconcile, refetch: IsDeleted false, null markers), a delete log's
    entry and a pushed notification of one version hash alike."""
    deleted = fields.get("IsDeleted") in _TRUE
    master = fields.get("MasterRecordId") if deleted else None
    converted = fields.get("ConvertedContactId") if fields.get("IsConverted") in _TRUE else None
    values: list[str | bool | None] = []
    if not deleted:  # (a deletion is one whatever values its row still shows)
        get = fields.get
        for name in sources:
            value = get(name, _ABSENT)
            if value is _ABSENT:
                values.append(False)  # no value is that: _plain makes every one text or None
            else:
                values.append(value if value is None or type(value) is str else _plain(value))
    data = orjson.dumps((deleted, _plain(master) or None, _plain(converted) or None, values))
    return hashlib.blake2b(data, digest_size=8).hexdigest()


_ABSENT = object()


def _plain(value: Any) -> str | None:
    """A value as pushed notifications carry it (text), whichever source it came from."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_status(value: Any) -> int:
    if isinstance(value, str):
        return 1 if value.strip().lower() in ("1", "true", "active", "yes") else 0
    return 1 if value else 0


@dataclass(slots=True)
class Record:
    """A notification ready for the rules."""

    index: int
    notification_id: str
    raw_id: str  # as received
    sf_id: str  # sf_key(raw_id)
    obj: ObjectMap
    modstamp: int | None
    fields: dict[str, Any]
    email: str | None  # stripped; None when missing or blank
    converted_to: str | None  # sf_key(ConvertedContactId) of a converted Lead
    converted_raw: str | None
    mail_key: str  # email.lower() ('' without one): the batch's own index of mails
    mail_ok: bool  # there is an email, and Drupal would accept it (valid_email)


def to_record(
    index: int, notification: JobNotification, field_map: FieldMap, *, drupal7: bool = False
) -> Record:
    fields = notification.fields
    raw_id = fields.get("Id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise RecordError("the notification has no record Id")
    raw_id = raw_id.strip()
    sobject = notification.object
    obj = field_map.objects.get(sobject)
    if obj is None:
        raise RecordError(f"the field map has no [{sobject}] section")
    email = fields.get(obj.email_field)
    email = (email.strip() or None) if isinstance(email, str) else None
    converted = fields.get("ConvertedContactId")
    is_converted = fields.get("IsConverted") in (True, "true", "1", 1)
    converted_raw = converted.strip() if is_converted and isinstance(converted, str) else None
    return Record(
        index=index,
        notification_id=notification.id,
        raw_id=raw_id,
        sf_id=sf_key(raw_id),
        obj=obj,
        modstamp=modstamp(fields),
        fields=fields,
        email=email,
        converted_to=sf_key(converted_raw) if converted_raw else None,
        converted_raw=converted_raw,
        mail_key=email.lower() if email else "",
        mail_ok=email is not None and valid_email(email, international=not drupal7),
    )


def clean_name(raw: str, *, bmp_only: bool = False, drupal7: bool = False) -> str:
    """What Drupal accepts as a username: allowed characters, single spaces, <= 60.

    ASCII letters, digits and " .@+_'-"; other letters, digits and marks as written (NFC),
    but never a code point Drupal refuses: full-width ASCII becomes ASCII, a space
    separator a space, the rest (soft hyphen, zero-width, bidi controls, ...) goes.
    `bmp_only`: without characters outside the BMP (for a utf8mb3 column: dropped, not
    replaced, since Drupal 7's user_validate_name() refuses U+FFFD in a name).
    `drupal7`: without "+", which Drupal 7 refuses (jo+news@ gives jonews)."""
    if raw.isascii():  # the usual case, without a per-character loop
        kept = _NOT_NAME_ASCII.sub("", raw)
    else:
        text = unicodedata.normalize("NFC", raw.translate(_NAME_TRANSLATION))
        if bmp_only:
            text = _OUTSIDE_BMP.sub("", text)
        kept = "".join(
            c
            for c in text
            if c in _NAME_PUNCTUATION
            or (c.isascii() and c.isalnum())
            or (not c.isascii() and (c.isalnum() or unicodedata.category(c).startswith("M")))
        )
    if drupal7 and "+" in kept:
        kept = kept.replace("+", "")
    if not kept.isascii():
        # Dropping a character can leave a letter before a combining mark: compose them again.
        kept = unicodedata.normalize("NFC", kept)
    return " ".join(kept.split())[:NAME_MAX].strip()


def username_base(
    record: Record, field_map: FieldMap, *, bmp_only: bool = False, drupal7: bool = False
) -> str:
    email = record.email or ""
    source = record.obj.base.get("name")
    if source and record.fields.get(source):
        name = clean_name(str(record.fields[source]), bmp_only=bmp_only, drupal7=drupal7)
    else:
        template = render(field_map.username_template, record.fields, email)
        name = clean_name(template, bmp_only=bmp_only, drupal7=drupal7)
    if not name:
        fallback = render(field_map.username_fallback, record.fields, email)
        name = clean_name(fallback, bmp_only=bmp_only, drupal7=drupal7)
    return name or "user"


def with_suffix(base: str, n: int) -> str:
    """base, base_2, base_3, ... kept within Drupal's 60 characters."""
    if n <= 1:
        return base
    suffix = f"_{n}"
    return base[: NAME_MAX - len(suffix)].rstrip() + suffix


def base_values(record: Record) -> dict[str, Any]:
    """Drupal base fields the notification carries (mail and name are handled apart)."""
    values: dict[str, Any] = {}
    for drupal, source in record.obj.base.items():
        if drupal in ("mail", "name") or source not in record.fields:
            continue
        value = record.fields[source]
        values[drupal] = as_status(value) if drupal == "status" else as_text(value)
    return values
