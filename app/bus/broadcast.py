"""The event bus: publish/subscribe between API replicas over memory, Redis or PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from broadcaster import BroadcastBackend
from broadcaster._backends.memory import MemoryBackend

from app import metrics
from app.config import bus_backend_kind
from app.errors import BusUnavailable, RateLimited

logger = logging.getLogger(__name__)


# Readiness probes publish here; nobody subscribes to it.
HEALTH_CHANNEL = "capsule.health"
# Waits between tries to reach a backend that dropped or refused: fast at first, for a restart.
RECONNECT_DELAYS_SEC = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class BusOverflow(RateLimited):
    """A subscriber fell too far behind; it ends rather than eat memory or lose events unseen."""


def make_backend(url: str, *, timeout_sec: float) -> BroadcastBackend:
    """The broadcaster backend for a bus URL: memory://, redis[s]:// or postgres[ql]://."""
    kind = bus_backend_kind(url)
    if kind == "redis":
        from app.bus.redis_backend import RedisBackend

        return RedisBackend(url, timeout_sec=timeout_sec)
    if kind == "postgres":
        from app.bus.postgres_backend import PostgresBackend

        return PostgresBackend(url, timeout_sec=timeout_sec)
    return MemoryBackend(url)


class _Subscriber:
    """One subscription's bounded buffer; iterating it yields messages, then its error if it has one."""

    def __init__(self, channel: str, capacity: int) -> None:
        self.channel = channel
        self._capacity = capacity
        self._messages: collections.deque[str] = collections.deque()
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()

    def push(self, message: str) -> None:
        if self._error is not None:
            return
        if len(self._messages) >= self._capacity:
            # Dropping silently would leave a hole nobody sees; ending the subscription says so.
            self.fail(
                BusOverflow(
                    f"a subscriber of {self.channel} fell {self._capacity} events behind; subscribe again"
                )
            )
            return
        self._messages.append(message)
        self._wakeup.set()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            self._wakeup.set()

    def __aiter__(self) -> _Subscriber:
        return self

    async def __anext__(self) -> str:
        # Buffered messages come first, so the error marks exactly where delivery stopped.
        while not self._messages:
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._messages.popleft()


class _News:
    """A news watch: each message on its channel sets its event, and so does each resubscription
    after the connection dropped (messages may have been lost meanwhile). It never fails."""

    def __init__(self, channel: str, wake: asyncio.Event) -> None:
        self.channel = channel
        self._wake = wake

    def push(self, message: str) -> None:
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        pass  # a watch outlives its connection: the bus subscribes it again once it is back


_Sink = _Subscriber | _News


class Bus:
    """Publish/subscribe on named channels; reconnects by itself after its backend drops.

    Subscribers end with BusUnavailable when the connection drops; news watches stay, and the bus
    reconnects them with backoff, setting their events once they are subscribed again.
    """

    def __init__(self, url: str, *, queue_size: int = 1000, timeout_sec: float = 5.0) -> None:
        bus_backend_kind(url)  # rejected now, not at first use
        self._url = url
        self._queue_size = queue_size
        self._timeout = timeout_sec
        self._backend: BroadcastBackend | None = None
        self._listener: asyncio.Task[None] | None = None
        self._channels: dict[str, set[_Sink]] = {}
        self._lock = asyncio.Lock()
        # News watches whose channel is not subscribed while the connection is down.
        self._orphans: set[_News] = set()
        self._reconnector: asyncio.Task[None] | None = None
        self._failures = 0
        self._connections = 0  # how many times the backend was reached
        self._retry_at = 0.0  # before then, connecting is not tried again (the loop's clock)

    async def connect(self) -> None:
        """Connects now, so a misconfigured or unreachable backend shows at startup."""
        await self._ensure()

    async def disconnect(self) -> None:
        """Closes the backend; live subscribers end with BusUnavailable, news watches hear no more."""
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None:
            reconnector.cancel()
            await asyncio.wait({reconnector})
        async with self._lock:
            if self._backend is not None:
                await self._lose(self._backend, reason="closing")
        self._orphans.clear()

    @contextlib.asynccontextmanager
    async def news(self, channel: str, wake: asyncio.Event) -> AsyncIterator[None]:
        """Sets wake for each message published on the channel while the block runs, and after each
        reconnection (what was published while the bus was down is not known). Never raises for the
        bus: while it is unreachable, the watch waits for it to come back."""
        watch = _News(channel, wake)
        await self._attach_news(watch)
        try:
            yield
        finally:
            self._orphans.discard(watch)
            await self._detach(watch)

    async def publish(self, channel: str, message: str) -> None:
        """Sends a message to every subscriber of the channel on every replica."""
        try:
            backend = await self._ensure()
        except BusUnavailable:
            metrics.BUS_PUBLISHES.labels("failed").inc()
            raise
        try:
            async with asyncio.timeout(self._timeout):
                await backend.publish(channel, message)
        except (BusUnavailable, TimeoutError) as exc:
            metrics.BUS_PUBLISHES.labels("failed").inc()
            logger.warning("bus publish on %s failed: %s", channel, type(exc).__name__)
            await self._lose(backend, reason="publish failed")
            raise BusUnavailable() from exc
        metrics.BUS_PUBLISHES.labels("ok").inc()

    async def reachable(self, timeout_sec: float) -> bool:
        """True when the backend takes a publish (on HEALTH_CHANNEL) within timeout_sec."""
        try:
            async with asyncio.timeout(timeout_sec):
                await self.publish(HEALTH_CHANNEL, "")
        except (BusUnavailable, TimeoutError):
            return False
        return True

    def subscribe(
        self, channel: str, *, queue_size: int | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """A context whose iterator yields the channel's messages published after entry.

        queue_size overrides the bus's bound on the messages waiting to be read.
        """
        return self._subscription(channel, queue_size or self._queue_size)

    @contextlib.asynccontextmanager
    async def _subscription(self, channel: str, queue_size: int) -> AsyncIterator[AsyncIterator[str]]:
        subscriber = _Subscriber(channel, queue_size)
        await self._attach(subscriber)
        try:
            yield subscriber
        finally:
            await self._detach(subscriber)

    async def _ensure(self) -> BroadcastBackend:
        if self._backend is not None:
            return self._backend
        async with self._lock:
            if self._backend is None:
                loop = asyncio.get_running_loop()
                if loop.time() < self._retry_at:  # it failed a moment ago: fail fast until the backoff ends
                    raise BusUnavailable()
                backend = make_backend(self._url, timeout_sec=self._timeout)
                try:
                    async with asyncio.timeout(self._timeout):
                        await backend.connect()
                except (BusUnavailable, TimeoutError) as exc:
                    delay = RECONNECT_DELAYS_SEC[min(self._failures, len(RECONNECT_DELAYS_SEC) - 1)]
                    self._failures += 1
                    self._retry_at = loop.time() + delay
                    logger.warning("bus backend unreachable (%s): next try in %ss", type(exc).__name__, delay)
                    await self._close_quietly(backend)
                    raise BusUnavailable() from exc
                if self._connections:  # connected before: this is a reconnection
                    metrics.BUS_RECONNECTS.inc()
                self._connections += 1
                if self._failures:
                    logger.info("bus backend reachable again")
                self._failures, self._retry_at = 0, 0.0
                self._backend = backend
                self._listener = asyncio.create_task(self._listen(backend), name="bus-listener")
            return self._backend

    async def _attach_news(self, watch: _News) -> None:
        try:
            await self._attach(watch)
        except BusUnavailable:
            self._orphans.add(watch)
            self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if self._orphans and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.create_task(self._reconnect(), name="bus-reconnector")

    async def _reconnect(self) -> None:
        """Subscribes the orphaned news watches again once the backend is back, with backoff."""
        loop = asyncio.get_running_loop()
        while self._orphans:
            await asyncio.sleep(max(self._retry_at - loop.time(), 0.0))
            try:
                await self._ensure()
            except BusUnavailable:
                continue  # _ensure has put the next try further off
            watches, self._orphans = self._orphans, set()
            for watch in watches:
                try:
                    await self._attach(watch)
                except BusUnavailable:  # dropped again: the rest wait for the next round
                    self._orphans.add(watch)
                else:
                    watch.push("")  # what was published while it was not subscribed is not known
            if not self._orphans:
                logger.info("bus: %d news watch(es) subscribed again", len(watches))

    async def _listen(self, backend: BroadcastBackend) -> None:
        try:
            while True:
                event = await backend.next_published()
                metrics.BUS_DELIVERIES.inc()
                for subscriber in list(self._channels.get(event.channel, ())):
                    subscriber.push(event.message)
        except Exception as exc:
            cause = exc.__cause__ or exc
            logger.warning(
                "bus connection lost (%s: %s); subscribers end, news watches wait for it to reconnect",
                type(cause).__name__,
                cause,
            )
            await self._lose(backend, reason="connection lost")

    async def _attach(self, subscriber: _Sink) -> None:
        backend = await self._ensure()
        channel = subscriber.channel
        async with self._lock:
            if self._backend is not backend:
                raise BusUnavailable()
            subscribers = self._channels.get(channel)
            if subscribers:
                subscribers.add(subscriber)
                return
            self._channels[channel] = {subscriber}
            try:
                async with asyncio.timeout(self._timeout):
                    await backend.subscribe(channel)
            except BaseException as exc:
                # A half-done SUBSCRIBE/LISTEN leaves the connection in doubt: start afresh.
                await self._lose(backend, reason="subscribe failed")
                if isinstance(exc, BusUnavailable | TimeoutError):
                    raise BusUnavailable() from exc
                raise
            if self._backend is not backend:  # the connection dropped while subscribing
                raise BusUnavailable()

    async def _detach(self, subscriber: _Sink) -> None:
        subscriber.fail(StopAsyncIteration())
        async with self._lock:
            subscribers = self._channels.get(subscriber.channel)
            if subscribers is None or subscriber not in subscribers:
                return  # the backend dropped, and took the channel with it
            subscribers.discard(subscriber)
            if subscribers or self._backend is None:
                return
            del self._channels[subscriber.channel]
            backend = self._backend
            try:
                async with asyncio.timeout(self._timeout):
                    await backend.unsubscribe(subscriber.channel)
            except (BusUnavailable, TimeoutError):
                await self._lose(backend, reason="unsubscribe failed")

    async def _lose(self, backend: BroadcastBackend, *, reason: str) -> None:
        """Forgets a backend: its subscribers end with BusUnavailable, the next call reconnects."""
        if self._backend is not backend:
            return
        self._backend = None
        listener, self._listener = self._listener, None
        channels, self._channels = self._channels, {}
        for subscribers in channels.values():
            for subscriber in subscribers:
                if isinstance(subscriber, _News):
                    self._orphans.add(subscriber)
                else:
                    subscriber.fail(BusUnavailable())
        if reason != "closing":
            self._start_reconnecting()
        if listener is not None and listener is not asyncio.current_task():
            listener.cancel()
            await asyncio.wait({listener})  # unlike awaiting it, leaves a cancellation of ours alone
        logger.debug("bus backend dropped: %s", reason)
        await self._close_quietly(backend)

    async def _close_quietly(self, backend: BroadcastBackend) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await backend.disconnect()
        except Exception as exc:  # the connection is already gone; nothing more to release
            logger.debug("closing the bus backend failed: %s", type(exc).__name__)
