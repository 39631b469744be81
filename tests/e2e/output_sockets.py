"""processOutput on WebSockets of its own, as the shared-output and multiplex tests subscribe to it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import websockets

from app.config import Settings
from tests.e2e.client import HttpClient, document
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start

OUTPUT = document("ProcessOutput")
MiB = 1024 * 1024
# Prints a line, waits for its stdin to close, then writes: every subscriber is live before the rest.
GATED = "echo ready; cat >/dev/null; {}"
KIND = {"graphql-transport-ws": ("subscribe", "next", "complete"), "graphql-ws": ("start", "data", "stop")}


class Socket:
    """One WebSocket with one processOutput subscription, over either protocol; keeps each text."""

    def __init__(self, socket: Any, protocol: str, operation_id: str) -> None:
        self.socket, self.protocol, self.id = socket, protocol, operation_id
        self.texts: list[str] = []

    async def message(self) -> dict[str, Any]:
        while True:
            text = await self.socket.recv()
            message = json.loads(text)
            if message["type"] != "ka":
                self.texts.append(text)
                return dict(message)

    async def next_event(self) -> dict[str, Any]:
        message = await self.message()
        assert message["type"] == KIND[self.protocol][1], message
        assert message["id"] == self.id
        return dict(message["payload"]["data"]["processOutput"])

    async def until_exited(self) -> list[dict[str, Any]]:
        events = [await self.next_event()]
        while events[-1]["__typename"] != "ProcessExited":
            events.append(await self.next_event())
        return events

    async def unsubscribe(self) -> None:
        await self.socket.send(json.dumps({"id": self.id, "type": KIND[self.protocol][2]}))


@asynccontextmanager
async def subscribed(
    server: Server,
    key: str,
    capsule_id: str,
    selector: str,
    *,
    from_seq: int = 0,
    protocol: str = "graphql-transport-ws",
    operation_id: str = "1",
    **connect: Any,
) -> AsyncIterator[Socket]:
    async with websockets.connect(server.ws_url, subprotocols=[protocol], **connect) as socket:  # type: ignore[list-item]
        await socket.send(
            json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}})
        )
        assert json.loads(await socket.recv())["type"] == "connection_ack"
        variables = {"capsuleId": capsule_id, "selector": selector, "fromSeq": from_seq}
        payload = {"query": OUTPUT, "variables": variables}
        await socket.send(json.dumps({"id": operation_id, "type": KIND[protocol][0], "payload": payload}))
        yield Socket(socket, protocol, operation_id)


def total_bytes(events: list[dict[str, Any]]) -> int:
    """The output bytes events account for: the data received and the data lost in gaps."""
    return sum(
        len(e["data"]) if e["__typename"] == "OutputChunk" else int(e["lostBytes"])
        for e in events
        if e["__typename"] in ("OutputChunk", "OutputGap")
    )


async def all_output(socket: Socket, size: int) -> list[dict[str, Any]]:
    """The socket's events to ProcessExited, which must end a run that exited 0 and account for
    all of its size bytes."""
    events = await socket.until_exited()
    assert events[-1]["exitCode"] == 0
    assert total_bytes(events) == size
    return events


@dataclass(frozen=True)
class Bulk:
    """A process that writes its bytes once its stdin is closed, and two sockets on its output."""

    api: HttpClient
    capsule_id: str
    tag: str
    stalled: Socket
    reader: Socket

    async def release(self) -> None:
        """Closes the process's stdin: it writes its bytes now."""
        (await self.api.run("CloseInput", capsuleId=self.capsule_id, selector=self.tag)).ok()


@asynccontextmanager
async def bulk_output(settings: Settings, size: int) -> AsyncIterator[Bulk]:
    """A server of settings with a small (256 KiB) fan-out buffer, so that a socket that stops reading
    falls behind it (and the agent's log too); on it a process that writes size bytes once released,
    and two sockets on its output that have read its "ready": stalled, which reads nothing until
    asked (a queue of one message), and reader. The block has 90 s."""
    async with running_server(replace(settings, fanout_buffer_bytes=256 * 1024)) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            writer = GATED.format(f"head -c {size} /dev/zero | tr '\\0' x")
            process = await start(api, capsule_id, "sh", "-c", writer, tag="bulk", stdin=True)
            async with (
                subscribed(server, key, capsule_id, "bulk", max_queue=1, max_size=None) as stalled,
                subscribed(server, key, capsule_id, "bulk", max_size=None) as reader,
                asyncio.timeout(90),
            ):
                assert (await stalled.next_event())["data"] == "ready\n"
                assert (await reader.next_event())["data"] == "ready\n"
                yield Bulk(api, capsule_id, process["tag"], stalled, reader)
        finally:
            await api.aclose()
