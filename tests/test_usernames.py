"""Usernames built from a Contact's names pass Drupal's own UserNameConstraintValidator, and
a full-width "ａｄｍｉｎ" is "admin" (a namesake of the site's admin, suffixed), never a
look-alike of it."""

# Look-alike characters are what this file is about.
# ruff: noqa: RUF001, RUF002

from __future__ import annotations

import re
import sys
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from app.outcomes import Outcome
from app.records import clean_name
from tests.drupal_rows import open_syncer, user_table
from tests.factories import note, sf
from tests.fixtures_db import DrupalSite

# Drupal 10's core/modules/user/src/Plugin/Validation/Constraint/UserNameConstraintValidator.php:
# its byte regex (no /u: every byte of a non-ASCII UTF-8 character is in \x80-\xF7) ...
_PHP_BYTES = re.compile(rb"[^\x80-\xF7 a-z0-9@+_.'-]", re.IGNORECASE)
# ... then, with /u, these code points.
_PHP_CODE_POINTS = re.compile(
    "["
    "\x80-\xa0"  # Non-printable ISO-8859-1 + NBSP
    "\xad"  # Soft-hyphen
    "\u2000-\u200f"  # Various space characters
    "\u2028-\u202f"  # Bidirectional text overrides
    "\u205f-\u206f"  # Various text hinting characters
    "\ufeff"  # Byte order mark
    "\uff01-\uff60"  # Full-width latin
    "\ufff9-\ufffd"  # Replacement characters
    "\x00-\x1f"  # NULL byte and control characters
    "]"
)
USERNAME_MAX_LENGTH = 60


def drupal_refusals(name: str) -> list[str]:
    """The violations Drupal's validator reports for `name` ([] when it accepts it)."""
    if name == "":
        return ["You must enter a username."]
    found = []
    if name.startswith(" "):
        found.append("The username cannot begin with a space.")
    if name.endswith(" "):
        found.append("The username cannot end with a space.")
    if "  " in name:
        found.append("The username cannot contain multiple spaces in a row.")
    try:
        data = name.encode("utf-8")  # what PHP would be given (a lone surrogate has none)
    except UnicodeEncodeError:
        return [*found, "not UTF-8"]
    if _PHP_BYTES.search(data) or _PHP_CODE_POINTS.search(name):
        found.append("The username contains an illegal character.")
    if len(name) > USERNAME_MAX_LENGTH:  # mb_strlen: code points
        found.append("The username is too long.")
    return found


@pytest.mark.parametrize(
    "name",
    ["ａｄｍｉｎ", "Ｔａｒｏ Ｙａｍａｄａ", "Anne\u00a0Marie", "a\u00adb", "a\u200bb", "\u202eevil",
     "\ufeffZoë", "a\ufffdb", "a\tb", "a<b", " a", "a ", "a  b", "x" * 61],
)  # fmt: skip
def test_the_transcription_refuses_what_drupal_refuses(name: str) -> None:
    assert drupal_refusals(name)


@pytest.mark.parametrize(
    "name",
    ["admin", "José Ñúñez", "山田\u3000太郎", "O'Neil-Smith @ ACME+Co.", "ｶﾀｶﾅ", "é" * 60],
)
def test_the_transcription_accepts_what_drupal_accepts(name: str) -> None:
    assert drupal_refusals(name) == []


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("Anne\tMarie", "Anne Marie"), ("Anne\r\nMarie\x0b", "Anne Marie"), ("Ann\x00e", "Anne")],
)
def test_ascii_whitespace_separates_words_and_controls_go(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("ａｄｍｉｎ", "admin"),  # full-width Latin: the ASCII it stands for
        ("Ｔａｒｏ Ｙａｍａｄａ", "Taro Yamada"),
        ("Ｔａｒｏ\u3000Ｙａｍａｄａ", "Taro Yamada"),  # ideographic space: a word separator
        ("ＪＯＨＮ＿ＤＯＥ２", "JOHN_DOE2"),
        ("Ｏ＇Ｎｅｉｌ＜ｂ＞", "O'Neilb"),  # then the ASCII rules: "<", ">" go
        ("ｎａｍｅ\uff5f\uff60", "name"),  # full-width white parentheses: refused, dropped
        ("Ｊｏｓｅ\u0301", "José"),  # mapped, then composed
        ("ｶﾀｶﾅ ①", "ｶﾀｶﾅ ①"),  # other letters and digits kept as written (no NFKC)
        ("Anne\u00a0Marie", "Anne Marie"),  # no-break space
        ("Anne\u2009Marie\u202fLi\u205fWu", "Anne Marie Li Wu"),  # thin, narrow, math spaces
        ("山田\u3000太郎", "山田 太郎"),
        ("\u00a0Zoë\u2003\u2003Li\u3000", "Zoë Li"),  # never leading, trailing or doubled
        ("Zo\u00adë\u200b\u200c\u200d\u200e\u200f", "Zoë"),  # soft hyphen, zero-width, marks
        ("\u202eZoë\u202a\u2066\u2069", "Zoë"),  # bidi controls
        ("Zoë\u2028Li\u2029Wu\u0085Ng", "Zoë Li Wu Ng"),  # line breaks: word separators
        ("\ufeffZoë\ufffd\ufff9\u009f", "Zoë"),  # BOM, replacement, C1 controls
        ("Zoë\tLi\x00\x1f", "Zoë Li"),  # a tab separates words; other C0 controls go
        ("Zoë\r\nLi", "Zoë Li"),
        ("e\u200b\u0301", "é"),  # a dropped character between a letter and its accent
    ],
)
def test_unicode_names_are_cleaned_to_what_drupal_accepts(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean
    assert drupal_refusals(clean) == []


# Characters around Drupal's refused ranges, and some that change under normalization.
AROUND = [(0x0, 0x20), (0x7F, 0xAE), (0x1FFF, 0x2030), (0x205E, 0x2070), (0x2FFF, 0x3001),
          (0xFEFE, 0xFF62), (0xFFF8, 0xFFFE)]  # fmt: skip
EDGES = [chr(c) for low, high in AROUND for c in range(low, high + 1)]
EDGES += ["e", "\u0301", "\u212a", "\u0344", "\u1fee", "\u037e"]
names = st.text(st.one_of(st.characters(), st.sampled_from(EDGES)), max_size=80)


@given(names)
@example("ａｄｍｉｎ")
@example("Anne\u00a0Marie")
@example(" \u00a0 ".join(["Ｘ"] * 40))
@example("\ud800Zoë")  # a lone surrogate (Python allows it; UTF-8 does not)
def test_every_cleaned_name_passes_drupals_validator(raw: str) -> None:
    clean = clean_name(raw)
    assert clean == "" or drupal_refusals(clean) == [], (raw, clean)


def test_every_assigned_code_point_alone_or_in_a_name_passes_drupals_validator() -> None:
    bad = []
    for c in map(chr, range(sys.maxunicode + 1)):
        if unicodedata.category(c) in ("Cn", "Co"):  # unassigned, private use: never kept
            continue
        for raw in (c, f"Zoë{c}x"):
            clean = clean_name(raw)
            if clean and drupal_refusals(clean):
                bad.append((raw, clean))
    assert bad == []


async def test_a_full_width_admin_is_a_namesake_of_the_sites_admin(
    drupal_site: DrupalSite,
) -> None:
    """Every fixture site has uid 1 "admin": "ａｄｍｉｎ" is that name, so it is suffixed."""
    site = drupal_site
    users = user_table(site)
    assert await site.rows(f"SELECT uid FROM {users} WHERE name = 'admin'") == [{"uid": 1}]
    syncer = await open_syncer(site)
    out = await syncer.apply(
        [
            note(sf(1), "fw1@example.com", None, "ａｄｍｉｎ"),
            note(sf(2), "fw2@example.com", "Ｔａｒｏ", "Ｙａｍａｄａ"),
            note(sf(3), "fw3@example.com", "Anne\u00a0Marie", "Li"),
        ]
    )
    await syncer.close()
    assert [o.kind for o in out] == ["created"] * 3, out
    names = await stored_names(site, out)
    assert names == ["admin_2", "Taro Yamada", "Anne Marie Li"]
    assert all(drupal_refusals(n) == [] for n in names)


async def stored_names(site: DrupalSite, outcomes: list[Outcome]) -> list[str]:
    names = []
    for o in outcomes:
        (row,) = await site.rows(f"SELECT name FROM {user_table(site)} WHERE uid = :u", u=o.uid)
        names.append(str(row["name"]))
    return names


async def test_a_plus_addressed_email_names_a_drupal_7_user_without_the_plus(
    drupal_site: DrupalSite,
) -> None:
    """The fallback name is the email's local part; Drupal 7's user_validate_name() refuses
    "+" (Drupal 8+ accepts it)."""
    site = drupal_site
    syncer = await open_syncer(site)
    out = await syncer.apply(
        [note(sf(1), "jo+news@example.com"), note(sf(2), "x@example.com", "Ｊｏ＋", "Ｌｉ")]
    )
    await syncer.close()
    assert [o.kind for o in out] == ["created"] * 2, out
    assert await stored_names(site, out) == (
        ["jonews", "Jo Li"] if site.major == 7 else ["jo+news", "Jo+ Li"]
    )
