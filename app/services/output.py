"""A process's output: replay from a seq, then follow live, OutputGap where events were evicted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from app import domain
from app.domain import CapsuleInfo, OutputEvent, ProcessInfo
from app.errors import InvalidRequest, NotFound
from app.hosts.pool import HostPool
from app.services.capsules import CapsuleService
from app.services.fanout import OutputFanout, ProcessKey
from app.services.processes import ProcessService

# Seqs are 64-bit on the agent's wire; no log ever comes near it.
MAX_SEQ = 2**63 - 1


class OutputService:
    """Output use case for one team; built per request."""

    def __init__(
        self, *, pool: HostPool, fanout: OutputFanout, capsules: CapsuleService, processes: ProcessService
    ) -> None:
        self._pool, self._fanout, self._capsules, self._processes = pool, fanout, capsules, processes

    async def follow(self, capsule_id: str, selector: str, from_seq: int) -> AsyncIterator[OutputEvent]:
        """Replays retained output from from_seq, follows live output, ends after the exit event."""
        if not 0 <= from_seq <= MAX_SEQ:
            raise InvalidRequest(
                "fromSeq is out of range: pass 0 for all retained output, or the last seq seen plus one"
            )
        domain.parse_selector(selector)
        # Viewers subscribing at once (after a restart, thousands) share one lookup: the answer is
        # never older than the subscribe, so a destroyed capsule is refused as promptly as ever.
        capsule, process = await self._fanout.lookups.run(
            (self._capsules.team.id, capsule_id, selector), lambda: self._find(capsule_id, selector)
        )
        key = ProcessKey(host_id=capsule.host_id, capsule_id=capsule_id, pid=process.pid, tag=process.tag)
        # A viewer that follows output keeps the capsule from being stopped as idle.
        async with (
            self._fanout.holding(capsule.id, lambda: self._capsules.in_use(capsule)),
            aclosing(self._fanout.follow(key, from_seq)) as events,
        ):
            async for event in events:
                yield event

    async def _find(self, capsule_id: str, selector: str) -> tuple[CapsuleInfo, ProcessInfo]:
        """The team's running capsule and its live process, or why not."""
        capsule = await self._capsules.require_running(capsule_id)
        try:
            process = await self._pool.client(capsule.host_id).get_process(capsule_id, selector)
        except NotFound:
            ended = await self._processes.get(capsule_id, selector)
            if ended is None or ended.ended_at is None:
                raise
            raise NotFound(
                f"process {selector} exited at {ended.ended_at.isoformat()} and its output is no longer "
                "retained; query process(...) for how it ended"
            ) from None
        return capsule, process
