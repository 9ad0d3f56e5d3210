"""Group commit: the jobs a worker runs at once share one `Syncer.apply` call, whole jobs only."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.errors import RetryableError
from app.sync import Outcome

logger = logging.getLogger("sfrelay.worker")

Apply = Callable[[Sequence[dict[str, Any]]], Awaitable[list[Outcome]]]
_Waiter = tuple[Sequence[dict[str, Any]], "asyncio.Future[list[Outcome]]"]


class GroupCommit:
    """Collects the notifications of concurrent jobs and applies them in as few calls as fit.

    A job is never split: a call holds whole jobs, up to `max_notifications` (one job alone
    may be larger). Jobs that arrive while a call runs go together into the next one, so the
    batch grows with the backlog and a lone job is applied at once.
    """

    def __init__(self, apply: Apply, max_notifications: int) -> None:
        self._apply = apply
        self._max = max_notifications
        self._pending: deque[_Waiter] = deque()
        self._runner: asyncio.Task[None] | None = None

    async def apply(self, notifications: Sequence[dict[str, Any]]) -> list[Outcome]:
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._pending.append((notifications, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # A cancelled job cancels its future: the runner then leaves it out.
        return await future

    async def wait_idle(self) -> None:
        """Return once no call is running (before the Syncer is closed)."""
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    async def _run(self) -> None:
        # Jobs started in the same poll of the queue get here a moment apart: let them join.
        await asyncio.sleep(0)
        while self._pending:
            batch: list[_Waiter] = []
            size = 0
            while self._pending:
                notifications, future = self._pending[0]
                if batch and size + len(notifications) > self._max:
                    break
                self._pending.popleft()
                if not future.done():
                    batch.append((notifications, future))
                    size += len(notifications)
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
            outcomes = await self._apply([n for notifications, _ in batch for n in notifications])
            if len(outcomes) != sum(len(notifications) for notifications, _ in batch):
                raise RuntimeError("Syncer.apply returned a different number of outcomes")
        except RetryableError as exc:
            _fail(batch, exc)  # the database as a whole: every job retries
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # Something unexpected: apply each job alone so that one job cannot fail the others.
            for waiter in batch:
                await self._apply_batch([waiter])
            return
        logger.debug(
            "applied %d notifications of %d jobs in %.0f ms",
            len(outcomes),
            len(batch),
            (time.perf_counter() - started) * 1000,
        )
        start = 0
        for notifications, future in batch:
            if not future.done():
                future.set_result(outcomes[start : start + len(notifications)])
            start += len(notifications)


def _fail(waiters: Sequence[_Waiter] | deque[_Waiter], exc: BaseException) -> None:
    for _, future in waiters:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
