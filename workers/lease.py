"""Whose turn it is to write one Drupal database: a fair writer lease shared through Redis.

The database's own writer lock (SQLite BEGIN IMMEDIATE, PostgreSQL advisory lock, MySQL
GET_LOCK) keeps writes correct; it is not fair: a SQLite writer that commits and begins again
at once wins over one that sleeps in its busy handler, and a waiting worker's jobs ran out of
time. So workers of one database take turns, first come first served, before they take the
database lock: a worker waiting for its turn registers in a Redis sorted set (by arrival
time); the turn goes to the longest waiting worker when the lease is free. A worker gives its
turn back once its waiting jobs are written, or after workers.group_commit.TURN_HOLD_S of
consecutive batches, so two busy workers alternate every few batches, and the lease expires
(LEASE_S, renewed while held) when a worker dies holding it.

If Redis cannot be asked, the worker goes on without its turn: the database lock still keeps
the writes correct.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from app.drupal.url import async_url
from app.queue import WRITER_PREFIX
from workers import metrics as worker_metrics

logger = logging.getLogger("sfrelay.worker")

LEASE_S = 10.0  # a dead holder delays the others at most this long
RENEW_S = 2.0
POLL_S = 0.005  # a turn handed over costs the waiter at most this
STALE_MS = 5000  # a waiter that stopped asking this long ago has left the line

# KEYS: lease, line, seen. ARGV: token, lease ms, stale ms. 1 = the turn is ours.
_TAKE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local token = ARGV[1]
if redis.call('GET', KEYS[1]) == token then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('ZADD', KEYS[2], 'NX', ms, token)
redis.call('HSET', KEYS[3], token, ms)
while true do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head == nil or head == token then break end
  local seen = tonumber(redis.call('HGET', KEYS[3], head) or '0')
  if ms - seen <= tonumber(ARGV[3]) then return 0 end
  redis.call('ZREM', KEYS[2], head)
  redis.call('HDEL', KEYS[3], head)
end
if redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[2]) then
  redis.call('ZREM', KEYS[2], token)
  redis.call('HDEL', KEYS[3], token)
  return 1
end
return 0
"""
# KEYS: lease, line, seen. ARGV: token.
_GIVE = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lease. ARGV: token, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def database_key(database_url: str) -> str:
    """One key per database however its URL is spelled (scheme alias, credentials, a
    relative SQLite path): backend, host, port and database name or absolute file."""
    url = async_url(database_url)  # ConfigError for a malformed one: before any Redis key
    backend = url.get_backend_name()
    if backend == "sqlite":
        where = str(Path(url.database or "").resolve())
    else:
        where = f"{(url.host or 'localhost').lower()}:{url.port or ''}/{url.database or ''}"
    digest = hashlib.sha256(f"{backend}|{where}".encode()).hexdigest()[:24]
    return WRITER_PREFIX + digest


def worker_token() -> str:
    """This process among all workers: host, pid, and a nonce for a pid reused after a restart."""
    return f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"


class WriterLease:
    """`async with lease.turn():` waits for this worker's turn to write the database."""

    def __init__(self, redis: Redis, database_url: str) -> None:
        self.redis = redis
        key = database_key(database_url)
        self.keys = [key, key + ":line", key + ":seen"]
        self.token = worker_token()
        self._take = redis.register_script(_TAKE)
        self._give = redis.register_script(_GIVE)
        self._renew = redis.register_script(_RENEW)
        self._warned = False

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        held = await self._wait()
        renewer = asyncio.create_task(self._keep()) if held else None
        try:
            yield
        finally:
            if renewer is not None:
                renewer.cancel()
                with suppress(asyncio.CancelledError):
                    await renewer
            # Also when cancelled while waiting: leave the line.
            with suppress(RedisError, OSError):
                await asyncio.shield(self._give(keys=self.keys, args=[self.token]))

    async def _wait(self) -> bool:
        lease_ms = int(LEASE_S * 1000)
        while True:
            try:
                if await self._take(keys=self.keys, args=[self.token, lease_ms, STALE_MS]):
                    return True
            except (RedisError, OSError) as exc:
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "writer turns unavailable (%s): writing without waiting for a turn; "
                        "the database lock still keeps the writes correct",
                        exc,
                    )
                return False
            await asyncio.sleep(POLL_S)

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            with suppress(RedisError, OSError):
                await self._renew(keys=self.keys[:1], args=[self.token, int(LEASE_S * 1000)])


ACTIVE_S = 5.0  # a dead or stuck active worker is replaced after this
RENEW_ACTIVE_S = 1.0

# KEYS: active. ARGV: token, ms. 1 = this worker is the one taking jobs.
_ELECT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: active. ARGV: token.
_GIVE_ACTIVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def active_key(database_url: str, queue_name: str) -> str:
    """Who takes jobs of `queue_name` for this database (another queue has its own)."""
    return f"{database_key(database_url)}:active:{queue_name}"


class Election:
    """One worker per database and queue takes jobs; the others stand by.

    Every worker calls `elect()` before each look at the queue (every 50 ms): the first to ask
    becomes the active one and stays so while it lives (its claim is renewed at each look and
    every RENEW_ACTIVE_S); the others take no jobs. A worker that stops (SIGTERM, the memory
    guard, --burst done) resigns, so a standby takes over at its next look; one that dies or
    hangs is replaced ACTIVE_S later; one whose database fails its batches steps down.
    Writes are one at a time per database anyway (the writer lease above, then the
    database's own lock): a second worker taking jobs only took CPU from the one writing and
    handed the turn, and SQLite's page cache, back and forth (the nightly benchmark: ~20%
    slower than one).

    If Redis cannot be asked, the worker takes jobs: the writer lease and the database lock
    keep the writes correct.
    """

    def __init__(self, database_url: str, queue_name: str) -> None:
        self.key = active_key(database_url, queue_name)
        self.token = worker_token()
        self.active: bool | None = None  # unknown until first asked
        self._client: Redis | None = None
        self._paused_until = 0.0  # monotonic; see step_down
        self._keeper: asyncio.Task[None] | None = None

    def _scripts(self, redis: Redis) -> tuple[AsyncScript, AsyncScript, AsyncScript]:
        if self._client is not redis:
            self._client = redis
            self._elect, self._give, self._renew = (
                redis.register_script(_ELECT),
                redis.register_script(_GIVE_ACTIVE),
                redis.register_script(_RENEW),
            )
        return self._elect, self._give, self._renew

    async def elect(self, redis: Redis) -> bool:
        """Whether this worker takes jobs now (and keeps it so for ACTIVE_S)."""
        if time.monotonic() < self._paused_until:
            self.active = False
            worker_metrics.ACTIVE.set(0)
            return False
        try:
            elect = self._scripts(redis)[0]
            won = bool(await elect(keys=[self.key], args=[self.token, int(ACTIVE_S * 1000)]))
        except (RedisError, OSError):
            won = True  # arq's own look at the queue reports Redis failing
        worker_metrics.ACTIVE.set(1 if won else 0)
        if won != self.active:
            if won:
                logger.info("taking jobs: the active worker of this database and queue")
            else:
                logger.info(
                    "standing by: another worker takes this database's jobs; this one takes "
                    "over within %.0f s of its stopping",
                    ACTIVE_S,
                )
            self.active = won
        if won and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.create_task(self._keep(redis))
        return won

    async def _keep(self, redis: Redis) -> None:
        """Renew the claim every RENEW_ACTIVE_S beside the looks at the queue: arq's look waits
        for a free job slot (a long batch, a slow database), and a busy active worker must not
        be taken for a dead one. It only extends this worker's own claim, never takes one."""
        renew = self._scripts(redis)[2]
        while self.active:
            await asyncio.sleep(RENEW_ACTIVE_S)
            with suppress(RedisError, OSError):
                if not await renew(keys=[self.key], args=[self.token, int(ACTIVE_S * 1000)]):
                    return  # taken over (it was gone too long): the next look says so

    async def step_down(self, redis: Redis, seconds: float = ACTIVE_S) -> None:
        """This worker's database writes fail as a whole (unreachable, read-only, too slow):
        let a standby, which may reach the database another way, take the jobs for
        `seconds`; with none, this worker takes them again after that."""
        self._paused_until = time.monotonic() + seconds
        if self.active is False:
            return  # standing by already (another of its jobs failed first): the pause is longer
        logger.warning(
            "the database failed this worker's batch: standing by for %.0f s so that "
            "another worker of this database may take the jobs",
            seconds,
        )
        await self.resign(redis)

    async def resign(self, redis: Redis) -> None:
        """Let a standby take over at once (this worker takes no more jobs)."""
        self.active = False
        worker_metrics.ACTIVE.set(0)
        if self._keeper is not None:
            self._keeper.cancel()
        with suppress(RedisError, OSError):
            await self._scripts(redis)[1](keys=[self.key], args=[self.token])
