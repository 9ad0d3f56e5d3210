"""A local Salesforce for the tests: real HTTPS (a CA made per session with trustme), reached
through a CONNECT proxy so `login.salesforce.com`, `acme.my.salesforce.com` ... all land here,
answering with the REST and OAuth shapes Salesforce documents. simple-salesforce, unpatched,
is the client: point it here with HTTPS_PROXY and REQUESTS_CA_BUNDLE (see `SalesforceServer.env`).

What it answers (the org's state is `FakeOrg`):

- POST /services/oauth2/token: JWT bearer (RS256 assertion checked against the Connected App's
  certificate key), client credentials (HTTP Basic; My Domain hosts only), password grants.
- POST /services/Soap/u/<ver>: SOAP login (username, password + security token).
- /services/data/vNN.0/: query and queryAll (a small SOQL subset, nextRecordsUrl paging),
  sobjects/<Object>/describe, /updated, /deleted, /<Id>, limits; `Sforce-Limit-Info` on each.
- The delete log behind /deleted (getDeleted): every deletion, kept after the record has left
  queryAll (a hard delete, a record emptied from the Recycle Bin) and after an undelete, for 15
  days or until the org purges the log (`FakeOrg.purge_delete_log`: earliestDateAvailable moves
  there); times to the minute (seconds ignored), start at least a minute before end.
- /services/data/vNN.0/tooling/query: WorkflowOutboundMessage (the org's Outbound Messages,
  `FakeOrg.outbound_messages`), answered with the Tooling API's QueryResult; `Metadata` and
  `FullName` only when the query returns at most one record, as Salesforce allows; a user
  without "View Setup and Configuration" is `FakeOrg.tooling_refusal`.
- OAuth refusals as `{"error", "error_description"}` with HTTP 400 (`FakeOrg.refuse_logins`).
- A retired API version (`FakeOrg.oldest_version`): 410 GONE on every REST resource.
- Errors as Salesforce sends them: 401 INVALID_SESSION_ID, 403 REQUEST_LIMIT_EXCEEDED,
  400 MALFORMED_QUERY / INVALID_FIELD / INVALID_TYPE, and injected 5xx (`FakeOrg.fail_next`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import select
import socket
import socketserver
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

INSTANCE = "acme.my.salesforce.com"
ORG_ID = "00D5g000004ABCDEAQ"
CONSUMER_KEY = "3MVG9sfrelayTestConsumerKey"
CONSUMER_SECRET = "sfrelay-test-consumer-secret"
USERNAME = "integration@example.org"
PASSWORD = "Pa55-word"
SECURITY_TOKEN = "TOKENabc123"

FIELDS: dict[str, dict[str, str]] = {
    "Contact": {
        "Id": "id",
        "Email": "email",
        "FirstName": "string",
        "LastName": "string",
        "SystemModstamp": "datetime",
        "LastModifiedDate": "datetime",
        "IsDeleted": "boolean",
        "MasterRecordId": "reference",
        "Birthdate": "date",
    },
    "Lead": {
        "Id": "id",
        "Email": "email",
        "FirstName": "string",
        "LastName": "string",
        "SystemModstamp": "datetime",
        "LastModifiedDate": "datetime",
        "IsDeleted": "boolean",
        "MasterRecordId": "reference",
        "IsConverted": "boolean",
        "ConvertedContactId": "reference",
    },
}
_SELECT = re.compile(
    r"SELECT (?P<fields>.+?) FROM (?P<obj>\w+)(?: WHERE (?P<where>.+?))?"
    r"(?: ORDER BY (?P<order>[\w, ]+?))?(?: LIMIT (?P<limit>\d+))?",
    re.IGNORECASE | re.DOTALL,
)
_COMPARE = re.compile(r"(\w+) (>=|<=|<|>|=) (\S+)")
_IN = re.compile(r"Id IN \(((?:'[A-Za-z0-9]+'(?:, )?)+)\)", re.IGNORECASE)
_TOOLING_SELECT = re.compile(
    r"SELECT (?P<fields>.+?) FROM (?P<obj>\w+)(?: WHERE Id = '(?P<id>[A-Za-z0-9]+)')?",
    re.IGNORECASE,
)
ENDPOINT_URL = "https://sfrelay.example.org/salesforce/outbound-message?token=s3cret-token"
# The Outbound Messages a fresh org has: one per object, to sfrelay, selecting the fields of
# sfrelay's own WSDLs (wsdl/*.wsdl).
WSDL_FIELDS = {
    "Contact": ["Email", "FirstName", "Id", "LastModifiedDate", "LastName", "SystemModstamp"],
    "Lead": [
        "ConvertedContactId",
        "Email",
        "FirstName",
        "Id",
        "IsConverted",
        "LastModifiedDate",
        "LastName",
        "SystemModstamp",
    ],
}
_SOQL_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")


def sf_datetime(value: datetime) -> str:
    """A dateTime as the REST API renders it."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{value.microsecond // 1000:03d}+0000"
    )


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def outbound_message(
    sobject: str,
    name: str,
    fields: list[str],
    endpoint_url: str = ENDPOINT_URL,
    include_session_id: bool = False,
) -> dict[str, Any]:
    """A WorkflowOutboundMessage as the Tooling API has it: its top-level fields and its
    Metadata (the Metadata API's WorkflowOutboundMessage type)."""
    developer_name = name.replace(" ", "_")
    return {
        "Name": developer_name,
        "EntityDefinitionId": sobject,  # a standard object's; a custom one's is its 01I Id
        "FullName": f"{sobject}.{developer_name}",
        "Metadata": {
            "apiVersion": 62.0,
            "description": None,
            "endpointUrl": endpoint_url,
            "fields": list(fields),
            "includeSessionId": include_session_id,
            "integrationUser": USERNAME,
            "name": name,
            "protected": False,
            "useDeadLetterQueue": False,
        },
    }


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FakeOrg:
    """The org behind the server; tests change it directly (the server reads it per request)."""

    public_key: Any = None
    fields: dict[str, dict[str, str]] = field(
        default_factory=lambda: {k: dict(v) for k, v in FIELDS.items()}
    )
    records: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in FIELDS}
    )
    # The delete log: sobject -> Id -> deletedDate (the record's SystemModstamp at deletion).
    delete_log: dict[str, dict[str, datetime]] = field(
        default_factory=lambda: {name: {} for name in FIELDS}
    )
    log_purged_at: datetime | None = None
    max_deleted_ids: int = 600_000  # sobjects/<Object>/deleted: more is EXCEEDED_ID_LIMIT
    api_used: int = 0
    api_max: int = 15_000
    page_size: int = 2000
    fixed_time: datetime | None = None
    reject_all_sessions: bool = False
    # Every login refused with this OAuth error (status, error, error_description), as when
    # an administrator changes the Connected App or the integration user months in.
    refuse_logins: tuple[int, str, str] | None = None
    # REST API versions below this are retired: 410 GONE (Salesforce's end-of-life policy).
    oldest_version: float = 31.0
    # Objects the integration user may no longer read (its profile lost Read): SOQL calls
    # them not supported (INVALID_TYPE), their sobjects/ resources do not exist (404).
    unreadable_objects: set[str] = field(default_factory=set)
    fail_next: list[tuple[int, str, str]] = field(default_factory=list)
    # Id (04k...) -> WorkflowOutboundMessage (see `outbound_message`)
    outbound_messages: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "04k5g000000AbCdAAK": outbound_message(
                "Contact", "sfrelay Contact", WSDL_FIELDS["Contact"]
            ),
            "04k5g000000AbCeAAK": outbound_message("Lead", "sfrelay Lead", WSDL_FIELDS["Lead"]),
        }
    )
    # (status, errorCode, message) for every Tooling API request: a user without "View
    # Setup and Configuration"
    tooling_refusal: tuple[int, str, str] | None = None
    tokens: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    connects: list[str] = field(default_factory=list)
    audiences: list[str] = field(default_factory=list)  # the JWT bearer assertions' aud
    served_records: int = 0
    last_query: str = ""
    request_lines: list[int] = field(default_factory=list)
    cursors: dict[str, tuple[str, list[str], list[str], bool]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # When set: each API request sets `arrived`, then waits (outside the lock) for `release`.
    hold: bool = False
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def now(self) -> datetime:
        return self.fixed_time or datetime.now(UTC)

    def add(self, sobject: str, record_id: str, **values: Any) -> None:
        values.setdefault("SystemModstamp", self.now())
        values.setdefault("LastModifiedDate", values["SystemModstamp"])
        values.setdefault("IsDeleted", False)
        self.records[sobject][record_id] = {"Id": record_id, **values}

    def delete(self, sobject: str, record_id: str, at: datetime, master: str | None = None) -> None:
        record = self.records[sobject][record_id]
        record.update(IsDeleted=True, SystemModstamp=at, MasterRecordId=master)
        self.delete_log[sobject][record_id] = at

    def hard_delete(self, sobject: str, record_id: str, at: datetime) -> None:
        """Bulk API hardDelete: past the Recycle Bin, so queryAll never returns it again;
        only the delete log knows."""
        self.delete(sobject, record_id, at)
        self.empty_recycle_bin(sobject, record_id)

    def empty_recycle_bin(self, sobject: str, record_id: str) -> None:
        """A deleted record purged from the Recycle Bin: gone from queryAll, still logged."""
        assert self.records[sobject][record_id]["IsDeleted"]
        del self.records[sobject][record_id]

    def undelete(self, sobject: str, record_id: str, at: datetime) -> None:
        """Restored from the Recycle Bin: live again; its delete log entry stays."""
        record = self.records[sobject][record_id]
        record.update(IsDeleted=False, SystemModstamp=at, LastModifiedDate=at, MasterRecordId=None)

    def purge_delete_log(self, before: datetime) -> None:
        """Salesforce's own purge of a delete log over its size limit (or the Recycle Bin
        emptied by an administrator): earlier entries are gone and earliestDateAvailable is
        `before`, so a window starting earlier is refused."""
        self.log_purged_at = before
        for log in self.delete_log.values():
            for record_id in [i for i, at in log.items() if at < before]:
                del log[record_id]

    def expire_sessions(self) -> None:
        self.tokens.clear()

    def issue_token(self) -> str:
        token = f"00D5g000004ABCD!{secrets.token_urlsafe(24)}"
        self.tokens.add(token)
        return token

    # --- OAuth and SOAP login -------------------------------------------------------------

    def oauth(self, host: str, form: dict[str, str], authorization: str | None) -> str:
        grant = form.get("grant_type")
        self.counts[f"token:{grant}"] += 1
        if self.refuse_logins is not None:
            raise Refusal(*self.refuse_logins)
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            try:
                claims = jwt.decode(
                    form.get("assertion", ""),
                    self.public_key,
                    algorithms=["RS256"],
                    audience=["https://login.salesforce.com", "https://test.salesforce.com"],
                )
            except jwt.PyJWTError as exc:
                raise Refusal(400, "invalid_grant", f"invalid assertion: {exc}") from None
            self.audiences.append(str(claims.get("aud")))
            if claims.get("iss") != CONSUMER_KEY:
                raise Refusal(400, "invalid_client_id", "client identifier invalid")
            if claims.get("sub") != USERNAME:
                raise Refusal(400, "invalid_grant", "user hasn't approved this consumer")
        elif grant == "client_credentials":
            if not host.endswith(".my.salesforce.com"):
                raise Refusal(400, "invalid_request", "request not supported on this domain")
            expected = base64.b64encode(f"{CONSUMER_KEY}:{CONSUMER_SECRET}".encode()).decode()
            if authorization != f"Basic {expected}":
                raise Refusal(400, "invalid_client", "invalid client credentials")
        elif grant == "password":
            if (form.get("client_id"), form.get("client_secret")) != (
                CONSUMER_KEY,
                CONSUMER_SECRET,
            ):
                raise Refusal(400, "invalid_client", "invalid client credentials")
            if (form.get("username"), form.get("password")) != (
                USERNAME,
                PASSWORD + SECURITY_TOKEN,
            ):
                raise Refusal(400, "invalid_grant", "authentication failure")
        else:
            raise Refusal(400, "unsupported_grant_type", "grant type not supported")
        return json.dumps(
            {
                "access_token": self.issue_token(),
                "instance_url": f"https://{INSTANCE}",
                "id": f"https://login.salesforce.com/id/{ORG_ID}/005000000000001AAA",
                "token_type": "Bearer",
                "issued_at": str(int(self.now().timestamp() * 1000)),
                "signature": "c2lnbmF0dXJl",
            }
        )

    def soap_login(self, body: str, version: str) -> tuple[int, str]:
        self.counts["soap:login"] += 1
        if float(version) < self.oldest_version:
            return 500, _soap_fault(
                "UNSUPPORTED_API_VERSION",
                "UnexpectedErrorFault",
                f"The API version that was specified ({version}) is below the minimum "
                f"supported ({self.oldest_version}). Change the version number and run the "
                "request again.",
            )
        username = re.search(r"<n1:username>(.*?)</n1:username>", body)
        password = re.search(r"<n1:password>(.*?)</n1:password>", body)
        if (
            username is None
            or password is None
            or (username.group(1), password.group(1))
            != (escape(USERNAME), escape(PASSWORD + SECURITY_TOKEN))
        ):
            return 500, _soap_fault(
                "INVALID_LOGIN",
                "LoginFault",
                "Invalid username, password, security token; or user locked out.",
            )
        return 200, (
            '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
            'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns="urn:partner.soap.sforce.com"><soapenv:Body><loginResponse><result>'
            f"<metadataServerUrl>https://{INSTANCE}/services/Soap/m/{version}/{ORG_ID[:15]}"
            "</metadataServerUrl><passwordExpired>false</passwordExpired><sandbox>false"
            f"</sandbox><serverUrl>https://{INSTANCE}/services/Soap/u/{version}/{ORG_ID[:15]}"
            f"</serverUrl><sessionId>{self.issue_token()}</sessionId>"
            "<userId>005000000000001AAA</userId></result></loginResponse></soapenv:Body>"
            "</soapenv:Envelope>"
        )

    # --- REST -----------------------------------------------------------------------------

    def render(self, sobject: str, record: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attributes": {
                "type": sobject,
                "url": f"/services/data/v62.0/sobjects/{sobject}/{record['Id']}",
            }
        }
        for name in fields:
            value = record.get(name)
            out[name] = sf_datetime(value) if isinstance(value, datetime) else value
        return out

    def _field_names(self, sobject: str, names: list[str], soql: str) -> list[str]:
        known = {name.lower(): name for name in self.fields[sobject]}
        chosen = []
        for name in names:
            if name.lower() not in known:
                column = soql.find(name) + 1
                raise Refusal(
                    400,
                    "INVALID_FIELD",
                    f"\n{soql[:80]}\n{' ' * column}^\nERROR at Row:1:Column:{column}\nNo such "
                    f"column '{name}' on entity '{sobject}'. If you are attempting to use a "
                    "custom field, be sure to append the '__c' after the custom field name. "
                    "Please reference your WSDL or the describe call for the appropriate names.",
                )
            chosen.append(known[name.lower()])
        return chosen

    def query(self, soql: str, include_deleted: bool, version: str) -> dict[str, Any]:
        self.last_query = soql
        match = _SELECT.fullmatch(soql.strip())
        if match is None:
            raise Refusal(400, "MALFORMED_QUERY", f"unexpected token: '{soql.split()[-1]}'")
        sobject = match.group("obj")
        if sobject not in self.records or sobject in self.unreadable_objects:
            raise Refusal(
                400,
                "INVALID_TYPE",
                f"\n{soql[:80]}\nERROR at Row:1:Column:1\nsObject type '{sobject}' is not "
                "supported. If you are attempting to use a custom object, be sure to append "
                "the '__c' after the entity name.",
            )
        names = [n.strip() for n in match.group("fields").split(",")]
        if len({n.lower() for n in names}) != len(names):
            raise Refusal(400, "MALFORMED_QUERY", "duplicate field selected")
        fields = self._field_names(sobject, names, soql)
        rows = [
            r for r in self.records[sobject].values() if include_deleted or not r.get("IsDeleted")
        ]
        for condition in re.split(r" AND ", match.group("where") or "", flags=re.IGNORECASE):
            if condition:
                rows = self._filter(rows, condition, sobject, soql)
        if match.group("order"):
            keys = self._field_names(
                sobject, [k.strip() for k in match.group("order").split(",")], soql
            )
            rows.sort(key=lambda r: tuple(r.get(k) for k in keys))
        if match.group("limit"):
            rows = rows[: int(match.group("limit"))]
        locator = f"01g5g{secrets.token_hex(5)}"
        self.cursors[locator] = (sobject, [r["Id"] for r in rows], fields, include_deleted)
        return self.page(locator, 0, version)

    def tooling_query(self, soql: str, version: str) -> dict[str, Any]:
        """The Tooling API's query of WorkflowOutboundMessage (all, or `WHERE Id = '...'`)."""
        self.last_query = soql
        match = _TOOLING_SELECT.fullmatch(soql.strip())
        if match is None:
            raise Refusal(400, "MALFORMED_QUERY", f"unexpected token: '{soql.split()[-1]}'")
        if match.group("obj") != "WorkflowOutboundMessage":
            raise Refusal(
                400, "INVALID_TYPE", f"sObject type '{match.group('obj')}' is not supported."
            )
        names = [n.strip() for n in match.group("fields").split(",")]
        known = {"Id", "Name", "EntityDefinitionId", "FullName", "Metadata"}
        for name in names:
            if name not in known:
                raise Refusal(
                    400,
                    "INVALID_FIELD",
                    f"No such column '{name}' on entity 'WorkflowOutboundMessage'. If you are "
                    "attempting to use a custom field, be sure to append the '__c' after the "
                    "custom field name. Please reference your WSDL or the describe call for "
                    "the appropriate names.",
                )
        rows = [
            {"Id": record_id, **message}
            for record_id, message in self.outbound_messages.items()
            if match.group("id") in (None, record_id, record_id[:15])
        ]
        if {"Metadata", "FullName"} & set(names) and len(rows) > 1:
            raise Refusal(
                400,
                "MALFORMED_QUERY",
                "When retrieving results with Metadata or FullName fields, the query "
                "qualifications must specify no more than one row for retrieval. Result "
                f"size: {len(rows)}",
            )
        records = [
            {
                "attributes": {
                    "type": "WorkflowOutboundMessage",
                    "url": f"/services/data/v{version}/tooling/sobjects/WorkflowOutboundMessage/"
                    f"{row['Id']}",
                },
                **{name: row[name] for name in names},
            }
            for row in rows
        ]
        return {
            "size": len(records),
            "totalSize": len(records),
            "done": True,
            "queryLocator": None,
            "entityTypeName": "WorkflowOutboundMessage",
            "records": records,
        }

    def _filter(
        self, rows: list[dict[str, Any]], condition: str, sobject: str, soql: str
    ) -> list[dict[str, Any]]:
        found = _IN.fullmatch(condition.strip())
        if found:
            ids = {i.strip().strip("'") for i in found.group(1).split(",")}
            return [r for r in rows if r["Id"] in ids or r["Id"][:15] in ids]
        found = _COMPARE.fullmatch(condition.strip())
        if found is None:
            raise Refusal(400, "MALFORMED_QUERY", f"unexpected token: '{condition[:40]}'")
        name, op, literal = found.groups()
        (name,) = self._field_names(sobject, [name], soql)
        value: Any
        if _SOQL_DATETIME.fullmatch(literal):
            value = _parse_time(literal)
        elif literal.lower() in ("true", "false"):
            value = literal.lower() == "true"
        elif literal.startswith("'") and literal.endswith("'"):
            value = literal[1:-1]
        else:
            raise Refusal(400, "MALFORMED_QUERY", f"unexpected token: '{literal}'")
        compare = {
            ">=": lambda a: a >= value,
            "<=": lambda a: a <= value,
            "<": lambda a: a < value,
            ">": lambda a: a > value,
            "=": lambda a: a == value,
        }[op]
        return [r for r in rows if r.get(name) is not None and compare(r[name])]

    def page(self, locator: str, offset: int, version: str) -> dict[str, Any]:
        if locator not in self.cursors:
            raise Refusal(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        sobject, ids, fields, _ = self.cursors[locator]
        chunk = ids[offset : offset + self.page_size]
        records = [
            self.render(sobject, self.records[sobject][i], fields)
            for i in chunk
            if i in self.records[sobject]
        ]
        self.served_records += len(records)
        done = offset + self.page_size >= len(ids)
        body: dict[str, Any] = {"totalSize": len(ids), "done": done, "records": records}
        if not done:
            body["nextRecordsUrl"] = (
                f"/services/data/v{version}/query/{locator}-{offset + self.page_size}"
            )
        else:
            del self.cursors[locator]
        return body

    def replication(self, sobject: str, kind: str, params: dict[str, list[str]]) -> dict[str, Any]:
        try:
            start, end = _parse_time(params["start"][0]), _parse_time(params["end"][0])
        except (KeyError, ValueError):
            raise Refusal(400, "INVALID_REPLICATION_DATE", "start and end are required") from None
        # The seconds are ignored.
        start, end = start.replace(second=0, microsecond=0), end.replace(second=0, microsecond=0)
        if end - start <= timedelta(minutes=1):
            raise Refusal(
                400,
                "INVALID_REPLICATION_DATE",
                "startDate must be at least one minute greater than endDate",
            )
        now = self.now()
        earliest = now - timedelta(days=15)
        if self.log_purged_at is not None:
            earliest = max(earliest, self.log_purged_at)
        if start < earliest:
            raise Refusal(
                400, "INVALID_REPLICATION_DATE", "startDate before org replication enabled date"
            )
        covered = min(end, now).replace(second=0, microsecond=0)
        if kind == "updated":
            ids = [
                r["Id"]
                for r in self.records[sobject].values()
                if not r.get("IsDeleted") and start <= r["SystemModstamp"] <= covered
            ]
            return {"ids": ids, "latestDateCovered": sf_datetime(covered)}
        deleted = [
            {"id": record_id, "deletedDate": sf_datetime(at)}
            for record_id, at in self.delete_log[sobject].items()
            if start <= at <= covered
        ]
        if len(deleted) > self.max_deleted_ids:
            raise Refusal(
                400,
                "EXCEEDED_ID_LIMIT",
                f"There are more than {self.max_deleted_ids} deleted records: choose start and "
                "end dates that are closer together",
            )
        return {
            "deletedRecords": deleted,
            "earliestDateAvailable": sf_datetime(earliest),
            "latestDateCovered": sf_datetime(covered),
        }

    def rest(self, method: str, path: str, params: dict[str, list[str]]) -> tuple[int, Any]:
        match = re.fullmatch(r"/services/data/v(\d+\.\d)/(.*?)/?", path)
        if match is None:
            raise Refusal(404, "NOT_FOUND", "The requested resource does not exist")
        version, rest = match.groups()
        if float(version) < self.oldest_version:
            raise Refusal(410, "GONE", f"API version {version} is retired")
        if self.fail_next:
            status, code, message = self.fail_next.pop(0)
            raise Refusal(status, code, message)
        if rest == "tooling/query":
            self.counts["tooling"] += 1
            if self.tooling_refusal is not None:
                raise Refusal(*self.tooling_refusal)
            return 200, self.tooling_query(params.get("q", [""])[0], version)
        if rest in ("query", "queryAll"):
            self.counts[rest] += 1
            return 200, self.query(params.get("q", [""])[0], rest == "queryAll", version)
        more = re.fullmatch(r"query(?:All)?/(\w+)-(\d+)", rest)
        if more:
            self.counts["query_more"] += 1
            return 200, self.page(more.group(1), int(more.group(2)), version)
        if rest == "limits":
            self.counts["limits"] += 1
            return 200, {
                "DailyApiRequests": {"Max": self.api_max, "Remaining": self.api_max - self.api_used}
            }
        sobj = re.fullmatch(r"sobjects/(\w+)(?:/(.+))?", rest)
        if sobj is None:
            raise Refusal(404, "NOT_FOUND", "The requested resource does not exist")
        sobject, tail = sobj.groups()
        if sobject not in self.records or sobject in self.unreadable_objects:
            raise Refusal(404, "NOT_FOUND", "The requested resource does not exist")
        self.counts[f"{sobject}:{tail}"] += 1
        if tail == "describe":
            return 200, {
                "name": sobject,
                "fields": [{"name": n, "type": t} for n, t in self.fields[sobject].items()],
            }
        if tail in ("deleted", "updated"):
            return 200, self.replication(sobject, tail, params)
        record = self.records[sobject].get(tail or "")
        if record is None or record.get("IsDeleted"):
            raise Refusal(404, "NOT_FOUND", "The requested resource does not exist")
        return 200, self.render(sobject, record, list(self.fields[sobject]))


def _soap_fault(code: str, fault: str, message: str) -> str:
    """A SOAP API fault as Salesforce sends it (HTTP 500)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
        'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:sf="urn:fault.partner.soap.sforce.com" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
        f"<soapenv:Fault><faultcode>sf:{code}</faultcode><faultstring>{code}: {message}"
        f'</faultstring><detail><sf:{fault} xsi:type="sf:{fault}">'
        f"<sf:exceptionCode>{code}</sf:exceptionCode><sf:exceptionMessage>{message}"
        f"</sf:exceptionMessage></sf:{fault}></detail></soapenv:Fault>"
        "</soapenv:Body></soapenv:Envelope>"
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPSServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        return format_datetime(self.server.org.now().astimezone(UTC), usegmt=True)

    def _send(self, status: int, body: str, content_type: str, extra: dict[str, str]) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length).decode()

    def do_POST(self) -> None:
        org = self.server.org
        url = urlsplit(self.path)
        body = self._body()
        host = (self.headers.get("Host") or "").split(":")[0]
        with org.lock:
            if url.path == "/services/oauth2/token":
                form = {k: v[0] for k, v in parse_qs(body).items()}
                try:
                    answer = org.oauth(host, form, self.headers.get("Authorization"))
                except Refusal as exc:
                    answer = json.dumps({"error": exc.code, "error_description": exc.message})
                    self._send(exc.status, answer, "application/json;charset=UTF-8", {})
                    return
                self._send(200, answer, "application/json;charset=UTF-8", {})
                return
            soap = re.fullmatch(r"/services/Soap/u/(\d+\.\d)", url.path)
            if soap:
                status, xml = org.soap_login(body, soap.group(1))
                self._send(status, xml, "text/xml;charset=UTF-8", {})
                return
        self._send(404, '[{"errorCode":"NOT_FOUND","message":"no such resource"}]', "json", {})

    def do_GET(self) -> None:
        org = self.server.org
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization") or ""
        if org.hold:
            org.arrived.set()
            if not org.release.wait(10):
                self._send(503, "[]", "application/json", {})
                return
        with org.lock:
            org.request_lines.append(len(f"GET {self.path} HTTP/1.1"))
            token = auth.removeprefix("Bearer ")
            if org.reject_all_sessions or token not in org.tokens:
                org.counts["401"] += 1
                body = [
                    {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}
                ]
                self._send(401, json.dumps(body), "application/json;charset=UTF-8", {})
                return
            if org.api_used >= org.api_max:
                status, answer = (
                    403,
                    [
                        {
                            "message": "TotalRequests Limit exceeded.",
                            "errorCode": "REQUEST_LIMIT_EXCEEDED",
                        }
                    ],
                )
            else:
                org.api_used += 1
                try:
                    status, answer = org.rest("GET", url.path, parse_qs(url.query))
                except Refusal as exc:
                    status, answer = exc.status, [{"message": exc.message, "errorCode": exc.code}]
            limit = {"Sforce-Limit-Info": f"api-usage={org.api_used}/{org.api_max}"}
            self._send(status, json.dumps(answer), "application/json;charset=UTF-8", limit)


class _HTTPSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, org: FakeOrg, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.org = org
        self.socket = context.wrap_socket(self.socket, server_side=True)


class _Proxy(socketserver.ThreadingTCPServer):
    """HTTP CONNECT to any host -> the local HTTPS server (TLS stays end to end)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: int, server: SalesforceServer) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target = target
        self.owner = server


class _ProxyHandler(socketserver.BaseRequestHandler):
    server: _Proxy

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode()
        method, _, target = line.partition(" ")
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.server.owner.org.connects.append(target.split()[0])
        with socket.create_connection(("127.0.0.1", self.server.target)) as upstream:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            sockets = [client, upstream]
            while not self.server.owner.stopping.is_set():
                readable, _, _ = select.select(sockets, [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)


class SalesforceServer:
    """The HTTPS server and its proxy, in threads; `org` is swapped for a fresh one per test."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert(
            "*.salesforce.com",
            "*.my.salesforce.com",
            "*.sandbox.my.salesforce.com",
            "login.salesforce.com",
            "localhost",
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key_file = directory / "connected-app.key"
        self.private_key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.public_key = key.public_key()
        self.stopping = threading.Event()
        self.org = self.fresh_org()
        self.https = _HTTPSServer(self.org, context)
        self.proxy = _Proxy(self.https.server_address[1], self)
        self._threads = [
            threading.Thread(target=s.serve_forever, daemon=True) for s in (self.https, self.proxy)
        ]
        for thread in self._threads:
            thread.start()

    def fresh_org(self) -> FakeOrg:
        self.org = FakeOrg(public_key=self.public_key)
        with contextlib.suppress(AttributeError):
            self.https.org = self.org
        return self.org

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def env(self) -> dict[str, str]:
        """What makes requests (so simple-salesforce) reach this server and trust it."""
        return {
            "HTTPS_PROXY": self.proxy_url,
            "https_proxy": self.proxy_url,
            "REQUESTS_CA_BUNDLE": str(self.ca_file),
        }

    def stop(self) -> None:
        self.stopping.set()
        for server in (self.https, self.proxy):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
