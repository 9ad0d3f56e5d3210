"""Untrusted text made visible-safe, for a terminal and for a log line.

A Salesforce value (a name, an email, a notification id) or a stored error may reach an
operator's terminal (`sfrelay why`, `sfrelay dead list`) or a log line. Printed as it is, a
carriage return or backspace overwrites what came before, an ANSI or OSC escape (ESC, or
C1's single-character CSI and OSC) clears the screen or writes the clipboard, a newline forges
a log line, and a bidi override (U+202E) shows the rest of the line reversed. Each of these
is escaped as `\\xNN` or `\\uNNNN`: the C0 and C1 controls, DEL, the bidi marks, embeddings,
overrides and isolates, and the line and paragraph separators. Every other character is shown
as it is (Ødegaard, 张伟, Zoë, O'Brien, and the joiners U+200C and U+200D, which Persian
names and emoji need).
"""

from __future__ import annotations

import re

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# In JSON text, orjson already escapes the C0 controls; the others it leaves as they are.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every character that could rewrite a terminal or a log line escaped."""
    if text.isprintable():  # the usual text: no regular expression (a space is printable)
        return text
    return UNSAFE.sub(_escaped, text)


def visible_json(document: str) -> str:
    """A JSON document with the same characters written as `\\uNNNN` escapes: the same values
    for a JSON reader, nothing a terminal acts on (they can only stand inside strings)."""
    if document.isascii():
        return document
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", document)
