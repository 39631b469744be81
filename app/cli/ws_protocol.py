"""uvicorn's protocols, keeping less of each open WebSocket: its HTTP protocol (httptools), which
hands the connection over, and its WebSocket protocol (websockets, sans-I/O)."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

T = TypeVar("T")
K = TypeVar("K")

# Request headers whose values come alike on connection after connection (a client's host, upgrade,
# version, subprotocol and extension offers, user agent, origin): one copy of each such header,
# name and value, serves every connection's ASGI scope, where each kept its own (some 1 KiB of
# every open WebSocket). Others (the key of the handshake, credentials) share only their name.
SHARED_HEADERS = frozenset(
    {
        b"host",
        b"connection",
        b"upgrade",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"user-agent",
        b"origin",
        b"pragma",
        b"cache-control",
        b"accept-encoding",
        b"accept-language",
    }
)
_SHARED_KEPT = 1024  # headers, and names apart, each; once full, what is new is kept per connection
_headers: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}
_names: dict[bytes, bytes] = {}


def _shared(table: dict[K, K], item: K) -> K:
    if len(table) < _SHARED_KEPT:
        return table.setdefault(item, item)
    return table.get(item, item)


def shared_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """headers, each the one copy kept of it where its name is in SHARED_HEADERS, else with the
    one copy kept of its name."""
    return [
        _shared(_headers, (name, value)) if name in SHARED_HEADERS else (_shared(_names, name), value)
        for name, value in headers
    ]


class Inbox(Generic[T]):
    """What uvicorn's protocol uses of an asyncio.Queue (put_nowait, get, empty), with asyncio.Queue's
    behaviour: a list, and a list of waiting readers only while one waits. An asyncio.Queue holds
    three deques and an Event's deque from the start, some 2.5 KiB of every open WebSocket."""

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._getters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._wake_next()

    async def get(self) -> T:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()  # in case it is not done yet
                if getter in self._getters:
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():  # woken, then cancelled: the next reads
                    self._wake_next()
                raise
        return self._items.pop(0)

    def _wake_next(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return


class Flag:
    """What uvicorn's protocol uses of an asyncio.Event (set, clear, wait), with its behaviour, and a
    list of waiters only while one waits (an Event holds a deque from the start)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[bool]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)


class LeanHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, which lets go of itself when it hands a connection over to the
    WebSocket protocol. Its parser and it refer to each other (the parser calls it back), and uvicorn
    breaks that cycle only when the connection is lost, which an upgraded connection never reports
    to it: each WebSocket left the old protocol, its parser, request headers and flow control (some
    3 KiB) to the cyclic collector, which gets to them seldom, so a burst of connections held them
    all. Dropping the parser once the new protocol has the transport frees them at once."""

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        self.parser = None  # type: ignore[assignment]  # as uvicorn's connection_lost does


class LeanWebSocketsProtocol(WebSocketsSansIOProtocol):
    """uvicorn's protocol, keeping less of each open connection: once it is accepted, the
    handshake's request and response go (uvicorn keeps both for the connection's life, and
    websockets' parser the request: some 3 KiB that nothing reads again; what the app sees of the
    request is its ASGI scope, which stays), the scope's headers share what repeats
    (SHARED_HEADERS), and its inbox and writable flag hold no deque."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # none when the handshake was refused
        if scope is not None:  # the app has not run yet: it reads the scope once its task starts
            scope["headers"] = shared_headers(scope["headers"])

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete and self.request is not None:
            self.request.headers.clear()  # websockets' parser holds the request itself till the end
            self.request = self.response = None  # type: ignore[assignment]


def uvicorn_protocols() -> dict[str, Any]:
    """The protocol arguments of uvicorn.Config that `capsule serve` runs with (and its tests)."""
    return {"http": LeanHttpToolsProtocol, "ws": LeanWebSocketsProtocol}
