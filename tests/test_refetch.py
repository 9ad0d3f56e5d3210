"""Refetch mode: Id-only messages, stale payloads and records deleted since, on a worker."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import redis

from app.config import Settings
from app.dead import list_dead_letters, replay_dead_letters
from app.jobs import JobNotification
from tests.drupal_rows import note, sf
from tests.fixtures_worker import drupal_users, run_worker
from tests.sfserver import FakeOrg
from tests.test_purge import enqueue
from tests.test_reconcile import T0, rc_settings

__all__ = ["rc_settings"]


def users(path: Path) -> dict[str, tuple[str, str, int]]:
    return {row[6]: (row[2], row[5], row[3]) for row in drupal_users(path)}


async def test_id_only_messages_read_the_current_values_and_deletions(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, redis_client: redis.Redis
) -> None:
    message = rc_settings
    refetch = rc_settings.model_copy(update={"payload_mode": "refetch"})
    # Synced by push first (message mode): four users.
    await enqueue(
        message, [[note(sf(n), f"r{n}@example.org", "R", f"Old{n}") for n in range(1, 5)]]
    )
    await run_worker(message)
    assert {k: v[1] for k, v in users(drupal_db).items()} == {sf(n): f"Old{n}" for n in range(1, 5)}
    # Salesforce now: 1 changed, 2 in the recycle bin, 3 gone entirely, 4 changed.
    later = T0 + timedelta(hours=1)
    for n in (1, 2, 4):
        sf_org.add(
            "Contact",
            sf(n),
            Email=f"r{n}@example.org",
            FirstName="R",
            LastName=f"New{n}",
            SystemModstamp=later,
        )
    sf_org.delete("Contact", sf(2), later + timedelta(minutes=1))
    # An Id-only message for 1, 2, 3 and a stale full payload for 4; Salesforce fails once.
    id_only = [JobNotification(f"04l9z{n:013d}", "Contact", {"Id": sf(n)}) for n in (1, 2, 3)]
    stale = note(sf(4), "stale@example.org", "R", "Stale", minutes=30)
    await enqueue(refetch, [[*id_only, stale]])
    sf_org.fail_next = [(503, "SERVER_UNAVAILABLE", "Service unavailable")]
    await run_worker(refetch)
    found = users(drupal_db)
    assert found[sf(1)] == ("r1@example.org", "New1", 1)
    assert found[sf(2)][2] == 0  # deleted since: blocked
    assert found[sf(3)] == ("r3@example.org", "Old3", 1)  # not returned: left as it was
    assert found[sf(4)] == ("r4@example.org", "New4", 1)  # the stale payload never won
    stats = redis_client.hgetall("sfrelay:stats")
    assert (int(stats[b"outcome:updated"]), int(stats[b"outcome:blocked"])) == (2, 1)
    assert sf_org.counts["queryAll"] >= 1
    (letter,) = await list_dead_letters(refetch)
    assert (letter.record_id, letter.reason) == (
        sf(3),
        f"refetch: Salesforce returns no Contact {sf(3)} to the integration user: it is not "
        "shared with that user (give it access, then `sfrelay dead replay`), or it was deleted "
        "and purged (reconcile finds that in the delete log: `sfrelay dead discard`)",
    )
    # Shared with the integration user since: the replayed letter reads and applies it.
    sf_org.add("Contact", sf(3), Email="r3@example.org", FirstName="R", LastName="New3",
               SystemModstamp=later)  # fmt: skip
    await replay_dead_letters(refetch, None)
    await run_worker(refetch)
    assert users(drupal_db)[sf(3)] == ("r3@example.org", "New3", 1)
    assert await list_dead_letters(refetch) == []


async def test_records_no_longer_returned_never_block_their_users(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, redis_client: redis.Redis
) -> None:
    """The integration user loses access to every record (a sharing rule changed): the next
    notifications block no one; each is a dead letter saying what to do."""
    refetch = rc_settings.model_copy(update={"payload_mode": "refetch"})
    for n in range(1, 6):
        sf_org.add("Contact", sf(n), Email=f"s{n}@example.org", FirstName="S", LastName=f"V{n}",
                   SystemModstamp=T0)  # fmt: skip
    ids = [JobNotification(f"04l8z{n:013d}", "Contact", {"Id": sf(n)}) for n in range(1, 6)]
    await enqueue(refetch, [ids])
    await run_worker(refetch)
    assert {k: v[2] for k, v in users(drupal_db).items()} == {sf(n): 1 for n in range(1, 6)}
    for n in range(1, 6):
        sf_org.records["Contact"].pop(sf(n))
    await enqueue(refetch, [[replace(i, id=f"04l7z{n:013d}") for n, i in enumerate(ids, 1)]])
    await run_worker(refetch)
    assert {k: v[2] for k, v in users(drupal_db).items()} == {sf(n): 1 for n in range(1, 6)}
    letters = await list_dead_letters(refetch)
    assert sorted(letter.record_id or "" for letter in letters) == [sf(n) for n in range(1, 6)]
    stats = redis_client.hgetall("sfrelay:stats")
    assert b"outcome:blocked" not in stats and int(stats[b"outcome:dead"]) == 5


async def test_pushed_work_is_never_held_back_by_the_polls_reserve(
    rc_settings: Settings, sf_org: FakeOrg, drupal_db: Path, redis_client: redis.Redis
) -> None:
    """SFRELAY_SF_MIN_API_REMAINING keeps requests back from polling; a pushed notification in
    refetch mode is still read (it was dead-lettered, and the low reading never refreshed)."""
    refetch = rc_settings.model_copy(
        update={"payload_mode": "refetch", "reconcile_every_seconds": 0}
    )
    assert refetch.sf_min_api_remaining == 1000
    sf_org.api_max, sf_org.api_used = 15_000, 14_200  # 800 requests left today
    for n in (1, 2):
        sf_org.add("Contact", sf(n), Email=f"p{n}@example.org", FirstName="P", LastName=f"Now{n}",
                   SystemModstamp=T0 + timedelta(hours=1))  # fmt: skip
    await enqueue(refetch, [[note(sf(1), "p1@example.org", "P", "Pushed1")]])
    await run_worker(refetch)  # reads 799 left from the response's Sforce-Limit-Info
    await enqueue(refetch, [[note(sf(2), "p2@example.org", "P", "Pushed2")]])
    await run_worker(refetch)
    assert {k: v[1] for k, v in users(drupal_db).items()} == {sf(1): "Now1", sf(2): "Now2"}
    stats = redis_client.hgetall("sfrelay:stats")
    assert int(stats[b"outcome:created"]) == 2 and b"outcome:dead" not in stats
    assert sf_org.counts["queryAll"] == 2


async def test_refetch_without_salesforce_settings_refuses_to_start(
    worker_settings: Settings,
) -> None:
    import pytest

    from app.errors import ConfigError
    from workers.main import worker_options

    with pytest.raises(ConfigError) as refused:
        worker_options(worker_settings.model_copy(update={"payload_mode": "refetch"}))
    assert str(refused.value).startswith(
        "SFRELAY_PAYLOAD_MODE=refetch reads records from Salesforce"
    )


async def test_a_worker_refuses_to_start_when_a_mapped_field_is_unreadable(
    rc_settings: Settings, sf_org: FakeOrg
) -> None:
    import pytest

    from app.errors import ConfigError

    del sf_org.fields["Contact"]["LastName"]
    with pytest.raises(ConfigError) as refused:
        await run_worker(rc_settings.model_copy(update={"payload_mode": "refetch"}))
    assert str(refused.value) == (
        "Salesforce: the integration user cannot read Contact LastName: fix SFRELAY_FIELD_MAP "
        "or the user's field access (`sfrelay check` shows every part)"
    )
