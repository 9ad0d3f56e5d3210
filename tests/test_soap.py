"""app.soap: real and generated messages parse to typed notifications; bad ones are refused."""

from __future__ import annotations

import pytest
from lxml import etree

from app.config import DEFAULT_WSDL_DIR
from app.errors import MalformedMessage
from app.soap import ACK, OutboundMessage, fault, parse_message
from app.wsdl import Contract, load_contract
from tests.conftest import SHARED_WSDLS, shared_message
from tests.factories import ORG_ID, sf_id
from tests.messages import Record, contact, lead, outbound_message

HANDLED = ("Contact", "Lead")


@pytest.fixture(scope="module")
def contract() -> Contract:
    return load_contract(DEFAULT_WSDL_DIR)


def parse(body: bytes, contract: Contract) -> OutboundMessage:
    return parse_message(body, contract, HANDLED)


def test_contract_types_come_from_the_wsdls(contract: Contract) -> None:
    assert contract.objects["Contact"] == {
        "Id": "string",
        "Email": "string",
        "FirstName": "string",
        "LastModifiedDate": "dateTime",
        "LastName": "string",
        "SystemModstamp": "dateTime",
    }
    lead_types = contract.objects["Lead"]
    assert lead_types["IsConverted"] == "boolean"
    assert lead_types["ConvertedContactId"] == "string"


def test_aspnet_capture_two_contacts_email_omitted_on_one(contract: Contract) -> None:
    message = parse(shared_message("aspnet_WebHooks__Salesforce.xml"), contract)
    assert message.organization_id == "012345678901234"
    assert message.action_id == "04k1I000000bmsHQAQ"
    first, second = message.notifications
    assert (first.id, first.sobject, first.problem) == ("04l1I000000fztEQAQ", "Contact", None)
    # Salesforce leaves null fields out: declared by the WSDL, so selected, absent is null.
    assert first.fields["Email"] is None
    assert (first.fields["SystemModstamp"], first.fields["LastModifiedDate"]) == (None, None)
    assert second.fields["Email"] == "drb24@cornell.edu"
    assert second.fields["Id"] == "0031I0000081tb0QAA"
    # CreatedDate and Title are not in sfrelay's Contact WSDL: kept as text and reported.
    assert second.fields["CreatedDate"] == "2017-12-11T21:44:55.000Z"
    assert second.undeclared == ["CreatedDate", "Title"]


def test_aspnet_lead_capture_with_bom_and_edited_types_is_skipped(contract: Contract) -> None:
    body = shared_message("aspnet_AspNetWebHooks__OutboundMessage1.xml")
    assert body.startswith(b"\xef\xbb\xbf")
    message = parse(body, contract)
    assert [n.sobject for n in message.notifications] == ["Lead1", "Lead2", "Lead3"]
    # Objects no mapping handles are not converted (and not refused): the receiver skips them.
    assert all(n.fields == {} and n.problem is None for n in message.notifications)


def test_mulesoft_opportunity_is_parsed_but_not_handled(contract: Contract) -> None:
    message = parse(
        shared_message("mulesoft-labs_sfdc-outbound-message-demo__sample_sfdc_outbound.xml"),
        contract,
    )
    assert message.organization_id == "00DQ0000000EB93"
    [notification] = message.notifications
    assert notification.sobject == "Opportunity"


def test_guardian_placeholders_are_flagged_not_crashed(contract: Contract) -> None:
    message = parse(
        shared_message("guardian_salesforce-message-handler__soapNotificationsRequest.xml"),
        contract,
    )
    [notification] = message.notifications
    assert notification.sobject == "Contact"
    assert notification.problem == (
        "Notification Id 'notificationID' is not a Salesforce notification id (15 or 18 letters "
        "and digits with a valid checksum, starting 04l); sf:Id 'aContactId' is not a Salesforce id"
    )


def test_empty_notifications_element_is_refused(contract: Contract) -> None:
    with pytest.raises(MalformedMessage, match="no OrganizationId"):
        parse(shared_message("aspnet_AspNetWebHooks__OutboundMessage2.xml"), contract)


def test_values_are_typed_from_the_wsdl(contract: Contract) -> None:
    record = lead(
        Email="ada@example.org",
        IsConverted="true",
        ConvertedContactId="0031I0000081tbPQAQ",
        LastModifiedDate="2024-02-29T23:59:59.5+01:00",
        SystemModstamp="2024-03-01T08:00:00.000Z",
    )
    [notification] = parse(outbound_message([record]), contract).notifications
    assert notification.problem is None
    assert notification.fields["IsConverted"] is True
    assert notification.fields["LastModifiedDate"] == "2024-02-29T22:59:59.500Z"
    assert notification.fields["SystemModstamp"] == "2024-03-01T08:00:00.000Z"
    assert notification.undeclared == []


def test_a_value_that_does_not_fit_its_type_makes_the_notification_unusable(
    contract: Contract,
) -> None:
    bad, good = lead(IsConverted="maybe"), lead(IsConverted="false")
    first, second = parse(outbound_message([bad, good]), contract).notifications
    assert first.problem == "IsConverted='maybe' is not a valid boolean"
    assert second.problem is None and second.fields["IsConverted"] is False


def test_a_reference_sfrelay_follows_must_be_an_id_of_its_object(contract: Contract) -> None:
    """A converted Lead's user moves to its ConvertedContactId, a merge loser's to its
    MasterRecordId: whoever posts must not make it any string, nor another object's id."""
    contact_id, lead_id = sf_id("003", 1), sf_id("00Q", 2)
    records = [
        lead(IsConverted="true", ConvertedContactId="003\u202eevil"),
        lead(IsConverted="true", ConvertedContactId=lead_id),
        lead(IsConverted="true", ConvertedContactId=contact_id[:15] + "ZZZ"),
        lead(IsDeleted="true", MasterRecordId=contact_id),
        contact(IsDeleted="true", MasterRecordId="null"),
        lead(IsConverted="true", ConvertedContactId=contact_id.lower()[:15]),
        lead(IsConverted="true", ConvertedContactId=contact_id),
        contact(IsDeleted="true", MasterRecordId=contact_id),
        lead(IsConverted="false", ConvertedContactId=""),
    ]
    problems = [n.problem for n in parse(outbound_message(records), contract).notifications]
    assert problems == [
        "sf:ConvertedContactId '003\\\\u202eevil' is not a Salesforce id",
        f"sf:ConvertedContactId '{lead_id}' is not an id of the right object (they start with 003)",
        f"sf:ConvertedContactId '{contact_id[:15]}ZZZ' is not a Salesforce id",
        f"sf:MasterRecordId '{contact_id}' is not an id of the right object (they start with 00Q)",
        "sf:MasterRecordId 'null' is not a Salesforce id",
        None,  # 15 characters, as written: a valid id
        None,
        None,
        None,
    ]


def test_xsi_type_is_resolved_by_namespace_not_prefix(contract: Contract) -> None:
    body = outbound_message([contact(Email="a@example.org")])
    renamed = body.replace(b'xsi:type="sf:Contact"', b'xsi:type="obj:Contact"').replace(
        b"xmlns:sf=", b'xmlns:obj="urn:sobject.enterprise.soap.sforce.com" xmlns:sf='
    )
    [notification] = parse(renamed, contract).notifications
    assert notification.sobject == "Contact" and notification.problem is None
    wrong_ns = body.replace(b'xsi:type="sf:Contact"', b'xsi:type="xsd:Contact"')
    [notification] = parse(wrong_ns, contract).notifications
    assert notification.problem == "sObject has no xsi:type in the sObject namespace"


def test_crlf_and_nil_values(contract: Contract) -> None:
    body = outbound_message([contact(Email="a@example.org")]).replace(b"\n", b"\r\n")
    body = body.replace(b"<sf:Email>a@example.org</sf:Email>", b'<sf:Email xsi:nil="true"/>')
    [notification] = parse(body, contract).notifications
    assert notification.fields["Email"] is None


def test_one_hundred_notifications_accepted_one_more_refused(contract: Contract) -> None:
    records = [contact(Email=f"p{i}@example.org") for i in range(101)]
    assert len(parse(outbound_message(records[:100]), contract).notifications) == 100
    with pytest.raises(MalformedMessage, match="more than 100 notifications"):
        parse(outbound_message(records), contract)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not xml at all", "the body is not well-formed XML"),
        (b"", "the body is not well-formed XML"),
        (
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>',
            "DOCTYPE and entity declarations are not accepted",
        ),
        ("<a/>".encode("utf-16"), "not UTF-8 encoded"),
        (
            b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body/></e:Envelope>',
            "SOAP 1.2 is not supported",
        ),
        (b"<Envelope/>", "expected a SOAP 1.1 Envelope, got Envelope"),
        (
            b'<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"/>',
            "the SOAP Envelope has no Body",
        ),
        (
            b'<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body>'
            b'<notifications xmlns="urn:other"/></e:Body></e:Envelope>',
            "unknown operation: expected notifications in http://soap.sforce.com/2005/09/outbound",
        ),
    ],
)
def test_refusals(body: bytes, reason: str, contract: Contract) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse(body, contract)
    assert reason in caught.value.faultstring


def test_billion_laughs_and_deep_nesting_are_refused_before_expanding(contract: Contract) -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "ha"><!ENTITY b "&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;">]><l>&c;</l>'
    )
    deep = b"<a>" * 100_000 + b"</a>" * 100_000
    # Refused by the parser's limits (no DTD; lxml's depth limit), never expanded or built:
    # how fast is the benchmarks' business (python -m tests.bench receiver).
    with pytest.raises(MalformedMessage) as entities:
        parse(laughs, contract)
    assert str(entities.value) == "DOCTYPE and entity declarations are not accepted"
    with pytest.raises(MalformedMessage) as nesting:
        parse(deep, contract)
    assert "Excessive depth in document: 256" in str(nesting.value)


def test_ack_and_fault_envelopes() -> None:
    ack = etree.fromstring(ACK)
    ns = {
        "s": "http://schemas.xmlsoap.org/soap/envelope/",
        "o": "http://soap.sforce.com/2005/09/outbound",
    }
    assert (
        ack.xpath("string(/s:Envelope/s:Body/o:notificationsResponse/o:Ack)", namespaces=ns)
        == "true"
    )
    error = etree.fromstring(fault("bad <thing> & more"))
    assert error.xpath("string(//faultstring)") == "bad <thing> & more"
    assert error.xpath("string(//faultcode)") == "soapenv:Client"


def test_org_id_is_kept_as_sent(contract: Contract) -> None:
    message = parse(outbound_message([contact()], org_id=ORG_ID.lower()), contract)
    assert message.organization_id == ORG_ID.lower()


def test_a_real_custom_object_wsdl_types_salesforce_renderings() -> None:
    # gwestersf's managed-package object: doubles as Salesforce renders numbers ("208230.0"
    # and the 1.0E7 form), xsd:date, booleans, dateTimes; a nil double is None.
    contract = load_contract(SHARED_WSDLS)
    values = {
        "CreatedDate": "2017-09-01T16:27:19.000Z",
        "IsDeleted": "false",
        "gwestr__Insurance__c": "1.0E7",
        "gwestr__Rush__c": "true",
        "gwestr__Scheduled_Delivery__c": "1978-01-01",
        "gwestr__Status__c": "In Transit",
        "gwestr__Weight__c": "208230.0",
    }
    record = Record("gwestr__Shipment__c", {"Id": sf_id("a0R", 5), **values})
    body = outbound_message([record], nil=("gwestr__OverWeight__c",))
    [notification] = parse_message(body, contract, ("gwestr__Shipment__c",)).notifications
    assert notification.problem is None and notification.undeclared == []
    assert notification.fields == {
        "Id": sf_id("a0R", 5),
        "CreatedDate": "2017-09-01T16:27:19.000Z",
        "IsDeleted": False,
        "gwestr__Insurance__c": 10_000_000.0,
        "gwestr__Rush__c": True,
        "gwestr__Scheduled_Delivery__c": "1978-01-01",
        "gwestr__Status__c": "In Transit",
        "gwestr__Weight__c": 208_230.0,
        "gwestr__OverWeight__c": None,
        # the fields the WSDL declares and the message leaves out: null (never sent as such)
        **dict.fromkeys(contract.objects["gwestr__Shipment__c"].keys() - {"Id", *values}),
    }
    assert notification.fields["Name"] is None
