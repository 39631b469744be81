"""Flights: concurrent calls for one key share one run of it, and nothing is kept after it.

A burst of viewers (thousands reconnecting after a restart) asks the same questions at once: is this
key valid, is this capsule running, which process is this. Each question is answered once for all
who asked while it was being answered; whoever asks after that asks again, so no answer is ever
older than the question.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Flights(Generic[V]):
    """Shares each key's call among the callers that arrive while it runs."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._running)

    async def run(self, key: Hashable, call: Callable[[], Awaitable[V]]) -> V:
        """call()'s result (or exception), shared with every caller of key while it runs."""
        task = self._running.get(key)
        if task is None:

            async def flight() -> V:
                return await call()

            task = asyncio.create_task(flight(), name=f"flight-{key!r:.60}")
            self._running[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        # A caller cancelled leaves the call to the others (or to its end: it is never left running
        # longer than it takes, and its exception is retrieved below).
        return await asyncio.shield(task)

    def _landed(self, key: Hashable, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            with contextlib.suppress(BaseException):
                task.exception()  # retrieved, so no "never retrieved" warning if nobody waited
