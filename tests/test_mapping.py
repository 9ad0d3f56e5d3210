"""Database URLs, the field map file, and the per-record rules that need no database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from app.drupal.engine import create_engine
from app.drupal.url import async_url
from app.errors import ConfigError
from app.mapping import DEFAULT_FIELD_MAP, load_field_map, parse_field_map, render
from app.records import (
    clean_name,
    json_within_bmp,
    outside_bmp,
    valid_email,
    version_digest,
    with_suffix,
    within_bmp,
)
from app.sfid import checksum, sf_key, to18


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://drupal:secret@db:3306/drupal", "mysql+aiomysql://drupal:***@db:3306/drupal"),
        ("mariadb://u@h/d", "mysql+aiomysql://u@h/d"),
        ("pgsql://drupal:pw@localhost/drupal", "postgresql+asyncpg://drupal:***@localhost/drupal"),
        ("postgres://u@h:5433/d", "postgresql+asyncpg://u@h:5433/d"),
        ("postgresql://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("sqlite:////var/www/sites/default/files/.ht.sqlite", None),
        ("sqlite+aiosqlite:///relative.sqlite", "sqlite+aiosqlite:///relative.sqlite"),
    ],
)
def test_drupal_urls_get_async_drivers(url: str, expected: str | None) -> None:
    parsed = async_url(url)
    if expected is None:
        assert parsed.drivername == "sqlite+aiosqlite"
        assert parsed.database == "/var/www/sites/default/files/.ht.sqlite"
    else:
        assert parsed.render_as_string().split("?")[0] == expected
    if parsed.drivername.startswith("mysql"):
        assert parsed.query["charset"] == "utf8mb4"  # Drupal's tables are utf8mb4


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("oracle://u@h/d", "unsupported database 'oracle'"),
        ("sqlite://", "give the path"),
        ("not a url", "not a database URL"),
    ],
)
def test_unusable_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        async_url(url)


def test_the_default_field_map_is_documented_and_complete() -> None:
    field_map = load_field_map(None)
    assert set(field_map.objects) == {"Contact", "Lead"}
    contact = field_map.objects["Contact"]
    assert contact.base == {"mail": "Email"}
    assert contact.fields == {
        "field_first_name": "FirstName",
        "field_last_name": "LastName",
        "field_salesforce_id": "Id",
    }
    assert contact.defaults == {"status": 1} and contact.roles == ()
    assert field_map.username_template == "{FirstName} {LastName}"
    assert not field_map.update_username
    assert "SFRELAY_FIELD_MAP" in DEFAULT_FIELD_MAP.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[Contact", "not valid TOML"),
        ("[username]\ntemplate = 'x'\n", "no object sections"),
        (
            "[Contact.fields]\nmail = 'Email'\nnickname = 'Nick'\n",
            "unknown Drupal field 'nickname'",
        ),
        ("[Contact.fields]\nmail = 3\n", "mail must name a Salesforce field"),
        ("[Contact]\nroles = 'editor'\n[Contact.fields]\nmail = 'Email'\n", "list of role names"),
        ("[Contact]\nfields = 1\n", r"Contact\.fields must be a table"),
        ("[username]\ntemplate = 'plain'\n[Contact.fields]\nmail='Email'\n", "with {Field} names"),
        ("[username]\ntemplate = '{A} {'\n[Contact.fields]\nmail='Email'\n", "malformed"),
        ("[username]\nupdate = 'yes'\n[Contact.fields]\nmail='Email'\n", "true or false"),
        ("[Contact.defaults]\nmail = 'x'\n[Contact.fields]\nmail='Email'\n", "cannot default"),
    ],
)
def test_field_map_errors_say_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_field_map(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[username]\nupdat = true\n[Contact.fields]\nmail = 'Email'\n",
            "field map [username]: unknown key 'updat' (it has template, fallback, update)",
        ),
        (
            "[Contact]\nrole = ['editor']\n[Contact.fields]\nmail = 'Email'\n",
            "field map [Contact]: unknown key 'role' (a section has roles, [Contact.fields] "
            "and [Contact.defaults])",
        ),
        (
            "[Contact.fields]\nmail = 'Email'\n[Contact.default]\nstatus = 1\n",
            "field map [Contact]: unknown key 'default' (a section has roles, [Contact.fields] "
            "and [Contact.defaults])",
        ),
        (
            "roles = ['editor']\n[Contact.fields]\nmail = 'Email'\n",
            "field map: roles is a value, not a section: write [roles] with its [roles.fields] "
            "(or move it into the section it belongs to)",
        ),
    ],
)
def test_a_key_the_field_map_does_not_have_is_refused_not_ignored(text: str, message: str) -> None:
    """A misspelt key (updat, role, [Contact.default]) was silently ignored: the map did
    something other than what its author wrote."""
    with pytest.raises(ConfigError) as refused:
        parse_field_map(text)
    assert str(refused.value) == message


def test_a_missing_field_map_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_field_map(tmp_path / "nope.toml")


def test_templates_render_fields_and_the_email_local_part() -> None:
    values = {"FirstName": "Ada", "LastName": None}
    assert render("{FirstName} {LastName}", values, "ada@example.com") == "Ada "
    assert render("{email_local}", values, "ada.l@example.com") == "ada.l"


@pytest.mark.parametrize(
    "mail",
    ["a@example.com", "A.B+tag@Sub.Example.co.uk", "o'brien@example.ie", "x@[192.168.0.1]"],
)
def test_valid_emails(mail: str) -> None:
    assert valid_email(mail)


@pytest.mark.parametrize(
    "mail",
    ["", "plain", "@example.com", "a@", "a b@example.com", "a@exa_mple.com", "a.@example.com",
     "a..b@example.com", "ü@example.com", "a@-example.com", "a@example.com\n"],
)  # fmt: skip
def test_invalid_emails(mail: str) -> None:
    assert not valid_email(mail)


@pytest.mark.parametrize(
    "mail",
    ["jürgen@müller.de", "инфо@письмо.рф", "用户@例子.广告", "Zoë.Ødegaard+x@bø.no",
     # combining marks (Mc, Mn): Devanagari vowel signs and virama, Thai vowels, a
     # decomposed (NFD) "ñ"; Egulias refuses only symbols and control/format code points
     "संपर्क@डाटामेल.भारत", "ดีเอ@example.com", "man\u0303ana@example.com",
     # beyond ASCII, spaces and punctuation are atoms to Egulias's lexer too
     "jü@\u00a0müller.de", "«jü»@müller.de"],
)  # fmt: skip
def test_international_emails_only_where_drupal_8_takes_them(mail: str) -> None:
    assert valid_email(mail, international=True)
    assert not valid_email(mail)  # Drupal 7: ASCII only


@pytest.mark.parametrize(
    "mail",
    ["ü ü@müller.de", "\U0001f601@example.com", "jü@-müller.de", "jü@müller-.de",
     "jü.@müller.de", "jü..x@müller.de", "jü@müller_x.de", "ü" * 250 + "@x.de",
     # symbols (So, Sc, Sm) and control, format, private-use, unassigned code points
     "jü€@müller.de", "jü@müller\u00d7.de", "jü\u200b@müller.de", "jü\u00ad@müller.de",
     "jü\x85@müller.de", "jü\ue000@müller.de", "jü\u0378@müller.de", "ü@\u2603.de"],
)  # fmt: skip
def test_international_emails_still_refused(mail: str) -> None:
    assert not valid_email(mail, international=True)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  John   Doe ", "John Doe"),
        ("José Ñúñez", "José Ñúñez"),
        ("<script>alert(1)</script>", "scriptalert1script"),
        ("a\u200bb\u00adc", "abc"),  # zero-width and soft hyphen: Drupal refuses them
        ("x" * 80, "x" * 60),
        ("O'Neil-Smith @ ACME+Co.", "O'Neil-Smith @ ACME+Co."),
    ],
)
def test_usernames_are_cleaned_to_what_drupal_accepts(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


def test_characters_outside_the_bmp() -> None:
    """For 3-byte utf8 columns: U+FFFD in values, nothing in usernames (Drupal 7's
    user_validate_name() refuses U+FFF9-U+FFFD)."""
    bold_a, grin = "\U0001d400", "\U0001f600"
    assert not outside_bmp("plain ascii") and not outside_bmp("Zo\u00eb \ufffd")
    assert outside_bmp(f"Smith {grin}") and outside_bmp(bold_a)
    assert within_bmp(f"{bold_a}nna {grin}!") == "\ufffdnna \ufffd!"
    assert within_bmp("Zo\u00eb") == "Zo\u00eb"
    assert clean_name(f"{bold_a}nna {grin} Smith") == f"{bold_a}nna Smith"
    assert clean_name(f"{bold_a}nna {grin} Smith", bmp_only=True) == "nna Smith"
    assert clean_name(f"{bold_a} {grin}", bmp_only=True) == ""  # then the fallback
    # sfrelay's own JSON: the same JSON, with escape pairs
    value = {"d": f"{bold_a}nna {grin} Zo\u00eb"}
    escaped = json_within_bmp(orjson.dumps(value))
    assert escaped == '{"d":"\\ud835\\udc00nna \\ud83d\\ude00 Zo\u00eb"}'
    assert orjson.loads(escaped) == value
    assert json_within_bmp(b'{"d":"plain"}') == '{"d":"plain"}'


def test_suffixes_keep_usernames_within_60_characters() -> None:
    assert with_suffix("Jo", 1) == "Jo"
    assert with_suffix("Jo", 12) == "Jo_12"
    assert with_suffix("y" * 60, 3) == "y" * 58 + "_3"


def test_salesforce_ids_are_keyed_by_their_case_correct_18_characters() -> None:
    id15 = "0035g00000AbCdE"
    assert sf_key(id15) == to18(id15)
    assert sf_key(to18(id15)) == to18(id15)
    assert sf_key(to18(id15).lower()) == to18(id15)  # case-folded on the way: same record


@given(st.text(max_size=20))
@example("0035g00000AbCdE")  # capitals in each chunk
@example("001D000000IqhSL")  # Salesforce's documented example: 001D000000IqhSLIAZ
@example("ÄBCDEfghijKLMNO")  # not ASCII: only A-Z are capitals
def test_the_checksum_marks_each_capital_a_to_z_of_each_chunk(text: str) -> None:
    """Bit i of chunk c (characters 5c..5c+4) is set when that character is A-Z; the suffix
    is those three 5-bit numbers in A-Z0-5."""
    expected = "".join(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[
            sum(1 << i for i, ch in enumerate(text[5 * c : 5 * c + 5]) if "A" <= ch <= "Z")
        ]
        for c in range(3)
    )
    assert checksum(text) == expected
    if text == "001D000000IqhSL":
        assert expected == "IAZ"


def test_a_missing_sqlite_file_is_a_config_error_not_a_new_empty_database(tmp_path: Path) -> None:
    missing = tmp_path / "typo.sqlite"
    with pytest.raises(ConfigError, match=f"no Drupal SQLite database at {missing}"):
        create_engine(f"sqlite:///{missing}")
    assert not missing.exists()


def test_an_absolute_sqlite_path_written_with_three_slashes_is_shown_with_four(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///var/www/site.sqlite is var/www/site.sqlite, relative to the current folder:
    the error says so and names the URL of the file that exists."""
    site = tmp_path / "site.sqlite"
    site.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    relative = str(site).lstrip("/")
    with pytest.raises(ConfigError) as refused:
        create_engine(f"sqlite:///{relative}")
    assert str(refused.value) == (
        f"no Drupal SQLite database at {relative} (in {tmp_path}: a path after sqlite:/// is "
        "relative to the current folder; an absolute one takes four slashes): set "
        f"SFRELAY_DATABASE_URL to sqlite:///{site} for {site}"
    )
    assert not (tmp_path / relative).exists()


def test_an_sqlite_url_with_a_host_is_refused_with_the_url_meant(tmp_path: Path) -> None:
    """sqlite://tmp/x/site.sqlite: SQLAlchemy would drop the 'host' and open x/site.sqlite."""
    with pytest.raises(ConfigError) as refused:
        async_url("sqlite://var/www/html/sites/default/files/.ht.sqlite")
    assert str(refused.value) == (
        "SFRELAY_DATABASE_URL: sqlite://var/... names a host, which an SQLite URL has none "
        "of: for the file /var/www/html/sites/default/files/.ht.sqlite, write "
        "sqlite:////var/www/html/sites/default/files/.ht.sqlite (a path after sqlite:/// is "
        "relative to the current folder; an absolute one takes four slashes)"
    )


# Addresses that make nested repeats backtrack exponentially (a decomposed ü, as text pasted
# from macOS carries; a long domain), each failing at its very end, up to the 254 characters
# allowed.
SLOW_FOR_NESTED_REPEATS = [
    "maximilianschneiderberg" * 9 + "u\u0308" + "@web.de!",
    "a@" + "a" * 240 + "!",
    "a@" + "a-" * 120 + "!",
    "j\u00fc" * 120 + "@m\u00fcller\u0308.de!",
    "x@" + "\u00fc" * 240 + "\u0308!",
]


def test_email_checks_take_linear_time() -> None:
    """In a process of its own with a deadline: exponential backtracking would never end."""
    code = (
        "import sys, json; from app.records import valid_email\n"
        "mails = json.loads(sys.stdin.read())\n"
        "print([valid_email(m, international=i) for m in mails for i in (False, True)])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=orjson.dumps(SLOW_FOR_NESTED_REPEATS).decode(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.stdout.strip() == str([False] * 2 * len(SLOW_FOR_NESTED_REPEATS)), result.stderr


def test_a_versions_digest_is_what_it_says_whichever_source_it_came_from() -> None:
    """Pushed values are text; a REST row (reconcile, refetch) has JSON types, IsDeleted
    false and null markers; a delete log entry only the Id: one version hashes alike."""
    field_map = load_field_map(None)
    sources = field_map.sources["Lead"]
    assert sources == ("Email", "FirstName", "LastName", "Id", "email_local")
    pushed = {"Id": "00Q5g00000AbCdEAAZ", "Email": "a@example.com", "FirstName": "Ann",
              "LastName": "Lee", "SystemModstamp": "2026-01-01T00:00:00.000Z"}  # fmt: skip
    rest = {**pushed, "IsDeleted": False, "MasterRecordId": None, "IsConverted": False,
            "ConvertedContactId": None, "LastModifiedDate": "2025-12-31T00:00:00.000Z"}  # fmt: skip
    same = version_digest(pushed, sources)
    assert version_digest(rest, sources) == same
    assert len(same) == 16
    # Another value, a value deleted (nil) and a value not sent are three other versions.
    others = [
        {**pushed, "LastName": "Lea"},
        {**pushed, "LastName": None},
        {k: v for k, v in pushed.items() if k != "LastName"},
    ]
    digests = {version_digest(o, sources) for o in others}
    assert len(digests) == 3 and same not in digests
    # By meaning: a conversion, a deletion (whatever values it shows), a merge into one Id.
    converted = {**rest, "IsConverted": True, "ConvertedContactId": "0035g00000XyZaBAAZ"}
    assert version_digest(converted, sources) != same
    assert version_digest({**converted, "IsConverted": "true"}, sources) == version_digest(
        converted, sources
    )
    deleted = version_digest({**rest, "IsDeleted": True}, sources)
    logged = {"Id": pushed["Id"], "IsDeleted": True, "SystemModstamp": pushed["SystemModstamp"]}
    assert version_digest(logged, sources) == deleted != same
    merged = {**logged, "MasterRecordId": "00Q5g00000ZzZzZAAZ"}
    assert version_digest(merged, sources) not in (deleted, same)
    # JSON types as pushed text
    typed = ("Email", "HasOptedOutOfEmail", "NumberOfEmployees")
    as_text = {"Email": "a@example.com", "HasOptedOutOfEmail": "true", "NumberOfEmployees": "5"}
    as_json = {"Email": "a@example.com", "HasOptedOutOfEmail": True, "NumberOfEmployees": 5}
    assert version_digest(as_text, typed) == version_digest(as_json, typed)
