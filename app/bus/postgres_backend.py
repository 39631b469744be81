"""A PostgreSQL LISTEN/NOTIFY backend for the bus that fails loudly when its connection drops."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
from broadcaster import BroadcastBackend, Event

from app.errors import BusUnavailable

_MAX_NAME_BYTES = 63  # NAMEDATALEN - 1: longer identifiers are cut, and pg_notify refuses them
_MAX_FRAME_BYTES = 7900  # NOTIFY refuses payloads of 8000 bytes or more; this leaves room for a header
_MAX_PARTIAL = 64  # messages being reassembled at once; more means frames were lost
_PING_SEC = 10.0  # an idle LISTEN connection is checked this often, so a dead one is noticed
_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
# Errors of the connection rather than of the statement (class 57: the server ended the session).
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    asyncpg.InternalClientError,  # "another operation is in progress" on a connection being torn down
    TimeoutError,
)


def client_name(role: str) -> str:
    """The application_name a bus connection (role: listen or notify) carries in pg_stat_activity."""
    return f"capsule-bus-{os.getpid()}-{role}"


def pg_channel(channel: str) -> str:
    """The PostgreSQL channel for a bus channel: itself when short enough, else a digest."""
    if len(channel.encode()) <= _MAX_NAME_BYTES:
        return channel
    return "bus." + hashlib.sha256(channel.encode()).hexdigest()[:56]


def frames(message: str) -> list[str]:
    """Payloads for one message: '=' + message, or '+id:i:n:' parts cut on character boundaries."""
    data = message.encode()
    if len(data) <= _MAX_FRAME_BYTES:
        return ["=" + message]
    parts: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + _MAX_FRAME_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # never split a UTF-8 sequence
            end -= 1
        parts.append(data[start:end].decode())
        start = end
    message_id = secrets.token_hex(8)
    return [f"+{message_id}:{index}:{len(parts)}:{part}" for index, part in enumerate(parts)]


class PostgresBackend(BroadcastBackend):
    """Unlike broadcaster's, it notices a lost connection and publishes on a connection of its own."""

    def __init__(self, url: str, *, timeout_sec: float) -> None:
        self._url = url
        self._timeout = timeout_sec
        self._channels: dict[str, str] = {}  # PostgreSQL channel -> bus channel
        self._partial: dict[str, list[str | None]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the connection is lost
        # asyncpg runs one operation at a time per connection.
        self._listen_lock = asyncio.Lock()
        self._notify_lock = asyncio.Lock()

    async def _connect(self, role: str) -> Any:
        return await asyncpg.connect(
            self._url, timeout=self._timeout, server_settings={"application_name": client_name(role)}
        )

    async def connect(self) -> None:
        try:
            self._listen = await self._connect("listen")
            self._listen.add_termination_listener(self._on_terminated)
            # Publishing on a second connection keeps a NOTIFY from queueing behind LISTEN or a ping.
            self._notify = await self._connect("notify")
        except _ERRORS as exc:
            raise BusUnavailable() from exc

    async def disconnect(self) -> None:
        self._listen.remove_termination_listener(self._on_terminated)
        try:
            await self._listen.close(timeout=self._timeout)
        finally:
            await self._notify.close(timeout=self._timeout)

    async def subscribe(self, channel: str) -> None:
        name = pg_channel(channel)
        self._channels[name] = channel
        try:
            async with self._listen_lock:
                await self._listen.add_listener(name, self._on_notification)
        except _ERRORS as exc:
            raise BusUnavailable() from exc

    async def unsubscribe(self, channel: str) -> None:
        name = pg_channel(channel)
        self._channels.pop(name, None)
        try:
            async with self._listen_lock:
                await self._listen.remove_listener(name, self._on_notification)
        except _ERRORS as exc:
            raise BusUnavailable() from exc

    async def publish(self, channel: str, message: Any) -> None:
        rows = [(pg_channel(channel), frame) for frame in frames(message)]
        async with self._notify_lock:
            try:
                await self._notify_once(rows)
            except _CONNECTION_ERRORS:
                # A notify connection lost while idle says nothing of the listener: one fresh try,
                # on a new connection, since the old one may be half-way through its own end.
                self._notify.terminate()
                try:
                    await self._notify_once(rows)
                except _CONNECTION_ERRORS as exc:
                    raise BusUnavailable() from exc

    async def _notify_once(self, rows: list[tuple[str, str]]) -> None:
        if self._notify.is_closed():
            self._notify = await self._connect("notify")
        # One transaction, so a message's frames arrive together and in order.
        await self._notify.executemany("SELECT pg_notify($1, $2)", rows, timeout=self._timeout)

    async def next_published(self) -> Event:
        while True:
            try:
                async with asyncio.timeout(_PING_SEC):
                    event = await self._events.get()
            except TimeoutError:
                await self._ping()
                continue
            if event is None:
                raise BusUnavailable()
            return event

    async def _ping(self) -> None:
        try:
            async with self._listen_lock:
                await self._listen.execute("SELECT 1", timeout=self._timeout)
        except _ERRORS as exc:
            raise BusUnavailable() from exc

    def _on_terminated(self, connection: object) -> None:
        self._events.put_nowait(None)

    def _on_notification(self, connection: object, pid: int, name: str, payload: str) -> None:
        channel = self._channels.get(name)
        if channel is None:
            return
        if payload.startswith("="):
            self._events.put_nowait(Event(channel=channel, message=payload[1:]))
        elif payload.startswith("+"):
            message = self._reassemble(name, payload[1:])
            if message is not None:
                self._events.put_nowait(Event(channel=channel, message=message))

    def _reassemble(self, name: str, frame: str) -> str | None:
        try:
            message_id, index, count, part = frame.split(":", 3)
            if not 0 < int(count) <= 4096:
                return None
            key = f"{name}:{message_id}"
            parts = self._partial.setdefault(key, [None] * int(count))
            parts[int(index)] = part
        except (ValueError, IndexError):
            return None  # not ours: someone else NOTIFYed on the channel
        if any(p is None for p in parts):
            while len(self._partial) > _MAX_PARTIAL:
                del self._partial[next(iter(self._partial))]
            return None
        del self._partial[key]
        return "".join(p for p in parts if p is not None)
