"""A Redis pub/sub backend for the bus that fails loudly when its connection drops."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from broadcaster import BroadcastBackend, Event
from redis import asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from app.errors import BusUnavailable

# A silently dead peer (no FIN, no RST) is noticed within about 20 s instead of never.
_KEEPALIVE = {socket.TCP_KEEPIDLE: 10, socket.TCP_KEEPINTVL: 5, socket.TCP_KEEPCNT: 2}


def client_name(role: str) -> str:
    """The name a bus connection (role: listen or publish) carries in CLIENT LIST."""
    return f"capsule-bus-{os.getpid()}-{role}"


class RedisBackend(BroadcastBackend):
    """Unlike broadcaster's, a dropped connection raises from next_published instead of hanging."""

    def __init__(self, url: str, *, timeout_sec: float) -> None:
        self._url = url
        self._timeout = timeout_sec
        self._confirmations: dict[str, asyncio.Future[None]] = {}

    def _client(self, role: str, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(
            self._url,
            socket_connect_timeout=self._timeout,
            socket_keepalive=True,
            socket_keepalive_options=_KEEPALIVE,
            client_name=client_name(role),
            **options,
        )

    async def connect(self) -> None:
        # One retry lets a publish survive a connection the server closed while idle.
        self._publisher = self._client("publish", socket_timeout=self._timeout, retry=Retry(NoBackoff(), 1))
        # No retries here: redis-py would resubscribe behind our back and hide lost messages.
        self._listener = self._client("listen", retry=Retry(NoBackoff(), 0))
        self._pubsub = self._listener.pubsub()
        try:
            await self._publisher.execute_command("PING")  # type: ignore[no-untyped-call]
            # Connected now, so next_published can read before the first subscription.
            await self._pubsub.connect()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise BusUnavailable() from exc

    async def disconnect(self) -> None:
        try:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        finally:
            await self._listener.aclose()
            await self._publisher.aclose()

    async def subscribe(self, channel: str) -> None:
        # Returning only once Redis confirms means no message published afterwards is missed.
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        try:
            await self._pubsub.subscribe(channel)
            await confirmed
        except (RedisError, OSError) as exc:
            raise BusUnavailable() from exc
        finally:
            del self._confirmations[channel]

    async def unsubscribe(self, channel: str) -> None:
        try:
            await self._pubsub.unsubscribe(channel)
        except (RedisError, OSError) as exc:
            raise BusUnavailable() from exc

    async def publish(self, channel: str, message: Any) -> None:
        try:
            await self._publisher.publish(channel, message)
        except (RedisError, OSError) as exc:
            raise BusUnavailable() from exc

    async def next_published(self) -> Event:
        try:
            while True:
                message = await self._pubsub.get_message(timeout=None)
                if message is None:
                    continue
                if message["type"] == "message":
                    return Event(channel=message["channel"].decode(), message=message["data"].decode())
                if message["type"] == "subscribe":
                    confirmed = self._confirmations.get(message["channel"].decode())
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
        except (RedisError, OSError) as exc:
            for confirmed in self._confirmations.values():
                if not confirmed.done():
                    confirmed.set_exception(BusUnavailable())
            raise BusUnavailable() from exc
