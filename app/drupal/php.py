"""PHP's serialize() format, as Drupal stores config (8+) and variables and field data (7)."""

from __future__ import annotations

from typing import Any


def php_unserialize(data: bytes | str | memoryview) -> Any:
    """A PHP-serialized value (Drupal's config and D7 variables): strings, numbers,
    booleans, null, arrays (as dicts) and objects (their properties as a dict: D7's
    `language_default` is a stdClass). ValueError for anything else."""
    raw = bytes(data) if not isinstance(data, str) else data.encode()
    value, end = _php_value(raw, 0)
    if end != len(raw):
        raise ValueError(f"trailing data after offset {end}")
    return value


def php_array(data: bytes | str | memoryview | None) -> dict[Any, Any]:
    """A PHP-serialized array (a config object, a D7 variable) as a dict: {} for NULL,
    another type, or what does not parse (a setting sfrelay cannot read is Drupal's default)."""
    if data is None:
        return {}
    try:
        value = php_unserialize(data)
    except (ValueError, IndexError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _php_value(raw: bytes, at: int) -> tuple[Any, int]:
    kind = raw[at : at + 2]
    if kind == b"N;":
        return None, at + 2
    if kind in (b"b:", b"i:", b"d:"):
        end = raw.index(b";", at)
        text_ = raw[at + 2 : end].decode()
        if kind == b"b:":
            return text_ == "1", end + 1
        return (int(text_) if kind == b"i:" else float(text_)), end + 1
    if kind == b"s:":
        colon = raw.index(b":", at + 2)
        length = int(raw[at + 2 : colon])
        start = colon + 2  # past ':"'
        if raw[colon + 1 : start] != b'"' or raw[start + length : start + length + 2] != b'";':
            raise ValueError(f"bad string at offset {at}")
        return raw[start : start + length].decode("utf-8", "replace"), start + length + 2
    if kind == b"a:":
        return _php_items(raw, at + 2)
    if kind == b"O:":  # O:<n>:"<class>":<count>:{<properties>}: the properties, as a dict
        colon = raw.index(b":", at + 2)
        end = colon + 2 + int(raw[at + 2 : colon])  # the class name's closing quote
        if raw[end : end + 2] != b'":':
            raise ValueError(f"bad object at offset {at}")
        return _php_items(raw, end + 2)
    raise ValueError(f"unsupported PHP-serialized type {kind!r} at offset {at}")


def _php_items(raw: bytes, at: int) -> tuple[dict[Any, Any], int]:
    """An array's or object's `<count>:{<key><value>...}`, from `at` (its count)."""
    colon = raw.index(b":", at)
    count = int(raw[at:colon])
    if raw[colon + 1 : colon + 2] != b"{":
        raise ValueError(f"bad array at offset {at}")
    pos, items = colon + 2, {}
    for _ in range(count):
        key, pos = _php_value(raw, pos)
        items[key], pos = _php_value(raw, pos)
    if raw[pos : pos + 1] != b"}":
        raise ValueError(f"bad array end at offset {pos}")
    return items, pos + 1


def php_serialize(value: object) -> str:
    """PHP's serialize() of what Drupal's config holds (str, int, float, bool, None, dict,
    list)."""
    if value is None:
        return "N;"
    if isinstance(value, bool):
        return f"b:{int(value)};"
    if isinstance(value, int):
        return f"i:{value};"
    if isinstance(value, float):
        return f"d:{value!r};"
    if isinstance(value, str):
        return f's:{len(value.encode())}:"{value}";'
    if isinstance(value, list):
        value = dict(enumerate(value))
    if not isinstance(value, dict):
        raise TypeError(f"no PHP serialization for {type(value).__name__}")
    body = "".join(php_serialize(k) + php_serialize(v) for k, v in value.items())
    return f"a:{len(value)}:{{{body}}}"
