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


def outbound_message(
    records: list[Record], *, org_id: str = ORG_ID, action_id: str = ACTION_ID
) -> bytes:
    """A message as Salesforce renders it: XML declaration, 1-space indent, `sf` per sObject."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"'
        ' xmlns:xsd="http://www.w3.org/2001/XMLSchema"'
        ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">',
        " <soapenv:Body>",
        '  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">',
        f"   <OrganizationId>{org_id}</OrganizationId>",
        f"   <ActionId>{action_id}</ActionId>",
        '   <SessionId xsi:nil="true"/>',
        f"   <EnterpriseUrl>https://na73.salesforce.com/services/Soap/c/61.0/{org_id[:15]}"
        "</EnterpriseUrl>",
        f"   <PartnerUrl>https://na73.salesforce.com/services/Soap/u/61.0/{org_id[:15]}"
        "</PartnerUrl>",
    ]
    for record in records:
        lines += [
            "   <Notification>",
            f"    <Id>{record.notification_id}</Id>",
            f'    <sObject xsi:type="sf:{record.sobject}"'
            ' xmlns:sf="urn:sobject.enterprise.soap.sforce.com">',
            f"     <sf:Id>{record.fields['Id']}</sf:Id>",
        ]
        for name in sorted(k for k in record.fields if k != "Id"):
            lines.append(f"     <sf:{name}>{escape(record.fields[name])}</sf:{name}>")
        lines += ["    </sObject>", "   </Notification>"]
    lines += ["  </notifications>", " </soapenv:Body>", "</soapenv:Envelope>", ""]
    return "\n".join(lines).encode()
