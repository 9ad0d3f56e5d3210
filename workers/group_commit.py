"""Group commit: the jobs a worker runs at once share one `Syncer.apply` call, whole jobs only.

With a `turn` (workers.lease.WriterLease.turn), each call waits for this worker's turn to
write the database first, and only then takes the jobs still waiting: a job whose deadline
passes before that never started, and `apply` raises `WriterBusy` for it (the task puts it
back on the queue with its tries unchanged), so no job times out merely waiting for another
worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from app.errors import RetryableError, SiteChanged
from app.outcomes import Outcome
from workers.metrics import batch_applied

logger = logging.getLogger("sfrelay.worker")

TURN_HOLD_S = 2.0  # how long one worker may keep the writer turn while it has jobs
# Syncer.apply (notifications) or Syncer.apply_prepared (what Syncer.prepare made of them):
# one Outcome per item, in order.
Apply = Callable[[Sequence[Any]], Awaitable[list[Outcome]]]
Turn = Callable[[], AbstractAsyncContextManager[None]]


class WriterBusy(Exception):
    """The job's deadline passed before its batch got the turn to write: nothing of it ran."""


@dataclass(slots=True)
class _Waiter:
    notifications: Sequence[Any]  # JobNotifications, or what Syncer.prepare made of them
    future: asyncio.Future[list[Outcome]]
    started: bool = field(default=False)


class GroupCommit:
    """Collects the notifications of concurrent jobs and applies them in as few calls as fit.

    A job is never split: a call holds whole jobs, up to `max_notifications` (one job alone
    may be larger). Jobs that arrive while a call runs go together into the next one, so the
    batch grows with the backlog and a lone job is applied at once.
    """

    def __init__(self, apply: Apply, max_notifications: int, turn: Turn | None = None) -> None:
        self._apply = apply
        self._max = max_notifications
        self._turn: Turn = turn or nullcontext
        # Seconds the runner spent waiting for its turn, and since when it waits now.
        self._turn_waited = 0.0
        self._turn_since: float | None = None
        self._pending: deque[_Waiter] = deque()
        self._runner: asyncio.Task[None] | None = None

    async def apply(
        self, notifications: Sequence[Any], deadline: float | None = None
    ) -> list[Outcome]:
        """The outcomes; past `deadline` (loop time) WriterBusy if the job never started,
        TimeoutError if it was being applied."""
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(notifications, future)
        arrived, turn_clock = time.monotonic(), self._turn_clock()
        self._pending.append(waiter)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # A cancelled job cancels its future: the runner then leaves it out.
        try:
            async with asyncio.timeout_at(deadline):
                return await future
        except TimeoutError:
            # Never started, and mostly for other workers' turns: not this database's fault.
            # Mostly behind this worker's own batches: the database is slow, a real timeout.
            waited = time.monotonic() - arrived
            if not waiter.started and 2 * (self._turn_clock() - turn_clock) >= waited:
                raise WriterBusy(
                    "other workers wrote the database until the job's deadline"
                ) from None
            raise

    def _turn_clock(self) -> float:
        if self._turn_since is None:
            return self._turn_waited
        return self._turn_waited + time.monotonic() - self._turn_since

    async def wait_idle(self) -> None:
        """Return once no call is running (before the Syncer is closed)."""
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    async def _run(self) -> None:
        # Jobs started in the same poll of the queue get here a moment apart: let them join.
        await asyncio.sleep(0)
        while self._pending:
            self._turn_since = time.monotonic()
            try:
                async with self._turn():
                    self._stop_turn_clock()
                    # Batch after batch while jobs wait, up to TURN_HOLD_S: a turn handed to
                    # another process costs more than its batch (SQLite drops a process's page
                    # cache whenever another one wrote the file), and the others' jobs wait
                    # seconds, far below their deadlines.
                    until = time.monotonic() + TURN_HOLD_S
                    await self._take_and_apply()
                    while self._pending and time.monotonic() < until:
                        await self._take_and_apply()
            finally:
                self._stop_turn_clock()

    def _stop_turn_clock(self) -> None:
        self._turn_waited = self._turn_clock()
        self._turn_since = None

    async def _take_and_apply(self) -> None:
        """Take the jobs still waiting (not those that gave up), up to the batch size."""
        # Only now are jobs taken: those that gave up waiting are left out.
        batch: list[_Waiter] = []
        size = 0
        while self._pending:
            waiter = self._pending[0]
            if batch and size + len(waiter.notifications) > self._max:
                break
            self._pending.popleft()
            if not waiter.future.done():
                waiter.started = True
                batch.append(waiter)
                size += len(waiter.notifications)
        if batch:
            try:
                await self._apply_batch(batch)
            except BaseException as exc:
                _fail(batch, exc)
                _fail(self._pending, exc)
                self._pending.clear()
                raise

    async def _apply_batch(self, batch: list[_Waiter]) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._apply([n for w in batch for n in w.notifications])
            if len(outcomes) != sum(len(w.notifications) for w in batch):
                raise RuntimeError("Syncer.apply returned a different number of outcomes")
        except (RetryableError, SiteChanged) as exc:
            _fail(batch, exc)  # the database or the site as a whole: every job alike
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # Something unexpected: apply each job alone so that one job cannot fail the others.
            for waiter in batch:
                await self._apply_batch([waiter])
            return
        # metrics and the batch's log line (workers/metrics.py)
        batch_applied(len(outcomes), len(batch), time.perf_counter() - started, outcomes)
        start = 0
        for waiter in batch:
            end = start + len(waiter.notifications)
            if not waiter.future.done():
                waiter.future.set_result(outcomes[start:end])
            start = end


def _fail(waiters: Sequence[_Waiter] | deque[_Waiter], exc: BaseException) -> None:
    for waiter in waiters:
        future = waiter.future
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
