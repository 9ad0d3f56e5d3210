"""What an ack promises (SFRELAY_ACK_DURABILITY), and how the receiver makes Redis keep it.

- `fsync` (default): the notification is in Redis's AOF on disk before the ack. On Redis >= 7.2
  and Valkey the enqueue is followed, in the same round trip, by `WAITAOF 1 0`; on older Redis
  the server must run `appendfsync always` (it fsyncs before it replies, so the script's reply
  already means on disk).
- `replica`: that, and one replica has it too (`WAIT 1`: in the replica's memory; the primary
  has it on disk). Not `WAITAOF 1 1` (on the replica's disk): replicas report their fsynced
  offset about once a second, so each ack took ~1.1 s (measured on Valkey 8.1).
- `memory`: an ack means Redis holds it (and its AOF, if on, within a second): a crash of
  the machine can lose acked notifications, which Salesforce never resends.

`plan_ack_wait` checks at start-up that the Redis can honour the mode and says what to change
otherwise. A wait that does not confirm in time makes the receiver fault (503): Salesforce
retries. The write itself stays, so the retry finds its notifications already seen and is
acked once its own wait confirms. That is right because Redis replicates and appends to its
AOF in one ordered stream, and the enqueue script always writes (its counters): a wait that
covers the retry's write covers the earlier write too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.errors import ConfigError

AckDurability = Literal["fsync", "replica", "memory"]

# How long one ack waits for the fsync, and then for the replica (ms): both together well inside
# the client's 5 s socket timeout. A healthy disk or replica answers in a few ms.
ACK_WAIT_MS = 1500
# The start-up probe waits at most this long (ms).
PROBE_WAIT_MS = 1000


@dataclass(frozen=True, slots=True)
class AckWait:
    """What the enqueue round trip carries after the script, and what the replies must say.

    No commands: the script's own reply is the confirmation (memory, or appendfsync always).
    """

    mode: AckDurability
    how: str  # for logs and the benchmark: what confirms an ack
    waitaof: bool = False  # WAITAOF 1 0: fsynced to the local AOF
    replica: bool = False  # WAIT 1: one replica has it

    @property
    def commands(self) -> tuple[tuple[str | int, ...], ...]:
        local = (("WAITAOF", 1, 0, ACK_WAIT_MS),) if self.waitaof else ()
        return local + ((("WAIT", 1, ACK_WAIT_MS),) if self.replica else ())

    def problem(self, replies: list[Any]) -> str | None:
        """None when the replies to `commands` confirm the write; otherwise what is missing."""
        for command, reply in zip(self.commands, replies, strict=True):
            if command[0] == "WAITAOF" and int(reply[0]) < 1:
                return f"Redis did not fsync the write to its AOF within {ACK_WAIT_MS} ms"
            if command[0] == "WAIT" and int(reply) < 1:
                return f"no replica confirmed the write within {ACK_WAIT_MS} ms"
        return None


def redis_location(url: str) -> str:
    """host:port (or the socket path) of a Redis URL, without its password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def _version(info: dict[str, Any]) -> tuple[int, ...]:
    text = str(info.get("redis_version", "0"))
    return tuple(int(part) for part in text.split(".") if part.isdigit())


async def plan_ack_wait(redis: Redis, mode: AckDurability, where: str) -> AckWait:
    """How acks are confirmed on this Redis; ConfigError, naming the fix, if it cannot honour
    `mode`. Redis errors (unreachable) propagate: the caller decides when to check again."""
    if mode == "memory":
        return AckWait(mode, "none (Redis's memory)")
    server = await redis.info("server")
    persistence = await redis.info("persistence")
    # Valkey reports redis_version 7.2.4 (and valkey_version): it has WAITAOF too.
    name = "Valkey" if server.get("server_name") == "valkey" else "Redis"
    version = str(server.get("valkey_version") or server.get("redis_version"))
    has_waitaof = _version(server) >= (7, 2)
    fix_memory = "or SFRELAY_ACK_DURABILITY=memory to accept losing acked notifications"
    if str(persistence.get("aof_enabled")) != "1":
        raise ConfigError(
            f"{name} at {where} runs without AOF (appendonly no), so an ack would not mean the "
            f"notification is on disk: set appendonly yes and appendfsync always, {fix_memory}"
        )
    if mode == "replica":
        await _require_replica(redis, name, where)
    if has_waitaof:
        try:
            # No write on this connection yet: answers at once, or refuses (AOF off, ACL).
            await redis.execute_command("WAITAOF", 1, 0, PROBE_WAIT_MS)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            raise ConfigError(
                f"{name} {version} at {where} refuses WAITAOF ({exc}): allow the command, "
                f"{fix_memory}"
            ) from exc
        if mode == "fsync":
            return AckWait(mode, "WAITAOF 1 0", waitaof=True)
        return AckWait(mode, "WAITAOF 1 0 + WAIT 1", waitaof=True, replica=True)
    try:
        fsync = (await redis.config_get("appendfsync")).get("appendfsync")
    except ResponseError as exc:
        raise ConfigError(
            f"{name} {version} at {where} does not show its appendfsync (CONFIG GET: {exc}) and "
            "has no WAITAOF (Redis >= 7.2): allow CONFIG GET and set appendfsync always, or use "
            f"Redis >= 7.2 or Valkey, {fix_memory}"
        ) from exc
    if fsync != "always":
        raise ConfigError(
            f"{name} {version} at {where} fsyncs its AOF only every second or less often "
            f"(appendfsync {fsync}) and has no WAITAOF (Redis >= 7.2): set appendfsync always, "
            f"or use Redis >= 7.2 or Valkey, {fix_memory}"
        )
    if mode == "fsync":
        return AckWait(mode, "appendfsync always")
    return AckWait(mode, "appendfsync always + WAIT 1", replica=True)


async def _require_replica(redis: Redis, name: str, where: str) -> None:
    replication = await redis.info("replication")
    if int(replication.get("connected_slaves", 0)) < 1:
        raise ConfigError(
            f"SFRELAY_ACK_DURABILITY=replica but {name} at {where} has no connected replica: "
            "start one (replicaof), or SFRELAY_ACK_DURABILITY=fsync"
        )
