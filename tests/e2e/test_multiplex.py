"""Multiplexed processOutput: sockets with one document, variables and team share one pump; a slow
socket goes on alone with its gap while the others keep up; one unsubscribing leaves the rest."""

from __future__ import annotations

import asyncio
import itertools
import json
from contextlib import AsyncExitStack

from app.api import multiplex
from app.config import Settings
from tests.e2e.client import HttpClient
from tests.e2e.conftest import Server
from tests.e2e.output_sockets import GATED, MiB, all_output, bulk_output, subscribed
from tests.e2e.test_processes import start


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
    size = 96 * MiB  # far past the stalled socket's buffers (the kernel's too) and the output cap
    async with bulk_output(settings, size) as bulk:
        [group] = groups_of(bulk.capsule_id)
        assert group.members == 2
        await bulk.release()
        # The reader gets to the exit while the stalled one has read nothing since "ready".
        await all_output(bulk.reader, size)
        rest = await all_output(bulk.stalled, size)
        gaps = [e for e in rest if e["__typename"] == "OutputGap"]
        assert gaps and gaps[0]["lostBytes"] > 0
        # No duplicate: seqs rise (a merged chunk has its last part's); a gap's seq is the first
        # event it kept, which the next event holds.
        for before, after in itertools.pairwise(rest):
            assert after["seq"] >= before["seq"] + (before["__typename"] != "OutputGap")
