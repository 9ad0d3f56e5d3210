"""How Salesforce's refusals (REST error bodies) become sfrelay's errors: the one place."""

from __future__ import annotations

import re
from typing import Any

from simple_salesforce.exceptions import SalesforceError

from app.errors import (
    ApiLimitReached,
    SalesforceLoginFailed,
    SalesforceQueryRefused,
    SalesforceRequestRefused,
    SalesforceUnavailable,
    SfrelayError,
)
from app.salesforce.auth import RETIRED_VERSION_HINT

_NO_SUCH_COLUMN = re.compile(r"No such column '([^']+)' on (?:entity|sobject of type) '([^']+)'")
# What SOQL says of an object the integration user may not read (or the org lacks).
_NOT_SUPPORTED = re.compile(r"sObject type '([^']+)' is not supported")
# An object's own resources, which do not exist (404) for a user who may not read it.
_OBJECT_RESOURCE = re.compile(r"/sobjects/(\w+)/(describe|deleted|updated)\b")
_URL_VERSION = re.compile(r"/services/data/v(\d+\.\d+)/")
_RETRYABLE_CODES = frozenset(
    {"SERVER_UNAVAILABLE", "UNABLE_TO_LOCK_ROW", "INVALID_QUERY_LOCATOR", "QUERY_TIMEOUT"}
)
_QUERY_CODES = frozenset({"INVALID_FIELD", "MALFORMED_QUERY", "INVALID_TYPE"})


def _first_error(content: Any) -> tuple[str | None, str]:
    """(errorCode, message) of a REST error body: a list of {errorCode, message}."""
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0]
        return first.get("errorCode"), str(first.get("message", "")).strip()
    if isinstance(content, dict):
        return content.get("errorCode") or content.get("error"), str(content.get("message", ""))
    text = content.decode(errors="replace") if isinstance(content, bytes) else str(content)
    return None, text.strip()[:300]


def map_error(exc: SalesforceError, what: str) -> SfrelayError:
    """One place where Salesforce's refusals become sfrelay's errors (app/errors.py)."""
    code, message = _first_error(exc.content)
    status = exc.status
    url = str(exc.url or "")
    if status == 410:
        # Salesforce retires API versions over 3 years old: every resource is gone.
        found = _URL_VERSION.search(url)
        version = f"API version {found.group(1)}" if found else "this API version"
        return SalesforceQueryRefused(
            f"Salesforce no longer serves {version} (HTTP 410, {code or 'GONE'}: "
            f"{message[:200]}): {RETIRED_VERSION_HINT}",
            code,
        )
    resource = _OBJECT_RESOURCE.search(url) if status == 404 else None
    if resource is not None:
        sobject, tail = resource.groups()
        return _unreadable(sobject, f"{code or 'HTTP 404'} on sobjects/{sobject}/{tail}", code)
    if code == "REQUEST_LIMIT_EXCEEDED" and "concurrent" in message.lower():
        # ConcurrentPerOrgLongTxn: too many long requests running in the org right now (not
        # the daily limit): soon over.
        return SalesforceUnavailable(
            f"Salesforce refused {what}: too many long-running requests at once in the org "
            f"({message}); the next run tries again",
            code,
        )
    if code == "REQUEST_LIMIT_EXCEEDED":
        return ApiLimitReached(
            f"Salesforce refused {what}: the org's API request limit is exceeded ({message}); "
            "polling resumes on a later run, pushed notifications are still applied",
            code,
        )
    if status >= 500 or code in _RETRYABLE_CODES:
        return SalesforceUnavailable(
            f"Salesforce failed {what} (HTTP {status}, {code or 'no error code'}): "
            f"{message[:200]}; the next run tries again",
            code,
        )
    if code in _QUERY_CODES:
        unsupported = _NOT_SUPPORTED.search(message)
        if unsupported:
            return _unreadable(unsupported.group(1), f"{code}: {unsupported.group()}", code)
        found = _NO_SUCH_COLUMN.search(message)
        if found:
            field, sobject = found.groups()
            return SalesforceQueryRefused(
                f"Salesforce has no readable field {sobject}.{field} ({code}): fix the field "
                f"map (SFRELAY_FIELD_MAP) or give the integration user read access to it",
                code,
                sobject,
                field,
            )
        first_line = " ".join(message.split())[:300]
        return SalesforceQueryRefused(
            f"Salesforce refused the query for {what} ({code}): {first_line}; check the field "
            "map (SFRELAY_FIELD_MAP) and SFRELAY_HANDLED_OBJECTS",
            code,
        )
    if status == 401:
        return SalesforceLoginFailed(
            f"Salesforce refused the session for {what} ({code}): check the Connected App's "
            "session policies and IP restrictions",
            code,
        )
    hint = "; check the integration user's permissions" if status == 403 else ""
    return SalesforceRequestRefused(
        f"Salesforce refused {what} (HTTP {status}, {code or 'no error code'}): "
        f"{message[:200]}{hint}",
        code,
    )


def _unreadable(sobject: str, why: str, code: str | None) -> SalesforceQueryRefused:
    """An object the integration user may no longer read (its profile lost Read on it)."""
    return SalesforceQueryRefused(
        f"the integration user cannot read {sobject} ({why}): give it Read on {sobject} (its "
        f"profile or a permission set), or leave {sobject} out of SFRELAY_HANDLED_OBJECTS",
        code,
        sobject,
    )
