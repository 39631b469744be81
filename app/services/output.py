"""A process's output: replay from a seq, then follow live, OutputGap where events were evicted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from app import domain
from app.domain import OutputEvent
from app.errors import InvalidRequest
from app.hosts.pool import HostPool
from app.services.capsules import CapsuleService
from app.services.fanout import OutputFanout, ProcessKey


class OutputService:
    """Output use case for one team; built per request."""

    def __init__(self, *, pool: HostPool, fanout: OutputFanout, capsules: CapsuleService) -> None:
        self._pool, self._fanout, self._capsules = pool, fanout, capsules

    async def follow(self, capsule_id: str, selector: str, from_seq: int) -> AsyncIterator[OutputEvent]:
        """Replays retained output from from_seq, follows live output, ends after the exit event."""
        if from_seq < 0:
            raise InvalidRequest("fromSeq is negative: pass 0 for all retained output, or last seq + 1")
        domain.parse_selector(selector)
        capsule = await self._capsules.require_running(capsule_id)
        process = await self._pool.client(capsule.host_id).get_process(capsule_id, selector)
        key = ProcessKey(host_id=capsule.host_id, capsule_id=capsule_id, pid=process.pid, tag=process.tag)
        async with aclosing(self._fanout.follow(key, from_seq)) as events:
            async for event in events:
                yield event
