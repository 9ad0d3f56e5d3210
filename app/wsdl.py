"""The Outbound Message WSDLs are the contract: zeep reads them once, at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zeep
from zeep.xsd.types import builtins as xsd

from app.errors import ConfigError

SOBJECT_NS = "urn:sobject.enterprise.soap.sforce.com"
_NOT_OBJECTS = {"sObject", "AggregateResult"}

# The scalar kinds a field value is checked as on receipt (see app.soap._CONVERTERS).
FieldType = Literal["string", "boolean", "double", "int", "date", "dateTime", "time"]


def _kind(xsd_type: object) -> FieldType:
    # Order matters: zeep's builtins subclass each other (Integer is a Decimal).
    if isinstance(xsd_type, xsd.Boolean):
        return "boolean"
    if isinstance(xsd_type, xsd.DateTime):
        return "dateTime"
    if isinstance(xsd_type, xsd.Date):
        return "date"
    if isinstance(xsd_type, xsd.Time):
        return "time"
    if isinstance(xsd_type, xsd.Integer):
        return "int"
    if isinstance(xsd_type, xsd.Double | xsd.Float | xsd.Decimal):
        return "double"
    return "string"


@dataclass(frozen=True)
class Contract:
    """What the loaded WSDLs declare: object name -> field name -> scalar kind."""

    objects: Mapping[str, Mapping[str, FieldType]]
    documents: Mapping[str, bytes] = field(default_factory=dict)  # object name -> WSDL bytes

    def field_types(self, sobject: str) -> Mapping[str, FieldType] | None:
        return self.objects.get(sobject)


def load_wsdl(path: Path) -> dict[str, dict[str, FieldType]]:
    """Object name -> field types, for each sObject type declared in one WSDL file."""
    try:
        client = zeep.Client(str(path))  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ConfigError(f"cannot load the WSDL {path}: {exc}") from exc
    objects: dict[str, dict[str, FieldType]] = {}
    for xsd_type in client.wsdl.types.types:
        qname = getattr(xsd_type, "qname", None)
        if qname is None or qname.namespace != SOBJECT_NS or qname.localname in _NOT_OBJECTS:
            continue
        objects[qname.localname] = {
            name: _kind(element.type)
            for name, element in xsd_type.elements
            if name != "fieldsToNull"
        }
    return objects


def load_contract(wsdl_dir: Path) -> Contract:
    """Read every *.wsdl in `wsdl_dir`; one object's fields from several files are merged."""
    files = sorted(wsdl_dir.glob("*.wsdl"))
    if not files:
        raise ConfigError(
            f"no *.wsdl file in {wsdl_dir}: put the WSDL of each Outbound Message there "
            "(Setup > Outbound Messages > the message > Click for WSDL), or set SFRELAY_WSDL_DIR"
        )
    objects: dict[str, dict[str, FieldType]] = {}
    documents: dict[str, bytes] = {}
    for path in files:
        for name, fields in load_wsdl(path).items():
            merged = objects.setdefault(name, {})
            for field_name, kind in fields.items():
                if merged.get(field_name, kind) != kind:
                    raise ConfigError(
                        f"{path}: {name}.{field_name} is {kind} here but {merged[field_name]} "
                        "in another WSDL"
                    )
                merged[field_name] = kind
            documents.setdefault(name, path.read_bytes())
    return Contract(objects=objects, documents=documents)
