"""A hostile-input corpus against the in-process receiver and a real Redis.

Each case is one request: its exact status, its exact faultstring (or the Ack, with exactly
the dead letters and jobs it should leave), that Redis holds nothing else, that every log line
it caused is one bounded line, and that /healthz still answers afterwards.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import redis
from lxml import etree

from app.config import Settings
from app.errors import LOG_DETAIL_MAX
from app.jobs import JobNotification
from app.main import create_app
from app.queue import DEAD_BODY_PREFIX, DEAD_KEY, RATE_PREFIX, SEEN_PREFIX, STATS_KEY
from app.sfid import to18
from app.soap import parse_message
from app.wsdl import load_contract
from tests import test_receiver
from tests.conftest import shared_message
from tests.factories import ORG_ID, sf_id
from tests.messages import Record, contact, lead, outbound_message
from tests.test_receiver import ACK_TEXT, URL, XML, ClientFactory, queued_jobs_notifications

make_client = test_receiver.make_client  # the in-process app + httpx client fixture

TOKEN = "s3cr3t-token-value"
SF_NS = b'xmlns:sf="urn:sobject.enterprise.soap.sforce.com"'
SOAP_ENV = b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
DOCTYPE_REFUSED = "DOCTYPE and entity declarations are not accepted"
NOT_UTF8 = "the message is not UTF-8 encoded: Salesforce sends UTF-8"
WRONG_METHOD = "method {} is not allowed: POST Outbound Messages, GET ?wsdl"
MISSING_TOKEN = "missing token: add ?token=<SFRELAY_ENDPOINT_TOKEN> to the endpoint URL"
WRONG_TOKEN = "wrong token: check the ?token= of the endpoint URL in Salesforce"
NOT_XML = "content type {!r} is not accepted: send text/xml (SOAP 1.1)"
NOTIFICATION_ID = "(15 or 18 letters and digits with a valid checksum, starting 04l)"


def good(**fields: str) -> bytes:
    return outbound_message([contact(Email="ok@example.org", **fields)])


def in_sobject(extra: bytes) -> bytes:
    """A good message with `extra` as the last child of its sObject."""
    return good().replace(b"    </sObject>", extra + b"\n    </sObject>")


def in_body(extra: bytes) -> bytes:
    """A good message with `extra` beside its notifications element."""
    return good().replace(b" </soapenv:Body>", extra + b"\n </soapenv:Body>")


def envelope(inner: bytes, env: bytes = SOAP_ENV) -> bytes:
    return env + b"<soapenv:Body>" + inner + b"</soapenv:Body></soapenv:Envelope>"


def record(sobject: str, record_id: str, notification_id: str = "", **fields: str) -> bytes:
    rec = Record(sobject, {"Id": record_id, **fields}, notification_id)
    return outbound_message([rec])


def notification_id(value: str) -> bytes:
    return outbound_message([Record("Contact", {"Email": "n@example.org"}, value)])


def with_org(org: str) -> bytes:
    return outbound_message([contact(Email="o@example.org")], org_id=org)


ACCOUNT_ID = sf_id("001", 9001)
LEAD_ID = sf_id("00Q", 9002)
CONTACT_ID = sf_id("003", 9003)
BAD_CHECKSUM = "0031I0000081tbPQAB"  # 0031I0000081tbPQAQ with its last character changed
SOON = (datetime.now(UTC) + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
LATER = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
LONG_NAME = "a" * 40_000


@dataclass(frozen=True)
class Case:
    id: str
    body: bytes = b""
    status: int = 400
    fault: str | None = None  # None: the Ack
    method: str = "POST"
    query: str = ""
    headers: dict[str, str] = field(default_factory=lambda: dict(XML))
    settings: dict[str, Any] = field(default_factory=dict)
    queued: int = 0  # notifications queued in jobs
    dead: tuple[str, ...] = ()  # reasons of the dead letters written on receipt
    skipped: int = 0
    check: Callable[[list[JobNotification]], bool] | None = None  # on the queued notifications


def ack(id: str, body: bytes, *, queued: int = 1, **kwargs: Any) -> Case:
    return Case(id, body, status=200, queued=queued, **kwargs)


def dead(id: str, body: bytes, *reasons: str, queued: int = 0) -> Case:
    return Case(id, body, status=200, queued=queued, dead=reasons)


def refused(id: str, body: bytes, status: int, faultstring: str, **kwargs: Any) -> Case:
    return Case(id, body, status=status, fault=faultstring, **kwargs)


def method(verb: str) -> Case:
    return Case(f"method_{verb}", good(), 405, WRONG_METHOD.format(verb), method=verb)


def content_type(id: str, value: str | None, faultstring: str | None) -> Case:
    headers = {} if value is None else {"content-type": value}
    if faultstring is None:
        return ack(f"content_type_{id}", good(), headers=headers)
    return Case(f"content_type_{id}", good(), 415, faultstring, headers=headers)


def token(id: str, query: str, faultstring: str | None) -> Case:
    settings = {"endpoint_token": TOKEN}
    if faultstring is None:
        return ack(f"token_{id}", good(), query=query, settings=settings)
    return Case(f"token_{id}", good(), 401, faultstring, query=query, settings=settings)


CASES = [
    # --- classic XML attacks ------------------------------------------------------------------
    refused(
        "xxe_external_entity",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        + envelope(b"<x>&e;</x>"),
        400,
        DOCTYPE_REFUSED,
    ),
    refused(
        "xxe_parameter_entity",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY % p SYSTEM "http://198.51.100.1/x.dtd">'
        b" %p;]>" + envelope(b"<x/>"),
        400,
        DOCTYPE_REFUSED,
    ),
    refused(
        "billion_laughs",
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "haha"><!ENTITY b "&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;">]><l>&d;</l>',
        400,
        DOCTYPE_REFUSED,
    ),
    refused(
        "doctype_without_entities",
        good().replace(b"?>\n", b"?>\n<!DOCTYPE soapenv:Envelope>\n", 1),
        400,
        DOCTYPE_REFUSED,
    ),
    refused(
        "undeclared_entity_reference",
        in_sobject(b"<sf:Title>&xxe;</sf:Title>"),
        400,
        "the body is not well-formed XML: Entity 'xxe' not defined, line 15, column 16",
    ),
    dead(
        "xinclude_in_sobject",
        in_sobject(
            b'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="file:///etc/passwd"/>'
        ),
        "unexpected element {http://www.w3.org/2001/XInclude}include in sObject",
    ),
    ack(
        "xinclude_beside_notifications_is_never_processed",
        good().replace(
            b"   <Notification>",
            b'   <xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="/etc/passwd"/>\n'
            b"   <Notification>",
        ),
    ),
    ack(
        "processing_instruction_before_the_envelope",
        good().replace(b"?>\n", b'?>\n<?xml-stylesheet href="http://198.51.100.1/x.xsl"?>\n', 1),
    ),
    ack("processing_instruction_in_sobject", in_sobject(b"<?php system('id'); ?>")),
    ack("comment_hiding_markup", in_sobject(b"<!-- </sObject><sf:Id>001</sf:Id> -->")),
    ack(
        "cdata_value_is_text",
        good().replace(b"ok@example.org", b"<![CDATA[ok@example.org]]>"),
        check=lambda ns: ns[0].fields["Email"] == "ok@example.org",
    ),
    ack(
        "cdata_with_markup_stays_text",
        good().replace(
            b"ok@example.org", b"<![CDATA[</sf:Email><sf:Id>" + ACCOUNT_ID.encode() + b"</sf:Id>]]>"
        ),
        check=lambda ns: (
            ns[0].fields["Id"].startswith("003") and ns[0].fields["Email"].startswith("</sf:Email>")
        ),
    ),
    refused(
        "unterminated_cdata",
        good().replace(b"ok@example.org", b"<![CDATA[ok@example.org"),
        400,
        # Not libxml2's next lines: they quote the body.
        "the body is not well-formed XML: CData section not finished, line 20, column 1",
    ),
    refused(
        "deep_nesting",
        b"<a>" * 100_000 + b"</a>" * 100_000,
        400,
        "the body is not well-formed XML: Excessive depth in document: 256, use XML_PARSE_HUGE "
        "option, line 1, column 771",
    ),
    refused(
        "deep_nesting_inside_a_field",
        in_sobject(b"<sf:Title>" + b"<b>" * 300 + b"</b>" * 300 + b"</sf:Title>"),
        400,
        "the body is not well-formed XML: Excessive depth in document: 256, use XML_PARSE_HUGE "
        "option, line 15, column 763",
    ),
    ack(
        "huge_attribute_is_ignored",
        good().replace(b"<soapenv:Body>", b'<soapenv:Body junk="' + b"x" * 1_000_000 + b'">'),
    ),
    ack(
        "many_namespaces",
        good().replace(
            b"<soapenv:Body>",
            b"<soapenv:Body "
            + b" ".join(b'xmlns:n%d="urn:n%d"' % (i, i) for i in range(5000))
            + b">",
        ),
    ),
    refused(
        "huge_root_tag_name",
        f"<{LONG_NAME}/>".encode(),
        400,
        "expected a SOAP 1.1 Envelope, got " + "a" * 59 + "…",
    ),
    refused(
        "huge_tag_name_in_a_syntax_error",
        f"<{LONG_NAME}></b>".encode(),
        400,
        "the body is not well-formed XML: Opening and ending tag mismatch: "
        + "a" * 59
        + "… line 1 and b, line 1, column 40007",
    ),
    refused(
        "twenty_thousand_unknown_operations",
        envelope(b"<x/>" * 20_000),
        400,
        "unknown operation: expected notifications in http://soap.sforce.com/2005/09/outbound, "
        "got 20000 unknown elements, e.g. x",
    ),
    dead(
        "twenty_thousand_unknown_elements_in_sobject",
        in_sobject(b"<x/>" * 20_000),
        "20000 unexpected elements in sObject, e.g. {http://soap.sforce.com/2005/09/outbound}x",
    ),
    dead(
        "huge_unknown_element_in_sobject",
        in_sobject(f"<{LONG_NAME}/>".encode()),
        "unexpected element {http://soap.sforce.com/2005/09/outbound}" + "a" * 18 + "… in sObject",
    ),
    dead(
        "thousand_bad_values",
        outbound_message([lead(Email="l@example.org")]).replace(
            b"    </sObject>", b"<sf:IsConverted>maybe</sf:IsConverted>" * 1000 + b"</sObject>"
        ),
        "IsConverted='maybe' is not a valid boolean; IsConverted='maybe' is not a valid boolean; "
        "IsConverted='maybe' is not a valid boolean; and 997 more",
    ),
    # --- encodings ----------------------------------------------------------------------------
    refused("utf16_with_bom", good().decode().encode("utf-16"), 400, NOT_UTF8),
    refused("utf16le_without_bom", good().decode().encode("utf-16-le"), 400, NOT_UTF8),
    refused("utf16be_without_bom", good().decode().encode("utf-16-be"), 400, NOT_UTF8),
    refused("utf32", good().decode().encode("utf-32"), 400, NOT_UTF8),
    refused(
        "declared_utf16_but_utf8",
        good().replace(b'encoding="UTF-8"', b'encoding="UTF-16"', 1),
        400,
        "the message declares encoding 'UTF-16': Salesforce sends UTF-8",
    ),
    refused(
        "declared_latin1",
        good()
        .replace(b'encoding="UTF-8"', b'encoding="ISO-8859-1"', 1)
        .replace(b"ok@example.org", b"\xe9@example.org"),
        400,
        "the message declares encoding 'ISO-8859-1': Salesforce sends UTF-8",
    ),
    refused(
        "declared_ascii_name_of_a_legacy_encoding",
        good().replace(b'encoding="UTF-8"', b'encoding="windows-1252"', 1),
        400,
        "the message declares encoding 'windows-1252': Salesforce sends UTF-8",
    ),
    ack("declared_lowercase_utf8", good().replace(b'encoding="UTF-8"', b'encoding="utf-8"', 1)),
    ack("utf8_bom", b"\xef\xbb\xbf" + good()),
    ack(
        "utf8_non_ascii_values",
        outbound_message([contact(Email="o@example.org", LastName="Ødegaard Núñez İ")]),
        check=lambda ns: ns[0].fields["LastName"] == "Ødegaard Núñez İ",
    ),
    refused(
        "invalid_utf8_byte",
        good().replace(b"ok@example.org", b"\xff@example.org"),
        400,
        "the body is not well-formed XML: Invalid bytes in character encoding, line 14, column 16",
    ),
    refused(
        "overlong_utf8_slash",
        good().replace(b"ok@example.org", b"\xc0\xaf@example.org"),
        400,
        "the body is not well-formed XML: Invalid bytes in character encoding, line 14, column 16",
    ),
    refused(
        "utf8_encoded_surrogate",
        good().replace(b"ok@example.org", b"\xed\xa0\x80@example.org"),
        400,
        "the body is not well-formed XML: Invalid bytes in character encoding, line 14, column 16",
    ),
    refused(
        "nul_byte_in_a_value",
        good().replace(b"ok@example.org", b"ok\x00@example.org"),
        400,
        "the body is not well-formed XML: Invalid character: Char 0x0 out of allowed range, "
        "line 14, column 18",
    ),
    refused(
        "control_character_reference",
        good().replace(b"ok@example.org", b"ok&#1;@example.org"),
        400,
        "the body is not well-formed XML: xmlParseCharRef: invalid xmlChar value 1, line 14, "
        "column 22",
    ),
    # --- methods ------------------------------------------------------------------------------
    Case(
        "get_without_wsdl",
        method="GET",
        status=405,
        fault="POST Outbound Messages here; GET ?wsdl for the WSDL",
    ),
    *(method(verb) for verb in ("PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")),
    Case(
        "get_wsdl_of_a_path",
        method="GET",
        query="?wsdl=../../etc/passwd",
        status=404,
        fault="no WSDL for '../../etc/passwd'; known objects: Contact, Lead",
    ),
    Case(
        "get_wsdl_of_a_huge_name",
        method="GET",
        query="?wsdl=" + "L" * 40_000,
        status=404,
        fault="no WSDL for '" + "L" * 58 + "… known objects: Contact, Lead",
    ),
    # --- content types ------------------------------------------------------------------------
    content_type("missing", None, NOT_XML.format("missing")),
    content_type("json", "application/json", NOT_XML.format("application/json")),
    content_type(
        "multipart",
        "multipart/form-data; boundary=x",
        NOT_XML.format("multipart/form-data"),
    ),
    content_type("text_plain", "text/plain", NOT_XML.format("text/plain")),
    content_type(
        "soap12", "application/soap+xml; charset=utf-8", NOT_XML.format("application/soap+xml")
    ),
    content_type(
        "huge",
        "x" * 10_000,
        "content type '" + "x" * 58 + "… is not accepted: send text/xml (SOAP 1.1)",
    ),
    content_type("upper_case_with_spaces", "TEXT/XML ; charset=UTF-8", None),
    content_type("application_xml_without_charset", "application/xml", None),
    content_type("charset_latin1_header_is_not_the_body", "text/xml; charset=ISO-8859-1", None),
    content_type("charset_quoted", 'text/xml; charset="utf-8"', None),
    # --- token variants -----------------------------------------------------------------------
    token("missing", "", MISSING_TOKEN),
    token("wrong", "?token=not-the-token", WRONG_TOKEN),
    token("empty", "?token=", MISSING_TOKEN),
    token("upper_case_name", f"?TOKEN={TOKEN}", MISSING_TOKEN),
    token("title_case_name", f"?Token={TOKEN}", MISSING_TOKEN),
    token("padded_before", f"?token=%20{TOKEN}", WRONG_TOKEN),
    token("padded_after", f"?token={TOKEN}%20", WRONG_TOKEN),
    token("prefix_of_the_token", f"?token={TOKEN[:-1]}", WRONG_TOKEN),
    token("other_case", f"?token={TOKEN.upper()}", WRONG_TOKEN),
    token("huge", "?token=" + "t" * 50_000, WRONG_TOKEN),
    token("right", f"?token={TOKEN}", None),
    # --- organization variants ----------------------------------------------------------------
    refused(
        "unknown_org",
        with_org("00D000000000001AAA"),
        403,
        "organization 00D000000000001AAA is not in SFRELAY_ORG_IDS",
    ),
    ack("org_15_of_a_configured_18", with_org(ORG_ID[:15])),
    ack("org_18_of_a_configured_15", with_org(to18("012345678901234"))),
    ack("org_18_upper_cased_case_restored", with_org(ORG_ID.upper())),
    refused(
        "org_15_in_the_wrong_case",
        with_org(ORG_ID[:15].lower()),
        403,
        f"organization {ORG_ID[:15].lower()} is not in SFRELAY_ORG_IDS",
    ),
    refused(
        "org_malformed",
        with_org("00D-not-an-id"),
        400,
        "OrganizationId '00D-not-an-id' is not a Salesforce organization id "
        "(15 or 18 letters and digits)",
    ),
    refused(
        "org_huge",
        with_org("0" * 5000),
        400,
        "OrganizationId '" + "0" * 39 + "…' is not a Salesforce organization id "
        "(15 or 18 letters and digits)",
    ),
    refused(
        "org_missing",
        good().replace(b"   <OrganizationId>" + ORG_ID.encode() + b"</OrganizationId>\n", b""),
        400,
        "the message has no OrganizationId",
    ),
    refused(
        "org_empty",
        good().replace(ORG_ID.encode() + b"</OrganizationId>", b"</OrganizationId>"),
        400,
        "the message has no OrganizationId",
    ),
    # --- SOAP variants ------------------------------------------------------------------------
    refused(
        "no_body",
        SOAP_ENV + b"<soapenv:Header/></soapenv:Envelope>",
        400,
        "the SOAP Envelope has no Body",
    ),
    refused(
        "empty_body",
        envelope(b""),
        400,
        "unknown operation: expected notifications in http://soap.sforce.com/2005/09/outbound, "
        "got nothing",
    ),
    refused(
        "no_notifications_element",
        envelope(b'<o:other xmlns:o="http://soap.sforce.com/2005/09/outbound"/>'),
        400,
        "unknown operation: expected notifications in http://soap.sforce.com/2005/09/outbound, "
        "got {http://soap.sforce.com/2005/09/outbound}other",
    ),
    refused(
        "two_notifications_elements",
        in_body(b'<notifications xmlns="http://soap.sforce.com/2005/09/outbound"/>'),
        400,
        "unknown operation: expected notifications in http://soap.sforce.com/2005/09/outbound, "
        "got 2 notifications elements",
    ),
    refused(
        "notifications_without_notification",
        envelope(
            b'<notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
            b"<OrganizationId>" + ORG_ID.encode() + b"</OrganizationId></notifications>"
        ),
        400,
        "the message has no Notification",
    ),
    refused(
        "soap12_envelope",
        good().replace(
            b"http://schemas.xmlsoap.org/soap/envelope/", b"http://www.w3.org/2003/05/soap-envelope"
        ),
        400,
        "SOAP 1.2 is not supported: send a SOAP 1.1 envelope",
    ),
    refused(
        "notifications_in_the_wrong_namespace",
        good().replace(b"http://soap.sforce.com/2005/09/outbound", b"urn:evil"),
        400,
        "unknown operation: expected notifications in http://soap.sforce.com/2005/09/outbound, "
        "got {urn:evil}notifications",
    ),
    refused(
        "envelope_without_namespace",
        b"<Envelope><Body/></Envelope>",
        400,
        "expected a SOAP 1.1 Envelope, got Envelope",
    ),
    refused(
        "not_xml",
        b"{}",
        400,
        "the body is not well-formed XML: Start tag expected, '<' not found, line 1, column 1",
    ),
    refused(
        "empty", b"", 400, "the body is not well-formed XML: Document is empty, line 1, column 1"
    ),
    dead(
        "notification_without_sobject",
        good().replace(b"    <sObject", b"    <Other", 1).replace(b"</sObject>", b"</Other>"),
        "Notification has no sObject",
    ),
    dead(
        "sobject_type_in_another_namespace",
        good().replace(b'xsi:type="sf:Contact"', b'xsi:type="xsd:Contact"'),
        "sObject has no xsi:type in the sObject namespace",
    ),
    ack(
        "sobject_without_xsi_type_is_known_by_its_id",
        good().replace(b' xsi:type="sf:Contact"', b""),
    ),
    ack("unknown_object_is_skipped", record("Account", ACCOUNT_ID), queued=0, skipped=1),
    ack(
        "unknown_object_with_a_bad_id_is_still_skipped",
        record("Account", ACCOUNT_ID[:15] + "ZZZ", "x" * 300),
        queued=0,
        skipped=1,
    ),
    # --- section 5: values that must not be applied as they are ----------------------------
    dead(
        "account_id_sent_as_a_contact",
        record("Contact", ACCOUNT_ID),
        f"sf:Id '{ACCOUNT_ID}' is not a Contact id (Contact ids start with 003)",
    ),
    dead(
        "lead_id_sent_as_a_contact",
        record("Contact", LEAD_ID),
        f"sf:Id '{LEAD_ID}' is not a Contact id (Contact ids start with 003)",
    ),
    dead(
        "contact_id_sent_as_a_lead",
        record("Lead", CONTACT_ID),
        f"sf:Id '{CONTACT_ID}' is not a Lead id (Lead ids start with 00Q)",
    ),
    dead(
        "wrong_case_checksum",
        record("Contact", BAD_CHECKSUM),
        f"sf:Id '{BAD_CHECKSUM}' has a wrong checksum: its last 3 characters do not match the "
        "case of the first 15",
    ),
    dead(
        "id_upper_cased_by_a_case_folding_system",
        record("Contact", "0031I0000081tbPQAQ".upper()),
        "sf:Id '0031I0000081TBPQAQ' has a wrong checksum: its last 3 characters do not match "
        "the case of the first 15",
    ),
    dead(
        "id_not_an_id",
        record("Contact", "003' OR 1=1 --"),
        'sf:Id "003\' OR 1=1 --" is not a Salesforce id',
    ),
    ack("id_of_15_characters", record("Contact", CONTACT_ID[:15])),
    ack("lead_id_as_a_lead", record("Lead", LEAD_ID)),
    dead(
        "systemmodstamp_at_the_end_of_time",
        good(SystemModstamp="9999-12-31T23:59:59+14:00"),
        "SystemModstamp '9999-12-31T09:59:59.000Z' is more than a day in the future",
    ),
    dead(
        "systemmodstamp_past_the_end_of_time",
        good(SystemModstamp="9999-12-31T23:59:59-14:00"),
        "SystemModstamp='9999-12-31T23:59:59-14:00' is not a valid dateTime",
    ),
    dead(
        "lastmodifieddate_two_days_ahead",
        good(LastModifiedDate=LATER),
        f"LastModifiedDate '{LATER}' is more than a day in the future",
    ),
    ack("systemmodstamp_twelve_hours_ahead_is_clock_skew", good(SystemModstamp=SOON)),
    dead(
        "notification_id_of_5000_characters",
        notification_id("04l" + "A" * 4997),
        f"Notification Id '04l{'A' * 36}…' is not a Salesforce notification id " + NOTIFICATION_ID,
    ),
    dead(
        "notification_id_of_another_object",
        notification_id(CONTACT_ID),
        f"Notification Id '{CONTACT_ID}' is not a Salesforce notification id " + NOTIFICATION_ID,
    ),
    dead(
        "notification_id_with_a_wrong_checksum",
        notification_id("04l1I000000fztEQAB"),
        "Notification Id '04l1I000000fztEQAB' is not a Salesforce notification id "
        + NOTIFICATION_ID,
    ),
    ack("notification_id_of_15_characters", notification_id("04l1I000000fztE")),
    dead(
        "one_bad_among_good",
        outbound_message(
            [contact(Email="a@example.org"), Record("Contact", {"Id": ACCOUNT_ID}), lead()]
        ),
        f"sf:Id '{ACCOUNT_ID}' is not a Contact id (Contact ids start with 003)",
        queued=2,
    ),
    dead(
        "several_problems_in_one_notification",
        record("Contact", ACCOUNT_ID, "bogus", SystemModstamp="9999-12-31T23:59:59Z"),
        f"Notification Id 'bogus' is not a Salesforce notification id {NOTIFICATION_ID}; "
        f"sf:Id '{ACCOUNT_ID}' is not a Contact id (Contact ids start with 003); "
        "SystemModstamp '9999-12-31T23:59:59.000Z' is more than a day in the future",
    ),
    # --- the queue itself -----------------------------------------------------------------------
    refused(
        "redis_unreachable",
        good(),
        503,
        "temporarily unavailable: the queue (Redis) did not confirm the write",
        settings={"redis_url": "redis://127.0.0.1:1/0"},
    ),
]


def faultstring(response: httpx.Response) -> str:
    """The faultstring of a well-formed SOAP 1.1 Fault (and never an Ack)."""
    assert response.headers["content-type"] == "text/xml; charset=utf-8"
    root = etree.fromstring(response.content)
    [fault] = root.iterfind("{http://schemas.xmlsoap.org/soap/envelope/}Body/*")
    assert fault.tag == "{http://schemas.xmlsoap.org/soap/envelope/}Fault"
    text: str = fault.findtext("faultstring") or ""
    return text


def test_the_corpus_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


def assert_bounded_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    for entry in caplog.records:
        if entry.name.startswith("sfrelay"):
            line = entry.getMessage()
            assert "\n" not in line and len(line) <= LOG_DETAIL_MAX + 200, line[:300]
            assert entry.exc_info is None, line[:300]


def assert_stored(case: Case, redis_client: redis.Redis) -> None:
    """Exactly what the case should leave in Redis, nothing else."""
    notifications = queued_jobs_notifications(redis_client)
    assert len(notifications) == case.queued
    if case.check is not None:
        assert case.check(notifications)
    letters = [orjson.loads(v) for v in redis_client.hgetall(DEAD_KEY).values()]
    assert sorted(letter["reason"] for letter in letters) == sorted(case.dead)
    seen = list(redis_client.scan_iter(SEEN_PREFIX + "*"))
    assert len(seen) == case.queued + len(case.dead) + case.skipped
    assert all(len(key) < 120 for key in seen)
    assert int(redis_client.hget(STATS_KEY, "skipped") or 0) == case.skipped
    bodies = list(redis_client.scan_iter(DEAD_BODY_PREFIX + "*"))
    assert len(bodies) == (1 if case.dead else 0)
    for key in bodies:
        assert redis_client.ttl(key) > 0
    rates = list(redis_client.scan_iter(RATE_PREFIX + "*"))
    assert len(rates) == 1 and redis_client.ttl(rates[0]) > 0  # this minute's, expiring
    expected_keys = len(seen) + len(bodies) + 2  # + the stats hash and the rate key
    expected_keys += (2 if case.queued else 0) + (1 if case.dead else 0)
    assert redis_client.dbsize() == expected_keys


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_hostile_request(
    case: Case,
    make_client: ClientFactory,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client: httpx.AsyncClient = await make_client(**case.settings)
    response = await client.request(
        case.method, URL + case.query, content=case.body or None, headers=case.headers
    )
    assert response.status_code == case.status, response.text[:500]
    if case.fault is None:
        assert ACK_TEXT in response.text
        assert_stored(case, redis_client)
    else:
        if case.method != "HEAD":  # a HEAD answer has the headers only
            assert faultstring(response) == case.fault
            assert len(response.content) < 1000
        assert redis_client.dbsize() == 0
    if case.status == 405 and case.method != "GET":
        assert response.headers["allow"] == "GET, POST"
    assert_bounded_log_lines(caplog)
    health = await client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


# --- beyond one request and its answer ------------------------------------------------------


async def test_a_dead_letter_body_expires_with_the_jobs_and_keeps_no_session_id(
    make_client: ClientFactory, redis_client: redis.Redis, settings: Settings
) -> None:
    """A real capture carrying a SessionId, one of its Contacts made unusable (an Account id)."""
    original = shared_message("aspnet_WebHooks__Salesforce.xml")
    session = re.search(rb"<SessionId>([^<]+)</SessionId>", original)
    assert session is not None
    body = original.replace(b"0031I0000081tb0QAA", ACCOUNT_ID.encode())
    client = await make_client()
    response = await client.post(URL, content=body, headers=XML)
    assert response.status_code == 200 and ACK_TEXT in response.text
    [letter] = [orjson.loads(v) for v in redis_client.hgetall(DEAD_KEY).values()]
    assert letter["reason"] == (
        f"sf:Id '{ACCOUNT_ID}' is not a Contact id (Contact ids start with 003)"
    )
    key = DEAD_BODY_PREFIX + letter["body_sha256"]
    stored = redis_client.get(key)
    assert stored is not None
    assert session.group(1) not in stored and b"!" not in stored
    # The same document otherwise: the stored body parses to the same notifications.
    contract = load_contract(settings.wsdl_dir)
    kept, sent = (parse_message(b, contract, ("Contact",)) for b in (stored, body))
    assert kept.notifications == sent.notifications
    assert etree.fromstring(stored).findtext(".//{*}SessionId") == ""
    assert settings.job_ttl_seconds - 60 < redis_client.ttl(key) <= settings.job_ttl_seconds
    assert len(queued_jobs_notifications(redis_client)) == 1


async def test_a_client_gone_mid_body_is_one_log_line(
    settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)
    sent: list[dict[str, Any]] = []
    incoming: list[dict[str, Any]] = [
        {"type": "http.request", "body": good()[:100], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"text/xml"), (b"content-length", b"5000")],
        "client": ("127.0.0.1", 40000),
        "server": ("receiver", 80),
    }
    async with app.router.lifespan_context(app):
        caplog.clear()
        await app(scope, receive, send)  # no exception escapes to the server
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.getMessage(), r.exc_info) for r in records] == [
        (
            "sfrelay.receiver",
            "the client disconnected before the end of its body: nothing stored",
            None,
        )
    ]
    assert redis_client.dbsize() == 0


async def test_a_redis_error_shows_the_sender_no_internals_and_the_log_the_detail(
    make_client: ClientFactory, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(STATS_KEY, "not a hash")  # the script fails inside Redis (WRONGTYPE)
    client = await make_client()
    response = await client.post(URL, content=good(), headers=XML)
    assert response.status_code == 503
    assert faultstring(response) == (
        "temporarily unavailable: the queue (Redis) did not confirm the write"
    )
    assert b"script" not in response.content and b"WRONGTYPE" not in response.content
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith("not acked, Salesforce will retry: the queue (Redis) did not ")
    assert "WRONGTYPE" in line and "script" in line
    assert (await client.get("/healthz")).status_code == 200
