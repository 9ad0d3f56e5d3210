"""Outbound Messages in the exact shape Salesforce sends, built by the tests themselves."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

# Ids come from tests.factories; re-exported for the modules that import them from here.
from tests.factories import ACTION_ID as ACTION_ID
from tests.factories import ORG_ID as ORG_ID
from tests.factories import sf_id as sf_id

_counter = itertools.count(1)

# Text that needs escaping and is not ASCII: Salesforce escapes it and sends UTF-8.
ESCAPED_NAME = {"FirstName": "Zoë", "LastName": "O'Brien & <Søn>"}


@dataclass
class Record:
    sobject: str = "Contact"
    fields: dict[str, str] = field(default_factory=dict)
    notification_id: str = ""

    def __post_init__(self) -> None:
        number = next(_counter)
        if not self.notification_id:
            self.notification_id = sf_id("04l", number)
        self.fields.setdefault("Id", sf_id("003" if self.sobject == "Contact" else "00Q", number))


def contact(**fields: str) -> Record:
    return Record("Contact", dict(fields))


def lead(**fields: str) -> Record:
    return Record("Lead", dict(fields))


@dataclass(frozen=True)
class Layout:
    """How a message's bytes are laid out around the same content.

    The default is Salesforce's own rendering; the others are the shapes found in public
    captures and replays of real Outbound Messages (tests/test_e2e_receiver.py,
    REAL_LAYOUTS).
    """

    indent: str = " "
    newline: str = "\n"
    declaration: str = '<?xml version="1.0" encoding="UTF-8"?>'  # "": none
    bom: bool = False
    envelope_prefix: str = "soapenv"
    session_id: str | None = None  # None: `xsi:nil`, as with "Send Session ID" off
    session_element: bool = True  # False: no SessionId element at all
    sf_on_envelope: bool = False  # `sf` declared once on the Envelope, not on each sObject


SALESFORCE = Layout()


def outbound_message(
    records: list[Record],
    *,
    org_id: str = ORG_ID,
    action_id: str = ACTION_ID,
    layout: Layout = SALESFORCE,
    nil: tuple[str, ...] = (),
) -> bytes:
    """A message as Salesforce renders it: XML declaration, 1-space indent, `sf` per sObject.

    `layout` lays the same content out otherwise; the fields named in `nil` are sent as
    `xsi:nil="true"` elements (after the record's own fields).
    """
    env = layout.envelope_prefix
    sf_ns = 'xmlns:sf="urn:sobject.enterprise.soap.sforce.com"'
    session = (
        f"<SessionId>{escape(layout.session_id)}</SessionId>"
        if layout.session_id is not None
        else '<SessionId xsi:nil="true"/>'
    )
    lines: list[tuple[int, str]] = [
        (
            0,
            f'<{env}:Envelope xmlns:{env}="http://schemas.xmlsoap.org/soap/envelope/"'
            ' xmlns:xsd="http://www.w3.org/2001/XMLSchema"'
            ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
            + (f" {sf_ns}" if layout.sf_on_envelope else "")
            + ">",
        ),
        (1, f"<{env}:Body>"),
        (2, '<notifications xmlns="http://soap.sforce.com/2005/09/outbound">'),
        (3, f"<OrganizationId>{org_id}</OrganizationId>"),
        (3, f"<ActionId>{action_id}</ActionId>"),
        *([(3, session)] if layout.session_element else []),
        (
            3,
            f"<EnterpriseUrl>https://na73.salesforce.com/services/Soap/c/61.0/{org_id[:15]}"
            "</EnterpriseUrl>",
        ),
        (
            3,
            f"<PartnerUrl>https://na73.salesforce.com/services/Soap/u/61.0/{org_id[:15]}"
            "</PartnerUrl>",
        ),
    ]
    for record in records:
        declared_here = "" if layout.sf_on_envelope else f" {sf_ns}"
        lines += [
            (3, "<Notification>"),
            (4, f"<Id>{record.notification_id}</Id>"),
            (4, f'<sObject xsi:type="sf:{record.sobject}"{declared_here}>'),
            (5, f"<sf:Id>{record.fields['Id']}</sf:Id>"),
        ]
        for name in sorted(k for k in record.fields if k != "Id"):
            lines.append((5, f"<sf:{name}>{escape(record.fields[name])}</sf:{name}>"))
        lines += [(5, f'<sf:{name} xsi:nil="true"/>') for name in nil]
        lines += [(4, "</sObject>"), (3, "</Notification>")]
    lines += [(2, "</notifications>"), (1, f"</{env}:Body>"), (0, f"</{env}:Envelope>")]
    text = layout.newline.join(layout.indent * depth + line for depth, line in lines)
    if layout.declaration:
        text = layout.declaration + layout.newline + text
    return (b"\xef\xbb\xbf" if layout.bom else b"") + (text + layout.newline).encode()
