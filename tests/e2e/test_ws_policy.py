"""WebSocket policy on both protocols: allowed origins, the connection_init timeout, operations per
connection and connections per team (shared by replicas on Redis)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from app.agent.server import AgentHandle
from app.config import Settings
from tests.e2e.client import PROTOCOLS, HttpClient, document
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start

DEADLINE_SEC = 20
TRANSPORT = "graphql-transport-ws"
# Per protocol: the message that starts an operation, the one that carries a result, and the one
# that ends an operation from the client's side.
MESSAGES = {
    "graphql-transport-ws": ("subscribe", "next", "complete"),
    "graphql-ws": ("start", "data", "stop"),
}


@asynccontextmanager
async def socket(server: Server, protocol: str, origin: str | None = None) -> AsyncIterator[ClientConnection]:
    """A raw WebSocket to the server in one protocol, sending Origin when asked to."""
    async with connect(
        server.ws_url,
        subprotocols=[protocol],  # type: ignore[list-item]
        origin=None if origin is None else Origin(origin),
        open_timeout=10,
        close_timeout=2,
    ) as ws:
        yield ws


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a keep-alive."""
    async with asyncio.timeout(DEADLINE_SEC):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] not in ("ka", "ping", "pong"):
                return dict(message)


async def send_init(ws: ClientConnection, key: str) -> None:
    await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}))


async def init(ws: ClientConnection, key: str) -> dict[str, Any]:
    """Sends connection_init; the server's answer."""
    await send_init(ws, key)
    return await receive(ws)


async def close_of(ws: ClientConnection) -> tuple[int, str]:
    """The code and reason the server closes with (whatever it sends before is read and dropped)."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(DEADLINE_SEC):
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def operate(
    ws: ClientConnection, protocol: str, operation_id: str, name: str, **variables: Any
) -> None:
    kind = MESSAGES[protocol][0]
    payload = {"query": document(name), "variables": variables}
    await ws.send(json.dumps({"id": operation_id, "type": kind, "payload": payload}))


def same_origin(server: Server) -> str:
    return server.url.removesuffix("/graphql")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_cross_origin_upgrade_is_refused(server: Server, key: str, protocol: str) -> None:
    async with socket(server, protocol, origin="https://elsewhere.example") as ws:
        code, reason = await close_of(ws)
    assert code == 4403
    assert "origin" in reason
    # Same origin, and no Origin at all (a client that is no browser), are served.
    for origin in (same_origin(server), None):
        async with socket(server, protocol, origin=origin) as ws:
            assert (await init(ws, key))["type"] == "connection_ack"


async def test_allowed_origins_are_served(settings: Settings) -> None:
    allowed = replace(settings, ws_allowed_origins=("https://app.example",))
    async with running_server(allowed) as server:
        key = await server.new_key("team-a")
        async with socket(server, TRANSPORT, origin="https://app.example") as ws:
            assert (await init(ws, key))["type"] == "connection_ack"
        async with socket(server, TRANSPORT, origin="https://other.example") as ws:
            assert (await close_of(ws))[0] == 4403


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_no_connection_init_in_time_closes_4408(settings: Settings, protocol: str) -> None:
    async with running_server(replace(settings, ws_init_timeout_sec=1.0)) as server:
        key = await server.new_key("team-a")  # before: the second socket initialises at once
        async with socket(server, protocol) as ws:
            code, reason = await close_of(ws)
        assert code == 4408
        assert "timeout" in reason
        # One that initialises in time is served.
        async with socket(server, protocol) as ws:
            assert (await init(ws, key))["type"] == "connection_ack"
            await operate(ws, protocol, "served", "ProcessEvents", capsuleId="none")
            answer = await receive(ws)
            assert answer["id"] == "served"
            assert "NOT_FOUND" in json.dumps(answer)


async def events_reach(
    ws: ClientConnection, protocol: str, api: HttpClient, capsule_id: str, ids: set[str]
) -> None:
    """Starts processes until each operation of ids has had a result (subscriptions go live unseen)."""
    result_kind = MESSAGES[protocol][1]
    waiting = set(ids)
    async with asyncio.timeout(DEADLINE_SEC):
        while waiting:
            await start(api, capsule_id, "true")
            try:
                async with asyncio.timeout(0.3):
                    while waiting:
                        message = await receive(ws)
                        if message["id"] in ids:  # not the complete of one stopped before
                            assert message["type"] == result_kind, message
                            waiting.discard(message["id"])
            except TimeoutError:
                pass


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_operations_per_connection_are_bounded(settings: Settings, protocol: str) -> None:
    async with running_server(replace(settings, ws_max_subscriptions=2)) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            async with socket(server, protocol) as ws:
                assert (await init(ws, key))["type"] == "connection_ack"
                for operation_id in ("1", "2", "3"):
                    await operate(ws, protocol, operation_id, "ProcessEvents", capsuleId=capsule_id)
                refused = await receive(ws)
                assert (refused["id"], refused["type"]) == ("3", "error")
                error = refused["payload"][0] if isinstance(refused["payload"], list) else refused["payload"]
                assert error["extensions"]["code"] == "RATE_LIMITED"
                assert "in flight" in error["message"]
                # The two others go on; once one ends, another may start.
                await events_reach(ws, protocol, api, capsule_id, {"1", "2"})
                await ws.send(json.dumps({"id": "1", "type": MESSAGES[protocol][2]}))
                await operate(ws, protocol, "4", "ProcessEvents", capsuleId=capsule_id)
                await events_reach(ws, protocol, api, capsule_id, {"2", "4"})
        finally:
            await api.aclose()


async def until_served(server: Server, protocol: str, key: str) -> None:
    """Connects until a connection is acknowledged: a closed one frees its slot just after closing."""
    async with asyncio.timeout(DEADLINE_SEC):
        while True:
            async with socket(server, protocol) as ws:
                try:
                    if (await init(ws, key))["type"] == "connection_ack":
                        return
                except ConnectionClosed:
                    pass
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_connections_per_team_are_bounded(settings: Settings, protocol: str) -> None:
    async with running_server(replace(settings, ws_max_connections_per_team=2)) as server:
        key, other = await server.new_key("team-a"), await server.new_key("team-b")
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(socket(server, protocol))
            for ws in (first, await stack.enter_async_context(socket(server, protocol))):
                assert (await init(ws, key))["type"] == "connection_ack"
            async with socket(server, protocol) as ws:
                await send_init(ws, key)
                code, reason = await close_of(ws)
            assert code == 1013
            assert "WebSocket connections" in reason
            # Another team is not held back.
            async with socket(server, protocol) as ws:
                assert (await init(ws, other))["type"] == "connection_ack"
            await first.close()
            await until_served(server, protocol, key)


async def test_replicas_on_redis_share_connection_slots(settings: Settings, agent: AgentHandle) -> None:
    shared = replace(
        settings,
        hosts={"h1": f"127.0.0.1:{agent.port}"},
        bus_url="redis://127.0.0.1:6379",
        ws_max_connections_per_team=1,
    )
    async with running_server(shared) as first, running_server(shared) as second:
        key = await first.new_key("team-a")
        async with socket(first, TRANSPORT) as ws:
            assert (await init(ws, key))["type"] == "connection_ack"
            async with socket(second, TRANSPORT) as refused:
                await send_init(refused, key)
                assert (await close_of(refused))[0] == 1013
        await until_served(second, TRANSPORT, key)


def _frames(task: asyncio.Task[Any]) -> list[str]:
    """The files of the coroutine frames a task is suspended in, outermost first."""
    files: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None:
            files.append(frame.f_code.co_filename)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return files


async def test_a_graphql_websocket_holds_no_frame_of_starlettes_middleware(server: Server, key: str) -> None:
    async with socket(server, TRANSPORT) as ws:
        assert (await init(ws, key))["type"] == "connection_ack"
        chains = [_frames(task) for task in asyncio.all_tasks()]
        (mine,) = [files for files in chains if any("strawberry/subscriptions" in f for f in files)]
        assert any("app/api/size_limits.py" in f for f in mine)  # its limits still apply
        assert not [f for f in mine if "/starlette/" in f]
        # Another path still goes Starlette's way: its router refuses the handshake.
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws_url.removesuffix("/graphql") + "/elsewhere", open_timeout=10):
                pass
        assert refused.value.response.status_code == 403
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "pong"
