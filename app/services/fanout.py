"""One upstream output stream per process per API replica, fanned out to that replica's subscribers."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, field

from app import metrics
from app.domain import (
    CapsuleInfo,
    OutputChunk,
    OutputEvent,
    OutputGap,
    ProcessExit,
    ProcessInfo,
    merge_chunks,
)
from app.errors import CapsuleError, Unavailable
from app.hosts.pool import HostPool
from app.services.flights import Flights

# Neighbouring chunks of one stream are joined up to this size before they go out as one event.
# Far more than the agent's own cap: each event a subscriber gets costs a GraphQL result, a JSON
# encoding and a WebSocket frame, next to which copying its bytes once is cheap. The shared stream
# joins each batch once, as it arrives, so that every subscriber reads the very same event objects
# (whose GraphQL result and encoding the API then shares among them).
MAX_MERGED_BYTES = 1024 * 1024


def _merge(events: Sequence[OutputEvent]) -> list[OutputEvent]:
    return merge_chunks(events, max_bytes=MAX_MERGED_BYTES)


def _size(event: OutputEvent) -> int:
    return len(event.data) if isinstance(event, OutputChunk) else 64


class _Sent:
    """What one batch delivered to one subscriber, added to the metrics at once."""

    __slots__ = ("bytes", "events", "gaps")

    def __init__(self) -> None:
        self.events = self.bytes = self.gaps = 0

    def add(self, event: OutputEvent) -> None:
        self.events += 1
        if isinstance(event, OutputChunk):
            self.bytes += len(event.data)
        elif isinstance(event, OutputGap):
            self.gaps += 1

    def count(self) -> None:
        if self.events:
            audience = metrics.OUTPUT_AUDIENCE.get()
            times = 1 if audience is None else audience()
            if times <= 0:
                return
            metrics.OUTPUT_EVENTS.inc(self.events * times)
            metrics.OUTPUT_BYTES.inc(self.bytes * times)
            if self.gaps:
                metrics.OUTPUT_GAPS.inc(self.gaps * times)


SHUTTING_DOWN = "the server is shutting down: subscribe again, with fromSeq the last seq seen plus one"


@dataclass(frozen=True, slots=True)
class ProcessKey:
    """A process on a host; the tag guards against a reused PID."""

    host_id: str
    capsule_id: str
    pid: int
    tag: str


@dataclass(eq=False)
class _Upstream:
    """The events one agent stream has delivered, kept while subscribers read them."""

    from_seq: int
    events: deque[OutputEvent] = field(default_factory=deque)
    first_index: int = 0  # the absolute index of events[0]
    floor: int = 0  # the lowest seq a newcomer can still be served from
    size: int = 0
    subscribers: int = 0
    done: bool = False
    error: CapsuleError | None = None
    # Resolved (and replaced) each time events arrive or the stream ends: one future every waiting
    # subscriber awaits, woken at once, with no lock to take in turn.
    changed: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.floor = self.from_seq

    @property
    def end_index(self) -> int:
        return self.first_index + len(self.events)

    def covers(self, from_seq: int) -> bool:
        return self.error is None and from_seq >= self.floor

    def index_of(self, from_seq: int) -> int:
        """The absolute index of the first event a subscriber from from_seq must see."""
        for offset, event in enumerate(self.events):
            if event.seq >= from_seq:
                return self.first_index + offset
        return self.end_index

    def notify(self) -> None:
        """Wakes every subscriber waiting for events."""
        changed, self.changed = self.changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    def append(self, batch: Sequence[OutputEvent], cap: int) -> None:
        self.events.extend(batch)
        self.size += sum(_size(e) for e in batch)
        while self.size > cap and len(self.events) > 1:
            evicted = self.events.popleft()
            self.first_index += 1
            self.size -= _size(evicted)
            self.floor = evicted.seq + 1


@dataclass(eq=False)
class _Hold:
    """One hold shared by every subscriber of a capsule (see OutputFanout.holding)."""

    users: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class OutputFanout:
    """Shares one agent stream per process among the subscribers one API replica holds."""

    def __init__(self, *, pool: HostPool, buffer_bytes: int) -> None:
        self._pool, self._cap = pool, buffer_bytes
        self._upstreams: dict[ProcessKey, _Upstream] = {}
        # Every pump still running, the ones already dropped from _upstreams too, until it has ended.
        self._pumps: set[asyncio.Task[None]] = set()
        # Subscribes arriving at once for one team's process share one lookup of it (OutputService).
        self.lookups: Flights[tuple[CapsuleInfo, ProcessInfo]] = Flights()
        self._holds: dict[str, _Hold] = {}

    @property
    def upstreams(self) -> int:
        """How many agent streams are open now."""
        return sum(1 for u in self._upstreams.values() if not u.done)

    @property
    def pumps(self) -> int:
        """How many pump tasks have not ended yet."""
        return len(self._pumps)

    async def close(self) -> None:
        """Cancels every pump and waits until each has ended, its agent stream closed.

        For the server's shutdown: a subscriber still reading ends with UNAVAILABLE, never as if
        the output had ended.
        """
        for upstream in self._upstreams.values():
            upstream.error = Unavailable(SHUTTING_DOWN)
        self._upstreams.clear()
        pumps = list(self._pumps) + [h.task for h in self._holds.values() if h.task is not None]
        self._holds.clear()
        for pump in pumps:
            pump.cancel()
        if pumps:
            await asyncio.wait(pumps)

    @asynccontextmanager
    async def holding(
        self, capsule_id: str, hold: Callable[[], AbstractAsyncContextManager[None]]
    ) -> AsyncIterator[None]:
        """Runs the block inside hold() (the capsule kept from idling), which one task enters for
        all the subscribers of the capsule at once, rather than a heartbeat each."""
        shared = self._holds.get(capsule_id)
        if shared is None:
            shared = self._holds[capsule_id] = _Hold()
            released = shared.released

            async def keep() -> None:
                async with hold():
                    await released.wait()

            shared.task = asyncio.create_task(keep(), name=f"hold-{capsule_id}")
        shared.users += 1
        try:
            yield
        finally:
            shared.users -= 1
            if shared.users == 0:
                if self._holds.get(capsule_id) is shared:
                    del self._holds[capsule_id]
                shared.released.set()

    async def follow(self, key: ProcessKey, from_seq: int) -> AsyncGenerator[OutputEvent, None]:
        """The process's events from from_seq: replayed, then live, ending after its exit event."""
        upstream = self._upstreams.get(key)
        if upstream is not None and not upstream.covers(from_seq) and upstream.subscribers > 0:
            # Older than what the shared stream holds: this subscriber replays on its own.
            async with aclosing(self._private(key, from_seq)) as events:
                async for event in events:
                    yield event
            return
        if upstream is None or not upstream.covers(from_seq):
            upstream = self._open(key, from_seq)
        upstream.subscribers += 1
        try:
            async with aclosing(self._read(key, upstream, from_seq)) as events:
                async for event in events:
                    yield event
        finally:
            upstream.subscribers -= 1
            if upstream.subscribers == 0 and self._upstreams.get(key) is upstream:
                del self._upstreams[key]
                await self._stop(upstream)

    @staticmethod
    async def _stop(upstream: _Upstream) -> None:
        """Cancels the upstream's pump and waits for it to end."""
        pump = upstream.task
        if pump is None or pump.done():
            return
        pump.cancel()
        # asyncio.wait neither raises the pump's CancelledError as this task's own nor swallows a
        # cancellation of this task: that one goes on, and close() still awaits the pump.
        await asyncio.wait({pump})

    def _open(self, key: ProcessKey, from_seq: int) -> _Upstream:
        upstream = _Upstream(from_seq=from_seq)
        upstream.task = asyncio.create_task(
            self._pump(key, upstream), name=f"fanout-{key.capsule_id}-{key.pid}"
        )
        self._pumps.add(upstream.task)
        upstream.task.add_done_callback(self._pumps.discard)
        self._upstreams[key] = upstream
        return upstream

    async def _pump(self, key: ProcessKey, upstream: _Upstream) -> None:
        stream = self._pool.client(key.host_id).stream_output(key.capsule_id, key.tag, upstream.from_seq)
        metrics.OUTPUT_UPSTREAMS.inc()
        try:
            async with aclosing(stream):
                async for batch in stream:
                    upstream.append(_merge(batch), self._cap)
                    upstream.notify()
        except CapsuleError as exc:
            upstream.error = exc
        finally:
            metrics.OUTPUT_UPSTREAMS.dec()
            upstream.done = True
            upstream.notify()

    async def _read(
        self, key: ProcessKey, upstream: _Upstream, from_seq: int
    ) -> AsyncGenerator[OutputEvent, None]:
        cursor = upstream.index_of(from_seq)
        next_seq = from_seq
        while True:
            batch, cursor, finished = await self._take(upstream, cursor)
            if batch is None:  # this subscriber fell behind the shared buffer: it goes on alone
                async with aclosing(self._private(key, next_seq)) as events:
                    async for event in events:
                        yield event
                return
            sent = _Sent()  # counted for the metrics once per batch, not per event
            try:
                for event in batch:
                    if isinstance(event, OutputGap):
                        if event.seq <= next_seq:  # lost before this subscriber's from_seq: not its loss
                            continue
                        if event.from_seq != next_seq:
                            # The agent counted this loss from another seq (where the shared stream
                            # began), and how many bytes the events from next_seq on held only the
                            # agent knows: this subscriber asks it on a stream of its own.
                            async with aclosing(self._private(key, next_seq)) as events:
                                async for own in events:
                                    yield own
                            return
                    yield event
                    sent.add(event)
                    # After a gap, the next event may carry the gap's own seq: the first one retained.
                    next_seq = event.seq if isinstance(event, OutputGap) else event.seq + 1
                    if isinstance(event, ProcessExit):
                        return
            finally:
                sent.count()
            if finished:
                if upstream.error is not None:
                    raise upstream.error
                return

    @staticmethod
    async def _take(upstream: _Upstream, cursor: int) -> tuple[list[OutputEvent] | None, int, bool]:
        """Waits for events past cursor: (them or None when evicted, the new cursor, whether all is read)."""
        while upstream.end_index <= cursor and not upstream.done:
            await asyncio.shield(upstream.changed)  # one subscriber's cancellation leaves it be
        if cursor < upstream.first_index:
            return None, cursor, False
        start = cursor - upstream.first_index
        batch = [upstream.events[i] for i in range(start, len(upstream.events))]
        return batch, upstream.end_index, upstream.done

    async def _private(self, key: ProcessKey, from_seq: int) -> AsyncGenerator[OutputEvent, None]:
        stream = self._pool.client(key.host_id).stream_output(key.capsule_id, key.tag, from_seq)
        async with aclosing(stream):
            async for batch in stream:
                sent = _Sent()
                try:
                    for event in _merge(batch):
                        yield event
                        sent.add(event)
                        if isinstance(event, ProcessExit):
                            return
                finally:
                    sent.count()
