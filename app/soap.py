"""Outbound Message bytes -> typed notifications; the Ack and Fault envelopes. No web framework."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape

from lxml import etree

from app.errors import FAULTSTRING_MAX, NAME_MAX, MalformedMessage, clip, clip_words
from app.sfid import SF_ID_FORM, is_valid_id
from app.wsdl import SOBJECT_NS, Contract

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
OM_NS = "http://soap.sforce.com/2005/09/outbound"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"

MAX_NOTIFICATIONS = 100

_ENVELOPE = f"{{{SOAP11_NS}}}Envelope"
_BODY = f"{{{SOAP11_NS}}}Body"
_NOTIFICATIONS = f"{{{OM_NS}}}notifications"
_NOTIFICATION = f"{{{OM_NS}}}Notification"
_OM_ID = f"{{{OM_NS}}}Id"
_SOBJECT = f"{{{OM_NS}}}sObject"
_XSI_TYPE = f"{{{XSI_NS}}}type"
_XSI_NIL = f"{{{XSI_NS}}}nil"
_FIELD_PREFIX = f"{{{SOBJECT_NS}}}"
_SESSION_ID = f"{{{OM_NS}}}SessionId"

NOTIFICATION_ID_PREFIX = "04l"
# A modstamp further ahead of the receiver's clock than this is refused: applied, it would make
# every later real update of the record look stale.
MAX_FUTURE = timedelta(days=1)
_MODSTAMPS = ("SystemModstamp", "LastModifiedDate")
_PROBLEMS_SHOWN = 3  # a dead letter's reason names the first few problems and counts the rest

# No DTD, no entities, no network, libxml2's default depth and size limits (huge_tree off).
_PARSER_OPTIONS: dict[str, Any] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "huge_tree": False,
    "remove_comments": True,
    "remove_pis": True,
}

ACK = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    b"<soapenv:Body>"
    b'<notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound">'
    b"<Ack>true</Ack>"
    b"</notificationsResponse>"
    b"</soapenv:Body>"
    b"</soapenv:Envelope>"
)


def fault(faultstring: str, faultcode: str = "soapenv:Client") -> bytes:
    """A SOAP 1.1 Fault envelope; Salesforce shows `faultstring` as the delivery failure reason.

    Whoever builds it, the faultstring is one short line: long words cut, 300 characters at most.
    """
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        "<soapenv:Body><soapenv:Fault>"
        f"<faultcode>{escape(faultcode)}</faultcode>"
        f"<faultstring>{escape(clip_words(faultstring))}</faultstring>"
        "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    ).encode()


@dataclass(slots=True)
class Notification:
    """One notification: its id, object type and typed field values; `problem` if unusable."""

    id: str
    sobject: str
    fields: dict[str, Any] = field(default_factory=dict)
    undeclared: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def record_id(self) -> str | None:
        value = self.fields.get("Id")
        return value if isinstance(value, str) else None


@dataclass(slots=True)
class OutboundMessage:
    organization_id: str
    action_id: str
    notifications: list[Notification]


def _convert_boolean(text: str) -> bool:
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ValueError("not an xsd:boolean")


def _convert_double(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


# Salesforce's own rendering, already normalised: kept as it is (a third of the parse time).
_SALESFORCE_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _convert_datetime(text: str) -> str:
    if _SALESFORCE_DATETIME.fullmatch(text):
        datetime.fromisoformat(text)  # still refuse impossible dates such as 2024-02-30
        return text
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is past year 9999 in UTC
        raise ValueError("out of range") from None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _convert_date(text: str) -> str:
    return date.fromisoformat(text).isoformat()


# Values travel as JSON: booleans and numbers natively; dates and times as the ISO text
# Salesforce sends (app.records reads them where they are written).
_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "boolean": _convert_boolean,
    "double": _convert_double,
    "int": int,
    "dateTime": _convert_datetime,
    "date": _convert_date,
}


def _text(element: etree._Element) -> str:
    return (element.text or "").strip()


# Key prefixes of standard objects: a sender that omits xsi:type (a generic SOAP client such as
# zeep; Salesforce itself always sends it) is understood by its record id.
# The same table says which ids an object's records have: a Contact's Id starts with 003. An
# object not in it (a custom object: its prefix is per org) is checked against it the other way:
# its Id must not be one of these objects' ids.
_KEY_PREFIXES = {"003": "Contact", "00Q": "Lead", "001": "Account", "006": "Opportunity"}
_OBJECT_PREFIXES = {obj: prefix for prefix, obj in _KEY_PREFIXES.items()}


def _name(tag: object) -> str:
    """A tag name as a fault or dead letter shows it: a 40,000-character name is cut."""
    return clip(str(tag), NAME_MAX)


def _quote(value: str) -> str:
    return repr(clip(value, 40))


def _summary(problems: list[str]) -> str:
    shown = "; ".join(problems[:_PROBLEMS_SHOWN])
    if len(problems) > _PROBLEMS_SHOWN:
        shown += f"; and {len(problems) - _PROBLEMS_SHOWN} more"
    return clip_words(shown, FAULTSTRING_MAX)


def _record_id_problem(sobject_type: str, record_id: str) -> str | None:
    if not SF_ID_FORM.fullmatch(record_id):
        return f"sf:Id {_quote(record_id)} is not a Salesforce id"
    if not is_valid_id(record_id):
        return (
            f"sf:Id {record_id!r} has a wrong checksum: its last 3 characters do not match "
            "the case of the first 15"
        )
    expected = _OBJECT_PREFIXES.get(sobject_type)
    actual = _KEY_PREFIXES.get(record_id[:3])
    if expected is not None and record_id[:3] != expected:
        return (
            f"sf:Id {record_id!r} is not a {sobject_type} id "
            f"({sobject_type} ids start with {expected})"
        )
    if expected is None and actual is not None:
        return f"sf:Id {record_id!r} is a {actual} id, not a {sobject_type} id"
    return None


def _references(sobject_type: str, record_id: str | None) -> tuple[tuple[str, str | None], ...]:
    """The fields whose record id sfrelay acts on, with the key prefix that id must have: a
    converted Lead's Contact (its user moves to that Contact), a merge loser's winner (of the
    loser's own object)."""
    own = record_id[:3] if record_id else _OBJECT_PREFIXES.get(sobject_type)
    return (("ConvertedContactId", _OBJECT_PREFIXES["Contact"]), ("MasterRecordId", own))


def _reference_problem(name: str, value: object, prefix: str | None) -> str | None:
    """A reference sfrelay would follow must be a record id as Salesforce writes it: anything
    else would link a Drupal user to a record that cannot exist."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip()
    if not is_valid_id(text):
        return f"sf:{name} {_quote(text)} is not a Salesforce id"
    if prefix is not None and not text.startswith(prefix):
        return f"sf:{name} {text!r} is not an id of the right object (they start with {prefix})"
    return None


def is_notification_id(value: str) -> bool:
    """Whether `value` is an Outbound Message notification id (15 or 18, checksum, 04l)."""
    return value.startswith(NOTIFICATION_ID_PREFIX) and is_valid_id(value)


def _future_problem(name: str, value: object, now: datetime) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None  # an undeclared field passed on as text: not a modstamp sfrelay reads
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment > now + MAX_FUTURE:
        return f"{name} {_quote(value)} is more than a day in the future"
    return None


def _resolve_type(sobject: etree._Element) -> str | None:
    """The sObject's type name, resolving the xsi:type QName through the element's namespaces."""
    qname = sobject.get(_XSI_TYPE)
    if not qname:
        record_id = sobject.findtext(_FIELD_PREFIX + "Id") or ""
        return _KEY_PREFIXES.get(record_id.strip()[:3])
    prefix, _, local = qname.strip().rpartition(":")
    namespace = sobject.nsmap.get(prefix or None)
    if namespace != SOBJECT_NS or not local:
        return None
    return local


def _parse_notification(
    element: etree._Element, contract: Contract, handled: Collection[str], now: datetime
) -> Notification:
    notification_id = ""
    sobject: etree._Element | None = None
    for child in element:
        if child.tag == _OM_ID:
            notification_id = _text(child)
        elif child.tag == _SOBJECT:
            sobject = child
    if sobject is None:
        return Notification(notification_id, "", problem="Notification has no sObject")
    sobject_type = _resolve_type(sobject)
    if sobject_type is None:
        return Notification(
            notification_id, "", problem="sObject has no xsi:type in the sObject namespace"
        )
    result = Notification(notification_id, sobject_type)
    if sobject_type not in handled:
        return result  # acked and counted as skipped; its fields are not needed
    types: Mapping[str, str] = contract.field_types(sobject_type) or {}
    problems: list[str] = []
    if not notification_id:
        problems.append("Notification has no Id")
    elif not is_notification_id(notification_id):
        problems.append(
            f"Notification Id {_quote(notification_id)} is not a Salesforce notification id "
            "(15 or 18 letters and digits with a valid checksum, starting "
            f"{NOTIFICATION_ID_PREFIX})"
        )
    unexpected: list[object] = []
    for child in sobject:
        tag = child.tag
        if not isinstance(tag, str) or not tag.startswith(_FIELD_PREFIX):
            unexpected.append(tag)
            continue
        name = tag[len(_FIELD_PREFIX) :]
        if child.get(_XSI_NIL) in ("true", "1"):
            result.fields[name] = None
            continue
        text = child.text or ""
        kind = types.get(name)
        if kind is None:
            result.undeclared.append(name)
        converter = _CONVERTERS.get(kind or "string")
        if converter is None:
            result.fields[name] = text if text.strip() else None
            continue
        try:
            result.fields[name] = converter(text.strip())
        except (ValueError, OverflowError):
            problems.append(f"{name}={text[:40]!r} is not a valid {kind}")
    if len(unexpected) == 1:
        problems.append(f"unexpected element {_name(unexpected[0])} in sObject")
    elif unexpected:
        problems.append(
            f"{len(unexpected)} unexpected elements in sObject, e.g. {_name(unexpected[0])}"
        )
    record_id = result.record_id
    if record_id is None:
        problems.append(f"{sobject_type} has no sf:Id")
    else:
        problems.append(_record_id_problem(sobject_type, record_id) or "")
    for name, prefix in _references(sobject_type, record_id):
        problems.append(_reference_problem(name, result.fields.get(name), prefix) or "")
    for name in _MODSTAMPS:
        problems.append(_future_problem(name, result.fields.get(name), now) or "")
    problems = [p for p in problems if p]
    if problems:
        result.problem = _summary(problems)
    for name in types.keys() - result.fields.keys():
        # Salesforce leaves a null field out (no element, no xsi:nil): a field the WSDL
        # declares, the Outbound Message selects, so its absence is a null, which clears
        # the value in Drupal. Undeclared fields are only what arrives.
        result.fields[name] = None
    return result


_DECLARED_ENCODING = re.compile(
    rb"(?:\xef\xbb\xbf)?<\?xml\s[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._:-]{1,40})[\"']"
)
_POSITION = re.compile(r", line \d+, column \d+$")


def _syntax_error(exc: etree.XMLSyntaxError) -> str:
    """libxml2's message, its first line only: later lines quote the body (any credential)."""
    message = exc.msg or "syntax error"
    first = message.split("\n", 1)[0].rstrip(", ")
    position = _POSITION.search(message)
    if position and not first.endswith(position.group()):
        first += position.group()
    return first


def parse_message(body: bytes, contract: Contract, handled: Collection[str]) -> OutboundMessage:
    """Parse and check one Outbound Message; raise MalformedMessage with the reason to show."""
    head = body[:4]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise MalformedMessage("the message is not UTF-8 encoded: Salesforce sends UTF-8")
    declared = _DECLARED_ENCODING.match(body[:200])
    if declared and declared.group(1).upper() != b"UTF-8":
        raise MalformedMessage(
            f"the message declares encoding {declared.group(1).decode()!r}: Salesforce sends UTF-8"
        )
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise MalformedMessage("DOCTYPE and entity declarations are not accepted")
    try:
        root = etree.fromstring(body, etree.XMLParser(**_PARSER_OPTIONS))
    except etree.XMLSyntaxError as exc:
        raise MalformedMessage(f"the body is not well-formed XML: {_syntax_error(exc)}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype:  # type: ignore[union-attr]
        raise MalformedMessage("DOCTYPE and entity declarations are not accepted")
    encoding = docinfo.encoding or "UTF-8"
    if encoding.upper() != "UTF-8":
        raise MalformedMessage(
            f"the message declares encoding {encoding!r}: Salesforce sends UTF-8"
        )
    if root.tag != _ENVELOPE:
        if root.tag == f"{{{SOAP12_NS}}}Envelope":
            raise MalformedMessage("SOAP 1.2 is not supported: send a SOAP 1.1 envelope")
        raise MalformedMessage(f"expected a SOAP 1.1 Envelope, got {_name(root.tag)}")
    body_element = next((c for c in root if c.tag == _BODY), None)
    if body_element is None:
        raise MalformedMessage("the SOAP Envelope has no Body")
    operations = [c for c in body_element if isinstance(c.tag, str)]
    if len(operations) != 1 or operations[0].tag != _NOTIFICATIONS:
        unknown = [c.tag for c in operations if c.tag != _NOTIFICATIONS]
        if not operations:
            got = "nothing"
        elif not unknown:
            got = f"{len(operations)} notifications elements"
        elif len(unknown) == 1:
            got = _name(unknown[0])
        else:
            got = f"{len(unknown)} unknown elements, e.g. {_name(unknown[0])}"
        raise MalformedMessage(f"unknown operation: expected notifications in {OM_NS}, got {got}")
    organization_id = action_id = ""
    notification_elements: list[etree._Element] = []
    for child in operations[0]:
        tag = child.tag
        if tag == _NOTIFICATION:
            notification_elements.append(child)
            if len(notification_elements) > MAX_NOTIFICATIONS:
                raise MalformedMessage(
                    f"more than {MAX_NOTIFICATIONS} notifications in one message"
                )
        elif tag == f"{{{OM_NS}}}OrganizationId":
            organization_id = _text(child)
        elif tag == f"{{{OM_NS}}}ActionId":
            action_id = _text(child)
        # SessionId is deliberately never read: it is a credential and is being removed.
    if not organization_id:
        raise MalformedMessage("the message has no OrganizationId")
    if not SF_ID_FORM.fullmatch(organization_id):
        raise MalformedMessage(
            f"OrganizationId {_quote(organization_id)} is not a Salesforce organization id "
            "(15 or 18 letters and digits)"
        )
    if not notification_elements:
        raise MalformedMessage("the message has no Notification")
    now = datetime.now(UTC)
    notifications = [_parse_notification(n, contract, handled, now) for n in notification_elements]
    return OutboundMessage(organization_id, action_id, notifications)


def without_session_id(body: bytes) -> bytes:
    """`body` with the content of its SessionId element removed, for keeping beside a dead letter.

    sfrelay never uses the session id (a credential); the body is returned as it is when it
    carries none, and re-serialised (same document, SessionId emptied) when it does.
    """
    if b"SessionId" not in body:
        return body
    root = etree.fromstring(body, etree.XMLParser(**_PARSER_OPTIONS))
    emptied = False
    for element in root.iter(_SESSION_ID):
        if element.text or len(element):
            element.text = None
            element[:] = []
            emptied = True
    if not emptied:
        return body
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")
