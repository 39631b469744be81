"""A process's output: replay from a seq, then follow live, OutputGap where events were evicted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing

from app import domain
from app.domain import OutputChunk, OutputEvent
from app.errors import InvalidRequest
from app.hosts.pool import HostPool
from app.services.capsules import CapsuleService

# Merged chunks stay below this so one GraphQL message never grows without bound.
MAX_MERGED_BYTES = 1024 * 1024


def merge_chunks(events: Iterable[OutputEvent]) -> list[OutputEvent]:
    """Joins neighbouring chunks of one stream; a merged chunk carries the seq of its last part."""
    merged: list[OutputEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if (
            isinstance(event, OutputChunk)
            and isinstance(last, OutputChunk)
            and last.stream is event.stream
            and len(last.data) + len(event.data) <= MAX_MERGED_BYTES
        ):
            merged[-1] = OutputChunk(seq=event.seq, stream=event.stream, data=last.data + event.data)
        else:
            merged.append(event)
    return merged


class OutputService:
    """Output use case for one team; built per request."""

    def __init__(self, *, pool: HostPool, capsules: CapsuleService) -> None:
        self._pool, self._capsules = pool, capsules

    async def follow(self, capsule_id: str, selector: str, from_seq: int) -> AsyncIterator[OutputEvent]:
        """Replays retained output from from_seq, follows live output, ends after the exit event."""
        if from_seq < 0:
            raise InvalidRequest("fromSeq is negative: pass 0 for all retained output, or last seq + 1")
        domain.parse_selector(selector)
        capsule = await self._capsules.require_running(capsule_id)
        stream = self._pool.client(capsule.host_id).stream_output(capsule_id, selector, from_seq)
        async with aclosing(stream):
            async for batch in stream:
                for event in merge_chunks(batch):
                    yield event
                    if isinstance(event, domain.ProcessExit):
                        return
