"""What anyone who edits a Salesforce record (or posts to the receiver) can put in an operator's
terminal: `sfrelay why`, `dead list` and `status` show such values and stored errors escaped
(app.visible), never as escape sequences, carriage returns or bidi overrides; `--json` keeps
the values, written as JSON escapes. Ordinary international names are shown as they are.

A real receiver (in process), a real arq worker in burst mode, real Redis and a real Drupal 10
SQLite copy; the commands run through `app.cli.main`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import redis
from redis.asyncio import Redis

from app.config import Settings
from app.visible import visible
from tests.factories import contact_json, sf_id
from tests.fixtures_worker import run_worker
from tests.messages import contact, lead, outbound_message
from tests.test_status_why import _post, add_database_dead_letter, run
from workers.polls import _remember

# In XML (what Salesforce posts): a bidi override, C1's CSI, a line separator, a newline.
HOSTILE = "\u202eevil\x9b2J\u2028x\ny"
HOSTILE_SHOWN = "\\u202eevil\\x9b2J\\u2028x\\x0ay"
# Stored text (an error quoting a value, Salesforce's words): OSC 52 writes the clipboard,
# then the screen is cleared, the line overwritten.
ANSI = "\x1b]52;c;aGk=\x07\x1b[2J\r\x08forged"
ANSI_SHOWN = "\\x1b]52;c;aGk=\\x07\\x1b[2J\\x0d\\x08forged"
UNSAFE = ("\x1b", "\x07", "\r", "\x08", "\x9b", "\u202e", "\u2028")


def assert_visible_safe(text: str) -> None:
    for unsafe in UNSAFE:
        assert unsafe not in text, (unsafe, text)


def test_a_converted_leads_hostile_contact_id_is_refused_and_shown_escaped(
    worker_settings: Settings, drupal_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A converted Lead's user moves to its ConvertedContactId: one that is no Contact id is
    refused on receipt (app.soap), the Lead keeps its user, and `dead list` quotes the value
    escaped."""
    first = lead(Email="zoe@example.org", FirstName="Zoë", LastName="Ødegaard")
    lead_id = first.fields["Id"]
    asyncio.run(_post(worker_settings, outbound_message([first])))
    asyncio.run(run_worker(worker_settings))
    code, before, _ = run(capsys, worker_settings, "why", lead_id)
    converted = lead(
        Id=lead_id,
        Email="zoe@example.org",
        IsConverted="true",
        ConvertedContactId=f"003{HOSTILE}",
        SystemModstamp="2026-11-21T10:00:00.000Z",
    )
    asyncio.run(_post(worker_settings, outbound_message([converted])))
    asyncio.run(run_worker(worker_settings))

    code, lines, err = run(capsys, worker_settings, "why", lead_id)
    assert (code, err) == (0, "")
    assert lines[0] == before[0] and lines[0].startswith(f"Lead {lead_id} -> Drupal user ")
    code, lines, err = run(capsys, worker_settings, "dead", "list")
    assert (code, err) == (0, "")
    assert_visible_safe("\n".join(lines))
    shown = HOSTILE_SHOWN.replace("\\", "\\\\")  # repr'd again in the reason (app.soap._quote)
    reason = f"sf:ConvertedContactId '003{shown}' is not a Salesforce id"
    assert lines[1].endswith(f"refused on receipt: {reason}")


def test_dead_letters_and_status_show_stored_text_escaped(
    worker_settings: Settings,
    redis_client: redis.Redis,
    drupal_db: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Refused on receipt: its notification Id is not one, and the dead letter keeps it.
    refused = contact(Email="a@example.org")
    refused.notification_id = f"04l{HOSTILE}"
    asyncio.run(_post(worker_settings, outbound_message([refused])))
    # Kept by a worker, its error quoting what it was given.
    record = sf_id("003", 7)
    row = asyncio.run(
        add_database_dead_letter(
            worker_settings, contact_json(7, record, email="x@example.org"), ANSI
        )
    )

    code, lines, err = run(capsys, worker_settings, "dead", "list")
    assert (code, err) == (0, "")
    assert_visible_safe("\n".join(lines))
    assert len(lines) == 5  # the header, the two dead letters, a blank line, the advice
    assert lines[1].split()[1] == f"04l{HOSTILE_SHOWN}"
    assert lines[2].startswith(f"{row} ") and lines[2].endswith(f"  {ANSI_SHOWN}")

    code, lines, _ = run(capsys, worker_settings, "dead", "list", "--json")
    assert code == 0 and len(lines) == 1
    assert_visible_safe(lines[0])
    assert [d["error"] for d in orjson.loads(lines[0])][1] == ANSI

    code, lines, _ = run(capsys, worker_settings, "why", record)
    assert code == 0
    assert_visible_safe("\n".join(lines))
    assert lines[-1].endswith(f": {ANSI_SHOWN}")

    async def remember() -> None:
        client: Redis = Redis.from_url(worker_settings.redis_url)
        try:
            await _remember(client, 0, 1, f"Salesforce said {ANSI}")
        finally:
            await client.aclose()

    asyncio.run(remember())
    code, lines, _ = run(capsys, worker_settings, "status")
    assert code == 0
    assert_visible_safe("\n".join(lines))
    assert lines[-1].endswith(f"STOPPED: Salesforce said {ANSI_SHOWN}")


@pytest.mark.parametrize(
    "name",
    [
        "Ødegaard",
        "张伟",
        "Zoë",
        "O'Brien",
        "Nguyễn Thị",
        "\u0645\u062d\u0645\u062f\u200c\u0631\u0636\u0627",  # Persian, with its ZWNJ
        "👩\u200d💻",
        "a\u00a0b",
    ],
)
def test_international_names_are_shown_as_they_are(name: str) -> None:
    assert visible(name) == name
