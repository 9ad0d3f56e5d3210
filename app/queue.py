"""The only module that knows Redis keys and how jobs are enqueued.

`Enqueuer.submit` stores one `app.jobs.ApplyJob` from any source; the Outbound Message
receiver (`app.receiver`) is its first caller. A submission becomes at most one arq job holding
its new notifications, written by one Lua script in one round trip together with:

- a dedupe key per notification id (`sfrelay:seen:<org>:<id>`, kept for 26 hours by default),
  so a redelivered notification, alone or re-batched beside new ones, is never queued twice
  (a polled version's goes once the ledger holds it: `count_outcomes`);
- the skipped count for objects no mapping handles;
- a dead letter (reason + raw body) for each authentic but unusable notification; the body
  is kept as long as a job (`job_ttl_s`), without its SessionId's content.

The job is stored exactly as arq's own `enqueue_job` stores it (`arq:job:<id>` + the queue's
sorted set, laid out by arq's `serialize_job`, see `app.jobs`), so an unmodified arq worker
runs it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from app.config import Settings
from app.durability import AckDurability, AckWait, plan_ack_wait
from app.errors import AckNotDurable, ConfigError, NotConfirmed, QueueUnavailable
from app.jobs import ApplyJob, notification_count
from app.outcomes import OutcomeKind

# arq's own keys (arq/constants.py), which an unmodified arq worker reads and writes.
JOB_KEY_PREFIX = "arq:job:"
IN_PROGRESS_KEY_PREFIX = "arq:in-progress:"
RETRY_KEY_PREFIX = "arq:retry:"
DEFAULT_QUEUE = "arq:queue"  # SFRELAY_QUEUE_NAME's default
SEEN_PREFIX = "sfrelay:seen:"
STATS_KEY = "sfrelay:stats"
DEAD_KEY = "sfrelay:dead"
DEAD_BODY_PREFIX = "sfrelay:dead-body:"
# Notifications received per minute: hash `sfrelay:rate:<minutes since the epoch>`, field
# `received`, kept RATE_TTL_S (an hour of whole minutes and a margin) for `sfrelay status`.
RATE_PREFIX = "sfrelay:rate:"
RATE_TTL_S = 7260
OUTCOME_PREFIX = "outcome:"  # a field of STATS_KEY per outcome: what the workers did
# The turn to write one Drupal database (workers/lease.py): `sfrelay:writer:<digest>`.
WRITER_PREFIX = "sfrelay:writer:"
READY_PROBE_KEY = "sfrelay:ready-probe"  # /readyz writes it (only if it exists) to test writes
# The reconcile claim (claim_reconcile): one run at a time across workers, not before it is due.
RECONCILE_RUNNING_KEY = "sfrelay:reconcile:running"  # held while a reconcile runs
RECONCILE_DUE_KEY = "sfrelay:reconcile:recent"  # exists until the next run is due
# How the workers' last reconcile run ended (JSON: at, queued, errors, stopped), for status.
RECONCILE_LAST_KEY = "sfrelay:reconcile:last"
HEALTH_CHECK_SUFFIX = ":health-check"  # arq's health_check_key_suffix (arq/constants.py)
# After the health-check key: the workers alive (member: a worker, score: when its beat expires).
WORKERS_ALIVE_SUFFIX = ":workers"

# KEYS: queue, stats, dead hash, dead body key, job key, seen key per notification...,
#       and, last, this minute's rate key (RATE_PREFIX)
# ARGV: job id, score, job ttl ms, seen ttl s, job prefix, job suffix, dead body, now,
#       kinds (one letter per notification: "q" queue, "s" skip, "d" dead), the
#       notifications' JSON payloads joined by commas (as the job holds them), the rate key's
#       TTL (s), and the payloads' lengths in bytes, separated by spaces.
#       A few arguments rather than some per notification: packing them is the client's cost.
# The usual message (every notification new and queued) becomes the job as sent; only another
# one is cut into its notifications, by their lengths.
_ENQUEUE_LUA = """
local queued, skipped, dead, dupes = 0, 0, 0, 0
local seen_ttl = tonumber(ARGV[4])
local kinds, payloads = ARGV[9], ARGV[10]
local new = {}
for i = 6, #KEYS - 1 do
  if redis.call('SET', KEYS[i], ARGV[8], 'NX', 'EX', seen_ttl) then
    new[i] = true
  else
    dupes = dupes + 1
  end
end
local job = payloads
if dupes > 0 or string.find(kinds, '[sd]') then
  local kept, i, pos = {}, 5, 1
  for length in string.gmatch(ARGV[12], '%d+') do
    i = i + 1
    local stop = pos + tonumber(length)
    if new[i] then
      local kind = string.sub(kinds, i - 5, i - 5)
      if kind == 'q' then
        kept[#kept + 1] = string.sub(payloads, pos, stop - 1)
      elseif kind == 's' then
        skipped = skipped + 1
      else
        dead = dead + 1
        redis.call('HSET', KEYS[3], KEYS[i], string.sub(payloads, pos, stop - 1))
      end
    end
    pos = stop + 1
  end
  job = table.concat(kept, ',')
  queued = #kept
else
  queued = #KEYS - 6
end
if queued > 0 then
  redis.call('SET', KEYS[5], ARGV[5] .. job .. ARGV[6], 'PX', ARGV[3])
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
if skipped > 0 then redis.call('HINCRBY', KEYS[2], 'skipped', skipped) end
if dead > 0 then
  redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'dead_received', dead)
end
if dupes > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dupes) end
redis.call('HINCRBY', KEYS[2], 'queued_total', queued)
redis.call('HINCRBY', KEYS[#KEYS], 'received', #KEYS - 6)
redis.call('EXPIRE', KEYS[#KEYS], ARGV[11])
return {queued, skipped, dead, dupes}
"""


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    queued: int
    skipped: int
    dead: int
    duplicates: int
    job_id: str | None


@dataclass(frozen=True, slots=True)
class QueueStats:
    queued: int
    in_progress: int
    dead: int
    skipped: int
    duplicates: int
    # What the workers did with the notifications: {"outcome:created": n, ...}.
    outcomes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "in_progress": self.in_progress,
            "dead": self.dead,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
        }


def _seen_key(org15: str, dedupe_id: str) -> str:
    return f"{SEEN_PREFIX}{org15}:{dedupe_id}"


def _seen_keys(org15: str, dedupe_ids: list[str]) -> list[bytes]:
    """`_seen_key` of each id, encoded (as Redis gets them) in a few passes, not one per id."""
    if not dedupe_ids:
        return []
    seen = _seen_key(org15, "")
    keys = (seen + ("\n" + seen).join(dedupe_ids)).encode().split(b"\n")
    if len(keys) != len(dedupe_ids):  # an id with a newline in it (never a Salesforce id)
        keys = [_seen_key(org15, dedupe_id).encode() for dedupe_id in dedupe_ids]
    return keys


@dataclass(frozen=True, slots=True)
class NotQueued:
    """A notification stored beside a job but not in it: skipped, or a dead letter."""

    dedupe_id: str  # the notification id, or a stand-in unique to its message
    dead_letter: bytes | None = None  # None: skipped (no mapping handles its object)


class Enqueuer:
    """Writes a job to Redis in one round trip (see the module docstring).

    With SFRELAY_ACK_DURABILITY fsync or replica, the round trip also carries the wait that
    confirms it (`WAITAOF`/`WAIT`, see app.durability), pipelined after the script.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        queue_name: str,
        dedupe_ttl_s: int,
        job_ttl_s: int,
        ack_durability: AckDurability = "fsync",
        redis_location: str = "Redis",
    ) -> None:
        self._redis = redis
        self._script = redis.register_script(_ENQUEUE_LUA)
        self._durability: AckDurability = ack_durability
        self._location = redis_location
        self._ack_wait: AckWait | None = None  # planned by check_durability
        self._queue_name = queue_name
        self._dedupe_ttl_s = dedupe_ttl_s
        self._job_ttl_ms = job_ttl_s * 1000

    async def check_durability(self) -> AckWait:
        """How acks are confirmed; ConfigError if Redis cannot honour SFRELAY_ACK_DURABILITY.

        Redis errors propagate (Redis unreachable): the next call checks again.
        """
        if self._ack_wait is None:
            try:
                self._ack_wait = await plan_ack_wait(self._redis, self._durability, self._location)
            except ResponseError as exc:
                raise ConfigError(
                    f"cannot check that Redis at {self._location} can honour "
                    f"SFRELAY_ACK_DURABILITY={self._durability} ({exc}); "
                    "or set SFRELAY_ACK_DURABILITY=memory"
                ) from exc
        return self._ack_wait

    async def submit(
        self,
        job: ApplyJob,
        others: Sequence[NotQueued] = (),
        *,
        body: bytes = b"",
        body_sha: str | None = None,
    ) -> EnqueueResult:
        """Store `job` (its notifications deduped by id) and `others` in one round trip.

        `body` is the raw request, kept once (without its SessionId's content) beside the
        dead letters among `others`.
        """
        now_ms = int(job.received_at * 1000)
        job_id = uuid.uuid4().hex
        kinds = "q" * len(job.notifications) + "".join(
            "s" if other.dead_letter is None else "d" for other in others
        )
        has_dead = "d" in kinds
        if has_dead and body_sha is None:
            body_sha = hashlib.sha256(body).hexdigest()
        keys: list[Any] = [
            self._queue_name,
            STATS_KEY,
            DEAD_KEY,
            # Written only beside a dead letter: no digest of the body otherwise.
            DEAD_BODY_PREFIX + (body_sha or "-"),
            JOB_KEY_PREFIX + job_id,
        ]
        keys += _seen_keys(
            job.organization_id,
            [notification.id for notification in job.notifications]
            + [other.dedupe_id for other in others],
        )
        keys.append(f"{RATE_PREFIX}{int(job.received_at) // 60}")
        payloads = [notification.dumps() for notification in job.notifications]
        payloads += [other.dead_letter or b"" for other in others]
        prefix, suffix = job.frame(now_ms)
        kept = b""
        if has_dead and body:
            # Only a dead letter keeps the raw body, never the session id Salesforce may send
            # (imported here: app.soap loads lxml, which `sfrelay status` and `why` need not).
            from app.soap import without_session_id

            kept = without_session_id(body)
        args: list[Any] = [
            job_id,
            now_ms,
            self._job_ttl_ms,
            self._dedupe_ttl_s,
            prefix,
            suffix,
            kept,
            int(job.received_at),
            kinds,
            b",".join(payloads),
            RATE_TTL_S,
            " ".join(map(str, map(len, payloads))),
        ]
        try:
            wait = await self.check_durability()
            if not wait.commands:
                queued, skipped, dead, dupes = await self._script(keys=keys, args=args)
            else:
                queued, skipped, dead, dupes = await self._write_and_wait(wait, keys, args)
        except ConfigError as exc:
            raise AckNotDurable(f"acks are not possible: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"the queue (Redis) did not confirm the write: {exc}") from exc
        return EnqueueResult(queued, skipped, dead, dupes, job_id if queued else None)

    async def _write_and_wait(self, wait: AckWait, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA and the wait in one round trip (a pipeline, not a transaction: WAIT and
        WAITAOF block, which MULTI does not allow). redis-py's own script-in-pipeline support
        would first ask SCRIPT EXISTS, a second round trip: NOSCRIPT is handled here instead."""
        for _ in range(2):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                for command in wait.commands:
                    pipe.execute_command(*command)
                written, *confirmed = await pipe.execute(raise_on_error=False)
            if isinstance(written, NoScriptError):
                await self._redis.script_load(_ENQUEUE_LUA)
                continue
            if isinstance(written, Exception):
                raise written
            refused = next((r for r in confirmed if isinstance(r, Exception)), None)
            if isinstance(refused, ResponseError):  # the wait itself refused (no AOF, ...)
                # Redis's words (addresses, settings) are for the log, not the sender.
                raise QueueUnavailable(f"the queue (Redis) did not confirm the write: {refused}")
            if refused is not None:
                raise refused
            problem = wait.problem(confirmed)
            if problem is not None:
                raise NotConfirmed(problem)
            return written
        raise QueueUnavailable("the queue (Redis) did not load the enqueue script")


_REFUSALS = {
    # Workers need writes too (a job's in-progress key): more of them drain nothing.
    "OOM": "Redis is out of memory (maxmemory reached) and refuses writes, the workers' too "
    "(they cannot take jobs): raise maxmemory; nothing queued is lost (noeviction)",
    "MISCONF": "Redis refuses writes because it cannot save to disk: see the Redis log (disk "
    "full or not writable)",
    "READONLY": "Redis is a read-only replica: point SFRELAY_REDIS_URL at the primary",
    "NOREPLICAS": "Redis refuses writes: fewer replicas than min-replicas-to-write are connected",
}


def refusal(exc: ResponseError) -> str:
    """Why Redis refuses writes, and what to do, from its error code (not its words)."""
    # redis-py strips the codes it has a class for; the others stay the first word.
    if isinstance(exc, OutOfMemoryError):
        code = "OOM"
    elif isinstance(exc, ReadOnlyError):
        code = "READONLY"
    else:
        code = str(exc).split(" ", 1)[0]
    return _REFUSALS.get(code, f"Redis refuses writes ({code[:20]}): see the Redis log")


async def queue_stats(redis: Redis, queue_name: str) -> QueueStats:
    """Notifications waiting, being applied, and dead letters (counts of notifications)."""
    try:
        job_ids = [j.decode() for j in await redis.zrange(queue_name, 0, -1)]
        queued = in_progress = 0
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            async with redis.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.get(JOB_KEY_PREFIX + job_id)
                    pipe.exists(IN_PROGRESS_KEY_PREFIX + job_id)
                replies = await pipe.execute()
            for raw, running in zip(replies[::2], replies[1::2], strict=True):
                if raw is None:
                    continue
                count = notification_count(raw)
                if running:
                    in_progress += count
                else:
                    queued += count
        dead = await redis.hlen(DEAD_KEY)  # type: ignore[misc]
        counters = await redis.hgetall(STATS_KEY)  # type: ignore[misc]
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot read the queue (Redis): {exc}") from exc
    return QueueStats(
        queued=queued,
        in_progress=in_progress,
        dead=int(dead),
        skipped=int(counters.get(b"skipped", 0)),
        duplicates=int(counters.get(b"duplicates", 0)),
        outcomes={
            key.decode(): int(value)
            for key, value in sorted(counters.items())
            if key.startswith(OUTCOME_PREFIX.encode())
        },
    )


async def enqueue_apply(
    redis: Redis,
    queue_name: str,
    job: ApplyJob,
    *,
    job_ttl_s: int,
    defer_s: float = 0.0,
    job_id: str | None = None,
) -> bool:
    """Queue `job` on its own (retries, replays); False if `job_id` already exists.

    A fixed `job_id` makes the write idempotent: a worker that re-runs an interrupted job
    re-enqueues the same follow-up job, not a second one.
    """
    now_ms = int(time.time() * 1000)
    return await _store_job(
        redis, queue_name, job.serialize(now_ms), job_id or uuid.uuid4().hex, job_ttl_s, defer_s
    )


async def enqueue_stored(redis: Redis, queue_name: str, raw: bytes, *, job_ttl_s: int) -> None:
    """Queue a job again exactly as it was stored (`raw`: its `arq:job:` value, any shape):
    the replay of one a worker could not read (app.dead.DeadLetter.raw_job)."""
    await _store_job(redis, queue_name, raw, uuid.uuid4().hex, job_ttl_s)


async def _store_job(
    redis: Redis, queue_name: str, raw: bytes, job_id: str, job_ttl_s: int, defer_s: float = 0.0
) -> bool:
    now_ms = int(time.time() * 1000)
    score = now_ms + int(defer_s * 1000)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(JOB_KEY_PREFIX + job_id, raw, px=job_ttl_s * 1000 + score - now_ms, nx=True)
            pipe.zadd(queue_name, {job_id: score}, nx=True)
            created, _ = await pipe.execute()
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"the queue (Redis) did not confirm the write: {exc}") from exc
    return bool(created)


def redis_client(settings: Settings, *, timeout_s: float = 5) -> Redis:
    """The Redis client of the receiver, the CLI and the dead-letter code."""
    # Short timeouts: a request must fault (and Salesforce retry) long before its 60 s limit.
    client: Redis = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=timeout_s,
        health_check_interval=15,
    )
    return client


async def count_outcomes(
    redis: Redis, counts: Counter[OutcomeKind], *, org15: str = "", settled: Sequence[str] = ()
) -> None:
    """Add a job's outcomes to the `outcome:*` counters (shown by `sfrelay queue stats`), and
    forget the dedupe keys of `settled`: polled versions (app.jobs.Source.polled) that the
    ledger holds now, and which a poll asks the ledger about first. Kept, they made a version
    that Drupal lost again (its database restored from a backup) a duplicate for 26 hours."""
    async with redis.pipeline(transaction=False) as pipe:
        for name, count in counts.items():
            pipe.hincrby(STATS_KEY, f"{OUTCOME_PREFIX}{name.value}", count)
        if settled:
            pipe.delete(*_seen_keys(org15, list(settled)))
        await pipe.execute()


def worker_dead_letter_field(org15: str, notification_id: str) -> str:
    """The `sfrelay:dead` field of a worker's dead letter (the receiver's: its seen key)."""
    return f"worker:{org15}:{notification_id}"


def unreadable_job_field(job_id: str) -> str:
    """The `sfrelay:dead` field of a job a worker could not read (app.dead.keep_unreadable)."""
    return f"job:{job_id}"


async def dead_letters_to_redis(
    redis: Redis, entries: dict[str, bytes], *, fallback: bool = True
) -> None:
    """Keep dead letters in the `sfrelay:dead` hash: when the database cannot take them
    (`fallback`, counted), or jobs a worker could not read (kept with the queue's own)."""
    if not entries:
        return
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(DEAD_KEY, mapping=entries)
            if fallback:
                pipe.hincrby(STATS_KEY, "dead_fallback", len(entries))
            await pipe.execute()
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot write dead letters to Redis: {exc}") from exc


async def dead_letters_in_redis(redis: Redis) -> dict[str, bytes]:
    """The `sfrelay:dead` hash: field -> stored dead letter."""
    try:
        raw: dict[bytes, bytes] = await redis.hgetall(DEAD_KEY)  # type: ignore[misc]
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot read the dead letters in Redis: {exc}") from exc
    return {key.decode(): value for key, value in raw.items()}


async def remove_dead_letters_in_redis(
    redis: Redis, fields: Sequence[str], bodies: Sequence[str] = ()
) -> None:
    """Remove `sfrelay:dead` fields and the raw bodies (`sfrelay:dead-body:<digest>`) named."""
    try:
        async with redis.pipeline(transaction=True) as pipe:
            if fields:
                pipe.hdel(DEAD_KEY, *fields)
            if bodies:
                pipe.delete(*(DEAD_BODY_PREFIX + body for body in bodies))
            await pipe.execute()
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"the queue (Redis) failed removing dead letters: {exc}") from exc


_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def claim_reconcile(redis: Redis, token: str, every_s: int, hold_s: int) -> bool:
    """True when this worker may reconcile now: none running, none within `every_s`. The
    claim lasts `hold_s`: a run keeps it with renew_reconcile, so that a dead one holds it
    no longer than that."""
    if not await redis.set(RECONCILE_RUNNING_KEY, token, nx=True, ex=hold_s):
        return False
    if await redis.set(RECONCILE_DUE_KEY, token, nx=True, ex=every_s):
        return True
    await release_reconcile(redis, token)
    return False


async def release_reconcile(redis: Redis, token: str) -> None:
    await redis.eval(_RELEASE_LUA, 1, RECONCILE_RUNNING_KEY, token)  # type: ignore[misc]


_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


async def renew_reconcile(redis: Redis, token: str, hold_s: int) -> bool:
    """Keep this run's claim `hold_s` more seconds; False when it is no longer this run's."""
    renewed = await redis.eval(_RENEW_LUA, 1, RECONCILE_RUNNING_KEY, token, str(hold_s))  # type: ignore[misc]
    return bool(renewed)


class JobRewrite(Enum):
    DONE = 1
    CHANGED = 0  # the job is no longer what was read: read it again
    BUSY = -1  # a worker holds it (arq's in-progress key): left to it


# KEYS: job, in-progress, queue; ARGV: bytes read, new bytes ('' = none left), job id.
_REWRITE_JOB_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 1
"""


async def rewrite_queued_job(
    redis: Redis, queue_name: str, job_id: str, raw: bytes, new: bytes | None
) -> JobRewrite:
    """Replace a queued job's stored bytes `raw` with `new` (None: take the job out of the
    queue) in one step, only if no worker holds it and it is still `raw` (safe while workers
    run; app/purge.py)."""
    keys = (JOB_KEY_PREFIX + job_id, IN_PROGRESS_KEY_PREFIX + job_id, queue_name)
    args = (*keys, raw, new or b"", job_id)
    done = await redis.eval(_REWRITE_JOB_LUA, 3, *args)  # type: ignore[misc, arg-type]
    return JobRewrite(int(done))
