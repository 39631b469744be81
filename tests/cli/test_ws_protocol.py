"""The protocols `capsule serve` runs uvicorn with: a WebSocket keeps no handshake once open, nor the
HTTP protocol it came through, and everything else works as uvicorn's own (a real uvicorn, a real
client, on loopback)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.typing import Subprotocol

from app.cli import ws_protocol
from app.cli.ws_protocol import Flag, Inbox, LeanHttpToolsProtocol, LeanWebSocketsProtocol, shared_headers


async def echo(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol="echo")
    agent = dict(websocket.scope["headers"]).get(b"user-agent", b"").decode()
    await websocket.send_text(f"user-agent {agent}")
    async for text in websocket.iter_text():
        await websocket.send_text(text)


@asynccontextmanager
async def serving(
    http: type[HttpToolsProtocol] = LeanHttpToolsProtocol,
) -> AsyncIterator[tuple[uvicorn.Server, str]]:
    app = Starlette(routes=[WebSocketRoute("/ws", echo)])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", http=http, ws=LeanWebSocketsProtocol
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(15):
            while not server.started:
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield server, f"ws://127.0.0.1:{port}/ws"
    finally:
        server.should_exit = True
        await task


async def test_an_open_connection_keeps_no_handshake_and_works_on() -> None:
    async with serving() as (server, url):
        offer = [Subprotocol("echo")]
        async with websockets.connect(url, subprotocols=offer, user_agent_header="probe/1") as client:
            assert client.subprotocol == "echo"
            assert await client.recv() == "user-agent probe/1"  # the app still reads the request's headers
            (protocol,) = [
                c for c in server.server_state.connections if isinstance(c, LeanWebSocketsProtocol)
            ]
            assert protocol.request is None and protocol.response is None
            assert dict(protocol.scope["headers"])[b"user-agent"] == b"probe/1"
            for text in ("one", "x" * 100_000):
                await client.send(text)
                assert await client.recv() == text
        async with asyncio.timeout(10):
            while server.server_state.connections:
                await asyncio.sleep(0.01)


async def test_a_refused_handshake_is_answered_as_before() -> None:
    async with serving() as (_server, url):
        try:
            async with websockets.connect(url.replace("/ws", "/nowhere")):
                raise AssertionError("connected to a route that is not there")
        except websockets.InvalidStatus as refused:
            assert refused.response.status_code == 403


async def test_while_the_socket_cannot_take_more_the_app_waits_to_send() -> None:
    """The transport says its buffer is full (pause_writing, as asyncio's transports call it): the
    app's next send waits, and goes once the transport can take more again."""
    async with (
        serving() as (server, url),
        websockets.connect(url, subprotocols=[Subprotocol("echo")]) as client,
    ):
        await client.recv()  # the greeting: the connection is open
        (protocol,) = server.server_state.connections
        protocol.pause_writing()
        await client.send("held")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.recv()
        protocol.resume_writing()
        async with asyncio.timeout(5):
            assert await client.recv() == "held"


async def test_the_inbox_hands_items_out_in_order_and_survives_a_cancelled_reader() -> None:
    inbox: Inbox[int] = Inbox()
    assert inbox.empty()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert [await inbox.get(), await inbox.get()] == [1, 2] and inbox.empty()
    first = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(3)  # wakes the first reader, which is cancelled before it runs
    first.cancel()
    async with asyncio.timeout(5):
        assert await second == 3  # the item went to the next reader
    assert first.cancelled() and inbox.empty()


async def test_the_flag_wakes_every_waiter_and_waits_again_once_cleared() -> None:
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    async with asyncio.timeout(5):
        assert await asyncio.gather(*waiters) == [True] * 3
    assert await flag.wait()  # set: no wait at all
    flag.clear()
    waiting = asyncio.create_task(flag.wait())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    waiting.cancel()
    flag.set()
    async with asyncio.timeout(5):
        assert await flag.wait()


Made = list[weakref.ref[HttpToolsProtocol]]
ECHO = Subprotocol("echo")


def _recording(base: type[HttpToolsProtocol]) -> tuple[type[HttpToolsProtocol], Made]:
    made: Made = []

    class Recorded(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    return Recorded, made


@pytest.mark.parametrize("lean", [True, False], ids=["ours", "uvicorn's"])
async def test_the_http_protocol_a_websocket_came_through_is_freed_without_the_collector(lean: bool) -> None:
    http, made = _recording(LeanHttpToolsProtocol if lean else HttpToolsProtocol)
    gc.collect()
    gc.disable()
    try:
        async with (
            serving(http) as (_, url),
            websockets.connect(url, subprotocols=[ECHO], user_agent_header="probe/1") as client,
        ):
            assert await client.recv() == "user-agent probe/1"
            await client.send("still open")
            assert await client.recv() == "still open"
            assert len(made) == 1
            # uvicorn's own stays in a cycle with its parser till a collection finds it.
            assert (made[0]() is None) is lean
    finally:
        gc.enable()


async def test_open_connections_share_the_headers_that_repeat() -> None:
    async with serving() as (server, url):
        offer = [ECHO]
        async with (
            websockets.connect(url, subprotocols=offer, user_agent_header="probe/2") as one,
            websockets.connect(url, subprotocols=offer, user_agent_header="probe/2") as two,
        ):
            for client in (one, two):
                assert await client.recv() == "user-agent probe/2"  # the app reads them as sent
            first, second = (
                dict(c.scope["headers"])
                for c in server.server_state.connections
                if isinstance(c, LeanWebSocketsProtocol)
            )
    assert first[b"user-agent"] is second[b"user-agent"]
    assert first[b"sec-websocket-protocol"] is second[b"sec-websocket-protocol"] == b"echo"
    assert first[b"sec-websocket-key"] != second[b"sec-websocket-key"]  # each its own


def test_shared_headers_keep_bounded_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_protocol, "_headers", {})
    monkeypatch.setattr(ws_protocol, "_names", {})
    monkeypatch.setattr(ws_protocol, "_SHARED_KEPT", 2)

    def new(text: str) -> bytes:  # a bytes object of its own, as a parser makes one
        return text.encode()

    one = shared_headers([(new("host"), new("ab")), (new("x-secret"), new("s1"))])
    two = shared_headers([(new("host"), new("ab")), (new("x-secret"), new("s2"))])
    assert one[0] is two[0]  # a header that repeats: one copy
    assert one[1][0] is two[1][0] and two[1] == (b"x-secret", b"s2")  # elsewhere only the name
    assert shared_headers([(new("host"), new("cd"))])[0] is shared_headers([(new("host"), new("cd"))])[0]
    # The table of headers is full: a new one is kept as it came, the ones kept are still shared.
    late = shared_headers([(new("host"), new("ef")), (new("host"), new("ab"))])
    assert late[0] == (b"host", b"ef") and late[1] is one[0]
    assert len(ws_protocol._headers) == 2 and len(ws_protocol._names) == 1
