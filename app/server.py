"""How `sfrelay serve` runs uvicorn: a deadline for each request head, a connection cap, and a
drain on SIGTERM (`drain_on_sigterm`: not ready first, the listener closed later).

uvicorn bounds neither the time a client may take to send its request head nor the number of
connections it holds open: a few thousand clients trickling their headers exhaust the file
descriptors and take `/healthz` down with the rest. `GuardedHttpProtocol` (uvicorn's httptools
protocol) gives every connection `SFRELAY_READ_TIMEOUT_SECONDS` to deliver a complete request head,
from the moment it is accepted or its previous response was sent, then answers 408 and closes it.
At `SFRELAY_MAX_CONNECTIONS` open connections, a new one closes the oldest connection that is
still waiting for a request head (a trickler or an idle keep-alive); if every connection is busy
with a request, the new one gets 503 and is closed. The body's own deadline is enforced where the
receiver reads it (`app.receiver`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, cast
from weakref import WeakKeyDictionary

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server, ServerState

from app import metrics
from app.config import Settings

log = logging.getLogger("sfrelay.receiver")

# Descriptors the process needs beside client connections: listening socket, Redis pool, logs.
RESERVED_DESCRIPTORS = 128
# A refused connection is answered, half-closed, and read (what arrives is dropped) until the
# client closes its side or LINGER_S passes: RFC 9112 9.6's "TCP reset problem". Closed at
# once, a socket with unread client bytes (a trickler's next header line) sends a reset, which
# can destroy the 408/503 before the client reads it. At most MAX_LINGERING at once (beyond
# that, closed at once), fewer when the descriptor limit leaves less beside the cap: they keep
# their descriptors, and the cap comes first.
LINGER_S = 2.0
MAX_LINGERING = 1024


@dataclass(frozen=True)
class ConnectionLimits:
    read_timeout_s: float
    max_connections: int
    max_lingering: int = MAX_LINGERING  # what the descriptor limit leaves beside the cap


def _response(status: str, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


# Connections of one server that are waiting for a request head, oldest first.
_waiting: WeakKeyDictionary[ServerState, dict[GuardedHttpProtocol, None]] = WeakKeyDictionary()
# Refused connections of one server that are answered and half-closed (see LINGER_S).
_lingering: WeakKeyDictionary[ServerState, set[GuardedHttpProtocol]] = WeakKeyDictionary()


def lingering(server_state: ServerState) -> int:
    """Refused connections of this server still answered, half-closed and read (LINGER_S)."""
    return len(_lingering.get(server_state, ()))


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and a connection cap."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.head_deadline: asyncio.TimerHandle | None = None
        self.waiting = _waiting.setdefault(server_state, {})
        self.lingering = _lingering.setdefault(server_state, set())
        self.linger: asyncio.TimerHandle | None = None

    # --- the request-head deadline --------------------------------------------------------------

    def _await_head(self) -> None:
        """Start the clock: a complete request head must arrive within the read timeout."""
        self._head_arrived()
        self.head_deadline = self.loop.call_later(self.limits.read_timeout_s, self._head_late)
        self.waiting[self] = None

    def _head_arrived(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        self.waiting.pop(self, None)

    def _head_late(self) -> None:
        self.head_deadline = None
        self.waiting.pop(self, None)
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; the next head's clock starts after it
        seconds = f"{self.limits.read_timeout_s:g}"
        self._close_with(
            "408 Request Timeout",
            f"the request head did not arrive within {seconds} s (SFRELAY_READ_TIMEOUT_SECONDS)",
        )

    def _close_with(self, status: str, text: str) -> None:
        if self.linger is not None:
            return  # answered already and half-closed
        metrics.connection_refused(status)  # metrics: refusals by reason
        self._head_arrived()
        if not self.transport.is_closing():
            self.transport.write(_response(status, text))
            if len(self.lingering) < self.limits.max_lingering and self.transport.can_write_eof():
                # The answer, then FIN; what the client still sends is read and dropped until
                # it closes its side (eof_received: asyncio then closes) or LINGER_S passes.
                # uvicorn still knows it (its shutdown closes it); the cap no longer counts it.
                self.transport.write_eof()
                self.lingering.add(self)
                self.linger = self.loop.call_later(LINGER_S, self.transport.close)
                return
            self.transport.close()
        # Closing: no longer counted against the cap (uvicorn forgets it once the socket is gone).
        self.connections.discard(self)

    # --- uvicorn's hooks --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) - len(self.lingering) > self.limits.max_connections:
            if self.waiting:
                oldest = next(iter(self.waiting))
                oldest._close_with("503 Service Unavailable", "too many connections")
            else:
                self._close_with("503 Service Unavailable", "too many connections")
                return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self.linger is not None:
            return  # refused and half-closed: dropped unparsed
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_arrived()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # keep-alive: the next request's head has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        if self.linger is not None:
            self.linger.cancel()
            self.lingering.discard(self)
        super().connection_lost(exc)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The limits to serve with; raises the descriptor limit so the cap can be honoured."""
    needed = settings.max_connections + RESERVED_DESCRIPTORS  # the cap's
    wanted = needed + MAX_LINGERING
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return ConnectionLimits(settings.read_timeout_seconds, settings.max_connections)
    # Lingering gets what is left beside the cap; the cap shrinks only when even it does not fit.
    max_connections = settings.max_connections
    if soft < needed:
        max_connections = max(1, soft - RESERVED_DESCRIPTORS)
        log.warning(
            "SFRELAY_MAX_CONNECTIONS=%d needs %d file descriptors, the limit is %d: serving at "
            "most %d connections; raise the limit (ulimit -n) or lower SFRELAY_MAX_CONNECTIONS",
            settings.max_connections,
            needed,
            soft,
            max_connections,
        )
    max_lingering = max(0, soft - RESERVED_DESCRIPTORS - max_connections)
    return ConnectionLimits(settings.read_timeout_seconds, max_connections, max_lingering)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config keyword arguments shared by `sfrelay serve` and the tests."""
    protocol = functools.partial(GuardedHttpProtocol, limits=connection_limits(settings))
    return {
        # uvicorn accepts any protocol factory here; a partial of a module-level class also
        # survives the pickling of `--workers N`.
        "http": cast(type[asyncio.Protocol], protocol),
        "proxy_headers": False,  # X-Forwarded-For is judged by SFRELAY_TRUSTED_PROXIES alone
        "server_header": False,
    }


def drain_on_sigterm(
    seconds: float, loop: asyncio.AbstractEventLoop, draining: Callable[[], None]
) -> Callable[[], None] | None:
    """In a process uvicorn serves (it handles SIGTERM in the main thread): a SIGTERM first
    calls `draining` (the receiver then answers /readyz with 503) and hands the signal to
    uvicorn `seconds` later, which only then closes the listener and finishes the requests in
    flight. Meanwhile every request is still served, so a load balancer that polls /readyz
    stops sending here before connections are refused. A second SIGTERM, or SIGINT (Ctrl-C),
    stops at once. Returns what puts uvicorn's handler back; None where nothing was changed
    (no drain, not the main thread, not served by uvicorn: the tests' in-process apps)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return None
    uvicorn_handler = signal.getsignal(signal.SIGTERM)
    if not isinstance(getattr(uvicorn_handler, "__self__", None), Server):
        return None
    handle_exit = cast(Callable[[int, FrameType | None], None], uvicorn_handler)
    received: list[int] = []

    def drain(sig: int) -> None:
        draining()
        log.info(
            "SIGTERM: /readyz answers 503 for %g s (SFRELAY_SHUTDOWN_DRAIN_SECONDS) while "
            "requests are still served; then the receiver stops",
            seconds,
        )
        loop.call_later(seconds, handle_exit, sig, None)

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if received:
            handle_exit(sig, frame)  # a second SIGTERM: stop now
            return
        received.append(sig)
        # A signal handler interrupts whatever runs: the drain starts on the loop instead.
        loop.call_soon_threadsafe(drain, sig)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, handle_exit)

    return restore
