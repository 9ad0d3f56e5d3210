"""Salesforce record ids: the 15-character case-sensitive form and the 18-character form."""

from __future__ import annotations

import re

# The shape of a record id (15 or 18 letters and digits); is_valid_id also checks the checksum.
SF_ID_FORM = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")

_SUFFIX_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


# ASCII -> "1" for a capital A-Z, "0" for any other character: a chunk's bits, as text.
_CAPITALS = str.maketrans({chr(c): "1" if "A" <= chr(c) <= "Z" else "0" for c in range(128)})


def checksum(id15: str) -> str:
    """The three characters Salesforce appends to a 15-character id (bit i of each 5-character
    chunk: its character i is A-Z). No cache: one (bounded at 8,192 chunks) missed on the
    varying chunks of real ids and held ~1 MB in every process."""
    if len(id15) != 15 or not id15.isascii():
        return _code(id15[0:5]) + _code(id15[5:10]) + _code(id15[10:15])
    bits = id15.translate(_CAPITALS)  # e.g. "00110...", bit i is character i
    alphabet = _SUFFIX_ALPHABET
    return (
        alphabet[int(bits[4::-1], 2)]
        + alphabet[int(bits[9:4:-1], 2)]
        + alphabet[int(bits[14:9:-1], 2)]
    )


def _code(chunk: str) -> str:
    bits = 0
    for i, char in enumerate(chunk):
        if "A" <= char <= "Z":
            bits |= 1 << i
    return _SUFFIX_ALPHABET[bits]


def to18(id15: str) -> str:
    """The 18-character form of a 15-character id (an 18-character id is returned as it is)."""
    return id15 if len(id15) == 18 else id15 + checksum(id15)


def canonical_id(sf_id: str) -> str:
    """The case-correct 15-character id, the form two ids can be compared in.

    An 18-character id is case-insensitive: its suffix records which of the first 15
    characters are capitals, so the case is restored from it (an id that went through
    a case-folding system still compares equal). A suffix that cannot describe its id
    (a capital claimed for a digit) is kept verbatim, so it only equals itself.
    """
    if len(sf_id) != 18:
        return sf_id
    head, suffix = sf_id[:15], sf_id[15:].upper()
    if any(c not in _SUFFIX_ALPHABET for c in suffix):
        return sf_id
    chars = list(head)
    for chunk, code in enumerate(suffix):
        bits = _SUFFIX_ALPHABET.index(code)
        for i in range(5):
            pos = chunk * 5 + i
            char = chars[pos]
            upper = bool(bits & (1 << i))
            if upper and not char.isalpha():
                return sf_id
            chars[pos] = char.upper() if upper else char.lower()
    return "".join(chars)


def is_valid_id(value: str) -> bool:
    """A Salesforce id as Salesforce writes it: 15 ASCII letters and digits, or 18 whose last
    three are the checksum of the first 15 (exactly: a mangled case or suffix fails)."""
    if len(value) not in (15, 18) or not value.isascii() or not value.isalnum():
        return False
    return len(value) == 15 or value[15:] == checksum(value[:15])


def sf_key(sf_id: str) -> str:
    """The 18-character, case-correct form: the key sfrelay stores a record under."""
    head, suffix = sf_id[:15], sf_id[15:].upper()
    if len(sf_id) == 18 and checksum(head) == suffix:
        return head + suffix  # the usual case, an id as Salesforce sends it: one checksum
    return to18(canonical_id(sf_id))
