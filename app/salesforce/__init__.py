"""Salesforce's REST API for the polls (reconcile, backfill, refetch) and `sfrelay check`.

The polls code against `SalesforceApi`; `SalesforceClient` implements it with simple-salesforce
(unpatched). Every method is a coroutine (or an async iterator) whose Salesforce calls run in a
worker thread, so a worker keeps applying pushed notifications while a poll waits on Salesforce.

    client = SalesforceClient(settings)            # ConfigError: incomplete credentials
    await client.require_api_headroom()            # ApiLimitReached: too few requests left
    until = await client.server_time()             # Salesforce's clock, never ours
    async for page in client.changed_records("Contact", since, until):
        ...                                        # a list of notifications per page
    await client.close()

Notifications are `app.jobs.JobNotification`s, as a pushed one: id ``<Id18>@<modstamp digits>``,
object ``Contact``, fields ``{"Id": ..., "Email": ..., "SystemModstamp": "...000Z", ...}`` with the
mapped fields, the username template's fields, SystemModstamp, LastModifiedDate, IsDeleted,
MasterRecordId (Contact, Lead) and IsConverted/ConvertedContactId (Lead).

Logins (app/salesforce/auth.py) follow the settings: a private key -> OAuth JWT bearer; consumer
key + secret without a username -> client credentials; username + password -> OAuth password
flow with the consumer key/secret, else SOAP login with the security token. An expired session
(401 INVALID_SESSION_ID) is renewed once per failure. Errors: app/errors.py (Salesforce*,
ApiLimitReached), mapped in one place (refusals.map_error).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Protocol

from app.jobs import JobNotification
from app.salesforce.auth import AuthFlow, credentials, salesforce_configured
from app.salesforce.client import (
    ApiUsage,
    DeletedRecord,
    DeletedWindow,
    OutboundMessageDefinition,
    SalesforceClient,
    UpdatedWindow,
)

__all__ = [
    "ApiUsage",
    "AuthFlow",
    "DeletedRecord",
    "DeletedWindow",
    "OutboundMessageDefinition",
    "SalesforceApi",
    "SalesforceClient",
    "UpdatedWindow",
    "credentials",
    "salesforce_configured",
]


class SalesforceApi(Protocol):
    """What sfrelay needs from Salesforce; datetimes are timezone-aware (UTC)."""

    api_usage: ApiUsage | None

    @property
    def api_version(self) -> str: ...

    async def login(self) -> str: ...

    async def refresh_api_usage(self) -> ApiUsage: ...

    async def require_api_headroom(self) -> ApiUsage: ...

    async def server_time(self) -> datetime: ...

    async def describe_fields(self, sobject: str) -> dict[str, str]: ...

    async def missing_fields(self, sobject: str) -> list[str]: ...

    def changed_records(
        self, sobject: str, start: datetime, end: datetime, *, include_deleted: bool = False
    ) -> AsyncIterator[list[JobNotification]]: ...

    def records_by_id(
        self,
        sobject: str,
        ids: Iterable[str],
        *,
        include_deleted: bool = False,
        reserve: bool = True,
    ) -> AsyncIterator[list[JobNotification]]: ...

    async def deleted_records(
        self, sobject: str, start: datetime, end: datetime
    ) -> DeletedWindow: ...

    async def updated_ids(self, sobject: str, start: datetime, end: datetime) -> UpdatedWindow: ...

    async def close(self) -> None: ...
