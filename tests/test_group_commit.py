"""GroupCommit on its own, in front of a real Syncer on a real Drupal 10 SQLite copy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from app.config import Settings
from app.errors import RetryableError
from app.jobs import JobNotification
from app.outcomes import Outcome, OutcomeKind
from app.sync import Syncer
from tests.factories import new_contacts
from workers.group_commit import GroupCommit


class Recorder:
    """Calls the real `Syncer.apply` and keeps the size of every call."""

    def __init__(self, syncer: Syncer, refuse: str | None = None) -> None:
        self.syncer = syncer
        self.calls: list[int] = []
        self.refuse = refuse  # an email whose call fails with a bug-like error

    async def apply(self, notifications: Sequence[JobNotification]) -> list[Outcome]:
        self.calls.append(len(notifications))
        if any(n.fields.get("Email") == self.refuse for n in notifications):
            raise KeyError("a bug")
        return await self.syncer.apply(notifications)


@pytest.fixture
async def syncer(drupal_db: Path) -> AsyncIterator[Syncer]:
    syncer = await Syncer.open(Settings(_env_file=None, database_url=f"sqlite:///{drupal_db}"))
    yield syncer
    await syncer.close()


async def test_concurrent_jobs_share_calls_of_whole_jobs_up_to_the_size(syncer: Syncer) -> None:
    recorder = Recorder(syncer)
    group = GroupCommit(recorder.apply, max_notifications=4)
    jobs = [new_contacts(1, 2), new_contacts(3, 2), new_contacts(5, 2)]
    results = await asyncio.gather(*(group.apply(j) for j in jobs))
    # Jobs started together join one call; the third would exceed 4 and waits for the next.
    assert recorder.calls == [4, 2]
    for notifications, outcomes in zip(jobs, results, strict=True):
        assert [o.notification_id for o in outcomes] == [n.id for n in notifications]
        assert {o.kind for o in outcomes} == {OutcomeKind.CREATED}


async def test_a_job_larger_than_the_size_is_never_split(syncer: Syncer) -> None:
    recorder = Recorder(syncer)
    group = GroupCommit(recorder.apply, max_notifications=2)
    outcomes = await group.apply(new_contacts(1, 5))
    assert recorder.calls == [5]
    assert len(outcomes) == 5


async def test_a_bug_in_a_shared_call_fails_only_the_job_that_causes_it(syncer: Syncer) -> None:
    recorder = Recorder(syncer, refuse="user3@example.org")
    group = GroupCommit(recorder.apply, max_notifications=10)
    good, bad = new_contacts(1, 2), new_contacts(3, 2)
    results = await asyncio.gather(group.apply(good), group.apply(bad), return_exceptions=True)
    # The shared call fails; each job is then applied alone.
    assert recorder.calls == [4, 2, 2]
    assert [o.kind for o in results[0]] == [OutcomeKind.CREATED] * 2
    assert isinstance(results[1], KeyError)


async def test_a_retryable_error_fails_every_job_of_the_call() -> None:
    async def locked(notifications: Sequence[JobNotification]) -> list[Outcome]:
        raise RetryableError("another sfrelay writer holds the database lock")

    group = GroupCommit(locked, max_notifications=10)
    results = await asyncio.gather(
        group.apply(new_contacts(1, 1)), group.apply(new_contacts(2, 1)), return_exceptions=True
    )
    assert [type(r) for r in results] == [RetryableError, RetryableError]
    await group.wait_idle()
