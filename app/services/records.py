"""Process records across teams: the server's own bookkeeping of starts and exits."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace

from app import domain
from app.bus.broadcast import Bus
from app.bus.events import capsule_events_channel, process_event_to_json
from app.domain import ProcessEventKind, ProcessInfo, ProcessStatus, utcnow
from app.errors import CapsuleError
from app.store import models
from app.store.repositories import ProcessRecordRepository, SystemRepository
from app.store.session import Database

log = logging.getLogger(__name__)

MAX_EARLY_EXITS = 1000


def record_to_info(record: models.ProcessRecord) -> ProcessInfo:
    """A stored record as the same value the agent reports."""
    return ProcessInfo(
        capsule_id=record.capsule_id,
        pid=record.pid,
        tag=record.tag,
        cmd=record.cmd,
        args=tuple(record.args),
        cwd=record.cwd or "",
        status=record.status,
        started_at=record.started_at,
        exit_code=record.exit_code,
        signal=signal.Signals[record.signal] if record.signal else None,
        timed_out=record.timed_out,
        ended_at=record.ended_at,
    )


class ProcessRecords:
    """Writes each start and exit to the store once and publishes it on the bus."""

    def __init__(self, *, db: Database, bus: Bus) -> None:
        self._db, self._bus = db, bus
        # Exits that arrived before their start was recorded, by (capsule, pid, tag). The lock makes
        # "insert the start, then apply a waiting exit" and "find no record, park the exit" exclusive.
        self._early_exits: OrderedDict[tuple[str, int, str], ProcessInfo] = OrderedDict()
        self._lock = asyncio.Lock()

    async def record_start(self, team_id: int, info: ProcessInfo) -> None:
        """Stores a record of a process that has just started and announces it."""
        record = models.ProcessRecord(
            team_id=team_id,
            capsule_id=info.capsule_id,
            pid=info.pid,
            tag=info.tag,
            cmd=info.cmd,
            args=list(info.args),
            cwd=info.cwd or None,
            status=ProcessStatus.RUNNING,
            started_at=info.started_at,
        )
        async with self._lock:
            async with self._db.transaction() as session:
                await ProcessRecordRepository(session, team_id).add(record)
            early = self._early_exits.pop((info.capsule_id, info.pid, info.tag), None)
        await self._publish(ProcessEventKind.STARTED, info)
        if early is not None or info.status is ProcessStatus.EXITED:  # it ended before it was recorded
            await self.record_exit(early or info)

    async def record_exit(self, info: ProcessInfo) -> bool:
        """Marks the process EXITED once across every replica; True for the call that did."""
        async with self._lock, self._db.transaction() as session:
            system = SystemRepository(session)
            record = await system.record_exit(
                capsule_id=info.capsule_id,
                pid=info.pid,
                tag=info.tag,
                exit_code=info.exit_code,
                signal=domain.signal_name(info.signal),
                timed_out=info.timed_out,
                ended_at=info.ended_at or utcnow(),
            )
            if record is None and not await system.has_record(info.capsule_id, info.pid, info.tag):
                self._park(info)
        if record is None:
            return False
        log.info("capsule %s process %s (%s) exited", info.capsule_id, info.pid, info.tag)
        await self._publish(ProcessEventKind.EXITED, record_to_info(record))
        return True

    def _park(self, info: ProcessInfo) -> None:
        self._early_exits[(info.capsule_id, info.pid, info.tag)] = info
        while len(self._early_exits) > MAX_EARLY_EXITS:  # starts that failed to record never claim theirs
            self._early_exits.popitem(last=False)

    async def reconcile(self, capsule_id: str, live: Iterable[ProcessInfo]) -> None:
        """Ends the records of processes the agent reports exited or no longer knows."""
        by_key = {(p.pid, p.tag): p for p in live}
        async with self._db.session() as session:
            running = await SystemRepository(session).running_records(capsule_id)
        for record in running:
            info = by_key.get((record.pid, record.tag))
            if info is None:
                info = _lost(record_to_info(record))
            if info.status is ProcessStatus.EXITED:
                await self.record_exit(info)

    async def end_all(self, capsule_id: str) -> None:
        """Ends the records of every process of a capsule that was destroyed or lost."""
        await self.reconcile(capsule_id, ())

    async def _publish(self, kind: ProcessEventKind, info: ProcessInfo) -> None:
        event = domain.ProcessEvent(kind=kind, process=info)
        try:
            await self._bus.publish(capsule_events_channel(info.capsule_id), process_event_to_json(event))
        except CapsuleError:
            # The record is written; subscribers of this event miss it, and say so by their own error.
            log.warning("capsule %s: could not publish %s of %s", info.capsule_id, kind.value, info.tag)


def _lost(info: ProcessInfo) -> ProcessInfo:
    """A process the agent no longer knows: it was killed with its capsule or its agent."""
    return replace(info, status=ProcessStatus.EXITED, signal=signal.SIGKILL, ended_at=utcnow())
