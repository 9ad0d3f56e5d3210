"""SFRELAY_ACK_DURABILITY against real servers: redis-server 7.0 (appendfsync always, no WAITAOF)
and Valkey 8.1 (WAITAOF), killed with SIGKILL right after acks, with and without a replica."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.config import PROJECT_ROOT, Settings
from app.errors import AckNotDurable, ConfigError, QueueUnavailable
from app.jobs import read as read_job
from app.main import create_app
from app.queue import DEFAULT_QUEUE, JOB_KEY_PREFIX, STATS_KEY
from tests.messages import contact, outbound_message
from tests.servers import RedisServer, free_port, valkey_binary

URL = "/salesforce/outbound-message"
XML = {"content-type": "text/xml; charset=UTF-8", "soapaction": '""'}
ACK_TEXT = "<Ack>true</Ack>"
NO_REPLICA_FAULT = (
    "temporarily unavailable: the queue (Redis) did not confirm the write: "
    "no replica confirmed the write within 1500 ms"
)

# The two kinds of server: (test id, binary or None for the installed redis-server 7.0, name).
SERVERS = [("redis-7.0", None, "Redis"), ("valkey-8.1", "valkey", "Valkey")]


@pytest.fixture(params=SERVERS, ids=[s[0] for s in SERVERS])
def kind(request: pytest.FixtureRequest) -> tuple[str | None, str]:
    _, binary, name = request.param
    return (valkey_binary() if binary else None), name


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(binary: str | None, *options: str, name: str = "primary") -> RedisServer:
        server = RedisServer(
            free_port(),
            tmp_path / f"{name}-{len(started)}",
            # No 5 s wait for more replicas before a full sync (the default): one is all there is.
            (
                "--appendonly",
                "yes",
                "--maxmemory-policy",
                "noeviction",
                "--repl-diskless-sync-delay",
                "0",
                *options,
            ),
            binary=binary,
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def where(server: RedisServer) -> str:
    return f"127.0.0.1:{server.port}"


@asynccontextmanager
async def receiver(settings: Settings, server: RedisServer | str, mode: str) -> AsyncIterator[Any]:
    url = server if isinstance(server, str) else server.url
    app = create_app(
        Settings(
            _env_file=None,
            **{**settings.model_dump(), "redis_url": url, "ack_durability": mode},
        )
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 40000)),
            base_url="http://receiver",
        ) as client,
    ):
        yield client


async def refusal(settings: Settings, server: RedisServer | str, mode: str) -> str:
    with pytest.raises(ConfigError) as refused:
        async with receiver(settings, server, mode):
            pass
    return str(refused.value)


def notification_id(body: bytes) -> str:
    return body.split(b"<Id>")[1].split(b"</Id>")[0].decode()


def queued_ids(client: redis.Redis) -> list[str]:
    ids = []
    for job_id in client.zrange(DEFAULT_QUEUE, 0, -1):
        raw = client.get(JOB_KEY_PREFIX.encode() + job_id)
        assert raw is not None
        ids += [n.id for n in read_job(raw).notifications]
    return ids


def fault_of(response: httpx.Response) -> str:
    assert ACK_TEXT not in response.text
    start = response.text.index("<faultstring>") + len("<faultstring>")
    return response.text[start : response.text.index("</faultstring>")]


def wait_for_replica(primary: RedisServer, count: int = 1) -> None:
    client = primary.client()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = client.info("replication")
        links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if sum(link.get("state") == "online" for link in links) >= count:
            client.close()
            return
        time.sleep(0.05)
    client.close()
    raise TimeoutError(f"no replica of {where(primary)} came online")


# --- start-up refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fsync", "replica"])
async def test_refuses_to_start_on_a_redis_without_aof(
    settings: Settings,
    servers: Callable[..., RedisServer],
    kind: tuple[str | None, str],
    mode: str,
) -> None:
    binary, name = kind
    server = servers(binary, "--appendonly", "no")
    assert await refusal(settings, server, mode) == (
        f"{name} at {where(server)} runs without AOF (appendonly no), so an ack would not mean "
        "the notification is on disk: set appendonly yes and appendfsync always, or "
        "SFRELAY_ACK_DURABILITY=memory to accept losing acked notifications"
    )
    assert server.client().dbsize() == 0


async def test_refuses_to_start_on_redis_7_0_with_appendfsync_everysec(
    settings: Settings, servers: Callable[..., RedisServer]
) -> None:
    server = servers(None, "--appendonly", "yes", "--appendfsync", "everysec")
    version = server.client().info("server")["redis_version"]
    assert version.startswith("7.0.")
    assert await refusal(settings, server, "fsync") == (
        f"Redis {version} at {where(server)} fsyncs its AOF only every second or less often "
        "(appendfsync everysec) and has no WAITAOF (Redis >= 7.2): set appendfsync always, or "
        "use Redis >= 7.2 or Valkey, or SFRELAY_ACK_DURABILITY=memory to accept losing acked "
        "notifications"
    )
    assert server.client().dbsize() == 0


async def test_redis_7_0_with_config_disabled_is_refused_as_unverifiable(
    settings: Settings, servers: Callable[..., RedisServer]
) -> None:
    # Managed Redis often renames CONFIG away: without WAITAOF nothing else proves the fsync.
    server = servers(None, "--appendonly", "yes", "--rename-command", "CONFIG", '""')
    version = server.client().info("server")["redis_version"]
    assert await refusal(settings, server, "fsync") == (
        f"Redis {version} at {where(server)} does not show its appendfsync (CONFIG GET: unknown "
        "command 'CONFIG', with args beginning with: 'GET' 'appendfsync' ) and has no WAITAOF "
        "(Redis >= 7.2): allow CONFIG GET and set appendfsync always, or use Redis >= 7.2 or "
        "Valkey, or SFRELAY_ACK_DURABILITY=memory to accept losing acked notifications"
    )


async def test_valkey_with_config_disabled_relies_on_waitaof_and_acks(
    settings: Settings, servers: Callable[..., RedisServer]
) -> None:
    server = servers(valkey_binary(), "--rename-command", "CONFIG", '""')
    body = outbound_message([contact()])
    async with receiver(settings, server, "fsync") as client:
        response = await client.post(URL, content=body, headers=XML)
    assert response.status_code == 200
    assert queued_ids(server.client()) == [notification_id(body)]


async def test_refuses_a_valkey_that_refuses_waitaof(
    settings: Settings, servers: Callable[..., RedisServer]
) -> None:
    server = servers(valkey_binary(), "--rename-command", "WAITAOF", '""')
    version = server.client().info("server")["valkey_version"]
    assert await refusal(settings, server, "fsync") == (
        f"Valkey {version} at {where(server)} refuses WAITAOF (unknown command 'WAITAOF', with "
        "args beginning with: '1' '0' '1000' ): allow the command, or "
        "SFRELAY_ACK_DURABILITY=memory to accept losing acked notifications"
    )
    assert server.client().dbsize() == 0


async def test_refuses_replica_mode_without_a_replica(
    settings: Settings, servers: Callable[..., RedisServer], kind: tuple[str | None, str]
) -> None:
    binary, name = kind
    server = servers(binary)
    assert await refusal(settings, server, "replica") == (
        f"SFRELAY_ACK_DURABILITY=replica but {name} at {where(server)} has no connected "
        "replica: start one (replicaof), or SFRELAY_ACK_DURABILITY=fsync"
    )
    assert server.client().dbsize() == 0


def test_sfrelay_serve_refuses_with_the_fix_and_exit_code_2(
    servers: Callable[..., RedisServer],
) -> None:
    server = servers(None, "--appendonly", "no")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    env |= {"SFRELAY_ENV": "development", "SFRELAY_REDIS_URL": server.url, "SFRELAY_PORT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"sfrelay: Redis at {where(server)} runs without AOF (appendonly no), so an ack would "
        "not mean the notification is on disk: set appendonly yes and appendfsync always, or "
        "SFRELAY_ACK_DURABILITY=memory to accept losing acked notifications"
    )


async def test_memory_mode_starts_where_fsync_is_refused(
    settings: Settings, servers: Callable[..., RedisServer], kind: tuple[str | None, str]
) -> None:
    binary, _ = kind
    server = servers(binary, "--appendonly", "no")
    async with receiver(settings, server, "memory") as client:
        response = await client.post(URL, content=outbound_message([contact()]), headers=XML)
    assert response.status_code == 200
    assert ACK_TEXT in response.text


async def test_unreachable_at_start_up_then_checked_before_the_first_ack(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    late = RedisServer(
        port, tmp_path / "late", ("--appendonly", "yes", "--appendfsync", "everysec")
    )
    async with receiver(settings, f"redis://127.0.0.1:{port}/0", "fsync") as client:
        body = outbound_message([contact()])
        down = await client.post(URL, content=body, headers=XML)
        assert down.status_code == 503
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()["redis"]) == (
            503,
            "Redis does not answer: check SFRELAY_REDIS_URL and that Redis runs",
        )
        late.start()
        try:
            # Redis answers and takes writes, but not as an ack promises: not ready, as the
            # ack faults (the probe's body, like the fault, does not name Redis's address).
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {
                "status": "unavailable",
                "redis": "Redis cannot keep what SFRELAY_ACK_DURABILITY=fsync promises: see the "
                "receiver's log",
            }
            assert (
                "not ready: Redis cannot keep what SFRELAY_ACK_DURABILITY=fsync promises: "
                "see the receiver's log: Redis " in caplog.text
            )
            refused = await client.post(URL, content=body, headers=XML)
            assert refused.status_code == 503
            # The sender gets the gist; the operator's log names the Redis and the fix.
            assert fault_of(refused) == AckNotDurable.faultstring
            assert (
                f"acks are not possible: Redis {late.client().info('server')['redis_version']} "
                f"at 127.0.0.1:{port} fsyncs its AOF only every second"
            ) in caplog.text
            assert late.client().dbsize() == 0
        finally:
            late.stop()


# --- Redis killed right after acks ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fsync", "replica", "memory"])
async def test_redis_killed_right_after_acks(
    settings: Settings,
    servers: Callable[..., RedisServer],
    kind: tuple[str | None, str],
    mode: str,
) -> None:
    """fsync and replica: every acked notification is back after a SIGKILL and a restart from
    the AOF. memory (here on a Redis without AOF, which fsync refuses): all of them are gone,
    the risk that mode accepts.

    A SIGKILL leaves the kernel's page cache, so it cannot tell fsynced from written: that
    difference (a machine crash) is what the start-up checks and WAITAOF stand for."""
    binary, _ = kind
    options = ("--appendonly", "no") if mode == "memory" else ()
    primary = servers(binary, *options)
    if mode == "replica":
        servers(binary, "--replicaof", "127.0.0.1", str(primary.port), name="replica")
        wait_for_replica(primary)
    messages = [outbound_message([contact(), contact()]) for _ in range(30)]
    acked: list[str] = []
    async with receiver(settings, primary, mode) as client:
        for body in messages:
            response = await client.post(URL, content=body, headers=XML)
            assert response.status_code == 200
            acked += [i.decode() for i in _ids(body)]
        primary.kill()
        assert (await client.post(URL, content=messages[0], headers=XML)).status_code == 503
    primary.start()
    stored = primary.client()
    if mode == "memory":
        assert queued_ids(stored) == []
    else:
        assert sorted(queued_ids(stored)) == sorted(acked)
    stored.close()


def _ids(body: bytes) -> list[bytes]:
    return [part.split(b"</Id>")[0] for part in body.split(b"<Id>")[1:]]


# --- the ack waits for the fsync / the replica -----------------------------------------------


async def test_valkey_acks_wait_for_waitaof_and_fault_when_it_cannot_confirm(
    settings: Settings, servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """On Valkey the ack rides on WAITAOF 1 0: with the AOF switched off at run time, Valkey
    refuses WAITAOF and nothing is acked; once on again, the retry is acked, queued once."""
    server = servers(valkey_binary(), "--appendonly", "yes", "--appendfsync", "everysec")
    control = server.client()
    first, second = outbound_message([contact()]), outbound_message([contact()])
    async with receiver(settings, server, "fsync") as client:
        assert (await client.post(URL, content=first, headers=XML)).status_code == 200
        control.config_set("appendonly", "no")
        refused = await client.post(URL, content=second, headers=XML)
        assert refused.status_code == 503
        assert fault_of(refused) == QueueUnavailable.faultstring  # Redis's words: the log's
        assert "WAITAOF cannot be used when numlocal is set but appendonly is disabled" in (
            caplog.text
        )
        control.config_set("appendonly", "yes")
        deadline = time.monotonic() + 20
        while (
            control.info("persistence")["aof_rewrite_in_progress"] and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        retried = await client.post(URL, content=second, headers=XML)
        assert retried.status_code == 200, retried.text
    assert sorted(queued_ids(control)) == sorted([notification_id(first), notification_id(second)])
    control.close()


async def test_replica_mode_acks_then_faults_without_the_replica_and_queues_the_retry_once(
    settings: Settings, servers: Callable[..., RedisServer], kind: tuple[str | None, str]
) -> None:
    binary, _ = kind
    primary = servers(binary)
    replica = servers(binary, "--replicaof", "127.0.0.1", str(primary.port), name="replica")
    wait_for_replica(primary)
    first, second = outbound_message([contact()]), outbound_message([contact(), contact()])
    async with receiver(settings, primary, "replica") as client:
        assert (await client.post(URL, content=first, headers=XML)).status_code == 200
        # The replica dies (SIGKILL: a SIGTERM here used up RedisServer.stop's 10 s before the
        # kill); once restarted it resyncs from the primary, as asserted at the end.
        replica.kill()
        refused = await client.post(URL, content=second, headers=XML)
        assert refused.status_code == 503
        assert fault_of(refused) == NO_REPLICA_FAULT
        replica.start()
        wait_for_replica(primary)
        # Salesforce's retry: its notifications are already seen (written before the wait
        # timed out); the ack now waits for the replica, which then holds the earlier write too.
        retried = await client.post(URL, content=second, headers=XML)
        assert retried.status_code == 200
        assert ACK_TEXT in retried.text
    expected = sorted([notification_id(first), *(i.decode() for i in _ids(second))])
    assert sorted(queued_ids(primary.client())) == expected
    on_replica = replica.client()
    assert sorted(queued_ids(on_replica)) == expected
    assert int(on_replica.hget(STATS_KEY, "duplicates") or 0) == 2


async def test_replica_mode_is_not_ready_while_no_replica_is_connected(
    settings: Settings, servers: Callable[..., RedisServer]
) -> None:
    """Every ack waits for a replica (WAIT 1) and faults without one: /readyz says so, rather
    than 200 while each message is refused."""
    primary = servers(valkey_binary())
    replica = servers(
        valkey_binary(), "--replicaof", "127.0.0.1", str(primary.port), name="replica"
    )
    wait_for_replica(primary)
    async with receiver(settings, primary, "replica") as client:
        assert (await client.get("/readyz")).json() == {"status": "ready", "redis": "ok"}
        replica.kill()
        deadline = time.monotonic() + 20
        while (ready := await client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "still ready without a replica"
            await asyncio.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "unavailable",
            "redis": "no replica is connected to Redis, and every ack waits for one "
            "(SFRELAY_ACK_DURABILITY=replica) and faults: reconnect the replica",
        }
        refused = await client.post(URL, content=outbound_message([contact()]), headers=XML)
        assert (refused.status_code, fault_of(refused)) == (503, NO_REPLICA_FAULT)
        replica.start()
        wait_for_replica(primary)
        assert (await client.get("/readyz")).json() == {"status": "ready", "redis": "ok"}
        acked = await client.post(URL, content=outbound_message([contact()]), headers=XML)
        assert acked.status_code == 200


async def test_the_waiting_round_trip_reloads_a_flushed_script(
    settings: Settings, servers: Callable[..., RedisServer]
) -> None:
    """A Redis restarted without its scripts (or SCRIPT FLUSH) answers NOSCRIPT to the
    pipelined EVALSHA: the script is loaded and the round trip sent again, acked once."""
    server = servers(valkey_binary())
    control = server.client()
    first, second = outbound_message([contact()]), outbound_message([contact()])
    async with receiver(settings, server, "fsync") as client:
        assert (await client.post(URL, content=first, headers=XML)).status_code == 200
        control.script_flush()
        response = await client.post(URL, content=second, headers=XML)
        assert response.status_code == 200
        assert ACK_TEXT in response.text
    assert sorted(queued_ids(control)) == sorted([notification_id(first), notification_id(second)])
    assert int(control.hget(STATS_KEY, "duplicates") or 0) == 0
    control.close()
