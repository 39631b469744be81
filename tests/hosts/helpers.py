"""Small waits and collectors shared by the host client tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app import domain
from app.hosts.client import HostClient

DEADLINE = 10.0


def sh(script: str, *, tag: str | None = None, stdin: bool = False) -> domain.ProcessSpec:
    """A background `sh -c script`."""
    return domain.ProcessSpec(cmd="sh", args=("-c", script), tag=tag, stdin=stdin)


async def collect_output(
    client: HostClient, capsule_id: str, selector: str, from_seq: int = 0
) -> list[domain.OutputEvent]:
    """Every output event from from_seq through the exit event."""
    events: list[domain.OutputEvent] = []
    async with asyncio.timeout(DEADLINE):
        async for batch in client.stream_output(capsule_id, selector, from_seq):
            events.extend(batch)
    return events


def stdout_of(events: list[domain.OutputEvent]) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, domain.OutputChunk) and e.stream is domain.Stream.STDOUT
    )


async def next_batch(stream: AsyncIterator[list[domain.OutputEvent]]) -> list[domain.OutputEvent]:
    async with asyncio.timeout(DEADLINE):
        return await anext(stream)
