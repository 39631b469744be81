"""Subscribers of one process share each event's execution and encoding, and still go at their own pace."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import websockets

from app.api import sharing
from app.config import Settings
from tests.e2e.client import HttpClient, document
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start

OUTPUT = document("ProcessOutput")
MiB = 1024 * 1024
# Prints a line, waits for its stdin to close, then writes: every subscriber is live before the rest.
GATED = "echo ready; cat >/dev/null; {}"


class RawSubscriber:
    """A graphql-transport-ws client on its own socket that keeps each message's text as it came."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.texts: list[str] = []

    async def next_event(self) -> dict[str, Any]:
        text = await self.socket.recv()
        self.texts.append(text)
        message = json.loads(text)
        assert message["type"] == "next", message
        return dict(message["payload"]["data"]["processOutput"])

    async def until_exited(self) -> list[dict[str, Any]]:
        events = [await self.next_event()]
        while events[-1]["__typename"] != "ProcessExited":
            events.append(await self.next_event())
        return events


@asynccontextmanager
async def raw_subscriber(
    server: Server, key: str, capsule_id: str, selector: str, from_seq: int = 0, **connect: Any
) -> AsyncIterator[RawSubscriber]:
    protocols: Any = ["graphql-transport-ws"]
    async with websockets.connect(server.ws_url, subprotocols=protocols, **connect) as socket:
        auth = {"Authorization": f"Bearer {key}"}
        await socket.send(json.dumps({"type": "connection_init", "payload": auth}))
        assert json.loads(await socket.recv())["type"] == "connection_ack"
        variables = {"capsuleId": capsule_id, "selector": selector, "fromSeq": from_seq}
        payload = {"query": OUTPUT, "variables": variables}
        await socket.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
        yield RawSubscriber(socket)


def total_bytes(events: list[dict[str, Any]]) -> int:
    """The output bytes events account for: the data received and the data lost in gaps."""
    return sum(
        len(e["data"]) if e["__typename"] == "OutputChunk" else int(e["lostBytes"])
        for e in events
        if e["__typename"] in ("OutputChunk", "OutputGap")
    )


async def test_subscribers_with_one_document_get_the_same_messages_from_one_execution(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    process = await start(api, capsule_id, "sh", "-c", GATED.format("seq 1 3000"), tag="shared", stdin=True)
    executed = sharing.SHARED.executed
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        subscribers = [
            await stack.enter_async_context(raw_subscriber(server, key, capsule_id, "shared"))
            for _ in range(3)
        ]
        for subscriber in subscribers:
            assert (await subscriber.next_event())["data"] == "ready\n"
        (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
        events = [await subscriber.until_exited() for subscriber in subscribers]
    assert events[0][-1]["exitCode"] == 0
    assert "".join(e.get("data", "") for e in events[0]) == "".join(f"{i}\n" for i in range(1, 3001))
    # Byte for byte the same messages (each socket's subscription has the id "1")...
    assert subscribers[0].texts == subscribers[1].texts == subscribers[2].texts
    # ...from one execution of each event, not one per subscriber.
    assert sharing.SHARED.executed - executed == 1 + len(events[0])  # ready, then the rest


async def test_a_subscriber_that_stops_reading_stalls_no_other(settings: Settings, tmp_path: Any) -> None:
    # A small shared buffer, so that the stalled subscriber falls behind it and goes on alone.
    async with running_server(replace(settings, fanout_buffer_bytes=256 * 1024)) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            size = 24 * MiB  # past the socket buffers of the stalled subscriber and the output cap
            writer = GATED.format(f"head -c {size} /dev/zero | tr '\\0' x")
            process = await start(api, capsule_id, "sh", "-c", writer, tag="bulk", stdin=True)
            async with (
                raw_subscriber(server, key, capsule_id, "bulk", max_queue=1, max_size=None) as stalled,
                raw_subscriber(server, key, capsule_id, "bulk", max_size=None) as reader,
                asyncio.timeout(90),
            ):
                assert (await stalled.next_event())["data"] == "ready\n"
                assert (await reader.next_event())["data"] == "ready\n"
                (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
                # The stalled one reads nothing while the other gets everything, to the exit.
                read = await reader.until_exited()
                assert read[-1]["exitCode"] == 0
                assert total_bytes(read) == size
                # Then it reads on: from its own stream, with a gap where the log no longer held its bytes.
                rest = await stalled.until_exited()
                assert rest[-1]["exitCode"] == 0
                assert total_bytes(rest) == size
        finally:
            await api.aclose()


async def test_other_variables_are_executed_apart(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    # fromSeq differs: each subscriber's events are executed for its own variables.
    process = await start(api, capsule_id, "sh", "-c", GATED.format("seq 1 10"), tag="apart", stdin=True)
    executed = sharing.SHARED.executed
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        first = await stack.enter_async_context(raw_subscriber(server, key, capsule_id, "apart"))
        ready = await first.next_event()
        assert ready["data"] == "ready\n"
        other = await stack.enter_async_context(raw_subscriber(server, key, capsule_id, "apart", from_seq=1))
        (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
        events = [ready, *await first.until_exited()]
        later = await other.until_exited()
    assert later == [e for e in events if e["seq"] >= 1]
    assert sharing.SHARED.executed - executed == len(events) + len(later)
