"""Multiplexed processOutput: sockets with one document, variables and team share one pump; a slow
socket goes on alone with its gap while the others keep up; one unsubscribing leaves the rest."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import websockets

from app.api import multiplex
from app.config import Settings
from tests.e2e.client import HttpClient, document
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start
from tests.e2e.test_shared_output import GATED, total_bytes

OUTPUT = document("ProcessOutput")
MiB = 1024 * 1024
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


def groups_of(capsule_id: str) -> list[multiplex.Group]:
    return [g for key, g in multiplex.GROUPS.items() if capsule_id in json.dumps(key, default=str)]


async def test_sockets_with_one_document_share_one_execution_over_both_protocols(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    process = await start(api, capsule_id, "sh", "-c", GATED.format("seq 1 2000"), tag="mux", stdin=True)
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        sockets = [
            await stack.enter_async_context(
                subscribed(server, key, capsule_id, "mux", protocol=protocol, operation_id=oid)
            )
            for protocol, oid in [
                ("graphql-transport-ws", "1"),
                ("graphql-transport-ws", "1"),
                ("graphql-transport-ws", "other"),
                ("graphql-ws", "1"),
            ]
        ]
        for socket in sockets:
            assert (await socket.next_event())["data"] == "ready\n"
        [group] = groups_of(capsule_id)
        assert group.members == len(sockets)
        (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
        events = [await socket.until_exited() for socket in sockets]
        # Each gets a complete after the exit event, in its protocol.
        for socket in sockets:
            assert (await socket.message()) == {"id": socket.id, "type": "complete"}
    assert all(e == events[0] for e in events)
    assert "".join(e.get("data", "") for e in events[0]) == "".join(f"{i}\n" for i in range(1, 2001))
    # One execution and one encoding of each event for all four; the same text where the id is the same.
    assert group.executions == 1 + len(events[0])
    assert sockets[0].texts == sockets[1].texts
    assert [t.replace('"other"', '"1"') for t in sockets[2].texts] == sockets[0].texts
    assert not groups_of(capsule_id)


async def test_other_variables_and_other_teams_never_share(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    process = await start(api, capsule_id, "sh", "-c", GATED.format("seq 1 5"), tag="apart", stdin=True)
    other_key = await server.new_key("team-b")
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        first = await stack.enter_async_context(subscribed(server, key, capsule_id, "apart"))
        assert (await first.next_event())["data"] == "ready\n"
        later = await stack.enter_async_context(subscribed(server, key, capsule_id, "apart", from_seq=1))
        # Another team with the very same document and variables: its own operation, refused.
        stranger = await stack.enter_async_context(subscribed(server, other_key, capsule_id, "apart"))
        refused = await stranger.message()
        assert refused["payload"]["errors"][0]["extensions"]["code"] == "NOT_FOUND", refused
        assert (await stranger.message())["type"] == "complete"
        assert len(groups_of(capsule_id)) == 2  # fromSeq 0 and fromSeq 1; nothing for team-b
        (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
        events = await first.until_exited()
        rest = await later.until_exited()
    assert rest == [e for e in events if e["seq"] >= 1]


async def test_a_late_subscriber_with_the_same_variables_replays_then_follows_without_hole_or_duplicate(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    process = await start(
        api, capsule_id, "sh", "-c", "echo one; echo two; cat >/dev/null; seq 1 100", stdin=True
    )
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        first = await stack.enter_async_context(subscribed(server, key, capsule_id, process["tag"]))
        seen = [await first.next_event()]
        while "".join(e["data"] for e in seen) != "one\ntwo\n":
            seen.append(await first.next_event())
        late = await stack.enter_async_context(subscribed(server, key, capsule_id, process["tag"]))
        got = [await late.next_event() for _ in seen]
        assert got == seen
        [group] = groups_of(capsule_id)
        assert group.members == 2
        (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
        events = seen + await first.until_exited()
        late_events = got + await late.until_exited()
    assert late_events == events
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))


async def test_one_unsubscribing_leaves_the_rest(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    process = await start(api, capsule_id, "sh", "-c", GATED.format("seq 1 50"), tag="leave", stdin=True)
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        leaving = await stack.enter_async_context(subscribed(server, key, capsule_id, "leave"))
        legacy = await stack.enter_async_context(
            subscribed(server, key, capsule_id, "leave", protocol="graphql-ws")
        )
        staying = await stack.enter_async_context(subscribed(server, key, capsule_id, "leave"))
        for socket in (leaving, legacy, staying):
            assert (await socket.next_event())["data"] == "ready\n"
        [group] = groups_of(capsule_id)
        await leaving.unsubscribe()
        await legacy.unsubscribe()
        assert (await legacy.message()) == {"type": "complete", "id": "1"}  # graphql-ws confirms a stop
        async with asyncio.timeout(5):
            while group.members != 1:
                await asyncio.sleep(0.01)
        (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
        events = await staying.until_exited()
    assert "".join(e.get("data", "") for e in events) == "".join(f"{i}\n" for i in range(1, 51))


async def test_a_slow_socket_goes_on_alone_with_its_gap_while_a_fast_one_keeps_up(
    settings: Settings,
) -> None:
    # A small log, so that the stalled socket falls behind its group (and the agent's log too).
    async with running_server(replace(settings, fanout_buffer_bytes=256 * 1024)) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            size = 96 * MiB  # far past the stalled socket's buffers (the kernel's too) and the output cap
            writer = GATED.format(f"head -c {size} /dev/zero | tr '\\0' x")
            process = await start(api, capsule_id, "sh", "-c", writer, tag="bulk", stdin=True)
            async with (
                subscribed(server, key, capsule_id, "bulk", max_queue=1, max_size=None) as stalled,
                subscribed(server, key, capsule_id, "bulk", max_size=None) as reader,
                asyncio.timeout(90),
            ):
                assert (await stalled.next_event())["data"] == "ready\n"
                assert (await reader.next_event())["data"] == "ready\n"
                [group] = groups_of(capsule_id)
                assert group.members == 2
                (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
                # The reader gets to the exit while the stalled one has read nothing since "ready".
                read = await reader.until_exited()
                assert read[-1]["exitCode"] == 0
                assert total_bytes(read) == size
                rest = await stalled.until_exited()
                assert rest[-1]["exitCode"] == 0
                assert total_bytes(rest) == size
                gaps = [e for e in rest if e["__typename"] == "OutputGap"]
                assert gaps and gaps[0]["lostBytes"] > 0
                # No duplicate: seqs rise (a merged chunk has its last part's); a gap's seq is the first
                # event it kept, which the next event holds.
                for before, after in itertools.pairwise(rest):
                    assert after["seq"] >= before["seq"] + (before["__typename"] != "OutputGap")
        finally:
            await api.aclose()
