"""`sfrelay check`: whether each configured part works (Redis, the Drupal database, Salesforce).

Read-only: it migrates nothing and writes nothing. A part that is not configured is reported as
such, not as a failure (Redis always is: the receiver needs it).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.exceptions import RedisError
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import Settings
from app.drupal import ledger
from app.drupal.engine import create_engine
from app.drupal.fieldtypes import takes_salesforce_type
from app.drupal.schema import inspect_drupal
from app.errors import SfrelayError
from app.logs import without_password
from app.mapping import load_field_map
from app.sync import check_field_defaults, check_protected_roles

Status = Literal["ok", "failed", "not configured"]
PARTS = ("redis", "drupal", "salesforce")


@dataclass(slots=True)
class PartResult:
    part: str
    status: Status
    detail: str
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, **self.info}


def _first_line(exc: BaseException) -> str:
    text = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip()
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


async def check_salesforce(settings: Settings) -> PartResult:
    from app.salesforce import SalesforceClient, salesforce_configured

    if not salesforce_configured(settings):
        return PartResult(
            "salesforce",
            "not configured",
            "no SFRELAY_SF_* credentials: sfrelay works from Outbound Messages alone",
        )
    try:
        client = SalesforceClient(settings)
    except SfrelayError as exc:
        return PartResult("salesforce", "failed", str(exc))
    try:
        instance = await client.login()
        usage = await client.refresh_api_usage()
        described = {obj: await client.describe_fields(obj) for obj in settings.handled_objects}
    except SfrelayError as exc:
        return PartResult("salesforce", "failed", str(exc), {"flow": str(client.flow)})
    finally:
        await client.close()
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
    results = list(
        await asyncio.gather(
            check_redis(settings), check_drupal(settings), check_salesforce(settings)
        )
    )
    type_mismatches(settings, results)
    return results


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
