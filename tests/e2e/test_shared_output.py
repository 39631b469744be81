"""Subscribers of one process share each event's execution and encoding, and still go at their own pace."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from app.api import sharing
from app.config import Settings
from tests.e2e.client import HttpClient
from tests.e2e.conftest import Server
from tests.e2e.output_sockets import GATED, MiB, all_output, bulk_output, subscribed
from tests.e2e.test_processes import start


async def test_subscribers_with_one_document_get_the_same_messages_from_one_execution(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    process = await start(api, capsule_id, "sh", "-c", GATED.format("seq 1 3000"), tag="shared", stdin=True)
    executed = sharing.SHARED.executed
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        subscribers = [
            await stack.enter_async_context(subscribed(server, key, capsule_id, "shared")) for _ in range(3)
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
    size = 24 * MiB  # past the socket buffers of the stalled subscriber and the output cap
    async with bulk_output(settings, size) as bulk:
        await bulk.release()
        # The stalled one reads nothing while the other gets everything, to the exit.
        await all_output(bulk.reader, size)
        # Then it reads on: from its own stream, with a gap where the log no longer held its bytes.
        await all_output(bulk.stalled, size)


async def test_other_variables_are_executed_apart(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    # fromSeq differs: each subscriber's events are executed for its own variables.
    process = await start(api, capsule_id, "sh", "-c", GATED.format("seq 1 10"), tag="apart", stdin=True)
    executed = sharing.SHARED.executed
    async with AsyncExitStack() as stack, asyncio.timeout(30):
        first = await stack.enter_async_context(subscribed(server, key, capsule_id, "apart"))
        ready = await first.next_event()
        assert ready["data"] == "ready\n"
        other = await stack.enter_async_context(subscribed(server, key, capsule_id, "apart", from_seq=1))
        (await api.run("CloseInput", capsuleId=capsule_id, selector=process["tag"])).ok()
        events = [ready, *await first.until_exited()]
        later = await other.until_exited()
    assert later == [e for e in events if e["seq"] >= 1]
    assert sharing.SHARED.executed - executed == len(events) + len(later)
