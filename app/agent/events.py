"""Fans process lifecycle events out to the agent's watchers, each with its own bounded backlog."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

from app.domain import ProcessEvent
from app.errors import RateLimited

logger = logging.getLogger(__name__)

WATCHER_BACKLOG_EVENTS = 10_000

Publish = Callable[[ProcessEvent], None]


class Subscription:
    """The events one watcher has yet to take, from the moment it subscribed."""

    def __init__(self, hub: ProcessEvents, capsule_id: str | None) -> None:
        self.capsule_id = capsule_id
        self._hub = hub
        self._backlog: deque[ProcessEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._overflowed = False

    def offer(self, event: ProcessEvent) -> None:
        """Queues an event for this watcher, if it is still keeping up."""
        if self._ended or self._overflowed:
            return
        if len(self._backlog) >= WATCHER_BACKLOG_EVENTS:
            # A watcher this far behind would hold unbounded memory: end its stream instead.
            self._overflowed = True
            logger.warning("a process event watcher fell %d events behind", WATCHER_BACKLOG_EVENTS)
        else:
            self._backlog.append(event)
        self._wake()

    def end(self) -> None:
        """Ends the stream once the backlog is taken."""
        self._ended = True
        self._wake()

    def close(self) -> None:
        """Stops receiving events."""
        self._ended = True
        self._hub.unsubscribe(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def events(self) -> AsyncIterator[ProcessEvent]:
        """The events as they come, until ended; closes the subscription when done."""
        try:
            while True:
                while self._backlog:
                    yield self._backlog.popleft()
                if self._overflowed:
                    raise RateLimited(
                        f"this watcher fell {WATCHER_BACKLOG_EVENTS} events behind and was dropped: "
                        "watch again and list the processes to catch up"
                    )
                if self._ended:
                    return
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self.close()


class ProcessEvents:
    """STARTED and EXITED events of every capsule, for the watchers that want them."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, capsule_id: str | None) -> Subscription:
        """Starts collecting events of one capsule (None: every capsule) at once."""
        subscription = Subscription(self, capsule_id)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forgets a subscription."""
        self._subscriptions.discard(subscription)

    def publish(self, event: ProcessEvent) -> None:
        """Hands the event to every watcher of its capsule and of every capsule."""
        for subscription in self._subscriptions:
            if subscription.capsule_id in (None, event.process.capsule_id):
                subscription.offer(event)

    def end(self, capsule_id: str | None = None) -> None:
        """Ends the streams watching one capsule, or every stream when capsule_id is None."""
        for subscription in self._subscriptions:
            if capsule_id is None or subscription.capsule_id == capsule_id:
                subscription.end()
