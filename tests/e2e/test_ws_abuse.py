"""Bad bytes on both WebSocket protocols against a real uvicorn: each gets its protocol's answer, and
a client subscribed on another connection meanwhile keeps receiving its events.

graphql-transport-ws closes with its codes (4400 bad message, 4401 before connection_ack, 4409 a
reused id, 4429 a second connection_init, 4408 no connection_init in time); graphql-ws
(subscriptions-transport-ws) answers a malformed message with an `error` message and stays open, as
its reference server does. Both close with 1007 for a text frame that is not UTF-8 and 1009 for a
message past CAPSULE_MAX_WS_MESSAGE_BYTES.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import websockets
from websockets.typing import Subprotocol

from app.config import Settings
from tests.e2e.client import PROTOCOLS, HttpClient, document, subscribe, ws_session
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

TRANSPORT, LEGACY = PROTOCOLS
MiB = 1024 * 1024


@dataclass(frozen=True)
class NotUtf8:
    """A text frame whose bytes are not UTF-8."""

    data: bytes


Frame = str | bytes | NotUtf8


@dataclass(frozen=True)
class Closed:
    """The connection closes with this code, its reason containing words."""

    code: int
    words: str = ""


@dataclass(frozen=True)
class Answered:
    """graphql-ws: an error message (with this id, or none) saying words; the connection then still serves."""

    words: str
    id: str | None = None


@dataclass(frozen=True)
class Skipped:
    """graphql-ws: no answer at all; the connection then still serves."""


@dataclass(frozen=True)
class Case:
    name: str
    frames: tuple[Frame, ...]
    expected: Closed | Answered | Skipped
    init: bool = True  # connection_init with the key, and its ack, before the frames


def _json(message: dict[str, Any]) -> str:
    return json.dumps(message)


def _start(protocol: str, operation_id: Any, payload: Any) -> str:
    kind = "subscribe" if protocol == TRANSPORT else "start"
    return _json({"type": kind, "id": operation_id, "payload": payload})


def _events(protocol: str, capsule_id: str, operation_id: str = "1") -> str:
    payload = {"query": document("ProcessEvents"), "variables": {"capsuleId": capsule_id}}
    return _start(protocol, operation_id, payload)


def _shared_cases(protocol: str) -> list[Case]:
    """What both protocols answer alike: the frame level, and operations before connection_ack."""
    return [
        Case("text frame not UTF-8", (NotUtf8(b'{"type": "\xff\xfe"}'),), Closed(1007), init=False),
        Case("oversized frame", ("x" * (MiB + 1),), Closed(1009, f"at most {MiB} are allowed"), init=False),
        Case(
            "operation before connection_init",
            (_start(protocol, "1", {"query": "{ __typename }"}),),
            Closed(4401, "Unauthorized"),
            init=False,
        ),
    ]


def transport_cases(capsule_id: str) -> list[Case]:
    query = {"query": "{ __typename }"}
    return [
        *_shared_cases(TRANSPORT),
        Case("binary frame", (b'{"type": "connection_init"}',), Closed(4400, "must be text"), init=False),
        Case("not JSON", ("{nope",), Closed(4400, "valid JSON"), init=False),
        Case("a JSON array", ("[1, 2]",), Closed(4400, "a message must be a JSON object"), init=False),
        Case("a JSON string", ('"connection_init"',), Closed(4400, "JSON object"), init=False),
        Case("type not a string", ('{"type": 5}',), Closed(4400, "type that is a string"), init=False),
        Case("no type", ('{"payload": {}}',), Closed(4400, "type that is a string"), init=False),
        Case(
            "connection_init payload not an object",
            ('{"type": "connection_init", "payload": "Bearer x"}',),
            Closed(4400, "connection_init payload must be an object"),
            init=False,
        ),
        Case("connection_init twice", ('{"type": "connection_init", "payload": {}}',), Closed(4429)),
        Case("unknown type", ('{"type": "bogus"}',), Closed(4400, "unknown message type 'bogus'")),
        Case("unknown type of 10 kB", (_json({"type": "x" * 10_000}),), Closed(4400, "unknown message type")),
        Case("id a list", (_start(TRANSPORT, [1], query),), Closed(4400, "id that is a non-empty string")),
        Case("id empty", (_start(TRANSPORT, "", query),), Closed(4400, "id that is a non-empty string")),
        Case("payload not an object", (_start(TRANSPORT, "1", "{ x }"),), Closed(4400, "payload must be")),
        Case("query not a string", (_start(TRANSPORT, "1", {"query": 5}),), Closed(4400, "payload.query")),
        Case(
            "variables a list",
            (_start(TRANSPORT, "1", {**query, "variables": [1]}),),
            Closed(4400, "payload.variables"),
        ),
        Case(
            "duplicate subscription id",
            (_events(TRANSPORT, capsule_id), _events(TRANSPORT, capsule_id)),
            Closed(4409, "Subscriber for 1 already exists"),
        ),
        Case("complete without an id", ('{"type": "complete"}',), Closed(4400, "id that is")),
    ]


def legacy_cases(capsule_id: str) -> list[Case]:
    query = {"query": "{ __typename }"}
    return [
        *_shared_cases(LEGACY),
        Case("binary frame", (b'{"type": "connection_init"}',), Closed(1002, "must be text"), init=False),
        Case("not JSON", ("{nope",), Skipped()),  # strawberry's handler skips it
        Case("a JSON array", ("[1, 2]",), Answered("a message must be a JSON object")),
        Case("type not a string", ('{"type": 5}',), Answered("type that is a string")),
        Case(
            "unknown type",
            ('{"type": "bogus", "id": "7"}',),
            Answered("unknown message type 'bogus'", id="7"),
        ),
        Case("unknown type of 10 kB", (_json({"type": "x" * 10_000}),), Answered("unknown message type")),
        Case("connection_init twice", ('{"type": "connection_init", "payload": {}}',), Answered("already")),
        Case("id a list", (_start(LEGACY, [1], query),), Answered("id that is a non-empty string")),
        Case("payload not an object", (_start(LEGACY, "3", "{ x }"),), Answered("payload must be", id="3")),
        Case("query not a string", (_start(LEGACY, "3", {"query": 5}),), Answered("payload.query", id="3")),
        Case("stop without an id", ('{"type": "stop"}',), Answered("id that is")),
        Case(
            "connection_init payload not an object",
            ('{"type": "connection_init", "payload": "Bearer x"}',),
            Closed(4403, "no API key"),
            init=False,
        ),
    ]


class Bystander:
    """A client subscribed to processEvents on a connection of its own."""

    def __init__(self, api: HttpClient, capsule_id: str) -> None:
        self.api, self.capsule_id = api, capsule_id
        self.tags: set[str] = set()
        self.changed = asyncio.Event()

    async def follow(self, session: Any) -> None:
        async for result in subscribe(session, "ProcessEvents", capsuleId=self.capsule_id):
            self.tags.add(result["processEvents"]["process"]["tag"])
            self.changed.set()

    async def is_served(self) -> None:
        """Processes are started until the bystander sees one (the first may start before it listens)."""
        async with asyncio.timeout(15):
            while True:
                tag = f"probe-{secrets.token_hex(4)}"
                await start(self.api, self.capsule_id, "true", tag=tag)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        while tag not in self.tags:
                            self.changed.clear()
                            await self.changed.wait()
                        return


@contextlib.asynccontextmanager
async def bystander(server: Server, key: str, protocol: str, capsule_id: str) -> AsyncIterator[Bystander]:
    api = HttpClient(server.url, key)
    watcher = Bystander(api, capsule_id)
    try:
        async with ws_session(server.ws_url, key, protocol) as session:
            task = asyncio.create_task(watcher.follow(session))
            try:
                await watcher.is_served()
                yield watcher
            finally:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    finally:
        await api.aclose()


async def _send(ws: Any, frame: Frame) -> None:
    if isinstance(frame, NotUtf8):
        await ws.send(frame.data, text=True)
    else:
        await ws.send(frame)


async def _next_message(ws: Any) -> dict[str, Any]:
    """The next message other than a keep-alive."""
    while True:
        message = json.loads(await ws.recv())
        if message.get("type") != "ka":
            return dict(message)


async def _init(ws: Any, key: str) -> None:
    await ws.send(_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}))
    assert (await _next_message(ws))["type"] == "connection_ack"


async def _expect_close(ws: Any, expected: Closed) -> None:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await ws.recv()
    received = closed.value.rcvd
    assert received is not None, "the server dropped the connection without a close frame"
    assert received.code == expected.code, received
    assert expected.words in received.reason, received


async def _expect_answer(ws: Any, expected: Answered | Skipped) -> None:
    if isinstance(expected, Answered):
        message = await _next_message(ws)
        assert message["type"] == "error", message
        assert expected.words in message["payload"]["message"], message
        assert message.get("id") == expected.id, message
    # The connection serves on: a query sent now is answered.
    await ws.send(_start(LEGACY, "after", {"query": "{ __typename }"}))
    while (answer := await _next_message(ws))["type"] != "data":
        assert answer["type"] == "complete" and answer["id"] != "after", answer
    assert answer == {"type": "data", "id": "after", "payload": {"data": {"__typename": "Query"}}}


async def run_case(server: Server, key: str, protocol: str, case: Case) -> None:
    async with websockets.connect(server.ws_url, subprotocols=[Subprotocol(protocol)]) as ws:
        async with asyncio.timeout(10):
            if case.init:
                await _init(ws, key)
            for frame in case.frames:
                await _send(ws, frame)
            if isinstance(case.expected, Closed):
                await _expect_close(ws, case.expected)
            else:
                await _expect_answer(ws, case.expected)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_each_bad_message_gets_its_answer_while_another_client_is_served(
    server: Server, key: str, api: HttpClient, capsule_id: str, protocol: str
) -> None:
    cases = transport_cases(capsule_id) if protocol == TRANSPORT else legacy_cases(capsule_id)
    async with bystander(server, key, protocol, capsule_id) as watcher:
        for case in cases:
            try:
                await run_case(server, key, protocol, case)
            except (AssertionError, TimeoutError, websockets.ConnectionClosed) as exc:
                raise AssertionError(f"{protocol}, {case.name}: {exc!r}") from exc
            await watcher.is_served()
    # Nothing bad reached the server's code unguarded: every case was answered, none crashed it.
    assert (await api.query("{ __typename }")).ok() == {"__typename": "Query"}


async def test_graphql_ws_replaces_an_operation_whose_id_comes_again(
    server: Server, key: str, capsule_id: str
) -> None:
    # subscriptions-transport-ws: a start with an id in use stops the operation that had it.
    async with websockets.connect(server.ws_url, subprotocols=[Subprotocol(LEGACY)]) as ws:
        async with asyncio.timeout(10):
            await _init(ws, key)
            await ws.send(_events(LEGACY, capsule_id, "1"))
            await ws.send(_start(LEGACY, "1", {"query": "{ __typename }"}))
            messages = [await _next_message(ws)]
            while messages[-1]["type"] != "data":  # the subscription may say complete first
                assert messages[-1] == {"type": "complete", "id": "1"}, messages
                messages.append(await _next_message(ws))
            assert messages[-1] == {"type": "data", "id": "1", "payload": {"data": {"__typename": "Query"}}}
            assert await _next_message(ws) == {"type": "complete", "id": "1"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_no_connection_init_in_time_closes_with_4408(settings: Settings, protocol: str) -> None:
    async with (
        running_server(replace(settings, ws_init_timeout_sec=0.3)) as server,
        websockets.connect(server.ws_url, subprotocols=[Subprotocol(protocol)]) as ws,
    ):
        async with asyncio.timeout(10):
            await _expect_close(ws, Closed(4408))
