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

from app.config import bus_backend_kind
from app.errors import BusUnavailable, RateLimited

logger = logging.getLogger(__name__)


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


class Bus:
    """Publish/subscribe on named channels; reconnects by itself after its backend drops."""

    def __init__(self, url: str, *, queue_size: int = 1000, timeout_sec: float = 5.0) -> None:
        bus_backend_kind(url)  # rejected now, not at first use
        self._url = url
        self._queue_size = queue_size
        self._timeout = timeout_sec
        self._backend: BroadcastBackend | None = None
        self._listener: asyncio.Task[None] | None = None
        self._channels: dict[str, set[_Subscriber]] = {}
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        """Connects now, so a misconfigured or unreachable backend shows at startup."""
        await self._ensure()

    async def disconnect(self) -> None:
        """Closes the backend; live subscribers end with BusUnavailable."""
        async with self._lock:
            if self._backend is not None:
                await self._lose(self._backend, reason="closing")

    async def publish(self, channel: str, message: str) -> None:
        """Sends a message to every subscriber of the channel on every replica."""
        backend = await self._ensure()
        try:
            async with asyncio.timeout(self._timeout):
                await backend.publish(channel, message)
        except (BusUnavailable, TimeoutError) as exc:
            logger.warning("bus publish on %s failed: %s", channel, type(exc).__name__)
            await self._lose(backend, reason="publish failed")
            raise BusUnavailable() from exc

    def subscribe(
        self, channel: str, *, queue_size: int | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """A context whose iterator yields the channel's messages published after entry.

        queue_size overrides the bus's bound on the messages waiting to be read.
        """
        return self._subscription(channel, queue_size or self._queue_size)

    @contextlib.asynccontextmanager
    async def _subscription(self, channel: str, queue_size: int) -> AsyncIterator[AsyncIterator[str]]:
        subscriber = await self._attach(channel, queue_size)
        try:
            yield subscriber
        finally:
            await self._detach(subscriber)

    async def _ensure(self) -> BroadcastBackend:
        if self._backend is not None:
            return self._backend
        async with self._lock:
            if self._backend is None:
                backend = make_backend(self._url, timeout_sec=self._timeout)
                try:
                    async with asyncio.timeout(self._timeout):
                        await backend.connect()
                except (BusUnavailable, TimeoutError) as exc:
                    logger.warning("bus backend unreachable: %s", type(exc).__name__)
                    await self._close_quietly(backend)
                    raise BusUnavailable() from exc
                self._backend = backend
                self._listener = asyncio.create_task(self._listen(backend), name="bus-listener")
            return self._backend

    async def _listen(self, backend: BroadcastBackend) -> None:
        try:
            while True:
                event = await backend.next_published()
                for subscriber in list(self._channels.get(event.channel, ())):
                    subscriber.push(event.message)
        except Exception as exc:
            cause = exc.__cause__ or exc
            logger.warning(
                "bus connection lost (%s: %s); subscribers end, the bus reconnects on next use",
                type(cause).__name__,
                cause,
            )
            await self._lose(backend, reason="connection lost")

    async def _attach(self, channel: str, queue_size: int) -> _Subscriber:
        backend = await self._ensure()
        subscriber = _Subscriber(channel, queue_size)
        async with self._lock:
            if self._backend is not backend:
                raise BusUnavailable()
            subscribers = self._channels.get(channel)
            if subscribers:
                subscribers.add(subscriber)
                return subscriber
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
            return subscriber

    async def _detach(self, subscriber: _Subscriber) -> None:
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
                subscriber.fail(BusUnavailable())
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
