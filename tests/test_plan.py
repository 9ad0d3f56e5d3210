"""The Planner on its own: decisions made in memory, read from a real Drupal 10 SQLite copy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.config import Settings
from app.drupal.engine import writer
from app.jobs import JobNotification
from app.outcomes import Outcome, OutcomeKind
from app.plan import Plan, Planner
from app.records import to_record
from app.sync import Syncer
from tests.factories import note, sf


@pytest.fixture
async def syncer(drupal_db: Path) -> AsyncIterator[Syncer]:
    syncer = await Syncer.open(Settings(_env_file=None, database_url=f"sqlite:///{drupal_db}"))
    yield syncer
    await syncer.close()


async def plan(syncer: Syncer, notifications: list[JobNotification]) -> Plan:
    """Plan one batch and write nothing (the transaction is rolled back)."""
    records = [to_record(i, n, syncer.field_map) for i, n in enumerate(notifications)]
    async with writer(syncer.engine) as conn:
        planner = Planner(conn, syncer.store, syncer.field_map, True, {}, {})
        await planner.load(records)
        for record in records:
            planner.decide(record)
        await planner.pick_usernames()
        await conn.rollback()
    return planner.plan


def decided(plan: Plan) -> list[tuple[OutcomeKind, int | None, str | None]]:
    outcomes: list[Outcome] = [plan.decisions[i] for i in sorted(plan.decisions)]
    return [(o.kind, o.uid, o.detail) for o in outcomes]


async def test_a_batch_sees_its_own_earlier_decisions(syncer: Syncer) -> None:
    first = note(sf(1), "ada@example.org", "Ada", "Byron", minutes=1)
    again = note(sf(1), "ada@example.org", "Ada", "Lovelace", minutes=2)
    other = note(sf(2), "ADA@example.org", "Other", "Person")
    result = await plan(syncer, [first, again, other])
    # The record's second version updates the user created earlier in the batch (key -1);
    # another record with that email is a conflict naming the first record, never a merge.
    assert decided(result) == [
        (OutcomeKind.CREATED, -1, None),
        (OutcomeKind.UPDATED, -1, None),
        (OutcomeKind.CONFLICT_DUPLICATE_EMAIL, None, sf(1)),
    ]
    assert [u.name for u in result.new.values()] == ["Ada Lovelace"]


async def test_order_guard_and_email_filter(syncer: Syncer) -> None:
    result = await plan(
        syncer,
        [
            note(sf(1), None, "No", "Mail"),
            note(sf(2), "not an email", "Bad", "Mail"),
        ],
    )
    assert decided(result) == [
        (OutcomeKind.SKIPPED_NO_EMAIL, None, None),
        (OutcomeKind.SKIPPED_INVALID_EMAIL, None, "not an email"),
    ]
    assert result.new == {}


async def test_new_users_with_one_name_get_suffixes(syncer: Syncer) -> None:
    result = await plan(
        syncer,
        [note(sf(n), f"same{n}@example.org", "Same", "Name") for n in (1, 2, 3)],
    )
    assert [u.name for u in result.new.values()] == ["Same Name", "Same Name_2", "Same Name_3"]
