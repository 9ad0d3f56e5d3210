"""Writer turns (workers/lease.py) through real Redis, and a job that only waited for them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.sync import Syncer
from tests.factories import note, sf
from tests.fixtures_worker import drupal_users
from workers.group_commit import GroupCommit, WriterBusy
from workers.lease import ACTIVE_S, Election, WriterLease, active_key, database_key


@pytest.fixture
async def aredis(worker_settings: Settings) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(worker_settings.redis_url)
    yield client
    await client.aclose()


Elect = Callable[[str], Election]


@pytest.fixture
async def elections(worker_settings: Settings, aredis: Redis) -> AsyncIterator[Elect]:
    """Elections of this test's database by queue name; each resigns at the end (its renewal
    task stopped, its claim given back), whatever the test asserted before."""
    made: list[Election] = []

    def elect(queue: str) -> Election:
        made.append(Election(worker_settings.database_url, queue))
        return made[-1]

    yield elect
    for election in made:
        await election.resign(aredis)


def test_one_key_per_database_however_spelled(tmp_path: Path) -> None:
    assert database_key("pgsql://a:secret@DB:5432/drupal") == database_key(
        "postgresql://b@db:5432/drupal"
    )
    assert database_key("pgsql://db/drupal") != database_key("pgsql://db/other")
    assert database_key(f"sqlite:///{tmp_path}/x.sqlite") == database_key(
        f"sqlite:///{tmp_path}/./x.sqlite"
    )


async def test_one_worker_per_database_and_queue_takes_jobs_until_it_stops(
    worker_settings: Settings, aredis: Redis, elections: Elect
) -> None:
    url, queue = worker_settings.database_url, worker_settings.queue_name
    first, second = elections(queue), elections(queue)
    assert await first.elect(aredis) and not await second.elect(aredis)
    assert await first.elect(aredis) and not await second.elect(aredis)  # still the same
    # Another queue into the same database has its own active worker.
    assert await elections(queue + "-other").elect(aredis)
    # A claim lasts ACTIVE_S unless renewed: a dead worker is replaced after that.
    key = active_key(url, queue)
    assert 0 < await aredis.pttl(key) <= ACTIVE_S * 1000
    await first.resign(aredis)
    assert await second.elect(aredis) and not await first.elect(aredis)
    await first.resign(aredis)  # not its claim: the other's stays
    assert await aredis.get(key) == second.token.encode()
    await second.resign(aredis)
    assert not await aredis.exists(key)


async def test_the_active_claim_is_renewed_between_looks_at_the_queue(
    worker_settings: Settings, aredis: Redis, elections: Elect
) -> None:
    # arq's look at the queue can wait for a free job slot for longer than ACTIVE_S: the claim
    # is renewed by itself meanwhile (its time to live goes up again without another look).
    active = elections(worker_settings.queue_name)
    assert await active.elect(aredis)
    key = active.key
    deadline = asyncio.get_running_loop().time() + 20
    lowest = await aredis.pttl(key)
    while (ttl := await aredis.pttl(key)) <= lowest:
        lowest = ttl
        assert asyncio.get_running_loop().time() < deadline, "the claim was not renewed"
        await asyncio.sleep(0.05)
    await active.resign(aredis)
    assert not await aredis.exists(key)


async def test_a_worker_whose_database_fails_stands_by_for_a_while(
    worker_settings: Settings, aredis: Redis, elections: Elect
) -> None:
    first, second = elections(worker_settings.queue_name), elections(worker_settings.queue_name)
    assert await first.elect(aredis)
    # Long enough that a loaded machine gets through the next three calls within it.
    await first.step_down(aredis, seconds=2.0)
    assert await second.elect(aredis)  # the standby takes the jobs at once
    await first.step_down(aredis, seconds=2.0)  # another of its jobs failed: only paused again
    assert await aredis.get(first.key) == second.token.encode()
    await second.resign(aredis)
    assert not await first.elect(aredis)  # free, but it is paused
    assert not await aredis.exists(first.key)
    await asyncio.sleep(2.05)
    assert await first.elect(aredis)  # nobody else: it takes the jobs again


async def test_turns_are_taken_in_arrival_order(worker_settings: Settings, aredis: Redis) -> None:
    leases = [WriterLease(aredis, worker_settings.database_url) for _ in range(3)]
    order: list[int] = []
    first = leases[0].turn()
    await first.__aenter__()

    async def take(n: int) -> None:
        async with leases[n].turn():
            order.append(n)
            await asyncio.sleep(0.05)

    second = asyncio.create_task(take(1))
    await asyncio.sleep(0.1)
    third = asyncio.create_task(take(2))
    await asyncio.sleep(0.1)
    await first.__aexit__(None, None, None)
    await asyncio.gather(second, third)
    assert order == [1, 2]


async def test_a_job_that_only_waited_for_the_turn_is_writer_busy_and_nothing_ran(
    worker_settings: Settings, aredis: Redis, drupal_db: Path
) -> None:
    syncer = await Syncer.open(worker_settings)
    other = WriterLease(aredis, worker_settings.database_url).turn()
    await other.__aenter__()  # another worker writes
    mine = WriterLease(aredis, worker_settings.database_url)
    batch = GroupCommit(syncer.apply, 100, mine.turn)
    deadline = asyncio.get_running_loop().time() + 0.3
    with pytest.raises(WriterBusy):
        await batch.apply([note(sf(1), "ada@example.org")], deadline=deadline)
    await other.__aexit__(None, None, None)
    await batch.wait_idle()
    assert drupal_users(drupal_db) == []  # the job left before its batch began
    # Once the turn is free, the next job runs at once.
    (outcome,) = await batch.apply([note(sf(2), "grace@example.org")])
    assert outcome.kind == "created"
    await syncer.close()
