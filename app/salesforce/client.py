"""The Salesforce REST client: simple-salesforce in worker threads, one login renewal per expired
session, API usage read from every response, Salesforce's errors mapped onto sfrelay's tree."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from simple_salesforce.api import Salesforce
from simple_salesforce.exceptions import SalesforceError, SalesforceExpiredSession

from app.config import Settings
from app.errors import ApiLimitReached, SalesforceQueryRefused, SalesforceUnavailable
from app.jobs import JobNotification
from app.mapping import FieldMap, load_field_map
from app.salesforce import soql
from app.salesforce.auth import AuthFlow, credentials, login
from app.salesforce.refusals import map_error
from app.sfid import sf_key

log = logging.getLogger(__name__)
T = TypeVar("T")

# (connect, read) seconds: Salesforce ends a SOQL query itself after 120 s.
REQUEST_TIMEOUT = (10.0, 130.0)
# Tooling API: Metadata (and FullName) only in a query that returns one record.
_ONE_OUTBOUND_MESSAGE = "SELECT Id, FullName, Metadata FROM WorkflowOutboundMessage WHERE Id = '{}'"


@dataclass(frozen=True, slots=True)
class ApiUsage:
    """The org's daily API requests, from `Sforce-Limit-Info: api-usage=used/max`."""

    used: int
    max: int

    @property
    def remaining(self) -> int:
        return max(self.max - self.used, 0)


@dataclass(frozen=True, slots=True)
class DeletedRecord:
    id: str  # 18 characters
    deleted_at: datetime


@dataclass(frozen=True, slots=True)
class DeletedWindow:
    """`sobjects/<Object>/deleted`: the records deleted in the window, and up to when Salesforce
    vouches for the list (`latest_covered`, a watermark on Salesforce's clock)."""

    records: list[DeletedRecord]
    latest_covered: datetime
    earliest_available: datetime | None


@dataclass(frozen=True, slots=True)
class UpdatedWindow:
    ids: list[str]
    latest_covered: datetime


@dataclass(frozen=True, slots=True)
class OutboundMessageDefinition:
    """One Outbound Message as the Tooling API's WorkflowOutboundMessage describes it: its
    object (from FullName, `<Object>.<name>`) and its `Metadata` (the selected fields...)."""

    id: str
    name: str
    sobject: str
    endpoint_url: str
    fields: tuple[str, ...]
    include_session_id: bool
    integration_user: str | None
    api_version: str | None


class _TimeoutAdapter(HTTPAdapter):
    """Every request gets a timeout, including simple-salesforce's logins (which set none)."""

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        return super().send(
            request, stream, REQUEST_TIMEOUT if timeout is None else timeout, verify, cert, proxies
        )


class SalesforceClient:
    """sfrelay's Salesforce API client (see app/salesforce/__init__.py for the contract)."""

    def __init__(self, settings: Settings, field_map: FieldMap | None = None) -> None:
        self._creds = credentials(settings)  # ConfigError before any network use
        self._field_map = field_map or load_field_map(settings.field_map)
        self._min_remaining = settings.sf_min_api_remaining
        self._session = requests.Session()
        adapter = _TimeoutAdapter()
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.hooks["response"].append(self._on_response)
        self._sf: Salesforce | None = None
        self._login_lock = threading.Lock()
        self._thread = threading.local()
        self.api_usage: ApiUsage | None = None
        self.last_total_size: int | None = None  # totalSize of the last query (progress, ETA)
        self.logins = 0

    @property
    def api_version(self) -> str:
        return self._creds.api_version

    @property
    def flow(self) -> AuthFlow:
        return self._creds.flow

    @property
    def instance(self) -> str | None:
        return None if self._sf is None else str(self._sf.sf_instance)

    # --- in worker threads ------------------------------------------------------------------

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        # Any response, error or not, tells the org's API usage and Salesforce's clock.
        info = response.headers.get("Sforce-Limit-Info")
        if info:
            usage = Salesforce.parse_api_usage(info).get("api-usage")
            if usage is not None:
                self.api_usage = ApiUsage(usage.used, usage.total)
        date = response.headers.get("Date")
        if date:
            try:
                self._thread.server_time = parsedate_to_datetime(date).astimezone(UTC)
            except (TypeError, ValueError):
                log.warning("Salesforce sent an unreadable Date header: %r", date[:40])

    def _login(self, expired: Salesforce | None) -> Salesforce:
        with self._login_lock:
            if self._sf is not None and self._sf is not expired:
                return self._sf  # another thread renewed the session already
            session_id, instance = login(self._creds, self._session)
            self._sf = Salesforce(
                session_id=session_id,
                instance_url=f"https://{instance}",
                version=self._creds.api_version,
                session=self._session,
            )
            self.logins += 1
            log.info("Salesforce login (%s) to %s", self._creds.flow, instance)
            return self._sf

    def _call(self, what: str, fn: Callable[[Salesforce], T]) -> T:
        """fn against the current session; an expired session is renewed once, not in a
        loop: a second refusal right after a fresh login is an error."""
        sf = self._sf or self._login(None)
        renewed = False
        while True:
            try:
                return fn(sf)
            except SalesforceExpiredSession as exc:
                if renewed:
                    raise map_error(exc, what) from None
                log.info("Salesforce session expired during %s: logging in again", what)
                sf, renewed = self._login(sf), True
            except SalesforceError as exc:
                raise map_error(exc, what) from None
            except requests.RequestException as exc:
                raise SalesforceUnavailable(
                    f"cannot reach Salesforce for {what}: {type(exc).__name__}; the next run "
                    "tries again"
                ) from None

    def _check_headroom(self) -> None:
        usage = self.api_usage
        if usage is not None and usage.remaining < self._min_remaining:
            raise ApiLimitReached(
                f"only {usage.remaining} of the org's {usage.max} daily API requests are left "
                f"(SFRELAY_SF_MIN_API_REMAINING={self._min_remaining}): polling stops here and "
                "resumes on a later run; pushed notifications are still applied"
            )

    def _server_time(self) -> datetime:
        value: datetime | None = getattr(self._thread, "server_time", None)
        if value is None:
            raise SalesforceUnavailable("Salesforce's response had no Date header")
        return value

    async def _run(self, what: str, fn: Callable[[Salesforce], T]) -> T:
        return await asyncio.to_thread(self._call, what, fn)

    # --- the API (coroutines; every Salesforce call runs off the event loop) ---------------

    async def login(self) -> str:
        """Log in now (otherwise the first call does); returns the instance host."""
        sf = await asyncio.to_thread(self._login, self._sf)
        return str(sf.sf_instance)

    async def refresh_api_usage(self) -> ApiUsage:
        """The org's daily API requests, read from `limits/` now."""

        def limits(sf: Salesforce) -> ApiUsage:
            daily = _body(sf.restful("limits/")).get("DailyApiRequests") or {}
            if "Max" in daily and "Remaining" in daily:
                maximum, remaining = int(daily["Max"]), int(daily["Remaining"])
                self.api_usage = ApiUsage(maximum - remaining, maximum)
            if self.api_usage is None:
                raise SalesforceUnavailable("Salesforce's limits/ gave no DailyApiRequests")
            return self.api_usage

        return await self._run("limits", limits)

    async def require_api_headroom(self) -> ApiUsage:
        """ApiLimitReached unless at least SFRELAY_SF_MIN_API_REMAINING requests are left; a
        poll calls this before it starts (a low reading is re-read, so it cannot stick)."""
        usage = self.api_usage
        if usage is None or usage.remaining < self._min_remaining:
            usage = await self.refresh_api_usage()
        self._check_headroom()
        return usage

    async def server_time(self) -> datetime:
        """Salesforce's clock now (the `Date` header, to the second): for watermarks."""

        def now(sf: Salesforce) -> datetime:
            sf.restful("limits/")
            return self._server_time()

        return await self._run("limits", now)

    async def describe_fields(self, sobject: str) -> dict[str, str]:
        """The fields the integration user can read on `sobject`: name -> type."""
        name = soql.sobject_name(sobject)
        body = await self._run(
            f"describe {name}", lambda sf: _body(sf.restful(f"sobjects/{name}/describe/"))
        )
        return {f["name"]: f.get("type", "") for f in body.get("fields", [])}

    async def missing_fields(self, sobject: str) -> list[str]:
        """Fields a poll of `sobject` selects that the integration user cannot read."""
        readable = {name.lower() for name in await self.describe_fields(sobject)}
        return [f for f in self.field_set(sobject) if f.lower() not in readable]

    def field_set(self, sobject: str) -> list[str]:
        obj = self._field_map.objects.get(sobject)
        if obj is None:
            raise SalesforceQueryRefused(
                f"the field map has no [{sobject}] section", None, sobject, None
            )
        return soql.field_set(obj, self._field_map)

    async def _pages(
        self, what: str, query: str, include_deleted: bool, sobject: str, reserve: bool = True
    ) -> AsyncIterator[list[JobNotification]]:
        """One list of notifications per page Salesforce returns (nextRecordsUrl), fetched
        only when the previous one was taken: a million records never sit in memory.
        `reserve`: stop below SFRELAY_SF_MIN_API_REMAINING (polls; not pushed work)."""
        if reserve:
            self._check_headroom()
        result = await self._run(what, lambda sf: sf.query(query, include_deleted=include_deleted))
        self.last_total_size = result.get("totalSize")
        while True:
            yield [soql.to_notification(sobject, record) for record in result["records"]]
            if result.get("done", True):
                return
            if reserve:
                self._check_headroom()
            more = partial(_query_more, result["nextRecordsUrl"])
            result = None  # the page just yielded is the caller's alone now
            result = await self._run(what, more)

    def changed_records(
        self,
        sobject: str,
        start: datetime,
        end: datetime,
        *,
        include_deleted: bool = False,
    ) -> AsyncIterator[list[JobNotification]]:
        """Records whose SystemModstamp is in [start, end) (UTC, to the second), oldest first,
        a page at a time, as notifications; `include_deleted` uses queryAll (IsDeleted,
        MasterRecordId tell deletions and merges)."""
        query = soql.changed_query(sobject, self.field_set(sobject), start, end)
        return self._pages(f"the {sobject} changes", query, include_deleted, sobject)

    async def records_by_id(
        self,
        sobject: str,
        ids: Iterable[str],
        *,
        include_deleted: bool = False,
        reserve: bool = True,
    ) -> AsyncIterator[list[JobNotification]]:
        """The current version of each record (for refetch), IDS_PER_QUERY Ids per query;
        records deleted since are missing (or, with `include_deleted`, have IsDeleted).
        `reserve` False: pushed work, which the polls' reserve of requests must not stop
        (only Salesforce's own limit does; each response's reading is kept)."""
        fields = self.field_set(sobject)
        for batch in soql.id_batches(ids):
            query = soql.ids_query(sobject, fields, batch)
            pages = self._pages(f"{sobject} by Id", query, include_deleted, sobject, reserve)
            async for page in pages:
                yield page

    async def deleted_records(self, sobject: str, start: datetime, end: datetime) -> DeletedWindow:
        """`sobjects/<Object>/deleted` over [start, end] (Salesforce keeps about 15 days)."""
        name = soql.sobject_name(sobject)
        params = {"start": soql.rest_datetime(start), "end": soql.rest_datetime(end)}
        body = await self._run(
            f"the deleted {name} records",
            lambda sf: _body(sf.restful(f"sobjects/{name}/deleted/", params=params)),
        )
        earliest = body.get("earliestDateAvailable")
        return DeletedWindow(
            [
                DeletedRecord(sf_key(r["id"]), soql.parse_datetime(r["deletedDate"]))
                for r in body.get("deletedRecords", [])
            ],
            soql.parse_datetime(body["latestDateCovered"]),
            soql.parse_datetime(earliest) if earliest else None,
        )

    async def updated_ids(self, sobject: str, start: datetime, end: datetime) -> UpdatedWindow:
        """`sobjects/<Object>/updated` over [start, end]: Ids only (getUpdated)."""
        name = soql.sobject_name(sobject)
        params = {"start": soql.rest_datetime(start), "end": soql.rest_datetime(end)}
        body = await self._run(
            f"the updated {name} records",
            lambda sf: _body(sf.restful(f"sobjects/{name}/updated/", params=params)),
        )
        return UpdatedWindow(
            [sf_key(i) for i in body.get("ids", [])],
            soql.parse_datetime(body["latestDateCovered"]),
        )

    async def outbound_messages(self, sobjects: Iterable[str]) -> list[OutboundMessageDefinition]:
        """The org's Outbound Messages on `sobjects`, read through the Tooling API: one query
        lists them, then one query each reads its Metadata (Salesforce returns Metadata and
        FullName only from a query that returns one record). Needs "View Setup and
        Configuration"; a refusal is Salesforce*Refused (app.salesforce.refusals)."""
        wanted = {name.lower() for name in sobjects}
        listing = "SELECT Id, Name, EntityDefinitionId FROM WorkflowOutboundMessage"
        records = await self._run(
            "the Tooling API query of the Outbound Messages", partial(_tooling_all, listing)
        )
        found = []
        for record in records:
            entity = str(record.get("EntityDefinitionId") or "")
            # A standard object's EntityDefinitionId is its name; a custom one's is an Id
            # (01I...), resolved by FullName below.
            if entity.lower() not in wanted and not entity.startswith("01I"):
                continue
            ((record_id,),) = soql.id_batches([str(record.get("Id"))], 1)  # an Id, or ValueError
            one = _ONE_OUTBOUND_MESSAGE.format(record_id)
            rows = await self._run(
                f"the Tooling API query of the Outbound Message {record.get('Name')!r}",
                partial(_tooling_all, one),
            )
            for row in rows:
                sobject = str(row.get("FullName") or "").partition(".")[0] or entity
                if sobject.lower() in wanted:
                    found.append(_outbound_message(row, str(record.get("Name") or ""), sobject))
        return found

    async def close(self) -> None:
        await asyncio.to_thread(self._session.close)


def _query_more(next_url: str, sf: Salesforce) -> Any:
    return sf.query_more(next_url, identifier_is_url=True)


def _tooling_all(query: str, sf: Salesforce) -> list[dict[str, Any]]:
    """Every record of a Tooling API query, following nextRecordsUrl."""
    result = _body(sf.restful("tooling/query/", params={"q": query}))
    records: list[dict[str, Any]] = list(result.get("records", []))
    while not result.get("done", True) and result.get("nextRecordsUrl"):
        result = _body(sf.query_more(result["nextRecordsUrl"], identifier_is_url=True))
        records.extend(result.get("records", []))
    return records


def _outbound_message(row: dict[str, Any], name: str, sobject: str) -> OutboundMessageDefinition:
    metadata = row.get("Metadata") or {}
    version = metadata.get("apiVersion")
    user = metadata.get("integrationUser")
    return OutboundMessageDefinition(
        id=str(row.get("Id") or ""),
        name=str(metadata.get("name") or name),
        sobject=sobject,
        endpoint_url=str(metadata.get("endpointUrl") or ""),
        fields=tuple(str(f) for f in metadata.get("fields") or ()),
        include_session_id=metadata.get("includeSessionId") is True,
        integration_user=None if user is None else str(user),
        api_version=None if version is None else str(version),
    )


def _body(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SalesforceUnavailable(f"Salesforce answered with {type(value).__name__}, not JSON")
    return value
