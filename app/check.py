"""`sfrelay check`: whether each configured part works (Redis, the Drupal database, Salesforce).

Read-only: it migrates nothing and writes nothing. A part that is not configured is reported as
such, not as a failure (Redis always is: the receiver needs it).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from redis.exceptions import RedisError
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import Settings
from app.drupal import ledger
from app.drupal.engine import create_engine
from app.drupal.errors import driver_text
from app.drupal.fieldtypes import takes_salesforce_type
from app.drupal.schema import inspect_drupal
from app.errors import SalesforceUnavailable, SfrelayError
from app.logs import without_password
from app.mapping import load_field_map
from app.sync import check_field_defaults, check_protected_roles
from app.wsdl import load_contract

if TYPE_CHECKING:
    from app.salesforce import ApiUsage, OutboundMessageDefinition, SalesforceClient

# "skipped": configured, but it could not be looked at (its line says why); not a failure.
Status = Literal["ok", "failed", "not configured", "skipped"]
PARTS = ("redis", "drupal", "salesforce", "outbound")


@dataclass(slots=True)
class PartResult:
    part: str
    status: Status
    detail: str
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, **self.info}


def _first_line(exc: BaseException) -> str:
    text = driver_text(exc)
    return (text.splitlines() or [type(exc).__name__])[0][:300]


async def check_redis(settings: Settings) -> PartResult:
    from app.queue import redis_client

    redis = redis_client(settings)
    where = without_password(settings.redis_url)
    try:
        await redis.ping()
        server = await redis.info("server")
        version = server.get("redis_version", "?")
        return PartResult("redis", "ok", f"Redis {version} at {where}", {"version": version})
    except (RedisError, OSError) as exc:
        return PartResult(
            "redis",
            "failed",
            f"no answer from {where}: {_first_line(exc)}; check SFRELAY_REDIS_URL",
        )
    finally:
        await redis.aclose()


async def _cannot_write(conn: AsyncConnection) -> str | None:
    """Why the workers could not write Drupal's users (None: they can). An UPDATE that matches
    no row, rolled back: it changes nothing, yet the database refuses it as it would refuse
    every write (a SQLite file sfrelay's user may not write, a PostgreSQL or MySQL user
    without UPDATE, a read-only server)."""
    try:
        await conn.execute(text("UPDATE users SET uid = uid WHERE uid = -1"))
    except DBAPIError as exc:
        why = _first_line(exc.orig or exc)
        return (
            f"the database refuses sfrelay's writes ({why}): give the user "
            "sfrelay runs as write access (SQLite: to the file and its folder; PostgreSQL, "
            "MySQL: the database user may write Drupal's tables), or use a writable database"
        )
    finally:
        await conn.rollback()
    return None


def _no_default_site(settings: Settings) -> str | None:
    """Without SFRELAY_DATABASE_URL a worker uses its default, sqlite:///drupal.sqlite: that
    is checked when the file is here; else why nothing is (None: there is a database)."""
    if "database_url" in settings.model_fields_set:
        return None
    default = settings.database_url.removeprefix("sqlite:///")
    if os.path.isfile(default):
        return None
    return (
        f"SFRELAY_DATABASE_URL is not set, and there is no {default} here (its default, "
        f"{settings.database_url}): set it to your Drupal site's database; a worker cannot "
        "start without one"
    )


async def check_drupal(settings: Settings) -> PartResult:
    if (missing := _no_default_site(settings)) is not None:
        return PartResult("drupal", "not configured", missing)
    where = without_password(settings.database_url)
    try:
        field_map = load_field_map(settings.field_map)
        engine = create_engine(settings.database_url)
    except SfrelayError as exc:
        return PartResult("drupal", "failed", str(exc))
    try:
        async with engine.connect() as conn:
            schema = await inspect_drupal(conn, settings.drupal_version, field_map.user_fields)
            version = None
            if ledger.schema_version.name in schema.tables:
                version = await conn.scalar(
                    select(ledger.schema_version.c.version).where(ledger.schema_version.c.id == 1)
                )
            await conn.rollback()
            ledger.refuse_newer(version)
            if problem := await _cannot_write(conn):
                return PartResult("drupal", "failed", f"{where}: {problem}")
        field_map.validate(schema, settings.handled_objects)
        check_protected_roles(schema, field_map, settings.protected_roles)  # as a worker starts
        check_field_defaults(schema, field_map, engine.dialect.name)
    except SfrelayError as exc:
        return PartResult("drupal", "failed", f"{where}: {exc}")
    except (DBAPIError, OSError) as exc:
        return PartResult(
            "drupal",
            "failed",
            f"cannot use {where}: {_first_line(exc)}; check SFRELAY_DATABASE_URL",
        )
    finally:
        await engine.dispose()
    drupal = "Drupal 7" if schema.major == 7 else "Drupal 8 or later"
    ours = (
        f"sfrelay tables at schema v{version}"
        if version
        else "sfrelay tables not created yet (the first worker creates them)"
    )
    fields = sorted(schema.fields)
    # Each with its Drupal type: what decides how values are converted (app.drupal.fieldtypes).
    typed = [f"{name} ({schema.fields[name].type})" for name in fields]
    return PartResult(
        "drupal",
        "ok",
        f"{drupal} ({engine.dialect.name}), {len(schema.tables)} tables, field map valid "
        f"({', '.join(settings.handled_objects)}; user fields: {', '.join(typed) or 'none'}), "
        f"{ours}",
        {
            "drupal": 7 if schema.major == 7 else 8,
            "backend": engine.dialect.name,
            "tables": len(schema.tables),
            "user_fields": fields,
            "user_field_types": {name: schema.fields[name].type for name in fields},
            "sfrelay_schema": version,
        },
    )


async def check_salesforce(settings: Settings) -> tuple[PartResult, PartResult]:
    """The Salesforce part, and the Outbound Messages part (which needs its login)."""
    from app.salesforce import SalesforceClient, salesforce_configured

    if not salesforce_configured(settings):
        return PartResult(
            "salesforce",
            "not configured",
            "no SFRELAY_SF_* credentials: sfrelay works from Outbound Messages alone",
        ), PartResult(
            "outbound",
            "not configured",
            "no SFRELAY_SF_* credentials: the org's Outbound Messages are not compared with "
            "SFRELAY_WSDL_DIR and the field map",
        )
    unchecked = PartResult(
        "outbound", "skipped", "not compared: the Salesforce part failed (see its line)"
    )
    try:
        client = SalesforceClient(settings)
    except SfrelayError as exc:
        return PartResult("salesforce", "failed", str(exc)), unchecked
    try:
        instance = await client.login()
        usage = await client.refresh_api_usage()
        described = {obj: await client.describe_fields(obj) for obj in settings.handled_objects}
    except SfrelayError as exc:
        await client.close()
        return PartResult("salesforce", "failed", str(exc), {"flow": str(client.flow)}), unchecked
    try:
        outbound = compare_outbound_messages(
            settings, await client.outbound_messages(settings.handled_objects)
        )
    except SfrelayError as exc:
        outbound = _tooling_refused(exc)
    finally:
        await client.close()
    return _salesforce_result(settings, client, instance, usage, described), outbound


def _salesforce_result(
    settings: Settings,
    client: SalesforceClient,
    instance: str,
    usage: ApiUsage,
    described: dict[str, dict[str, str]],
) -> PartResult:
    missing: dict[str, list[str]] = {}
    mapped_types: dict[str, dict[str, str]] = {}
    for obj, types in described.items():
        by_name = {name.lower(): kind for name, kind in types.items()}
        wanted = client.field_set(obj)
        missing[obj] = [f for f in wanted if f.lower() not in by_name]
        mapped_types[obj] = {f: by_name[f.lower()] for f in wanted if f.lower() in by_name}
    info: dict[str, Any] = {
        "flow": str(client.flow),
        "instance": instance,
        "api_version": client.api_version,
        "api_requests_used": usage.used,
        "api_requests_max": usage.max,
        "api_requests_left": usage.remaining,
        "unreadable_fields": {obj: names for obj, names in missing.items() if names},
        "field_types": mapped_types,  # the selected fields' describe types
    }
    head = f"login ok ({client.flow}) to {instance}, API {client.api_version}"
    left = f"{usage.remaining:,} of {usage.max:,} daily API requests left"
    unreadable = "; ".join(
        f"{obj}: cannot read {', '.join(names)}" for obj, names in missing.items() if names
    )
    if unreadable:
        return PartResult(
            "salesforce",
            "failed",
            f"{head}, but {unreadable} (fix SFRELAY_FIELD_MAP or the integration user's field "
            f"access); {left}",
            info,
        )
    if usage.remaining < settings.sf_min_api_remaining:
        return PartResult(
            "salesforce",
            "failed",
            f"{head}, mapped fields readable, but only {left} "
            f"(SFRELAY_SF_MIN_API_REMAINING={settings.sf_min_api_remaining}: polls wait)",
            info,
        )
    objects = ", ".join(settings.handled_objects)
    return PartResult(
        "salesforce", "ok", f"{head}, mapped fields readable on {objects}, {left}", info
    )


async def run_checks(settings: Settings) -> list[PartResult]:
    redis, drupal, (salesforce, outbound) = await asyncio.gather(
        check_redis(settings), check_drupal(settings), check_salesforce(settings)
    )
    results = [redis, drupal, salesforce, outbound]
    type_mismatches(settings, results)
    return results


VIEW_SETUP = (
    'give the integration user the "View Setup and Configuration" permission (a permission '
    "set) so that check can compare the org's Outbound Messages with SFRELAY_WSDL_DIR and the "
    "field map; nothing else needs it"
)


def _tooling_refused(exc: SfrelayError) -> PartResult:
    """The Tooling API query of the Outbound Messages failed: said, never a failure of the
    check (sfrelay itself never needs the Tooling API)."""
    if isinstance(exc, SalesforceUnavailable):
        return PartResult("outbound", "skipped", f"not compared: {exc}")
    code = getattr(exc, "error_code", None) or "no error code"
    return PartResult(
        "outbound",
        "skipped",
        f"Salesforce refused to read the Outbound Messages through the Tooling API "
        f"({code}): {VIEW_SETUP}",
        {"tooling_error": code},
    )


def _cleared(drupal: str, source: str) -> str:
    if drupal == "mail":
        return f"every notification would arrive without {source} and be skipped (no email)"
    return f"every notification would clear {drupal} in Drupal for every user"


def compare_outbound_messages(
    settings: Settings, messages: list[OutboundMessageDefinition]
) -> PartResult:
    """The org's Outbound Messages to sfrelay's endpoint path against what sfrelay does with
    them. A mapped field the message does not select while the object's WSDL declares it
    fails: the receiver reads every declared field left out as null (Salesforce omits null
    fields), so each notification clears it. A selected field no WSDL declares (taken as
    text) and "Send Session ID" on are warnings."""
    from app.receiver import ENDPOINT

    try:
        field_map = load_field_map(settings.field_map)
        contract = load_contract(settings.wsdl_dir)
    except SfrelayError as exc:
        return PartResult("outbound", "failed", str(exc))
    ours = [m for m in messages if urlsplit(m.endpoint_url).path == ENDPOINT]
    problems: list[str] = []
    warnings: list[str] = []
    described: list[dict[str, Any]] = []
    for message in ours:
        label = f"Outbound Message {message.name!r} ({message.sobject}, {message.id})"
        selected = {f.lower() for f in message.fields} | {"id"}  # the Id is always sent
        declared = contract.field_types(message.sobject) or {}
        declared_lower = {name.lower() for name in declared}
        unselected = []
        obj = field_map.objects.get(message.sobject)
        mapped = {} if obj is None else {**obj.base, **obj.fields}
        for drupal, source in mapped.items():
            if source.lower() in declared_lower and source.lower() not in selected:
                unselected.append(source)
                problems.append(
                    f"{label} does not select {source}, which the {message.sobject} WSDL in "
                    f"SFRELAY_WSDL_DIR declares: {_cleared(drupal, source)} (select {source} "
                    "in the Outbound Message, or put that message's own WSDL in "
                    f"SFRELAY_WSDL_DIR, or unmap {drupal} in SFRELAY_FIELD_MAP)"
                )
        known = declared_lower | {"id"}
        undeclared = [f for f in message.fields if f.lower() not in known]
        if undeclared:
            warnings.append(
                f"{label} selects {', '.join(undeclared)}, which no WSDL in SFRELAY_WSDL_DIR "
                "declares: taken as text, and never cleared when left out (put that "
                "message's own WSDL in SFRELAY_WSDL_DIR)"
            )
        if message.include_session_id:
            warnings.append(
                f'{label} sends the session ID, which sfrelay never uses: turn "Send Session '
                'ID" off'
            )
        described.append(
            {
                "id": message.id,
                "name": message.name,
                "object": message.sobject,
                "fields": list(message.fields),
                "include_session_id": message.include_session_id,
                "unselected_mapped_fields": unselected,
                "undeclared_fields": undeclared,
            }
        )
    info: dict[str, Any] = {
        "endpoint_path": ENDPOINT,
        "messages": described,
        "problems": problems,
        "warnings": warnings,
        "other_endpoints": len(messages) - len(ours),
    }
    objects = ", ".join(settings.handled_objects)
    if not ours:
        head = f"no Outbound Message on {objects} sends to {ENDPOINT}"
    else:
        names = ", ".join(f"{m.name!r} ({m.sobject})" for m in ours)
        head = f"{len(ours)} Outbound Message{'s' if len(ours) > 1 else ''} to {ENDPOINT}: {names}"
    if problems:
        return PartResult("outbound", "failed", "; ".join([*problems, *warnings]), info)
    ok = f"{head}, every mapped field their WSDL declares selected" if ours else head
    return PartResult("outbound", "ok", "; ".join([ok, *warnings]), info)


def type_mismatches(settings: Settings, results: list[PartResult]) -> list[str]:
    """Mapped Salesforce fields whose type the Drupal field cannot take (a checkbox into a
    number, text into a date, ...): from the Drupal part's field types and the Salesforce
    part's describe, when both worked. Said in the Salesforce part; its status stays."""
    parts = {r.part: r for r in results}
    drupal, salesforce = parts.get("drupal"), parts.get("salesforce")
    if drupal is None or salesforce is None or drupal.status != "ok":
        return []
    drupal_types: dict[str, str] = drupal.info.get("user_field_types", {})
    sf_types: dict[str, dict[str, str]] = salesforce.info.get("field_types", {})
    found = []
    for obj in load_field_map(settings.field_map).objects.values():
        for field_name, source in obj.fields.items():
            kind, sf_kind = drupal_types.get(field_name), sf_types.get(obj.sobject, {}).get(source)
            if kind and sf_kind and not takes_salesforce_type(kind, sf_kind):
                found.append(
                    f"{field_name} ({kind}) cannot take {obj.sobject}.{source} ({sf_kind})"
                )
    if found:
        salesforce.info["type_mismatches"] = found
        salesforce.detail += f"; field types: {'; '.join(found)}"
    return found


def all_ok(results: list[PartResult]) -> bool:
    return all(r.status != "failed" for r in results)
