"""One reader of each followed capsule's event history per API replica, fanned out to the replica's
subscribers of that capsule.

A feed wakes on bus news (or on the replica's poll, should news be lost), reads what is new from the
store in one query, and keeps the newest events for its subscribers; one that falls behind them, or
resumes from an older cursor, reads the store on its own until it has caught up. Every subscriber
checks that each event follows the one before it, so none comes twice and none goes missing unseen.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from app.bus.broadcast import Bus
from app.bus.events import capsule_events_channel
from app.domain import CapsuleEvent
from app.errors import InvalidRequest, Unavailable
from app.services.events import EXPIRED, NOT_A_CURSOR, event_from_row
from app.store.repositories import ProcessEventRepository, SystemRepository, events_after
from app.store.session import Database

logger = logging.getLogger(__name__)

# Events a feed keeps for subscribers a little behind; one further behind reads the store itself.
BUFFER_EVENTS = 1024
# Events one store read returns at most.
PAGE_EVENTS = 500
# Capsules whose newest seq one poll asks for in one query.
POLL_BATCH = 500
SHUTTING_DOWN = "the server is shutting down: subscribe again, with after the cursor of the last event seen"


@dataclass(eq=False)
class _Feed:
    """What one replica has read of one capsule's history, for that replica's subscribers."""

    team_id: int
    capsule_id: str
    head: int = 0  # the seq of the newest event read
    events: deque[CapsuleEvent] = field(default_factory=deque)  # seqs up to head, without holes
    subscribers: int = 0
    ready: bool = False  # head is known
    done: bool = False
    error: Exception | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def first_seq(self) -> int:
        return self.head - len(self.events) + 1


class EventFeeds:
    """The replica's feeds, one per capsule someone here follows, and the poll that backs the bus."""

    def __init__(self, *, db: Database, bus: Bus, poll_sec: float) -> None:
        self._db, self._bus, self._poll_sec = db, bus, poll_sec
        self._feeds: dict[str, _Feed] = {}
        self._poller: asyncio.Task[None] | None = None

    @property
    def feeds(self) -> int:
        """How many capsules this replica follows now."""
        return len(self._feeds)

    async def follow(
        self, *, team_id: int, capsule_id: str, after: int | None
    ) -> AsyncGenerator[CapsuleEvent, None]:
        """The capsule's events past seq after (None: from now on), in order, until closed.

        The caller has checked that the capsule is the team's. INVALID_REQUEST for a seq the capsule
        has not reached or whose successors are no longer retained; Unavailable once the store is.
        """
        if after is not None:
            await self._check(team_id, capsule_id, after)
        feed = self._feeds.get(capsule_id)
        if feed is None or feed.done:
            feed = self._open(team_id, capsule_id)
        feed.subscribers += 1
        try:
            async with feed.changed:
                await feed.changed.wait_for(lambda: feed.ready or feed.done)
            if not feed.ready:
                raise feed.error or Unavailable(SHUTTING_DOWN)
            position = feed.head if after is None else after
            while True:
                for event in await self._next(feed, position):
                    position = event.seq
                    yield event
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0 and self._feeds.get(capsule_id) is feed:
                del self._feeds[capsule_id]
                await _stop(feed.task)

    async def close(self) -> None:
        """Ends every feed, for the server's shutdown: their subscribers end with UNAVAILABLE."""
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            feed.error = Unavailable(SHUTTING_DOWN)
            await _stop(feed.task)
        await _stop(self._poller)

    async def _check(self, team_id: int, capsule_id: str, after: int) -> None:
        async with self._db.session() as session:
            newest, oldest = await ProcessEventRepository(session, team_id).bounds(capsule_id)
        if after > newest:
            raise InvalidRequest(NOT_A_CURSOR)
        if after < newest and (oldest is None or oldest > after + 1):
            raise InvalidRequest(EXPIRED)

    def _open(self, team_id: int, capsule_id: str) -> _Feed:
        feed = _Feed(team_id=team_id, capsule_id=capsule_id)
        feed.task = asyncio.create_task(self._run(feed), name=f"events-{capsule_id}")
        self._feeds[capsule_id] = feed
        return feed

    async def _next(self, feed: _Feed, position: int) -> Sequence[CapsuleEvent]:
        """The events past position: from the feed where it holds them, else from the store."""
        async with feed.changed:
            await feed.changed.wait_for(lambda: feed.head > position or feed.done)
            if feed.head > position and position + 1 >= feed.first_seq:
                return list(itertools.islice(feed.events, position + 1 - feed.first_seq, None))
            if feed.done and feed.head <= position:
                raise feed.error or Unavailable(SHUTTING_DOWN)
        return await self._page(feed, position)

    async def _page(self, feed: _Feed, position: int) -> Sequence[CapsuleEvent]:
        rows = await events_after(self._db, feed.team_id, feed.capsule_id, position, limit=PAGE_EVENTS)
        if not rows or rows[0].seq != position + 1:  # dropped by the retention since
            raise InvalidRequest(EXPIRED)
        return [event_from_row(row) for row in rows]

    async def _run(self, feed: _Feed) -> None:
        try:
            # Watching before the head is read: what commits after the read also sends news after it.
            async with self._bus.news(capsule_events_channel(feed.capsule_id), feed.wake):
                async with self._db.session() as session:
                    feed.head, _ = await ProcessEventRepository(session, feed.team_id).bounds(feed.capsule_id)
                async with feed.changed:
                    feed.ready = True
                    feed.changed.notify_all()
                self._start_polling()
                while True:
                    await feed.wake.wait()
                    feed.wake.clear()  # before reading: news that comes during the read wakes it again
                    await self._read(feed)
        except Unavailable as exc:
            logger.warning("capsule %s: events cannot be read: %s", feed.capsule_id, exc)
            feed.error = exc
        except Exception as exc:
            logger.exception("capsule %s: following its events failed", feed.capsule_id)
            feed.error = exc
        finally:
            feed.done = True
            if self._feeds.get(feed.capsule_id) is feed:
                del self._feeds[feed.capsule_id]
            async with feed.changed:
                feed.changed.notify_all()

    async def _read(self, feed: _Feed) -> None:
        """Reads everything past the feed's head, one page at a time."""
        while True:
            rows = await events_after(self._db, feed.team_id, feed.capsule_id, feed.head, limit=PAGE_EVENTS)
            if not rows:
                return
            events = [event_from_row(row) for row in rows]
            async with feed.changed:
                if events[0].seq != feed.head + 1:
                    # The retention dropped events this replica had not read: those still behind
                    # them will find that out from the store.
                    feed.events.clear()
                feed.events.extend(events)
                while len(feed.events) > BUFFER_EVENTS:
                    feed.events.popleft()
                feed.head = events[-1].seq
                feed.changed.notify_all()
            if len(rows) < PAGE_EVENTS:
                return

    def _start_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="events-poll")

    async def _poll(self) -> None:
        """Wakes each feed whose capsule has events it has not read: what lost bus news delays."""
        while self._feeds:
            await asyncio.sleep(self._poll_sec)
            feeds = {f.capsule_id: f for f in self._feeds.values() if f.ready and not f.done}
            ids = list(feeds)
            for start in range(0, len(ids), POLL_BATCH):
                try:
                    async with self._db.session() as session:
                        newest = await SystemRepository(session).last_event_seqs(
                            ids[start : start + POLL_BATCH]
                        )
                except Exception as exc:  # the store, most likely: each feed finds out on its own read
                    logger.warning("polling for process events failed: %s", type(exc).__name__)
                    newest = {capsule_id: feeds[capsule_id].head + 1 for capsule_id in ids}
                for capsule_id, seq in newest.items():
                    feed = feeds[capsule_id]
                    if seq > feed.head:
                        feed.wake.set()


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    # Unlike awaiting it, leaves a cancellation of the caller's own alone.
    await asyncio.wait({task})
