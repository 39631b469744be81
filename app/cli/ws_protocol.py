"""uvicorn's protocols, keeping less of each open WebSocket: its HTTP protocol (httptools), which
hands the connection over, and its WebSocket protocol (websockets, sans-I/O)."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

T = TypeVar("T")


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
    request is its ASGI scope, which stays), and its inbox and writable flag hold no deque."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete and self.request is not None:
            self.request.headers.clear()  # websockets' parser holds the request itself till the end
            self.request = self.response = None  # type: ignore[assignment]
